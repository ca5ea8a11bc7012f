"""Reading a search from MLflow into a Report: its trial and confirmation runs, the best trials'
curves, the space file it logged, its soups."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

import flatbasin.search.confirm as confirm
import flatbasin.search.figures as figures
import flatbasin.search.soup as soup
from flatbasin.search.errors import UsageError
from flatbasin.search.report_data import (
    CONFIRM,
    Confirmation,
    Report,
    Trial,
    best_per_variant,
    status_counts,
)
from flatbasin.search.report_stats import importances
from flatbasin.search.search_lookup import children, error_line
from flatbasin.search.tags import ERROR, FINAL, ROLE, STOPPED, TRIAL_ID, VARIANT
from flatbasin.spaces.loader import Space, SpaceError, load_space


def _trial(run: Run) -> Trial:
    tags, metrics = run.data.tags, run.data.metrics
    if tags.get(ERROR):
        status = "failed"
    elif tags.get(FINAL) == "true" or "final_score" in metrics:
        status = "diverged" if tags.get("flatbasin.diverged") == "true" else "finished"
    elif tags.get(STOPPED, "").startswith("early stopping"):
        status = "stopped early"
    elif tags.get(STOPPED):
        status = "unfinished"
    elif run.info.status == "FAILED":
        status = "failed"
    else:
        status = "unfinished"
    score = metrics.get("final_score", metrics.get("score"))
    return Trial(
        run_id=run.info.run_id,
        trial_id=tags.get(TRIAL_ID, run.info.run_id[:8]),
        variant=tags.get(VARIANT) or run.data.params.get("variant", "?"),
        status=status,
        score=score,
        test_acc=metrics.get("test_acc"),
        val_loss=metrics.get("val_loss"),
        val_acc=metrics.get("val_acc"),
        params=dict(run.data.params),
        error=tags.get(ERROR),
    )


def _curve(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> dict[str, Any]:
    """A trial's curves as its final result held them, from the metric histories (step = count)."""

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    def points(prefix: str) -> list[dict[str, float]]:
        val, test = history(f"{prefix}/val_acc"), history(f"{prefix}/test_acc")
        return [
            {"count": n, "val_acc": val[n], "test_acc": test.get(n, math.nan)} for n in sorted(val)
        ]

    extras = sorted(
        k.removeprefix("curve/").removesuffix("/val_acc")
        for k in metrics
        if k.startswith("curve/") and k.endswith("/val_acc") and k != "curve/val_acc"
    )
    return {"curve": points("curve"), "extra_curves": {n: points(f"curve/{n}") for n in extras}}


def _space(client: MlflowClient, parent: Run) -> tuple[Space | None, str]:
    """The space file the search logged (its distributions rebuild the Optuna study), or why not."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file
    logged = parent.data.params.get("space")
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id) if not a.is_dir]
    name = Path(logged).name if logged else None
    candidates = [name] if name in artifacts else [a for a in artifacts if a.endswith(".yaml")]
    if not candidates:
        return None, "the search's run holds no space file, so its distributions are unknown"
    with tempfile.TemporaryDirectory(prefix="flatbasin-report-") as folder:
        try:
            path = client.download_artifacts(parent.info.run_id, candidates[0], folder)
            start_from = parent.data.params.get("from")
            space = load_space(path, start_from=start_from)
            # A post-convergence search (--from) searched the tail only: so does its study.
            return (space.tail_only()[0] if start_from else space), ""
        except SpaceError as err:
            return None, f"the logged space file cannot be read: {err}"
        except MlflowException as err:
            return None, f"the logged space file cannot be downloaded: {error_line(err)}"


def read_report(client: MlflowClient, parent: Run, uri: str) -> Report:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = client.get_experiment(parent.info.experiment_id).name
    trials, confirmations = [], []
    for run in children(client, parent):
        role = run.data.tags.get(ROLE)
        if role == "trial":
            trials.append(_trial(run))
        elif role == CONFIRM:
            metrics = run.data.metrics
            score = metrics.get("final_score", metrics.get("score"))
            if score is not None and (
                run.data.tags.get(FINAL) == "true" or "final_score" in metrics
            ):
                params = run.data.params
                confirmations.append(
                    Confirmation(
                        run.data.tags.get(VARIANT, "?"),
                        score,
                        metrics.get("test_acc"),
                        run.data.tags.get("flatbasin.diverged") == "true",
                        pair=confirm.pair_key(
                            {"seed": params.get("seed"), "val_seed": params.get("val_seed")}
                        ),
                        models=_members(client, run),
                        val_seed=str(params.get("val_seed")),
                    )
                )
    if not any(t.done for t in trials):
        counts = status_counts(trials)
        held = f" ({counts})" if counts else ""
        raise UsageError(
            f"search '{name}' (run {parent.info.run_id}) has no finished trials yet: "
            f"{len(trials)} trial run(s){held}; a report needs at least one"
        )
    best = best_per_variant(trials)
    order = {variant: i for i, variant in enumerate(best)}  # variants without a best go last
    trials.sort(key=lambda t: (order.get(t.variant, len(order)), t.variant, -(t.score or 0.0), t.trial_id))  # fmt: skip
    curves = {}
    # Every accuracy measured on the validation set is correct/N: enough of them name N.
    measured = [t.score for t in trials if t.score] + [t.val_acc for t in trials if t.val_acc]
    for variant, trial in best.items():
        metrics = client.get_run(trial.run_id).data.metrics
        curves[variant] = _curve(client, trial.run_id, metrics)
        measured += [p["val_acc"] for p in curves[variant]["curve"]]
        for key in ("val_acc", "score"):
            measured += [m.value for m in client.get_metric_history(trial.run_id, key)]
    space, problem = _space(client, parent)
    searched_splits = {t.params.get("val_seed", "None") for t in trials}
    return Report(
        name=name,
        uri=uri,
        parent=parent,
        trials=trials,
        confirmations=confirmations,
        space=space,
        space_problem=problem,
        best=best,
        curves=curves,
        # As the search measured it, when it logged it (confirmed searches do); else inferred.
        val_size=int(parent.data.metrics.get("confirmed/val_size", 0))
        or figures.infer_val_size(measured),
        importances=importances(trials, space, problem),
        fresh_splits=bool(confirmations)
        and all(c.val_seed != "None" and c.val_seed not in searched_splits for c in confirmations),
        soups=soup.recorded(client, parent),
    )


def _members(client: MlflowClient, run: Run) -> int:
    """Models a run's deployed model runs per prediction: an ensemble records its members'
    diversity, and its curve's last step is their count; anything else deploys one model."""
    if not any(key.startswith("diversity/") for key in run.data.metrics):
        return 1
    return max(
        (m.step for m in client.get_metric_history(run.info.run_id, "curve/val_acc")), default=1
    )
