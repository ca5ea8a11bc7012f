"""Finishing a search's run: the tags naming its answers, summary.json, the comparison figure, and
the deployed model (and final weights) of each variant's best trial."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag

import flatbasin.search.confirm as confirm
from flatbasin.search.confirm import recommended, to_reproduce
from flatbasin.search.figures import curve_figure
from flatbasin.search.tags import (
    ANSWER_TAGS,
    BEST_SEARCH_RUN,
    OLD_BEST_RUN,
    RECOMMENDED,
    REPRODUCE_RUN,
    VERDICT,
    WINNER,
)
from flatbasin.search.tracking import Tracker

MODEL_LOGGED = "flatbasin.model_logged"


def best_run_tags(best: list[dict[str, Any]], confirmed: list[dict[str, Any]]) -> dict[str, str]:
    """The search run's tags naming its answers, each with one meaning (tags.py): the best
    search trial, the confirmed winner (only when it is better than the rest beyond noise), the
    recommended variant and the verdict in words, and the run the printed `Reproduce:` names."""
    tags = {}
    if best and best[0].get("run_id"):
        tags[BEST_SEARCH_RUN] = tags[OLD_BEST_RUN] = best[0]["run_id"]
    if confirmed:
        verdict = confirm.verdict(confirmed)
        if verdict.winner:  # better than every other variant beyond noise
            tags[WINNER] = verdict.winner
        tags[RECOMMENDED] = verdict.recommended or ""
        tags[VERDICT] = verdict.text[:5000]
    chosen = to_reproduce(best, recommended(confirmed))
    if chosen is not None and chosen.get("run_id"):
        tags[REPRODUCE_RUN] = chosen["run_id"]
    return tags


def finish_parent(
    tracker: Tracker,
    parent: str,
    best: list[dict[str, Any]],
    grid: Any,
    confirmed: list[dict[str, Any]] | None = None,
    counts: dict[str, int] | None = None,
) -> None:
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
    summary = [{k: v for k, v in row.items() if k not in ("final", "config")} for row in best]
    # From the writer's records: reading every trial's run back from MLflow took seconds at 1,000
    counts = dict(sorted((counts or {}).items()))
    confirmed = confirmed or []
    tracker.client.log_dict(
        parent,
        {"best_per_variant": summary, "trials_per_variant": counts, "confirmed": confirmed},
        "summary.json",
    )
    answers = best_run_tags(best, confirmed)
    tracker.client.log_batch(parent, tags=[RunTag(k, v) for k, v in answers.items()])
    held = tracker.client.get_run(parent).data.tags  # a resumed search may answer otherwise now
    for stale in set(ANSWER_TAGS) & set(held) - set(answers):
        tracker.client.delete_tag(parent, stale)
    if confirmed:
        now = int(time.time() * 1000)
        tracker.client.log_batch(parent, metrics=[
            Metric(f"confirmed/{row['variant']}/{key}", float(row[key]), now, 0)
            for row in confirmed for key in ("val_mean", "val_std", "test_mean", "test_std")
        ] + [  # the validation split's size: the resolution the test assumed (the report reads it)
            Metric("confirmed/val_size", float(size), now, 0)
            for size in {row.get("val_size") for row in confirmed} if size
        ])  # fmt: skip
    if best:
        tracker.client.log_figure(
            parent, curve_figure({r["variant"]: r["final"] for r in best}), "comparison.png"
        )
        tracker.client.log_metric(parent, "best_score", best[0]["score"])
    checkpoints = {
        r.metrics.get("trial_id"): r.checkpoint for r in grid if r.checkpoint is not None
    }
    mlflow.set_tracking_uri(tracker.uri)
    # Pickle format on purpose: the ensembles' forward is not traceable to pt2 without example inputs.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    for row in best:
        if row["run_id"] is None:
            continue
        run = tracker.client.get_run(row["run_id"])
        if run.data.tags.get(MODEL_LOGGED) == "true":
            continue  # a restored search or a second sync: the model is there already
        if row["final"]["curve"]:  # drawn for the best trials only: 70 ms of CPU a figure
            figure = curve_figure({row["variant"]: row["final"]}, trial_id=row["trial_id"])
            tracker.client.log_figure(row["run_id"], figure, "curve.png")
        ckpt = checkpoints.get(row["trial_id"])
        if ckpt is None:
            continue
        config = TrialConfig.model_validate(row["final"]["trial_config"])
        with ckpt.as_directory() as folder:
            model = load_deployed(
                config.model_copy(update={"device": "cpu"}), Path(folder) / CHECKPOINT_FILE
            )
            # Its final weights too, so that a later search can continue this trial (--from RUN_ID).
            tracker.log_checkpoint(row["run_id"], Path(folder) / CHECKPOINT_FILE)
        with mlflow.start_run(run_id=row["run_id"]):
            # Explicit requirements: inferring them re-imports the model in a subprocess (seconds each).
            mlflow.pytorch.log_model(
                model, name="model", serialization_format="pickle",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"flatbasin=={flatbasin.__version__}"],
            )  # fmt: skip
        tracker.client.set_tag(row["run_id"], MODEL_LOGGED, "true")
        # start_run reopened the trial's run and closed it now: give it back its own end, so its
        # duration in the UI is the trial's, not the time until the search ended.
        tracker.client.set_terminated(row["run_id"], run.info.status, end_time=run.info.end_time)
