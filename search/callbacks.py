"""Tune callbacks on the driver: the MLflow writer (with a retry queue) and the live progress line."""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback
from rich.console import Console

from search.tracking import EPOCH_METRICS, Tracker, TrialRecord

# What a trial's result carries into MLflow; Tune's own bookkeeping stays behind.
KEPT = {*EPOCH_METRICS, "epoch", "step", "rung_epoch", "diverged", "done", "test_acc", "curve", "extra_curves",
        "trial_config", "data_fingerprint", "plan", "threads", "seconds_total"}  # fmt: skip


class MlflowWriter(Callback):
    """Turns Tune events into MLflow runs through the Tracker. When the server is away, writes wait in
    the records and go out at the next event or at the end; nothing is dropped."""

    def __init__(self, tracker: Tracker, console: Console):
        self.tracker = tracker
        self.console = console
        self.records: dict[str, TrialRecord] = {}
        self.unwritten: set[str] = set()
        self._warned = False

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with its state
        return {"tracker": self.tracker}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracker"], Console(highlight=False, soft_wrap=True))  # type: ignore[misc]

    def record(self, trial: Any) -> TrialRecord:
        if trial.trial_id not in self.records:
            self.records[trial.trial_id] = TrialRecord(trial.trial_id, dict(trial.config))
        return self.records[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.record(trial)
        self._flush(trial.trial_id)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self.record(trial).results.append({k: v for k, v in result.items() if k in KEPT})
        self._flush(trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.record(trial).status = "FINISHED"
        self._flush(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.record(trial).status = "FAILED"
        self._flush(trial.trial_id)

    def flush_all(self) -> bool:
        """Try every unwritten trial once more; True when MLflow holds everything."""
        for trial_id in list(self.unwritten):
            self._write(trial_id)
        return not self.unwritten

    def _flush(self, trial_id: str) -> None:
        self.unwritten.add(trial_id)
        for pending in list(self.unwritten):
            if not self._write(pending):
                return  # the server is away: keep the rest queued, retry at the next event

    def _write(self, trial_id: str) -> bool:
        try:
            self.tracker.write(self.records[trial_id])
        except Exception as err:  # any failure of the store: keep the record, retry later
            if not self._warned:
                self.console.print(
                    f"[yellow]MLflow unavailable ({type(err).__name__}); results are kept and written when it is back[/]"
                )
                self._warned = True
            return False
        self.unwritten.discard(trial_id)
        if self._warned and not self.unwritten:
            self.console.print("[green]MLflow is back; all results written[/]")
            self._warned = False
        return True


class Progress(Callback):
    """One concise line per finished trial and every `every_s` seconds: done / running / failed /
    diverged, best score so far, elapsed and estimated time left."""

    def __init__(self, total: int, console: Console, every_s: float = 15.0):
        self.total, self.console, self.every_s = total, console, every_s
        self.started = time.monotonic()
        self.last_print = 0.0
        self.done = self.failed = self.diverged = 0
        self.ended: set[str] = set()
        self.best: tuple[float, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"total": self.total, "every_s": self.every_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["total"], Console(highlight=False, soft_wrap=True), state["every_s"])  # type: ignore[misc]

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if result.get("done"):
            self.diverged += bool(result.get("diverged"))
            if not result.get("diverged") and (self.best is None or result["score"] > self.best[0]):
                self.best = (result["score"], trial.config["variant"])
        if time.monotonic() - self.last_print > self.every_s:
            self._line(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        self.ended.add(trial.trial_id)
        self._line(trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.failed += 1
        self.ended.add(trial.trial_id)
        self._line(trials)

    def _line(self, trials: list) -> None:
        self.last_print = time.monotonic()
        elapsed = self.last_print - self.started
        running = sum(t.status == "RUNNING" and t.trial_id not in self.ended for t in trials)
        finished = self.done + self.failed
        eta = (
            f"~{_clock(elapsed / finished * (self.total - finished))} left"
            if finished
            else "estimating"
        )
        best = f"best {self.best[0]:.4f} ({self.best[1]})" if self.best else "best -"
        self.console.print(
            f"[{_clock(elapsed)}] {self.done}/{self.total} done · {running} running · {self.failed} failed · "
            f"{self.diverged} diverged · {best} · {eta}"
        )


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m:02d}:{s:02d}"
