"""Running the confirmation: each variant's best configuration retrained with fresh seeds, as Ray
trials in parallel, and the statistics over them (confirm.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

import flatbasin.search.confirm as confirm
from flatbasin.search.callbacks import MlflowWriter, Progress, StopOnPermanentError, make_live
from flatbasin.search.options import SearchOptions
from flatbasin.search.recovery import disk_paragraph
from flatbasin.search.resume import confirm_path
from flatbasin.search.signals import interrupt_watch
from flatbasin.search.tracking import Tracker
from flatbasin.search.tune_results import fill_from_grid, trial_errors, tune_trial_ids
from flatbasin.search.tuner import confirm_tuner


def run_confirmation(
    tracker: Tracker,
    console: Console,
    options: SearchOptions,
    experiment_path: Path,
    best: list[dict[str, Any]],
    seeds: int,
    trainable: Any,
) -> tuple[list[dict[str, Any]], bool, list[str], str]:
    """Retrain each variant's best configuration with `seeds` fresh seeds, as Ray trials in parallel
    (a Tune experiment of its own beside the search's, resumable the same way); their runs are tagged
    flatbasin.role=confirm and never touch the search's own runs. `trainable` is the search's own:
    confirmations of a post-convergence search continue the same converged model."""
    path = confirm_path(experiment_path)
    configs = confirm.plan(best, seeds)
    splits = (
        "each on a fresh validation split"
        if confirm.fresh_splits(best)
        else "on the search's own validation split (its trials continue a model trained on the rest)"
    )
    console.print(
        f"Confirming the best configuration of {len(best)} variant(s) over {seeds} fresh seeds, "
        f"{splits}: {len(configs)} trials"
    )
    writer = MlflowWriter(tracker, console)
    progress = Progress(len(configs), console)
    stopper = StopOnPermanentError()
    make_live(writer, progress, stopper)
    tuner = confirm_tuner(path, configs, options, trainable, writer, progress, stopper)
    with interrupt_watch() as interrupt:
        grid = tuner.fit()
    fill_from_grid(writer, grid)
    errors = trial_errors(writer, grid)
    disk = disk_paragraph(stopper.disk, stopper.disk_error, path) if stopper.disk else ""
    if writer.drain():
        tracker.settle_lost(tune_trial_ids(grid), role="confirm")
    finals: dict[str, list[dict[str, Any]]] = {}
    val_sizes = set()
    for record in writer.records.values():
        if (final := record.final) is not None:
            finals.setdefault(record.config["variant"], []).append({
                "score": final["score"], "test_acc": final.get("test_acc"),
                "diverged": final.get("diverged"), "pair": confirm.pair_key(final["trial_config"]),
                "models": confirm.models_per_prediction(final),
            })  # fmt: skip
            val_sizes.add(final.get("val_size"))
    val_size = val_sizes.pop() if len(val_sizes) == 1 else None  # one size, else none to trust
    rows = [
        {**row, "val_size": val_size, "fresh_splits": confirm.fresh_splits(best)}
        for row in confirm.confirmation_stats(finals, val_size)
    ]
    return rows, interrupt.caught and not errors and not disk, errors, disk
