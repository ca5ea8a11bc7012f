"""`swa`: stochastic weight averaging (Izmailov et al. 2018).

The reference code's base schedule until the averaging phase, then a constant or cyclic SWA learning
rate; an equal average of the weights every `swa_every` epochs (cycle ends in cyclic mode), with batch
norm statistics recomputed for the average. From a converged model (post-convergence) the whole
budget is the averaging phase.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator
from torch import nn

from flatbasin.trainables import schedules
from flatbasin.trainables.averagers import Averager, BatchSource, EqualAverage
from flatbasin.trainables.conditions import Condition, OneOf
from flatbasin.trainables.variants.base import BudgetError, Variant, VariantParams


class SWAParams(VariantParams):
    swa_start_frac: float = Field(0.75, gt=0, lt=1)  # share of the budget before averaging starts
    swa_lr: float = Field(0.01, gt=0, le=10)  # constant SWA lr, or the low end of each cycle
    swa_mode: Literal["constant", "cyclic"] = "constant"
    swa_lr_max: float = Field(0.05, gt=0, le=10)  # cyclic mode: lr at the start of each cycle
    swa_every: int = Field(1, ge=1)  # epochs between averaged models (the cycle length)

    acts_when: ClassVar[dict[str, Condition]] = {"swa_lr_max": OneOf("swa_mode", ("cyclic",))}

    @model_validator(mode="after")
    def _ordered(self) -> SWAParams:
        if self.swa_mode == "cyclic" and self.swa_lr_max < self.swa_lr:
            raise ValueError(f"swa_lr_max ({self.swa_lr_max}) must be >= swa_lr ({self.swa_lr})")
        return self


class SWA(Variant[SWAParams]):
    name = "swa"
    Params = SWAParams
    smoke = {"swa_start_frac": 0.5}
    base_only = frozenset({"lr", "swa_start_frac"})

    def __init__(self, params: SWAParams, *, epochs: int, lr: float, converged: bool = False):
        super().__init__(params, epochs=epochs, lr=lr, converged=converged)
        base = 0 if converged else max(1, round(params.swa_start_frac * epochs))
        averaging = epochs - base
        self.models = averaging // params.swa_every
        if self.models < 1 and converged:
            raise BudgetError(
                f"swa_every={params.swa_every} does not fit the budget: {epochs} epoch(s) after "
                "convergence leave no whole period to average over; lower swa_every or raise epochs"
            )
        if self.models < 1:
            raise BudgetError(
                f"swa_every={params.swa_every} does not fit the budget: swa_start_frac="
                f"{params.swa_start_frac} of {epochs} epochs leaves {averaging} epoch(s) to average over"
            )
        # Leftover epochs go before averaging starts, so the last average ends with the budget.
        self.start_epoch = epochs - self.models * params.swa_every

    def schedule(self, steps_per_epoch: int) -> schedules.Schedule:
        p = self.params
        start = self.start_epoch * steps_per_epoch
        tail: schedules.Schedule
        if p.swa_mode == "constant":
            tail = schedules.Constant(p.swa_lr)
        else:
            tail = schedules.SWACyclic(p.swa_lr_max, p.swa_lr, p.swa_every * steps_per_epoch)
        # The reference code's decay to swa_lr; from a converged model only the leftover epochs come
        # first, already at swa_lr (where that decay ends).
        first = (
            schedules.Constant(p.swa_lr)
            if self.converged
            else schedules.SWABase(self.lr, p.swa_lr, start)
        )
        return schedules.Then(first, start, tail)

    def join_steps(self, steps_per_epoch: int) -> list[int]:
        start, every = self.start_epoch * steps_per_epoch, self.params.swa_every * steps_per_epoch
        return [start + k * every for k in range(1, self.models + 1)]

    def averager(self, model: nn.Module, steps_per_epoch: int, bn_batches: BatchSource) -> Averager:
        return EqualAverage(model, self.join_steps(steps_per_epoch), bn_batches)

    def plan(self) -> dict[str, float | int]:
        return {"swa_start_epoch": self.start_epoch, "models_averaged": self.models}
