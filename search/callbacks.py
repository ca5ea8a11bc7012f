"""Tune callbacks on the driver: the MLflow writer (with a retry queue), the live progress line, and the
stopper that ends a search at the first permanent trial error."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune import Callback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.utils.util import SafeFallbackEncoder
from rich.console import Console

from flatbasin.search.errors import plain_console
from flatbasin.search.tags import EPOCH_METRICS
from flatbasin.search.tracking import Tracker, TrialRecord
from flatbasin.search.tracking_uri import sqlite_file
from flatbasin.trainables.config import sampled
from flatbasin.trainables.files import disk_problem, disk_state

# What a trial's result carries into MLflow; Tune's own bookkeeping stays behind.
KEPT = {*EPOCH_METRICS, "epoch", "step", "rung_epoch", "diverged", "final", "test_acc", "curve", "extra_curves",
        "trial_config", "data_fingerprint", "plan", "threads", "seconds_total", "permanent_error", "model_built",
        "diversity", "phase", "seconds_to_best", "runtime", "chance", "code", "val_size"}  # fmt: skip

# What Tune adds to every result: each epoch's row of a report carries them (epoch_rows).
TUNE_FIELDS = (*AUTO_RESULT_KEYS, "trial_id")

# The callbacks of the search running in this process. Tune pickles its callbacks with the experiment
# state and a restored Tuner unpickles them: through this table a restored search gets this process's
# live objects back (the ones the driver reads after `fit`), not detached copies.
_LIVE: dict[str, Any] = {}


def make_live(*callbacks: Any) -> None:
    _LIVE.clear()
    _LIVE.update({type(c).__name__: c for c in callbacks})


def _revive(
    cls: type[MlflowWriter] | type[Progress] | type[StopOnPermanentError], state: dict[str, Any]
) -> Any:
    live = _LIVE.get(cls.__name__)
    return live if live is not None else cls.from_state(state)


def epoch_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per epoch of a trial's report, oldest first: the trial sends short epochs several to
    a report (trainables/ray_entry.EpochReporter), the newest as the result, the earlier ones under
    `epochs`. Each earlier one gets the report's own fields from Tune (trial id, node, time)."""
    earlier = result.get("epochs")
    if not earlier:
        return [result]
    tune_fields = {k: result[k] for k in TUNE_FIELDS if k in result}
    newest = {k: v for k, v in result.items() if k != "epochs"}
    return [*({**tune_fields, **row, "done": False} for row in earlier), newest]


class JsonRows(JsonLoggerCallback):
    """Tune's result.json, one line per epoch however many epochs a report carried: what `flatbasin
    sync`, a restored search and anyone reading the file expect.

    A report's lines go in whole or not at all: on a full disk the file is cut back to where it
    was, so that no line is left half written for a resumed search to take as the trial's last."""

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if trial not in self._trial_files:
            self.log_trial_start(trial)
        handle = self._trial_files[trial]
        text = "".join(json.dumps(r, cls=SafeFallbackEncoder) + "\n" for r in epoch_rows(result))
        handle.flush()  # empty: every line goes through here, straight to the file
        fd = handle.fileno()
        start = os.lseek(fd, 0, os.SEEK_END)
        data = memoryview(text.encode())
        try:
            while data:
                data = data[os.write(fd, data) :]  # appended: the file is open for appending
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise


class CsvRows(CSVLoggerCallback):
    """Tune's progress.csv, one line per epoch (see JsonRows)."""

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        for row in epoch_rows(result):
            super().log_trial_result(iteration, trial, row)


def mend_results(experiment_path: Path) -> None:
    """Cut a half-written last line off each trial's result.json and progress.csv before a search
    is resumed: Tune copies its files to the storage now and then, and a copy that a full disk cut
    short left a line that the resumed search would append after, a broken row in the middle."""
    for path in [*experiment_path.glob("*/result.json"), *experiment_path.glob("*/progress.csv")]:
        try:
            data = path.read_bytes()
            if not data or data.endswith(b"\n"):
                continue
            with path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
        except OSError:
            continue  # not ours to fail on: Tune reports what it cannot read


def append_rows(trial_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Rows that a trial's result.json lacks though Tune's state holds them (its copy on a full disk
    was cut short), appended as Tune writes them; left out where the file cannot take them."""
    if not rows or not (trial_dir / "result.json").is_file():
        return
    with contextlib.suppress(OSError), (trial_dir / "result.json").open("a") as handle:
        handle.write("".join(json.dumps(r, cls=SafeFallbackEncoder) + "\n" for r in rows))


def read_results(trial_dir: Path) -> list[dict[str, Any]]:
    """Every result Tune wrote for a trial (its result.json), in order; [] when there is none yet."""
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the last line of a file whose writer was killed mid-line
    return rows


class MlflowWriter(Callback):
    """Turns Tune events into MLflow runs through the Tracker, from one background thread.

    Tune runs callbacks inside its control loop and a trial's `tune.report` waits for that loop, so
    writing here directly would stall every trial for every MLflow round trip. Events only update the
    records and wake the writer thread; it brings each touched trial's run up to date, at most once
    every `flush_s`: a trial reports every epoch, often several times a second, and one MLflow write
    (a transaction, on SQLite a synced commit) per report cost the driver more CPU than all of Tune's
    own work, on the cores the trials train on. When the server is away the records keep everything
    and the thread retries; `drain` waits for the end state.
    """

    retry_s = 2.0
    flush_s = 2.0

    def __init__(self, tracker: Tracker, console: Console):
        self.tracker = tracker
        self.console = console
        self.records: dict[str, TrialRecord] = {}
        self.unwritten: set[str] = set()
        self._lock = threading.Lock()  # guards records and unwritten
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._warned = False
        self._thread: threading.Thread | None = None
        # The last failure of the store, in words, and its kind when waiting does not cure it ('full',
        # 'read-only', 'deleted': see store_failure): then the search ends in a failure.
        self.failure: str | None = None
        self.lasting = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return _revive, (MlflowWriter, {"tracker": self.tracker})

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MlflowWriter:
        return cls(state["tracker"], plain_console())

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
        """A record read back from Tune's result files: it replaces what the events told us."""
        with self._lock:
            self.records[record.trial_id] = record
            self.unwritten.add(record.trial_id)

    def _touch(self, trial: Any, result: dict | None = None, status: str | None = None) -> None:
        with self._lock:
            record = self.records.get(trial.trial_id)
            if record is None:
                # A restored trial: what it reported before the interruption is in its result file.
                record = TrialRecord(trial.trial_id, sampled(dict(trial.config)))
                for row in read_results(Path(trial.local_path or trial.path or ".")):
                    record.add({k: v for k, v in row.items() if k in KEPT})
                self.records[trial.trial_id] = record
            for row in epoch_rows(result) if result is not None else []:
                record.add({k: v for k, v in row.items() if k in KEPT})
            if status is not None:
                record.status = status
            self.unwritten.add(trial.trial_id)
            self._start()
            self._wake.notify()

    # ---------------------------------------------------------------- the writer thread
    def _start(self) -> None:
        if self._thread is None:
            self._closed = False
            self._thread = threading.Thread(target=self._run, name="flatbasin-mlflow", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        last = -math.inf
        while True:
            with self._lock:
                while not self.unwritten and not self._closed:
                    self._wake.wait()
                if self._closed and not self.unwritten:
                    return
                # Gather what arrives until flush_s after the last write: one write per trial then
                # carries all of its new epochs. `drain` (closed) writes at once.
                while not self._closed and (left := last + self.flush_s - time.monotonic()) > 0:
                    self._wake.wait(left)
            last = time.monotonic()
            failed = not self._write_pending()
            with self._lock:
                if failed and not self._closed:
                    self._wake.wait(self.retry_s)  # the server is away: retry after a pause
                elif failed:
                    return

    def _write_pending(self) -> bool:
        """Write every unwritten trial once; False at the first failure (the rest stay queued)."""
        with self._lock:
            pending = [self.records[t].copy() for t in sorted(self.unwritten)]
            self.unwritten.difference_update(r.trial_id for r in pending)
        for i, record in enumerate(pending):
            try:
                # A trial already whole in MLflow needs no write, and never counts as unwritten.
                if not self.tracker.is_written(record):
                    self.tracker.write(record)
            except Exception as err:  # any failure of the store: keep the records, retry later
                left = [r.trial_id for r in pending[i:] if not self.tracker.is_written(r)]
                with self._lock:
                    self.unwritten.update(left)
                self.failure, self.lasting = store_failure(self.tracker.uri, err)
                if not self._warned:
                    self.console.print(
                        f"{self.failure}; results are kept and written when it can be",
                        style="yellow",
                    )
                    self._warned = True
                return False
        if self._warned:
            self.console.print("MLflow is back; results written", style="green")
            self._warned = False
        self.failure, self.lasting = None, ""
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


def store_failure(uri: str, err: BaseException) -> tuple[str, str]:
    """Why a write to the tracking store failed, in words, and what lasts until someone acts: 'full'
    or 'read-only' (its disk), 'deleted' (a SQLite file removed under the search: SQLite then makes
    an empty one, without MLflow's tables), else '' (a server that is down or busy comes back)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    said = next((line for line in lines if line.startswith("(sqlite3.")), lines[0] if lines else "")
    path = sqlite_file(uri)
    if path is not None:
        if "no such table" in str(err) or not path.is_file() or path.stat().st_size == 0:
            return (
                f"MLflow's store {path} was deleted while the search ran ({said[:200]})",
                "deleted",
            )
        problem = disk_state(path) or disk_problem(err)
        if problem is not None:
            kind = "read-only" if "read-only" in problem else "full"
            return f"MLflow's store {path} cannot be written: its disk is {problem}", kind
        return f"MLflow's store {path} failed ({type(err).__name__}: {said[:200]})", ""
    problem = disk_problem(err)
    if problem is not None:  # a server's database on a full disk says so in its answer
        kind = "read-only" if "read-only" in problem else "full"
        return f"MLflow's server {uri} cannot write: its disk is {problem}", kind
    return f"MLflow unavailable ({type(err).__name__})", ""


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
        self.began: dict[str, float] = {}  # trial id -> when it started (this driver's clock)
        self.durations: list[float] = []  # of the trials that ended while this driver watched
        # Whether the trials that ended before this driver started (a resume) are counted yet.
        self.caught_up = False

    def __reduce__(self) -> tuple[Any, ...]:
        return _revive, (Progress, {"total": self.total, "every_s": self.every_s})

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        return cls(state["total"], plain_console(), state["every_s"])

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self.caught_up:  # a resumed search: count what ended before this driver started
            self.caught_up = True
            for trial in trials:
                if trial.status in ("TERMINATED", "ERROR"):
                    self._count_earlier(trial)

    def _count_earlier(self, trial: Any) -> None:
        last = trial.last_result or {}
        self.ended.add(trial.trial_id)
        if trial.status == "ERROR" or last.get("permanent_error"):
            self.failed += 1
            return
        self.done += 1
        self.diverged += bool(last.get("diverged"))
        better = self.best is None or last.get("score", -math.inf) > self.best[0]
        if last.get("final") and not last.get("diverged") and better:
            self.best = (last["score"], sampled(trial.config)["variant"])

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.began.setdefault(trial.trial_id, time.monotonic())

    def _end(self, trial: Any) -> None:
        self.ended.add(trial.trial_id)
        if trial.trial_id in self.began:
            self.durations.append(time.monotonic() - self.began[trial.trial_id])

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if result.get("permanent_error") and trial.trial_id not in self.ended:
            self.failed += 1  # the trial returns normally after reporting it: not a finished one
            self._end(trial)
        if result.get("final"):
            self.diverged += bool(result.get("diverged"))
            if not result.get("diverged") and (self.best is None or result["score"] > self.best[0]):
                self.best = (result["score"], sampled(trial.config)["variant"])
        if time.monotonic() - self.last_print > self.every_s:
            self._line(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id not in self.ended:
            self.done += 1
            self._end(trial)
        self._line(trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id not in self.ended:
            self.failed += 1
            self._end(trial)
        self._line(trials)

    def _line(self, trials: list) -> None:
        self.last_print = time.monotonic()
        elapsed = self.last_print - self.started
        # With reused actors the next trial waits as PENDING for a moment between two others: it holds
        # its slot all the same, so it counts as running.
        running = sum(
            t.status in ("RUNNING", "PENDING") and t.trial_id not in self.ended for t in trials
        )
        finished = self.done + self.failed
        eta = "estimating"
        if self.durations:
            # From how long a trial takes, not from the elapsed time (which holds Ray's start-up):
            # the trials still to start, in waves as wide as the running ones, plus half a trial
            # for those running now.
            per = sum(self.durations) / len(self.durations)
            waiting = max(self.total - finished - running, 0)
            left = waiting * per / max(running, 1) + (per / 2 if running else 0.0)
            eta = f"~{_clock(left)} left"
        best = f"best {self.best[0]:.4f} ({self.best[1]})" if self.best else "best -"
        self.console.print(
            f"[{_clock(elapsed)}] {self.done}/{self.total} done · {running} running · {self.failed} failed · "
            f"{self.diverged} diverged · {best} · {eta}"
        )


class StopOnPermanentError(tune.Stopper):
    """A trial that reports a permanent error (its data or model cannot work) ends the search: every
    other trial would hit the same wall, and retrying it would only repeat the error.

    A trial that reports a full or read-only disk stops the search too, but the way Ctrl-C does (Tune
    saves its state, and its SIGUSR1 handler is the same as its SIGINT one): trials stopped by this
    stopper would count as finished, and every trial must stay resumable once there is room."""

    def __init__(self) -> None:
        self.error: str | None = None
        self.disk_error: str | None = None  # 'trial ID: OSError: [Errno 28] ...', the first one
        self.disk: str | None = None  # 'full (no space left on device)', 'read-only', ...

    def __reduce__(self) -> tuple[Any, ...]:  # a restored search's Tuner gets this live object
        return _revive, (StopOnPermanentError, {})

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StopOnPermanentError:
        return cls()

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get("permanent_error"):
            self.error = self.error or str(result["permanent_error"])
            return True
        if result.get("disk_error") and self.disk_error is None:
            self.disk_error, self.disk = f"trial {trial_id}: {result['disk_error']}", result["disk"]
            _interrupt_tune()
        return False

    def stop_all(self) -> bool:
        return self.error is not None


def _interrupt_tune() -> None:
    """Stop the experiment as Ctrl-C would: Tune's handler of SIGUSR1 (it installs one with its
    SIGINT handler, in the main thread) saves the state and leaves every unfinished trial resumable."""
    if callable(signal.getsignal(signal.SIGUSR1)):
        os.kill(os.getpid(), signal.SIGUSR1)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m:02d}:{s:02d}"
