"""The libraries' chatter a user has no use for, silenced where it starts.

Each line of it printed on every run: MLflow's tqdm bar for each artifact it downloads (the report's
space file, reproduce's trial_config.json, a --from checkpoint), Ray's "Token authentication is
enabled" warning and its "Started a local Ray instance" and "Wrote the latest version of all result
files" lines, Tune's "The `process_trial_save` operation took 0.571 s" on a busy machine, and
Optuna's "already reported" warning for the epoch a trial resumed from its checkpoint reports again
(Optuna keeps the first value, which is the same). What a user needs is in flatbasin's own lines;
Ray's session logs (under RAY_TMPDIR) keep Ray's own record.
"""

from __future__ import annotations

import logging
import os
import warnings

# The level ray.init gives Ray's driver-side loggers: their INFO lines (a local Ray started, Tune's
# result files written) stay off the console; their warnings and errors reach it.
RAY_LOGGING_LEVEL = logging.WARNING


def quiet_libraries() -> None:
    """For every command and every API call that reads or writes MLflow or runs Optuna. A user's
    own setting of each environment variable wins."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings(
        "ignore", message="The reported value is ignored because this", category=UserWarning
    )


class _Dropped(logging.Filter):
    """Drops one logger's records that hold one of `texts`; the rest pass."""

    def __init__(self, *texts: str) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


# logger -> what its messages that stay off the console hold. Ray's notice, on every
# new local cluster, that it turned token authentication on (its default, which flatbasin keeps:
# preflight.check_local_ray checks ~/.ray can hold the token; a token missing or refused is still
# said); Tune's note that one of its own operations took over half a second (every few trials on a
# busy machine; the summary's Time: line says what the search cost).
DROPPED = {
    "ray._private.authentication.authentication_token_setup": (
        "Token authentication is enabled for this Ray",
    ),
    # "The `process_trial_save` operation took 0.571 s, which may be a performance bottleneck."
    "ray.tune.utils.util": ("which may be a performance bottleneck",),
}


def quiet_ray() -> None:
    """Before `ray.init`. Ray's RAY_AUTH_MODE cannot be set in the process instead: Ray has read
    its configuration by then, and a local cluster started so refused its own driver."""
    for name, texts in DROPPED.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _Dropped) for f in log.filters):
            log.addFilter(_Dropped(*texts))
