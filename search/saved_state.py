"""What Tune saved of a search, read the way its restore reads it, before --resume or sync trusts it.

Tune restores from tuner.pkl, the newest experiment_state-*.json and its search algorithm's newest
state. One of them cut short, emptied, replaced or deleted makes Tune log a traceback and quietly
start the experiment over, beside the runs already recorded. Here that is found before Ray starts and
refused in one paragraph that names the file; nothing is changed.
"""

from __future__ import annotations

import glob
import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flatbasin.search.errors import UsageError

TUNER = "tuner.pkl"
EXPERIMENT_STATE = "experiment_state-*.json"
SEARCHER_STATE = ("search_gen_state-*.json", "searcher-state-*.pkl")  # a search algorithm's
VARIANTS_STATE = ("basic-variant-state-*.json",)  # grid search (the confirmation runs)


@dataclass(frozen=True)
class SavedState:
    kind: Literal["none", "saved", "damaged"]
    file: Path | None = None  # the file that cannot be restored from, when damaged
    problem: str = ""  # what is wrong with it


def saved(folder: Path) -> bool:
    """Whether Tune saved this search well enough for --resume to continue it."""
    return inspect(folder).kind == "saved"


def inspect(folder: Path) -> SavedState:
    """'none': nothing of a search was ever saved here (no folder, or a search stopped before Tune
    saved anything); 'saved': every file Tune restores from reads as Tune reads it; else 'damaged',
    with the first file that does not."""
    if not folder.is_dir():
        return SavedState("none")
    tuner, states = folder / TUNER, sorted(folder.glob(EXPERIMENT_STATE))
    trials = [p for p in folder.iterdir() if p.is_dir() and (p / "params.json").exists()]
    if not tuner.exists() and not states and not trials:
        return SavedState("none")
    if not tuner.exists():
        return SavedState("damaged", tuner, "is missing")
    if not states:
        if not trials:
            return SavedState("none")  # stopped before Tune's first save: no trial started
        return SavedState(
            "damaged", folder / "experiment_state-*.json", "is missing (no such file)"
        )
    try:
        config = _read_tuner(tuner)
    except Exception as err:  # whatever unpickling raises means the same here
        return SavedState("damaged", tuner, _unreadable(err))
    state = states[-1]  # Tune restores from the newest (by name: the session's timestamp)
    try:
        _read_experiment_state(state)
    except Exception as err:
        return SavedState("damaged", state, _unreadable(err))
    # A search algorithm (Optuna) restored without its state would suggest every trial again;
    # a grid search's state is optional to Tune (it saves none for a lazy grid).
    searcher = config.search_alg is not None
    for pattern in SEARCHER_STATE if searcher else VARIANTS_STATE:
        found = sorted(glob.glob(str(folder / pattern)))
        if not found and searcher:
            return SavedState("damaged", folder / pattern, "is missing (no such file)")
        if not found:
            continue
        try:
            _read_pickled_state(Path(found[-1]))
        except Exception as err:
            return SavedState("damaged", Path(found[-1]), _unreadable(err))
    return SavedState("saved")


def complete_copy(folder: Path) -> tuple[Path, Path] | None:
    """(copy, damaged file) when Tune's state in `folder` is damaged and the driver's own copy of
    that file reads well. Tune writes its state in a staging folder of the driver's Ray session
    (under $RAY_TMPDIR or /tmp) and copies it to the storage; a disk that fills up during the copy
    leaves a file cut short there, and the whole one in the staging folder. Found by its name, which
    holds the session's timestamp."""
    found = inspect(folder)
    if found.kind != "damaged" or found.file is None or "*" in found.file.name:
        return None
    roots = {Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray", Path("/tmp/ray")}
    for root in sorted(roots):
        pattern = f"session_*/artifacts/*/{folder.name}/driver_artifacts/{found.file.name}"
        for copy in sorted(root.glob(pattern), reverse=True):
            try:
                READERS[found.file.name.partition("-")[0]](copy)
            except Exception:  # not whole either
                continue
            return copy.resolve(), found.file  # not through session_latest, which moves on
    return None


def check(
    folder: Path, mlflow_run: str | None = None, *, command: Literal["search", "sync"] = "search"
) -> bool:
    """True when the search at `folder` can be resumed, False when nothing was saved there; a
    damaged state raises UsageError, naming the file and what can be done."""
    found = inspect(folder)
    if found.kind != "damaged":
        return found.kind == "saved"
    kept = (
        f"MLflow's run {mlflow_run} and the folder {folder} are as they were"
        if mlflow_run
        else f"the folder {folder} is as it was"
    )
    if command == "sync":
        consequence, otherwise = "so its trials cannot be read back", ""
    else:
        consequence = (
            "Tune would start the search over beside the trials already recorded, so it is not "
            "resumed"
        )
        otherwise = (
            "; otherwise start a new search with --name NEW_NAME (flatbasin report still shows "
            "what this one recorded)"
        )
    remedy = (
        "If a good copy of that file exists (a backup, the shared storage), put it back and run "
        f"this command again{otherwise}"
    )
    if (copied := complete_copy(folder)) is not None:
        remedy = (
            f"A whole copy, which Tune wrote before copying it there, is {copied[0]}: copy it "
            f"back (cp {shlex.quote(str(copied[0]))} {shlex.quote(str(copied[1]))}) and run this "
            "command again"
        )
    raise UsageError(
        f"Tune's saved state of the search '{folder.name}' cannot be restored: {found.file} "
        f"{found.problem}. {consequence[0].upper()}{consequence[1:]}, and nothing was changed "
        f"({kept}). {remedy}"
    )


def _unreadable(err: BaseException) -> str:
    """How a file failed to read, in a few words: cut short, not Tune's, unreadable."""
    if isinstance(err, OSError):
        return f"cannot be read ({err.strerror or err})"
    if isinstance(err, EOFError) or "truncated" in str(err).lower():
        return "is cut short"
    if isinstance(err, ValueError) and type(err).__name__ == "JSONDecodeError":
        return f"is cut short or not Tune's ({err})"
    first = next((line for line in str(err).splitlines() if line.strip()), "")
    return f"is damaged or not Tune's ({type(err).__name__}: {first[:200]})"


def _read_tuner(path: Path) -> Any:
    """tuner.pkl as Tuner.restore unpickles it; returns its TuneConfig."""
    import ray.cloudpickle as pickle

    state = pickle.loads(path.read_bytes())
    if not isinstance(state, dict) or "_tune_config" not in state:
        raise ValueError("it holds no Tuner state")
    return state["_tune_config"]


def _read_experiment_state(path: Path) -> None:
    """The experiment state as TuneController.resume reads it, every trial rebuilt from it."""
    from ray.tune.experiment.trial import Trial
    from ray.tune.utils.serialization import _loads_with_cloudpickle

    state = _loads_with_cloudpickle(path.read_bytes())
    if not isinstance(state, dict) or not {"runner_data", "trial_data"} <= state.keys():
        raise ValueError("it holds no experiment state")
    for trial_state, run_metadata in state["trial_data"]:
        trial = Trial.from_json_state(trial_state, stub=True)
        trial.restore_run_metadata(run_metadata)


def _read_pickled_state(path: Path) -> None:
    """A search algorithm's state: a pickle, whatever its name says (Tune's _atomic_save)."""
    import ray.cloudpickle as pickle

    state = pickle.loads(path.read_bytes())
    if not isinstance(state, (dict, tuple)):
        raise ValueError("it holds no search state")


READERS = {  # by the part of the file name before its first '-'
    "tuner.pkl": _read_tuner,
    "experiment_state": _read_experiment_state,
    "search_gen_state": _read_pickled_state,
    "searcher": _read_pickled_state,
    "basic": _read_pickled_state,
}
