"""`sgdr`: cosine annealing with warm restarts (Loshchilov & Hutter 2017; seed 003), stepped per batch.

The first period t0 is derived from the budget so that `cycles` periods of t0, t0*t_mult, ... end with
it; the few leftover steps (fewer than the periods' total ratio) run at lr before the first period.
Deploys the weights at the end of the last period, or the softmax ensemble of all period ends.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from torch import nn

from flatbasin.trainables import schedules
from flatbasin.trainables.averagers import Averager, BatchSource, Snapshots
from flatbasin.trainables.conditions import AtLeast, Condition
from flatbasin.trainables.variants.base import BudgetError, Variant, VariantParams


class SGDRParams(VariantParams):
    cycles: int = Field(3, ge=1)  # restart periods in the budget
    t_mult: int = Field(2, ge=1)  # each period is t_mult times longer than the one before
    lr_min: float = Field(0.0, ge=0)
    ensemble: bool = False  # deploy the softmax ensemble of the period ends instead of the last one

    # One period has no next one to lengthen, and an ensemble of one period end is that end.
    acts_when: ClassVar[dict[str, Condition]] = {
        "t_mult": AtLeast("cycles", 2),
        "ensemble": AtLeast("cycles", 2),
    }


class SGDR(Variant[SGDRParams]):
    name = "sgdr"
    Params = SGDRParams
    smoke = {"cycles": 2, "t_mult": 1}

    def __init__(self, params: SGDRParams, *, epochs: int, lr: float):
        super().__init__(params, epochs=epochs, lr=lr)
        self.units = sum(params.t_mult**k for k in range(params.cycles))  # budget in units of t0
        if epochs < self.units:
            raise BudgetError(
                f"cycles={params.cycles} with t_mult={params.t_mult} needs periods of "
                f"{self.units} x t0 and t0 >= 1 epoch, but the budget is {epochs} epochs"
            )

    def _layout(self, steps_per_epoch: int) -> tuple[int, int]:
        """(leftover steps before the first period, t0 in steps)."""
        total = self.epochs * steps_per_epoch
        t0 = total // self.units
        return total - t0 * self.units, t0

    def schedule(self, steps_per_epoch: int) -> schedules.Schedule:
        lead, t0 = self._layout(steps_per_epoch)
        sgdr = schedules.SGDR(self.lr, self.params.lr_min, t0, self.params.t_mult)
        return schedules.Then(schedules.Constant(self.lr), lead, sgdr)

    def join_steps(self, steps_per_epoch: int) -> list[int]:
        lead, t0 = self._layout(steps_per_epoch)
        ends, end = [], lead
        for k in range(self.params.cycles):
            end += t0 * self.params.t_mult**k
            ends.append(end)
        return ends

    def averager(self, model: nn.Module, steps_per_epoch: int, bn_batches: BatchSource) -> Averager:
        return Snapshots(model, self.join_steps(steps_per_epoch), ensemble=self.params.ensemble)

    def plan(self) -> dict[str, float | int]:
        return {"t0_epochs": round(self.epochs / self.units, 3)}
