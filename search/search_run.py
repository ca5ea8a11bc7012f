"""A search's own runs: the search run (found again by its storage key on --resume, ended with its
state), the base run a post-convergence search continues, and the trial runs a killed driver lost."""

from __future__ import annotations

import functools
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

import flatbasin
from flatbasin.search.store import Store, TrackingUnavailable, first_line
from flatbasin.search.tags import (
    BASE_SOURCE,
    CHECKPOINT_ARTIFACT,
    EPOCH_METRICS,
    LOST,
    ROLE,
    SEARCH_KEY,
    SPACE_DIGEST,
    STATE,
    STOPPED,
    TRIAL_ID,
    VARIANT,
)
from flatbasin.search.tracking_uri import sqlite_file
from flatbasin.trainables.config import TrialConfig
from flatbasin.trainables.start import write_converged


@functools.cache
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def base_tags() -> dict[str, str]:
    tags = {"flatbasin.version": flatbasin.__version__}
    commit = git_commit()
    if commit:
        tags["flatbasin.git_commit"] = commit
    return tags


def log_weights(client: MlflowClient, run_id: str, checkpoint: Path) -> None:
    """A run's final weights as checkpoint.pt: the weights and the config that trained them, which
    is what --from RUN_ID continues; the optimiser and averager state only a resume needs stay
    out."""
    with tempfile.TemporaryDirectory(prefix="flatbasin-ckpt-") as folder:
        slim = Path(folder) / CHECKPOINT_ARTIFACT
        write_converged(checkpoint, slim)
        client.log_artifact(run_id, str(slim))


def quoted(value: str) -> str:
    """A value inside a single-quoted MLflow filter string."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


class SearchRun(Store):
    """The search's run and its base run, in the search's experiment."""

    def __init__(self, uri: str, experiment: str, search_key: str):
        super().__init__(uri, experiment, search_key)
        self._parent: str | None = None

    def find_parent(self) -> str | None:
        """The run of an earlier search with this storage key, if there is one; creates nothing."""
        found = self._search_run("=")
        return found.info.run_id if found else None

    def other_search(self) -> str | None:
        """The Tune folder of another search recorded under this experiment name (another
        --storage), if there is one: a second search there would mix two searches in one experiment."""
        found = self._search_run("!=")
        return found.data.tags.get(SEARCH_KEY) if found else None

    def _search_run(self, key_is: str) -> Run | None:
        """A search's run in this experiment whose storage key is (`=`) or is not (`!=`) ours;
        creates nothing (not even a SQLite file that is yet to exist)."""
        sqlite = sqlite_file(self.uri)
        if sqlite is not None and not sqlite.exists():
            return None  # asking would make the database
        found_experiment = self.client.get_experiment_by_name(self.experiment)
        if found_experiment is None:
            return None
        found = self.client.search_runs(
            [found_experiment.experiment_id],
            filter_string=f"tags.`{ROLE}` = 'search' and tags.`{SEARCH_KEY}` {key_is} '{quoted(self.search_key)}'",
            max_results=1,
        )
        return found[0] if found else None

    def parent(
        self,
        params: dict[str, Any] | None = None,
        space_file: Path | None = None,
        space_digest: str = "",
    ) -> str:
        """The search's run: found again by its storage key when a search is restored. A store that
        fails here (it answered the check, then went down or refused to write) is TrackingUnavailable."""
        try:
            return self._open_parent(params, space_file, space_digest)
        except (MlflowException, OSError) as err:
            raise TrackingUnavailable(
                f"MLflow tracking store {self.shown} failed when the search's run was made: "
                f"{first_line(err)}"
            ) from err

    def _open_parent(
        self, params: dict[str, Any] | None, space_file: Path | None, space_digest: str
    ) -> str:
        if self._parent is None:
            found = self.find_parent()
            if found:
                self._parent = found
                self.client.update_run(found, status="RUNNING")  # resumed: running again
                self.client.set_tag(found, STATE, "running")
            else:
                run = self.client.create_run(
                    self.experiment_id,
                    run_name=self.experiment,
                    tags={
                        ROLE: "search",
                        SEARCH_KEY: self.search_key,
                        STATE: "running",
                        **({SPACE_DIGEST: space_digest} if space_digest else {}),
                        **base_tags(),
                    },
                )
                self._parent = run.info.run_id
                if params:
                    self.client.log_batch(
                        self._parent, params=[Param(k, str(v)) for k, v in params.items()]
                    )
                if space_file is not None:
                    self.client.log_artifact(self._parent, str(space_file))
        return self._parent

    def recorded_space(self, run_id: str, file_name: str) -> tuple[str | None, Any]:
        """(digest, content as read) of the space file a search started with; (None, None) for a
        search recorded before digests were, and content None when the file was not logged."""
        import mlflow.artifacts
        import yaml

        from flatbasin.spaces.loader import read_yaml

        digest = self.client.get_run(run_id).data.tags.get(SPACE_DIGEST)
        if digest is None:
            return None, None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=file_name, dst_path=tmp, tracking_uri=self.uri
                )
                return digest, read_yaml(Path(local).read_text(encoding="utf-8"))
            except (MlflowException, OSError, ValueError, yaml.YAMLError):
                return digest, None

    def trial_variants(self) -> list[str]:
        """The variant of every search trial under the parent (confirmations not counted)."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent()}' and tags.`{ROLE}` = 'trial'",
            max_results=50_000,
        )
        return [r.data.tags.get(VARIANT, "?") for r in runs]

    def discard_parent(self) -> bool:
        """Delete the search's run if no trial was recorded under it; True when it was deleted."""
        if self._parent is None:
            return True
        children = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self._parent}'",
            max_results=1,
        )
        if children:
            return False
        self.client.delete_run(self._parent)
        self._parent = None
        return True

    def end_parent(self, state: str) -> None:
        """Mark the search's run: 'finished', 'failed' (a trial failed) or 'interrupted' (resumable)."""
        if self._parent is None:
            return
        status = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}[state]
        self.client.set_tag(self._parent, STATE, state)
        self.client.set_terminated(self._parent, status)

    def base_run(self) -> str | None:
        """The search's base run (post-convergence), found again on --resume; creates nothing."""
        parent = self._parent or self.find_parent()
        if parent is None:
            return None
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}' and tags.`{ROLE}` = 'base'",
            max_results=1,
        )
        return found[0].info.run_id if found else None

    def record_base(self, checkpoint: Path, source: str, result: dict[str, Any] | None) -> str:
        """The search's base run, under its run: the converged model every trial continues, as
        checkpoint.pt. When the search trained it (`result`, a TrialResult's JSON), also its epochs
        and a trial_config.json that `flatbasin reproduce` reads as it reads a trial's."""
        tags = {MLFLOW_PARENT_RUN_ID: self.parent(), ROLE: "base", TRIAL_ID: "base",
                BASE_SOURCE: source, **base_tags()}  # fmt: skip
        if result is not None:
            tags |= {VARIANT: result["config"]["variant"],
                     "flatbasin.dataset": result["config"]["dataset"],
                     "flatbasin.data_fingerprint": result["data_fingerprint"],
                     "flatbasin.model": result["model"], "flatbasin.diverged": "false"}  # fmt: skip
        run_id = self.client.create_run(self.experiment_id, run_name="base", tags=tags).info.run_id
        if result is not None:
            config = TrialConfig.model_validate(result["config"])
            params = [Param(k, str(v)) for k, v in sorted(config.flat().items())]
            for start in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[start : start + 100])
            now = int(time.time() * 1000)
            history = result["history"]
            metrics = [Metric(k, float(m[k]), now, int(m["epoch"]))
                       for m in history for k in EPOCH_METRICS if m.get(k) is not None]  # fmt: skip
            metrics += [Metric("test_acc", float(result["test_acc"]), now, 0),
                        Metric("final_score", float(result["score"]), now, 0)]  # fmt: skip
            for p in result["curve"]:
                metrics += [Metric("curve/val_acc", p["val_acc"], now, p["count"]),
                            Metric("curve/test_acc", p["test_acc"], now, p["count"])]  # fmt: skip
            for begin in range(0, len(metrics), 1000):
                self.client.log_batch(run_id, metrics=metrics[begin : begin + 1000])
            self.client.log_dict(run_id, {
                "config": result["config"], "seed": result["config"]["seed"],
                "threads": result["threads"], "data_fingerprint": result["data_fingerprint"],
                "flatbasin_version": flatbasin.__version__, "git_commit": git_commit(),
                "trial_id": "base",
                "recorded": {"score": result["score"], "test_acc": result["test_acc"],
                             "diverged": result["diverged"], "curve": result["curve"],
                             "history": [{k: m[k] for k in ("epoch", *EPOCH_METRICS)}
                                         for m in history]},
            }, "trial_config.json")  # fmt: skip
        self.log_checkpoint(run_id, checkpoint)
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def log_checkpoint(self, run_id: str, checkpoint: Path) -> None:
        log_weights(self.client, run_id, checkpoint)

    def discard_base(self) -> None:
        """Delete the search's base run: a search stopped before Tune saved anything leaves no run
        behind, and a base run alone would keep the search's run, so its name, taken."""
        if self._parent is None:
            return
        base = self.base_run()
        if base is not None:
            self.client.delete_run(base)

    def settle_lost(self, known: set[str], role: str = "trial") -> int:
        """End the runs of trials that Tune does not know. A driver killed outright (SIGKILL, the
        OOM killer) after a trial's run was made but before Tune saved that trial leaves a run that
        would say RUNNING forever and count as a trial, while --resume runs the slot again as a new
        trial. Such a run is ended KILLED and its role becomes 'lost', so that no count, summary or
        report takes it for a trial; what it logged stays. Returns how many there were."""
        if self._parent is None:
            return 0
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self._parent}' and "
            f"tags.`{ROLE}` = '{role}' and attributes.status = 'RUNNING'",
            max_results=50_000,
        )
        lost = [run for run in runs if run.data.tags.get(TRIAL_ID) not in known]
        for run in lost:
            tags = [RunTag(ROLE, "lost"), RunTag(STOPPED, LOST)]
            self.client.log_batch(run.info.run_id, tags=tags)
            self.client.set_terminated(run.info.run_id, "KILLED")
        return len(lost)
