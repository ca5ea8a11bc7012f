"""Assembling and running a search: OptunaSearch (seeded TPE) under a concurrency limit, ASHA or FIFO,
resources per trial, reused actors, checkpoints and retries, MLflow through the driver's callback."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from flatbasin.search.callbacks import MlflowWriter, Progress
from flatbasin.search.cluster import check_cluster
from flatbasin.search.tracking import Tracker, TrialRecord, curve_figure
from flatbasin.spaces import Space

MODEL_LOGGED = "flatbasin.model_logged"


class NothingToResume(FileNotFoundError):
    """--resume or sync pointed at a folder that holds no Tune experiment."""


class SearchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int | None = Field(None, ge=1)  # None: the space file's `samples`
    concurrency: int = Field(2, ge=1)
    address: str | None = None  # None: a local Ray on this machine
    tracking_uri: str
    storage: Path
    name: str | None = None  # None: the space's name
    resume: bool = False
    scheduler: Literal["asha", "fifo"] = "fifo"
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    seed: int = Field(0, ge=0)
    time_budget_s: float | None = Field(None, gt=0)
    max_failures: int = Field(2, ge=0)  # retries of a trial whose worker died
    checkpoint_every: int = Field(1, ge=1)  # epochs
    checkpoint_interval_s: float = Field(20.0, ge=0)  # at most one checkpoint per this many seconds


@dataclass(frozen=True)
class Outcome:
    name: str
    experiment_path: Path
    best: list[dict[str, Any]]  # best trial per variant, best first
    parent_run_id: str
    unwritten: int  # trials whose MLflow writes are still pending (server away at the end)
    seconds: dict[str, float] = field(default_factory=dict)  # start-up, trials, finish


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    # Each trial checkpoint forces a snapshot of Tune's state (see run_search); that is intended.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Our own progress line replaces Tune's tables; its JSON and CSV result files stay (see run_search).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault(
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true"
    )  # our summary names the runs
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # local: this machine only, nothing listening beyond loopback
        ray.init(
            include_dashboard=False, log_to_driver=False
        )  # loopback: see local_ray_on_loopback


def trial_name(trial: Any) -> str:
    """'swa_3f2a1b00' rather than Tune's default of every parameter in the folder name."""
    return f"{trial.config['variant']}_{trial.trial_id}"


def run_search(space: Space, options: SearchOptions, console: Console) -> Outcome:
    import optuna
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from flatbasin.trainables import ray_entry

    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    name = options.name or space.name
    storage = options.storage.expanduser().resolve()
    experiment_path = storage / name
    tracker = Tracker(options.tracking_uri, name, search_key=str(experiment_path))
    tracker.check()
    if options.address:
        # A job's working directory is Ray's to clean up (it can vanish under a long search); every
        # path is absolute by now, so work from the storage folder, which outlives the search.
        storage.mkdir(parents=True, exist_ok=True)
        os.chdir(storage)
    _init_ray(options.address)
    check_cluster(options.tracking_uri, storage, options.cpus_per_trial, options.gpus_per_trial)
    samples = options.samples or space.samples
    threads = max(1, int(options.cpus_per_trial))  # torch threads match the CPUs a trial holds
    device = "cuda" if options.gpus_per_trial > 0 else "cpu"
    space = space.with_settings(threads=threads, device=device)
    parent = tracker.parent(
        params={"space": str(space.path), "samples": samples, "seed": options.seed, "sampler": "TPE",
                "scheduler": options.scheduler, "concurrency": options.concurrency,
                "cpus_per_trial": options.cpus_per_trial, "gpus_per_trial": options.gpus_per_trial},
        space_file=space.path,
    )  # fmt: skip

    trainable = tune.with_resources(
        ray_entry.trainable, {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial}
    )
    writer = MlflowWriter(tracker, console)
    progress = Progress(samples, console)
    run_config = tune.RunConfig(
        name=name,
        storage_path=str(storage),
        # result.json and progress.csv are what `flatbasin sync` and a restored search read back;
        # TensorBoard files are left out (curves are lists, which TensorBoard cannot take).
        callbacks=[writer, progress, JsonLoggerCallback(), CSVLoggerCallback()],
        failure_config=tune.FailureConfig(max_failures=options.max_failures),
        # One checkpoint per trial, and every new one forces a snapshot of Tune's own state: a driver
        # killed at any moment resumes with each trial at its latest checkpoint, a finished trial at its end.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        verbose=0,
    )
    if options.resume:
        if not tune.Tuner.can_restore(str(experiment_path)):
            raise NothingToResume(f"no search to resume at {experiment_path}")
        # Tune restores its own (pickled) copies of the callbacks; trials that finished before the
        # interruption are read back from the result grid below, so `writer` needs no special care.
        tuner = tune.Tuner.restore(str(experiment_path), trainable, resume_errored=True)
    else:
        epochs = int(space.settings["epochs"])
        scheduler = (
            ASHAScheduler(
                time_attr="rung_epoch",
                metric="score",
                mode="max",
                max_t=epochs,
                grace_period=max(1, epochs // 4),
                reduction_factor=2,
            )
            if options.scheduler == "asha"
            else FIFOScheduler()
        )
        searcher = OptunaSearch(
            space.define_by_run,
            metric="score",
            mode="max",
            sampler=optuna.samplers.TPESampler(seed=options.seed),
        )
        tuner = tune.Tuner(
            trainable,
            param_space={
                "checkpoint_every": options.checkpoint_every,
                "checkpoint_interval_s": options.checkpoint_interval_s,
            },
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=options.concurrency),
                scheduler=scheduler,
                num_samples=samples,
                reuse_actors=True,
                time_budget_s=options.time_budget_s,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
            ),
            run_config=run_config,
        )
    fit_started = time.perf_counter()
    grid = tuner.fit()
    fit_ended = time.perf_counter()

    _fill_from_grid(writer, grid)
    best = _best_per_variant(writer)
    written = writer.drain()
    if written:
        _finish_parent(tracker, parent, best, grid)
    seconds = {
        "start-up": fit_started - started,
        "trials": fit_ended - fit_started,
        "finish": time.perf_counter() - fit_ended,
    }
    return Outcome(name, experiment_path, best, parent, len(writer.unwritten), seconds)


def _fill_from_grid(writer: MlflowWriter, grid: Any) -> None:
    """Trials finished before a restore never pass through this process's callbacks: read them back."""
    from flatbasin.search.callbacks import KEPT

    for result in grid:
        trial_id = result.metrics.get("trial_id") if result.metrics else None
        if trial_id is None or trial_id in writer.records:
            continue
        record = TrialRecord(trial_id, dict(result.config))
        frame = result.metrics_dataframe
        if frame is not None:
            for row in frame.to_dict("records"):
                record.results.append({k: v for k, v in row.items() if k in KEPT})
        if result.metrics.get("final"):
            record.results[-1:] = [{k: v for k, v in result.metrics.items() if k in KEPT}]
        record.status = "FAILED" if result.error else "FINISHED"
        writer.add(record)


def _best_per_variant(writer: MlflowWriter) -> list[dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for record in writer.records.values():
        final = record.final
        if final is None or final["diverged"]:
            continue
        variant = record.config["variant"]
        if variant not in best or final["score"] > best[variant]["score"]:
            best[variant] = {
                "variant": variant,
                "trial_id": record.trial_id,
                "score": final["score"],
                "test_acc": final["test_acc"],
                "params": dict(record.config.get(variant, {})),
                "final": final,
            }
    return sorted(best.values(), key=lambda row: -row["score"])


def _finish_parent(tracker: Tracker, parent: str, best: list[dict[str, Any]], grid: Any) -> None:
    """Summary, comparison figure and the deployed model of each variant's best trial."""
    import mlflow
    import mlflow.pytorch
    import torch

    import flatbasin.trainables
    from flatbasin.trainables.config import TrialConfig
    from flatbasin.trainables.loop import load_deployed
    from flatbasin.trainables.ray_entry import CHECKPOINT_FILE

    for row in best:
        row["run_id"] = tracker.run_id(row["trial_id"])
    summary = [{k: v for k, v in row.items() if k != "final"} for row in best]
    tracker.client.log_dict(parent, {"best_per_variant": summary}, "summary.json")
    if best:
        tracker.client.log_figure(
            parent, curve_figure({r["variant"]: r["final"] for r in best}), "comparison.png"
        )
        top = best[0]
        tracker.client.set_tag(parent, "flatbasin.best_run_id", top["run_id"] or "")
        tracker.client.log_metric(parent, "best_score", top["score"])
    checkpoints = {
        r.metrics.get("trial_id"): r.checkpoint for r in grid if r.checkpoint is not None
    }
    mlflow.set_tracking_uri(tracker.uri)
    # Pickle format on purpose: the ensembles' forward is not traceable to pt2 without example inputs.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    for row in best:
        ckpt = checkpoints.get(row["trial_id"])
        if ckpt is None or row["run_id"] is None:
            continue
        if tracker.client.get_run(row["run_id"]).data.tags.get(MODEL_LOGGED) == "true":
            continue  # a restored search or a second sync: the model is there already
        config = TrialConfig.model_validate(row["final"]["trial_config"])
        with ckpt.as_directory() as folder:
            model = load_deployed(
                config.model_copy(update={"device": "cpu"}), Path(folder) / CHECKPOINT_FILE
            )
        with mlflow.start_run(run_id=row["run_id"]):
            # Explicit requirements: inferring them re-imports the model in a subprocess (seconds each).
            mlflow.pytorch.log_model(
                model, name="model", serialization_format="pickle",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"flatbasin=={flatbasin.__version__}"],
            )  # fmt: skip
        tracker.client.set_tag(row["run_id"], MODEL_LOGGED, "true")
    tracker.client.set_terminated(parent, "FINISHED")


def sync(experiment_path: Path, tracking_uri: str, console: Console) -> Outcome:
    """Write a search's results into MLflow from Tune's result files (after the server was away).

    Idempotent like every write here: runs already complete are left alone, missing epochs are added.
    """
    from ray import tune

    from flatbasin.trainables import ray_entry

    experiment_path = experiment_path.expanduser().resolve()
    if not tune.Tuner.can_restore(str(experiment_path)):
        raise NothingToResume(f"no Tune experiment at {experiment_path}")
    tracker = Tracker(tracking_uri, experiment_path.name, search_key=str(experiment_path))
    tracker.check()
    parent = tracker.parent()
    grid = tune.Tuner.restore(str(experiment_path), ray_entry.trainable).get_results()
    writer = MlflowWriter(tracker, console)
    _fill_from_grid(writer, grid)
    best = _best_per_variant(writer)
    if writer.drain():
        _finish_parent(tracker, parent, best, grid)
    return Outcome(experiment_path.name, experiment_path, best, parent, len(writer.unwritten))
