"""What Tune's results say once the trials ended: the writer's records made whole from Tune's result
files, each variant's best trial, the failed trials' errors, what a time budget or a store cut short."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flatbasin.search.callbacks import KEPT, MlflowWriter, append_rows, epoch_rows, read_results
from flatbasin.search.options import SearchOptions
from flatbasin.search.tracking import TrialRecord
from flatbasin.trainables.config import sampled


def lasting_failure(writer: MlflowWriter) -> tuple[str, str]:
    """The store's failure and its kind when trials are left unwritten and waiting will not write
    them (see store_failure); ('', '') otherwise."""
    if writer.unwritten and writer.lasting and writer.failure:
        return writer.failure, writer.lasting
    return "", ""


def ran_out_of_time(
    options: SearchOptions, writer: MlflowWriter, samples: int, fit_seconds: float
) -> str:
    """What --time-budget cut short, if it did: Tune ends the trial phase at the budget, silently."""
    finished = sum(record.final is not None for record in writer.records.values())
    budget = options.time_budget_s
    if budget is None or finished >= samples or fit_seconds < budget:
        return ""
    return f"the --time-budget of {budget:g} s ran out after {finished} of {samples} trial(s)"


def fill_from_grid(writer: MlflowWriter, grid: Any, stopped_by: str | None = None) -> None:
    """Make the records exactly what Tune's result files hold, every epoch of every trial once.

    A restored search never sees, through its callbacks, the trials that finished before the
    interruption, nor an epoch reported just before the driver died: the files have them all.
    """
    for result in grid:
        trial_id = result.metrics.get("trial_id") if result.metrics else None
        if trial_id is None:
            continue
        seen = writer.records.get(trial_id)
        if result.config:
            config = sampled(dict(result.config))
        elif seen is not None:  # cut off before its first result: Tune kept no config for it
            config = seen.config
        else:
            continue
        record = TrialRecord(trial_id, config)
        # What the events brought first, then the files over it, epoch by epoch: a file that lags
        # behind the events (Tune syncs the driver's copy to the storage now and then) loses nothing.
        for row in seen.results if seen is not None else []:
            record.add(row)
        rows = read_results(Path(result.path)) if result.path else []
        if not rows and result.metrics_dataframe is not None:
            rows = result.metrics_dataframe.to_dict("records")
        for row in rows:
            record.add({k: v for k, v in row.items() if k in KEPT})
        if result.metrics.get("final") or result.metrics.get("permanent_error"):
            for row in epoch_rows(result.metrics):
                record.add({k: v for k, v in row.items() if k in KEPT})
            if result.path:  # Tune's copy of the file missed its last report (a full disk)
                have = {row.get("epoch") for row in rows}
                missing = [r for r in epoch_rows(result.metrics) if r.get("epoch") not in have]
                append_rows(Path(result.path), missing)
        record.status = "FAILED" if result.error else seen.status if seen else "FINISHED"
        if record.status == "RUNNING":  # the experiment ended with this trial unfinished
            record.status = "INTERRUPTED"
        if stopped_by and record.final is None and record.error is None:
            record.status = "STOPPED"  # cut off when another trial failed for good
        writer.add(record)


def unfinished(grid: Any) -> list[str]:
    """Trials still pending or running when the experiment ended: Ctrl-C, or a driver that died.

    Trials stopped by ASHA or a time budget count as finished (Tune marks them TERMINATED).
    """
    trials = grid._experiment_analysis.trials  # Result has no status; the analysis' trials do
    return [t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")]


def tune_trial_ids(grid: Any) -> set[str]:
    """Every trial Tune's experiment holds, whatever its state."""
    return {t.trial_id for t in grid._experiment_analysis.trials}


def trial_errors(writer: MlflowWriter, grid: Any) -> list[str]:
    """One line per failed trial: permanent errors (data, model) first, then trials that raised."""
    lines = [
        f"trial {r.trial_id}: {r.error}"
        for r in sorted(writer.records.values(), key=lambda r: r.trial_id)
        if r.error is not None
    ]
    for result in grid:
        if result.error is not None:
            trial_id = result.metrics.get("trial_id", "?") if result.metrics else "?"
            where = f" (log: {Path(result.path) / 'error.txt'})" if result.path else ""
            lines.append(f"trial {trial_id}: {_last_line(result.error)}{where}")
    return lines


def _last_line(error: BaseException) -> str:
    """'ValueError: ...' from a remote traceback: its last non-empty line says what went wrong."""
    text = [line.strip() for line in str(error).splitlines() if line.strip()]
    return text[-1] if text else type(error).__name__


def best_per_variant(writer: MlflowWriter) -> list[dict[str, Any]]:
    """Each variant's best finished, non-diverged trial, best first. Ties go to the lower validation
    loss, then to the smaller trial id, so the answer is the same on every resume and every sync."""
    best: dict[str, tuple[tuple[float, float, str], dict[str, Any]]] = {}
    for record in writer.records.values():
        final = record.final
        if final is None or final["diverged"]:
            continue
        variant = record.config["variant"]
        val_loss = final.get("val_loss")
        rank = (-final["score"], val_loss if val_loss is not None else math.inf, record.trial_id)
        if variant not in best or rank < best[variant][0]:
            best[variant] = (
                rank,
                {
                    "variant": variant,
                    "trial_id": record.trial_id,
                    "score": final["score"],
                    "test_acc": final["test_acc"],
                    "params": dict(record.config.get(variant, {})),
                    "final": final,
                    "config": record.config,
                },
            )
    return [row for _, row in sorted(best.values(), key=lambda item: item[0])]


def learned_nothing(best: list[dict[str, Any]], margin: float = 0.02) -> str:
    """A warning when even the best trial scored within `margin` of chance (always answering the most
    common validation class): every setting tried failed to learn, and 'the best' means nothing."""
    if not best or best[0]["final"].get("chance") is None:
        return ""
    top, chance = best[0]["score"], best[0]["final"]["chance"]
    if top >= chance + margin:
        return ""
    return (
        f"the best score, {top:.4f}, is no better than chance ({chance:.4f}: always answering the most "
        "common class), so no trial learned anything; look at the learning rates (flatbasin "
        "lr-find suggests a range), the number of epochs and the data before trusting this search"
    )


def count_variants(writer: MlflowWriter) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in writer.records.values():
        counts[record.config["variant"]] = counts.get(record.config["variant"], 0) + 1
    return counts
