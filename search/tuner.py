"""Assembling a search's Tuner: the trainable with its resources, OptunaSearch (seeded TPE) under a
concurrency limit, ASHA or FIFO, reused actors, checkpoints and retries, MLflow through the driver's
callbacks; restored from Tune's state on --resume. The confirmation's Tuner the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flatbasin.search.saved_state as saved_state
from flatbasin.search.callbacks import (
    CsvRows,
    JsonRows,
    MlflowWriter,
    Progress,
    StopOnPermanentError,
    mend_results,
)
from flatbasin.search.errors import UsageError
from flatbasin.search.options import SearchOptions
from flatbasin.search.schedulers import PerVariantASHA
from flatbasin.spaces import Space
from flatbasin.trainables.config import sampled

# Checkpoints kept per trial. Tune snapshots its whole state (every trial's, the searcher's: a cost
# that grows with the trials) whenever a trial has checkpointed this many times since the last
# snapshot, so that the state never names a checkpoint already deleted. At 1 that was at every
# checkpoint, each trial's final one included: 1,000 short trials made 1,000 snapshots of up to
# 1,000 trials. At 2 a trial's state lags at most one checkpoint behind, which is still on disk: a
# driver killed outright resumes each trial from its latest or the one before (a trial that had
# just finished may train its last checkpoint's epochs again); other snapshots come every 10 s or
# more (Tune's auto period, which keeps them under 5% of the time).
KEEP_CHECKPOINTS = 2


# A trial reports its epochs at most once a second, several to a report when they are shorter
# (trainables/ray_entry.EpochReporter): each report held the trial for a round trip to the driver.
REPORT_INTERVAL_S = 1.0


def trial_name(trial: Any) -> str:
    """'swa_3f2a1b00' rather than Tune's default of every parameter in the folder name."""
    return f"{sampled(trial.config)['variant']}_{trial.trial_id}"


def runtime_settings(space: Space, options: SearchOptions) -> Space:
    """Threads match the CPUs a trial holds; the device follows --gpus-per-trial unless the space names
    one, and a space that asks for CUDA without GPUs per trial is refused rather than run on the CPU."""
    threads = max(1, int(options.cpus_per_trial))
    asked = {space.settings.get("device", "auto")}  # the top level, then each variant's own
    for searched, fixed in space.variants.values():
        asked |= {fixed["device"]} if "device" in fixed else set()
        asked |= set(searched["device"].values) if "device" in searched else set()
    if "cuda" in asked and options.gpus_per_trial == 0:
        raise UsageError(f"{space.where}: device: cuda needs --gpus-per-trial above 0")
    if "cpu" in asked and options.gpus_per_trial > 0:
        raise UsageError(
            f"{space.where}: device: cpu, but --gpus-per-trial {options.gpus_per_trial:g}"
        )
    device = "cuda" if options.gpus_per_trial > 0 else "cpu"
    return space.with_settings(threads=threads, device=device)


def make_trainable(options: SearchOptions, start_weights: dict[str, Any] | None) -> Any:
    """The trial function with its resources. A post-convergence search hands every trial the
    converged weights through Ray's object store: with_parameters puts them there once (not into
    each trial's pickled config), and a trial on any node, or moved to another, fetches them from
    there."""
    from ray import tune

    from flatbasin.trainables import ray_entry

    function = ray_entry.trainable
    handed = {
        **({"start_weights": start_weights} if start_weights is not None else {}),
        **({"passed": options.passed} if options.passed else {}),
    }  # the callables handed in from Python travel the same way (see SearchOptions.passed)
    if handed:
        function = tune.with_parameters(ray_entry.trainable, **handed)
    return tune.with_resources(
        function, {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial}
    )


def run_config(
    name: str,
    storage: Path,
    options: SearchOptions,
    writer: MlflowWriter,
    progress: Progress,
    stopper: StopOnPermanentError,
) -> Any:
    """Tune's run config of a search or its confirmation. result.json and progress.csv are what
    `flatbasin sync` and a restored search read back; TensorBoard files are left out (curves are
    lists, which TensorBoard cannot take)."""
    from ray import tune

    return tune.RunConfig(
        name=name,
        storage_path=str(storage),
        callbacks=[writer, progress, JsonRows(), CsvRows()],
        failure_config=tune.FailureConfig(max_failures=options.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        stop=stopper,
        verbose=0,
    )  # fmt: skip


def search_tuner(
    space: Space,
    options: SearchOptions,
    experiment_path: Path,
    samples: int,
    trainable: Any,
    writer: MlflowWriter,
    progress: Progress,
    stopper: StopOnPermanentError,
) -> Any:
    """The search's Tuner: restored from Tune's state on --resume, else new."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    if options.resume:
        # Tune restores its own pickled run config; its callbacks come back as `writer` and `progress`.
        mend_results(experiment_path)
        return tune.Tuner.restore(str(experiment_path), trainable, resume_errored=True)
    epochs = int(space.settings["epochs"])
    scheduler = (
        PerVariantASHA(
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
    return tune.Tuner(
        trainable,
        param_space={
            **_reporting(options),
            "report_at": scheduler.milestones() if isinstance(scheduler, PerVariantASHA) else [],
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
        run_config=run_config(
            experiment_path.name, experiment_path.parent, options, writer, progress, stopper
        ),
    )


def _reporting(options: SearchOptions) -> dict[str, Any]:
    """How every trial of a search, and of its confirmation, checkpoints and reports to Tune."""
    return {
        "checkpoint_every": options.checkpoint_every,
        "checkpoint_interval_s": options.checkpoint_interval_s,
        "report_interval_s": REPORT_INTERVAL_S,
    }


def confirm_tuner(
    path: Path,
    configs: list[dict[str, Any]],
    options: SearchOptions,
    trainable: Any,
    writer: MlflowWriter,
    progress: Progress,
    stopper: StopOnPermanentError,
) -> Any:
    """The confirmation's Tuner: a grid of the variants' best configurations with fresh seeds, in
    a Tune experiment of its own at `path` (beside the search's), restored when Tune saved it."""
    from ray import tune

    if saved_state.saved(path):
        return tune.Tuner.restore(str(path), trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space={
            **_reporting(options),
            "confirm": tune.grid_search(configs),
        },
        tune_config=tune.TuneConfig(
            max_concurrent_trials=options.concurrency,
            reuse_actors=True,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=run_config(path.name, path.parent, options, writer, progress, stopper),
    )
