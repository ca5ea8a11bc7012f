"""Tune callbacks on the driver: the MLflow writer (with a retry queue) and the live progress line."""

from __future__ import annotations

import threading
import time
from typing import Any

from ray.tune import Callback
from rich.console import Console

from flatbasin.search.tracking import EPOCH_METRICS, Tracker, TrialRecord

# What a trial's result carries into MLflow; Tune's own bookkeeping stays behind.
KEPT = {*EPOCH_METRICS, "epoch", "step", "rung_epoch", "diverged", "final", "test_acc", "curve", "extra_curves",
        "trial_config", "data_fingerprint", "plan", "threads", "seconds_total"}  # fmt: skip


class MlflowWriter(Callback):
    """Turns Tune events into MLflow runs through the Tracker, from one background thread.

    Tune runs callbacks inside its control loop and a trial's `tune.report` waits for that loop, so
    writing here directly would stall every trial for every MLflow round trip. Events only update the
    records and wake the writer thread; it brings each touched trial's run up to date. When the server
    is away the records keep everything and the thread retries; `drain` waits for the end state.
    """

    retry_s = 2.0

    def __init__(self, tracker: Tracker, console: Console):
        self.tracker = tracker
        self.console = console
        self.records: dict[str, TrialRecord] = {}
        self.unwritten: set[str] = set()
        self._lock = threading.Lock()  # guards records and unwritten
        self._wake = threading.Condition(self._lock)
        self._busy = False
        self._closed = False
        self._warned = False
        self._thread: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with its state
        return {"tracker": self.tracker}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracker"], Console(highlight=False, soft_wrap=True))  # type: ignore[misc]

    # ---------------------------------------------------------------- Tune events (control loop)
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._touch(trial)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._touch(trial, result=result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._touch(trial, status="FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._touch(trial, status="FAILED")

    def add(self, record: TrialRecord) -> None:
        """A record built elsewhere (read back from Tune's result files)."""
        with self._lock:
            self.records[record.trial_id] = record
            self.unwritten.add(record.trial_id)

    def _touch(self, trial: Any, result: dict | None = None, status: str | None = None) -> None:
        with self._lock:
            record = self.records.setdefault(
                trial.trial_id, TrialRecord(trial.trial_id, dict(trial.config))
            )
            if result is not None:
                record.results.append({k: v for k, v in result.items() if k in KEPT})
            if status is not None:
                record.status = status
            self.unwritten.add(trial.trial_id)
            self._start()
            self._wake.notify()

    # ---------------------------------------------------------------- the writer thread
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flatbasin-mlflow", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self.unwritten and not self._closed:
                    self._wake.wait()
                if self._closed and not self.unwritten:
                    return
                self._busy = True
            failed = not self._write_pending()
            with self._lock:
                self._busy = False
                self._wake.notify_all()
                if failed and not self._closed:
                    self._wake.wait(self.retry_s)  # the server is away: retry after a pause
                elif failed:
                    return

    def _write_pending(self) -> bool:
        """Write every unwritten trial once; False at the first failure (the rest stay queued)."""
        with self._lock:
            pending = [
                TrialRecord(r.trial_id, r.config, list(r.results), r.status)
                for r in (self.records[t] for t in sorted(self.unwritten))
            ]
            self.unwritten.difference_update(r.trial_id for r in pending)
        for i, record in enumerate(pending):
            try:
                self.tracker.write(record)
            except Exception as err:  # any failure of the store: keep the records, retry later
                with self._lock:
                    self.unwritten.update(r.trial_id for r in pending[i:])
                if not self._warned:
                    self.console.print(
                        f"[yellow]MLflow unavailable ({type(err).__name__}); results are kept and written when it is back[/]"
                    )
                    self._warned = True
                return False
        if self._warned:
            self.console.print("[green]MLflow is back; results written[/]")
            self._warned = False
        return True

    def drain(self, attempts: int = 2) -> bool:
        """Stop the thread after it has written what it can; True when MLflow holds everything."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for _ in range(attempts):  # the last tries, in this thread
            if not self.unwritten or self._write_pending():
                break
        return not self.unwritten


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
        if result.get("final"):
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
