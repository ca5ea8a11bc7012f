"""What a trial's run recorded and what training it again needs back: its trial_config.json, the
callables handed to flatbasin.search (pickled with its search's run), and the converged model it
continued (reproduce, soup)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from flatbasin.search.errors import UsageError
from flatbasin.search.tags import CHECKPOINT_ARTIFACT
from flatbasin.trainables import usercode
from flatbasin.trainables.checkpoint import CheckpointError
from flatbasin.trainables.config import TrialConfig
from flatbasin.trainables.start import Weights, read_converged


def fetch_record(client: MlflowClient, run_id: str) -> dict[str, Any]:
    try:
        client.get_run(run_id)
    except Exception as err:
        raise UsageError(f"run {run_id} not found at the tracking URI: {err}") from err
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "trial_config.json", tmp)
        except Exception as err:
            raise UsageError(
                f"run {run_id} has no trial_config.json (is it a finished trial run?): {err}"
            ) from err
        return json.loads(Path(path).read_text())


def load_passed(client: MlflowClient, run_id: str, config: TrialConfig) -> list[str]:
    """The callables handed to flatbasin.search that this trial ran (`callable:NAME`): their
    pickled copies, from its search's run (code/NAME.pkl), registered under their names. Returns a
    line on each, for the console."""
    lines = []
    for name, record in config.passed.items():
        what = "model" if name == config.model else "dataset"
        stem = name.partition(":")[2]
        parent = client.get_run(run_id).data.tags.get(MLFLOW_PARENT_RUN_ID)
        where = f"code/{stem}.pkl of the search's run {parent}"
        shown = (
            "; its source is in the run's trial_config.json (config.passed)"
            if record.source
            else ""
        )
        try:
            if parent is None:
                raise MlflowException("the run has no search run above it")
            with tempfile.TemporaryDirectory(prefix="flatbasin-code-") as folder:
                blob = Path(
                    client.download_artifacts(parent, f"code/{stem}.pkl", folder)
                ).read_bytes()
            usercode.install({name: blob})
        except (MlflowException, OSError, usercode.UserCodeError) as err:
            raise UsageError(
                f"run {run_id} trained {what} {name}, a Python callable handed to flatbasin.search "
                f"from a notebook or script, which cannot be imported by name; its pickled copy "
                f"({where}) cannot be loaded here: {str(err).strip().splitlines()[0]}{shown}"
            ) from None
        same = hashlib.sha256(blob).hexdigest() == record.sha256
        lines.append(
            f"{what} {name}: the pickled copy recorded with the search ({where})"
            + (
                ""
                if same
                else "; it differs from the copy this trial ran (sha256), so the numbers may too"
            )
        )
    return lines


def converged_weights(client: MlflowClient, config: TrialConfig) -> Weights | None:
    """The converged model a post-convergence trial continued: the checkpoint.pt of the run that
    kept it (its base run, or the run it was started from), else the file it was read from. The
    loop checks their SHA-256 against the one the trial recorded."""
    start = config.start
    if start is None:
        return None
    try:
        if start.run_id is not None:
            with tempfile.TemporaryDirectory(prefix="flatbasin-from-") as folder:
                path = client.download_artifacts(start.run_id, CHECKPOINT_ARTIFACT, folder)
                return read_converged(Path(path)).weights
        if start.path is not None:
            return read_converged(Path(start.path)).weights
    except (CheckpointError, MlflowException) as err:
        raise UsageError(
            f"this trial continued the converged model {start.source}, which cannot be read "
            f"now: {err}"
        ) from err
    raise UsageError(f"this trial continued {start.source}, but no run or file holds it")
