"""The libraries' chatter a user has no use for, silenced where it starts.

Each line of it printed on every run: MLflow's tqdm bar for each artifact it downloads (the report's
space file, reproduce's trial_config.json, a --from checkpoint), Ray's "Token authentication is
enabled" warning and its "Started a local Ray instance" and "Wrote the latest version of all result
files" lines, and Optuna's "already reported" warning for the epoch a trial resumed from its
checkpoint reports again (Optuna keeps the first value, which is the same). What a user needs is in
flatbasin's own lines; Ray's session logs (under RAY_TMPDIR) keep Ray's own record.
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


class _TokenNotice(logging.Filter):
    """Ray's notice, on every new local cluster, that it turned token authentication on (its
    default, which flatbasin keeps: preflight.check_local_ray checks ~/.ray can hold the token).
    Its other warnings, a token missing or refused among them, pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray")


def quiet_ray() -> None:
    """Before `ray.init`. Ray's RAY_AUTH_MODE cannot be set in the process instead: Ray has read
    its configuration by then, and a local cluster started so refused its own driver."""
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _TokenNotice) for f in log.filters):
        log.addFilter(_TokenNotice())
