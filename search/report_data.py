"""What a report holds: the trials, confirmation runs and parameter importances of one search, as
read back from MLflow (report_read.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mlflow.entities import Run

from flatbasin.spaces.loader import Space

CONFIRM = "confirm"  # role of a confirmation run: a fresh seed of a variant's best config


@dataclass
class Trial:
    run_id: str
    trial_id: str
    variant: str
    status: str  # finished, diverged, stopped early, failed, unfinished
    score: float | None  # validation accuracy of the deployed model
    test_acc: float | None
    val_loss: float | None
    params: dict[str, str]
    val_acc: float | None = None  # of the live weights, last epoch
    error: str | None = None

    @property
    def done(self) -> bool:
        """Finished with a final result, the diverged ones included (they score 0 on purpose)."""
        return self.status in ("finished", "diverged")


@dataclass
class Confirmation:
    variant: str
    score: float  # a diverged seed counts with its score of 0: a setting that diverges is no winner
    test_acc: float | None
    diverged: bool = False
    pair: str = ""  # its seed and validation split: what pairs it with the other variants' runs
    models: int = 1  # models its deployed model runs per prediction
    val_seed: str = "None"  # the param as logged ("None": the split of split_seed)


@dataclass
class Importances:
    """One study's parameter importances, or why there are none."""

    title: str
    trials: int
    values: dict[str, float] = field(default_factory=dict)
    reason: str = ""  # set when values is empty


@dataclass
class Report:
    name: str
    uri: str
    parent: Run
    trials: list[Trial]
    confirmations: list[Confirmation]
    space: Space | None
    space_problem: str
    best: dict[str, Trial]  # variant -> best finished, non-diverged trial, best first
    curves: dict[str, dict[str, Any]]  # variant -> {"curve": [...], "extra_curves": {...}}
    val_size: int | None
    importances: list[Importances]
    fresh_splits: bool | None = None  # whether each confirmation run had a fresh validation split
    soups: list[dict[str, Any]] = field(default_factory=list)  # search/soup.py's runs, newest each


def best_per_variant(trials: list[Trial]) -> dict[str, Trial]:
    """Each variant's best finished, non-diverged trial, best first; ties as the search breaks them
    (lower validation loss, then the smaller trial id)."""
    best: dict[str, tuple[tuple[float, float, str], Trial]] = {}
    for t in trials:
        if t.status != "finished" or t.score is None:
            continue
        rank = (-t.score, t.val_loss if t.val_loss is not None else math.inf, t.trial_id)
        if t.variant not in best or rank < best[t.variant][0]:
            best[t.variant] = (rank, t)
    return {v: t for v, (_, t) in sorted(best.items(), key=lambda item: item[1][0])}


def status_counts(trials: list[Trial]) -> str:
    order = ("finished", "diverged", "stopped early", "failed", "unfinished")
    counts = {s: sum(t.status == s for t in trials) for s in order}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n)
