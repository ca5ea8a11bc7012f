"""`sgd`: plain training with one schedule; deploys the final weights (seeds 001, 003)."""

from __future__ import annotations

from torch import nn

from flatbasin.trainables.averagers import Averager, BatchSource, Live
from flatbasin.trainables.schedules import Schedule
from flatbasin.trainables.variants.base import BaseScheduleParams, Variant, base_schedule


class SGD(Variant[BaseScheduleParams]):
    name = "sgd"
    Params = BaseScheduleParams

    def schedule(self, steps_per_epoch: int) -> Schedule:
        return base_schedule(self.params, self.lr, self.epochs * steps_per_epoch)

    def averager(self, model: nn.Module, steps_per_epoch: int, bn_batches: BatchSource) -> Averager:
        return Live()
