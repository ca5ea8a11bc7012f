"""What a trial's recorded history decides: its best epoch, the time it took to get there, and
whether early stopping ends it. Pure functions of the history, so a resumed trial decides the same."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Epoch(Protocol):
    """The fields read here (EpochMetrics has them)."""

    @property
    def epoch(self) -> int: ...
    @property
    def score(self) -> float: ...
    @property
    def elapsed_s(self) -> float: ...


def best_epoch(history: Sequence[Epoch]) -> Epoch | None:
    """The first epoch with the highest score (the deployed model's validation accuracy)."""
    return max(history, key=lambda m: m.score) if history else None  # max keeps the first of ties


def seconds_to_best(history: Sequence[Epoch]) -> float | None:
    """Wall time from the start of training to the end of the best epoch: what "faster" means when
    methods differ in what an epoch costs (prior_guided's focus epochs take no pass over the data)."""
    best = best_epoch(history)
    return best.elapsed_s if best is not None else None


def patience_exhausted(history: Sequence[Epoch], patience: int | None) -> bool:
    """Early stopping as Keras does it (min_delta 0): True once the score has not beaten its best for
    `patience` epochs. None: never (the trial spends its whole budget)."""
    best = best_epoch(history)
    return patience is not None and best is not None and history[-1].epoch - best.epoch >= patience
