"""Starting Ray for a search: a new local Ray on this machine, or joining a cluster with the user's
folder (their model and data modules) carried to every worker."""

from __future__ import annotations

import json
import os
from typing import Any

from flatbasin.search.quiet import RAY_LOGGING_LEVEL, quiet_ray
from flatbasin.search.signals import install, spared_children

# What a user's folder never needs to send to a cluster with its modules: flatbasin's own outputs.
CODE_EXCLUDES = ["runs/", "mlruns/", "reports/", "*.db", "*.pt", "__pycache__/", ".git/"]


def code_runtime_env(code_dir: str | None) -> dict[str, Any] | None:
    """The job runtime env that carries the user's folder (their model and data modules) to every
    worker of a cluster: Ray's working_dir, which it puts first on each worker's PYTHONPATH. None
    when there is no user code, or when this driver is itself a job that brought the folder (flatbasin
    submit): Ray refuses a second working_dir there."""
    if code_dir is None:
        return None
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job and (json.loads(job).get("runtime_env") or {}).get("working_dir"):
        return None
    return {"working_dir": code_dir, "excludes": CODE_EXCLUDES}


def init_ray(address: str | None, code_dir: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    quiet_ray()  # Ray's notice that it turned token authentication on (search/quiet.py)
    # Tune snapshots its state at every other checkpoint of a trial (KEEP_CHECKPOINTS); that is intended.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Our own progress line replaces Tune's tables; its JSON and CSV result files stay (see run_search).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # A trial stopped on a full disk (StopOnPermanentError) raises after Tune stopped waiting for it;
    # Ray would print that error again, traceback and all: the search's paragraph names it.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    os.environ.setdefault(
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true"
    )  # our summary names the runs
    if address:
        os.environ["RAY_ADDRESS"] = address  # Ray lets $RAY_ADDRESS override the argument: agree
        ray.init(
            address=address, log_to_driver=False, runtime_env=code_runtime_env(code_dir),
            logging_level=RAY_LOGGING_LEVEL,
        )  # fmt: skip
    else:
        # A new Ray on this machine, always: never one that $RAY_ADDRESS or Ray's current-cluster
        # file names (a stale file made a search hang for minutes). Loopback: local_ray_on_loopback.
        os.environ.pop("RAY_ADDRESS", None)
        # No job runtime_env (an earlier worker set-up hook that imported torch was one): Ray only
        # hands a prestarted worker to an actor whose runtime_env is empty, so with one every trial
        # actor was a new process and the warmed workers sat idle (checked by their pids).
        with spared_children():
            ray.init(
                address="local", include_dashboard=False, log_to_driver=False,
                logging_level=RAY_LOGGING_LEVEL,
            )  # fmt: skip
    install()  # ray.init's own SIGTERM handler aborts the driver (exit 134, nothing saved)
