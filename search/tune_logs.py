"""Tune's log messages that flatbasin says better itself, or says once: dropped, or cut to one line."""

from __future__ import annotations

import logging
import re


class OwnMessages(logging.Filter):
    """Drop Tune's messages that flatbasin says better itself: its `Tuner.restore(...)` hint (our
    summary prints the `flatbasin search ... --resume` command), its list of unfinished trials, and
    its list of trials without results (cut short before their first epoch: the summary counts them)."""

    DROPPED = ("Resume experiment with", "Trials did not complete", "Failed to fetch metrics for")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(dropped in text for dropped in self.DROPPED)


class TrialFailures(logging.Filter):
    """Tune logs a failed trial with the worker's whole traceback; the user gets one line (the
    exception), and the traceback stays in the trial's error.txt, which the summary names."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith("Trial task failed for trial") or not record.exc_info:
            return True
        error = record.exc_info[1]
        cause = (
            getattr(error, "cause", None) or error
        )  # a RayTaskError wraps the worker's exception
        first = next((line for line in str(cause).splitlines() if line.strip()), "")
        line = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(cause).__name__}: {first}").strip()
        record.msg, record.args, record.exc_info, record.exc_text = (
            f"{text}: {line if len(line) <= 300 else line[:299] + '…'}", (), None, None,
        )  # fmt: skip
        return True


class SavingFailures(logging.Filter):
    """While a disk is full, Tune logs every failed save of its state and every failed sync with a
    whole traceback, every few seconds: one line, once; the search's paragraph says the rest."""

    said = False  # per process: one search at a time

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        if SavingFailures.said:
            return False
        SavingFailures.said = True
        error = record.exc_info[1] if record.exc_info else None
        lines = [line.strip() for line in str(error or record.getMessage()).splitlines()]
        last = next((line for line in reversed(lines) if line), "")
        record.msg, record.args, record.exc_info, record.exc_text = (
            f"Tune could not save its state to its storage: {last[:300]}", (), None, None,
        )  # fmt: skip
        return True


def filter_tune_logs() -> None:
    """Put the filters on Tune's loggers, once per process."""
    for logger, own in (
        ("ray.tune.tune", OwnMessages),
        ("ray.tune.analysis.experiment_analysis", OwnMessages),
        ("ray.tune.execution.tune_controller", TrialFailures),
        ("ray.tune.execution.experiment_state", SavingFailures),
        ("ray.train._internal.syncer", SavingFailures),
    ):
        log = logging.getLogger(logger)
        if not any(isinstance(f, own) for f in log.filters):
            log.addFilter(own())
