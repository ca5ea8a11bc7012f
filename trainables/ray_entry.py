"""The Ray Tune adapter: the only file under trainables/ that imports Ray.

Turns the sampled Tune config into a TrialConfig, runs the one loop, reports every epoch through
`tune.report`, several short ones to a report (EpochReporter), with a checkpoint every
`checkpoint_every` epochs, at most one per `checkpoint_interval_s`, and always at the end, and
resumes from `tune.get_checkpoint()` when Tune restarts the trial on another worker.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ray import tune

from flatbasin.trainables import usercode
from flatbasin.trainables.checkpoint import CheckpointError
from flatbasin.trainables.config import TrialConfig, trial_config, user_modules
from flatbasin.trainables.data import load_data
from flatbasin.trainables.data_spec import DataError
from flatbasin.trainables.files import disk_problem
from flatbasin.trainables.loop import TrialResult, resolve_device, train
from flatbasin.trainables.records import EpochMetrics
from flatbasin.trainables.sanity import TrialError

CHECKPOINT_FILE = "checkpoint.pt"


def epoch_metrics(m: EpochMetrics, rung_epochs: list[int]) -> dict[str, Any]:
    metrics = {k: v for k, v in vars(m).items()}
    metrics["rung_epoch"] = rung_epoch(m.epoch, rung_epochs)
    metrics["diverged"] = False
    metrics["node_id"] = _node_id()  # where the epoch ran: a trial moved after a node loss shows it
    return metrics


def rung_epoch(epoch: int, rung_epochs: list[int]) -> int:
    """ASHA compares trials only at cycle boundaries: mid-cycle accuracy says nothing."""
    return max((b for b in rung_epochs if b <= epoch), default=0) if rung_epochs else epoch


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def final_metrics(result: TrialResult, rung_epochs: list[int]) -> dict[str, Any]:
    last = epoch_metrics(result.history[-1], rung_epochs)
    return {
        **last,
        "score": result.score,
        "test_acc": result.test_acc,
        "diverged": result.diverged,
        "final": True,  # not "done": Tune fills that key itself
        "curve": [vars(p) for p in result.curve],
        "extra_curves": {k: [vars(p) for p in v] for k, v in result.extra_curves.items()},
        "diversity": [vars(p) for p in result.diversity],
        "trial_config": result.config.model_dump(mode="json"),
        "data_fingerprint": result.data_fingerprint,
        "plan": result.plan,
        "threads": result.threads,
        "seconds_total": result.seconds["total"],
        "seconds_to_best": result.seconds.get("to_best"),  # training time to the best epoch's end
        "model_built": result.model,
        "runtime": result.runtime,  # device, precision, channels_last, compile: what ran
        "chance": result.chance,  # the score of always answering the most common class
        # The user's own modules as this worker imported them: recorded with the trial's run
        "code": usercode.recorded_code(
            user_modules(result.config.model, result.config.dataset),
            result.config.code_dir,
        ),
    }


# Errors that say this trial can never run as configured (its data, model, checkpoint or the user's
# code): retrying the trial, as Tune does for a lost worker, would only repeat them.
PERMANENT = (DataError, TrialError, CheckpointError, ValidationError, usercode.UserCodeError)


def trainable(
    config: dict[str, Any],
    start_weights: dict[str, Any] | None = None,
    passed: dict[str, bytes] | None = None,
) -> None:
    """One trial. `start_weights`: a post-convergence search's converged model; `passed`: the
    callables handed to flatbasin.search from Python, pickled by value, by their `callable:NAME`.
    Tune hands both over from the object store (tune.with_parameters: put there once by the
    driver, fetched on any node)."""
    try:
        usercode.install(passed or {})
        _run(config, start_weights)
    except PERMANENT as err:
        # Reported, not raised: the trial ends without a retry, and the driver stops the search.
        # Tune refuses a result without the search's metric (it raises in the driver, ending the
        # search with a traceback), so the failed trial scores 0, as a diverged one does.
        tune.report(
            {"permanent_error": f"{type(err).__name__}: {err}", "score": 0.0, "node_id": _node_id()}
        )
    except Exception as err:
        problem = disk_problem(err)
        if problem is None:
            raise
        # A full or read-only disk (Tune's storage, this worker's temporary folder) refuses every
        # retry and every other trial's checkpoint alike until someone frees it. Said first, so that
        # the driver stops the search as on Ctrl-C, then raised: the trial stays resumable from its
        # last checkpoint once there is room (a reported error would end it for good).
        tune.report(
            {"disk_error": f"{type(err).__name__}: {err}", "disk": problem, "score": 0.0,
             "node_id": _node_id()}
        )  # fmt: skip
        raise


def _run(config: dict[str, Any], start_weights: dict[str, Any] | None) -> None:
    trial = trial_config(config)
    policy = CheckpointPolicy(
        int(config.get("checkpoint_every", 1)), float(config.get("checkpoint_interval_s", 0.0))
    )
    data = load_data(
        trial.data_spec, str(resolve_device(trial.device))
    )  # cached per worker process
    rungs = trial.build_variant().boundaries(data.steps_per_epoch(trial.batch_size))

    resume = None
    restored = tune.get_checkpoint()
    if restored is not None:
        resume_dir = Path(tempfile.mkdtemp(prefix="flatbasin-resume-"))
        resume = Path(restored.to_directory(str(resume_dir))) / CHECKPOINT_FILE

    reporter = EpochReporter(
        rungs, policy, interval_s=float(config.get("report_interval_s", 0.0)),
        milestones=[int(m) for m in config.get("report_at", [])],
    )  # fmt: skip
    try:
        result = train(
            trial, data=data, resume=resume, on_epoch=reporter.on_epoch, start_weights=start_weights
        )
    except PERMANENT:
        reporter.flush()  # the epochs it trained before its error stay on record, then the error
        raise
    reporter.finish(
        result, {"val_size": data.size("val")}
    )  # a score's resolution, for confirmation


class EpochReporter:
    """A trial's epochs to Tune, several to a report when epochs are short.

    Tune's `report` holds the trial until the driver has taken the result and asked for the next:
    a round trip through Ray and the driver's loop, milliseconds on a busy driver, at every report.
    With epochs of a few tens of milliseconds (a small model on a GPU) that was the trial's main
    cost. So epochs are held and sent together, the newest as the result itself and the earlier
    ones under `epochs` (the driver's loggers and MLflow writer give each its own row, once): at
    most one report per `interval_s`, and always at once when the held epochs end with a checkpoint
    or reach one of ASHA's `milestones` (its rungs, on `rung_epoch`), so Tune decides and saves at
    the same epochs as before. Each epoch waits for the next before it goes, so that the last goes
    out with the final results (which epoch is the last, early stopping decides).

    A due checkpoint is saved at its own epoch and goes out with it. Saved when the report went out,
    after the loop had trained the next epoch, it held the next epoch's weights under this epoch's
    number, and a trial resumed from it trained that epoch again from the wrong start. `report` is
    Tune's (tests pass their own)."""

    def __init__(
        self,
        rungs: list[int],
        policy: CheckpointPolicy,
        report: Any = None,
        interval_s: float = 0.0,
        milestones: list[int] | None = None,
    ):
        self.rungs, self.policy = rungs, policy
        self.report = report or tune.report
        self.interval_s, self.milestones = interval_s, sorted(milestones or [])
        # Epochs not yet reported: metrics, save function, checkpoint (only the newest has one)
        self.held: list[tuple[EpochMetrics, Any, tempfile.TemporaryDirectory | None]] = []
        self.sent_at, self.sent_rung = time.monotonic(), 0
        # Seconds the trial spent in Tune's report before its final one, and how many it made: the
        # final result carries both (what the trial waited for the driver, per report)
        self.waited_s, self.reports = 0.0, 0

    def on_epoch(self, metrics: EpochMetrics, save: Any) -> None:
        if self.held and self._due():
            self._send()
        folder = None
        if self.policy.due(metrics.epoch):
            folder = tempfile.TemporaryDirectory(prefix="flatbasin-ckpt-")
            save(Path(folder.name) / CHECKPOINT_FILE)
        self.held.append((metrics, save, folder))

    def flush(self) -> None:
        """Send what is held now (a trial ending in an error reports its epochs first)."""
        if self.held:
            self._send()

    def _due(self) -> bool:
        newest, _, folder = self.held[-1]
        if folder is not None or self.interval_s <= 0:
            return True
        rung = rung_epoch(newest.epoch, self.rungs)
        if any(self.sent_rung < m <= rung for m in self.milestones):
            return True
        return time.monotonic() - self.sent_at >= self.interval_s

    def _send(self, final: TrialResult | None = None, extra: dict[str, Any] | None = None) -> None:
        """The held epochs in one report; with `final`, its results (and `extra`) stand for the
        newest."""
        held, self.held = self.held, []
        folder = held[-1][2] if held else None
        try:
            if final is not None:
                row = final_metrics(final, self.rungs)
                earlier = [m for m, _, _ in held if m.epoch < final.history[-1].epoch]
            else:
                row, earlier = epoch_metrics(held[-1][0], self.rungs), [m for m, _, _ in held[:-1]]
            if earlier:
                row["epochs"] = [epoch_metrics(m, self.rungs) for m in earlier]
            if final is not None:
                row |= {"report_wait_s": self.waited_s, "reports": self.reports, **(extra or {})}
                self._final_report(row, held[-1][1] if held else None, final.diverged)
            else:
                checkpoint = tune.Checkpoint.from_directory(folder.name) if folder else None
                tick = time.perf_counter()
                self.report(row, checkpoint=checkpoint)
                self.waited_s += time.perf_counter() - tick
                self.reports += 1
        finally:
            if folder is not None:
                folder.cleanup()
        self.sent_at, self.sent_rung = time.monotonic(), int(row["rung_epoch"])

    def _final_report(self, row: dict[str, Any], save: Any, diverged: bool) -> None:
        # Saved now, after the loop's end (the final evaluation may update the averages' state)
        with tempfile.TemporaryDirectory(prefix="flatbasin-ckpt-") as tmp:
            checkpoint = None
            if save is not None and not diverged:
                save(Path(tmp) / CHECKPOINT_FILE)
                checkpoint = tune.Checkpoint.from_directory(tmp)
            self.report(row, checkpoint=checkpoint)

    def finish(self, result: TrialResult, extra: dict[str, Any] | None = None) -> None:
        """The final report: the final results (and `extra`), with the epochs still held."""
        if self.held and self.held[-1][0].epoch != result.history[-1].epoch:
            self._send()  # diverged: no callback for the last epoch, so nothing to save either
        self._send(final=result, extra=extra)


class CheckpointPolicy:
    """Every `every` epochs, but no sooner than `interval_s` after the last one: a lost node then costs
    at most that much work, and short trials do not spend their time writing checkpoints."""

    def __init__(self, every: int, interval_s: float):
        self.every, self.interval_s = every, interval_s
        self.last = time.monotonic()

    def due(self, epoch: int) -> bool:
        if epoch % self.every or time.monotonic() - self.last < self.interval_s:
            return False
        self.last = time.monotonic()
        return True


def train_base(
    config: dict[str, Any], passed: dict[str, bytes] | None = None
) -> tuple[dict[str, Any], bytes]:
    """The base phase of a post-convergence search, trained once: one plain trial, run as a Ray task
    with a trial's resources (or in a local driver's own process). Returns its record and its last
    checkpoint's bytes (empty when it diverged), which the driver records as the search's base
    run. `passed`: as for `trainable`."""
    usercode.install(passed or {})
    trial = TrialConfig.model_validate(config)
    data = load_data(trial.data_spec, str(resolve_device(trial.device)))
    with tempfile.TemporaryDirectory(prefix="flatbasin-base-") as tmp:
        path = Path(tmp) / CHECKPOINT_FILE

        def on_epoch(metrics: EpochMetrics, save: Any) -> None:
            if metrics.epoch == trial.epochs:
                save(path)

        result = train(trial, data=data, on_epoch=on_epoch)
        return result.to_json(), path.read_bytes() if path.is_file() else b""
