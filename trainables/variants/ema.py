"""`ema`: exponential moving average of weights and buffers, updated every step (timm, airbench)."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from flatbasin.trainables.averagers import EMA, Averager, BatchSource
from flatbasin.trainables.schedules import Schedule
from flatbasin.trainables.variants.base import BaseScheduleParams, Variant, base_schedule


class EMAParams(BaseScheduleParams):
    decay: float = Field(0.99, gt=0, lt=1)  # per step; the average spans about 1/(1-decay) steps


class EMAVariant(Variant[EMAParams]):
    name = "ema"
    Params = EMAParams
    smoke = {"decay": 0.8}  # 16 steps: 0.99 would still be the initial weights

    def schedule(self, steps_per_epoch: int) -> Schedule:
        return base_schedule(self.params, self.lr, self.epochs * steps_per_epoch)

    def averager(self, model: nn.Module, steps_per_epoch: int, bn_batches: BatchSource) -> Averager:
        return EMA(model, self.params.decay)
