"""`sgd`: plain training with one schedule; deploys the final weights (seeds 001, 003).

With `patience`, plain SGD with early stopping: the baseline the prior-guided paper (seed 004)
measures against. Without it (the default) the trial spends its whole budget, as every variant does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import Field
from torch import nn

from flatbasin.trainables.averagers import Averager, BatchSource, Live
from flatbasin.trainables.history import patience_exhausted
from flatbasin.trainables.schedules import Schedule
from flatbasin.trainables.variants.base import BaseScheduleParams, Variant, base_schedule

if TYPE_CHECKING:
    from flatbasin.trainables.records import EpochMetrics


class SGDParams(BaseScheduleParams):
    # Epochs without a better validation accuracy before the trial ends; None: the whole budget.
    patience: int | None = Field(None, ge=1)


class SGD(Variant[SGDParams]):
    name = "sgd"
    Params = SGDParams

    def schedule(self, steps_per_epoch: int) -> Schedule:
        return base_schedule(self.params, self.lr, self.epochs * steps_per_epoch)

    def averager(self, model: nn.Module, steps_per_epoch: int, bn_batches: BatchSource) -> Averager:
        return Live()

    def stop(self, history: Sequence[EpochMetrics]) -> bool:
        return patience_exhausted(history, self.params.patience)
