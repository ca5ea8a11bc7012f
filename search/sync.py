"""`flatbasin sync`: a search's results written into MLflow from Tune's result files (after the
store was away), as idempotently as the search itself writes them."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from rich.console import Console

import flatbasin.search.saved_state as saved_state
from flatbasin.search.callbacks import MlflowWriter, mend_results
from flatbasin.search.errors import UsageError
from flatbasin.search.finish import finish_parent
from flatbasin.search.options import Outcome
from flatbasin.search.tracking import Tracker
from flatbasin.search.tune_results import (
    best_per_variant,
    count_variants,
    fill_from_grid,
    lasting_failure,
    trial_errors,
    tune_trial_ids,
    unfinished,
)


def sync(experiment_path: Path, tracking_uri: str, console: Console) -> Outcome:
    """Write a search's results into MLflow from Tune's result files (after the server was away).

    Idempotent like every write here: runs already complete are left alone, missing epochs are added.
    """
    from ray import tune

    from flatbasin.trainables import ray_entry

    experiment_path = experiment_path.expanduser().resolve()
    if not saved_state.check(experiment_path, command="sync"):  # before MLflow is touched
        raise UsageError(f"no search at {experiment_path} (a Tune folder such as runs/NAME)")
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)  # the writer says it
    tracker = Tracker(tracking_uri, experiment_path.name, search_key=str(experiment_path))
    tracker.check()
    parent = tracker.parent()
    mend_results(experiment_path)
    grid = tune.Tuner.restore(str(experiment_path), ray_entry.trainable).get_results()
    writer = MlflowWriter(tracker, console)
    fill_from_grid(writer, grid)
    best = best_per_variant(writer)
    errors = trial_errors(writer, grid)
    outcome = Outcome(
        experiment_path.name, experiment_path, best, parent, 0,
        interrupted=bool(unfinished(grid)) and not errors, errors=errors,
    )  # fmt: skip
    if writer.drain():
        tracker.settle_lost(tune_trial_ids(grid))
        finish_parent(tracker, parent, best, grid, counts=count_variants(writer))
        tracker.end_parent(outcome.state)
    return dataclasses.replace(
        outcome, unwritten=len(writer.unwritten), trials_per_variant=count_variants(writer),
        store=lasting_failure(writer),
    )  # fmt: skip


def sync_to_mlflow(experiment_path: Path, tracking_uri: str, console: Console) -> Outcome:
    """`flatbasin sync`: sync, then its summary. A store that cannot be used is bad input
    (UsageError); trials still left unwritten by a store that failed on the way, SearchFailed."""
    from flatbasin.search.errors import SearchFailed
    from flatbasin.search.output import print_summary
    from flatbasin.search.recovery import store_failed
    from flatbasin.search.store import TrackingUnavailable

    try:
        outcome = sync(experiment_path, tracking_uri, console)
    except TrackingUnavailable as err:
        raise UsageError(str(err)) from err
    print_summary(outcome, tracking_uri, console)
    if outcome.store[0]:
        raise SearchFailed(store_failed(outcome, tracking_uri))
    return outcome
