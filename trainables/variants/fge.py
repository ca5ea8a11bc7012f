"""`fge`: Fast Geometric Ensembling (Garipov et al. 2018).

After a base phase, short triangular cycles between lr_1 and lr_2; a member at each cycle's low point,
deployed as a softmax ensemble (members in the order they were collected). From a converged model
(post-convergence) the cycles start at once.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import nn

from flatbasin.trainables import schedules
from flatbasin.trainables.averagers import Averager, BatchSource, Snapshots
from flatbasin.trainables.variants.base import Variant, VariantParams, cycle_split


class FGEParams(VariantParams):
    base_frac: float = Field(0.5, gt=0, lt=1)  # share of the budget before the cycles
    cycles: int = Field(4, ge=1)  # ensemble members
    lr_1: float = Field(0.05, gt=0, le=10)  # top of each triangle
    lr_2: float = Field(0.0005, gt=0, le=10)  # bottom, where a member is collected
    weight_average_curve: bool = True  # also score the equal weight average of the members

    @model_validator(mode="after")
    def _ordered(self) -> FGEParams:
        if self.lr_2 > self.lr_1:
            raise ValueError(f"lr_2 ({self.lr_2}) must not exceed lr_1 ({self.lr_1})")
        return self


class FGE(Variant[FGEParams]):
    name = "fge"
    Params = FGEParams
    smoke = {"cycles": 1}
    base_only = frozenset({"lr", "base_frac"})

    def __init__(self, params: FGEParams, *, epochs: int, lr: float, converged: bool = False):
        super().__init__(params, epochs=epochs, lr=lr, converged=converged)
        self.base_epochs, self.cycle_epochs = cycle_split(
            epochs, params.base_frac, params.cycles, converged=converged
        )

    def schedule(self, steps_per_epoch: int) -> schedules.Schedule:
        base, cycle = self.base_epochs * steps_per_epoch, self.cycle_epochs * steps_per_epoch
        p = self.params
        # From a converged model only the leftover epochs come first, at the low lr_2.
        first = (
            schedules.Constant(p.lr_2)
            if self.converged
            else schedules.Cosine(self.lr, p.lr_1, base)
        )
        return schedules.Then(first, base, schedules.Triangle(p.lr_1, p.lr_2, cycle))

    def join_steps(self, steps_per_epoch: int) -> list[int]:
        base, cycle = self.base_epochs * steps_per_epoch, self.cycle_epochs * steps_per_epoch
        low = max(cycle // 2, 1)  # the triangle's bottom: the step that ran at lr_2
        return [base + k * cycle + low for k in range(self.params.cycles)]

    def averager(self, model: nn.Module, steps_per_epoch: int, bn_batches: BatchSource) -> Averager:
        return Snapshots(
            model,
            self.join_steps(steps_per_epoch),
            ensemble=True,
            weight_average=self.params.weight_average_curve,
            bn_batches=bn_batches,
        )

    def plan(self) -> dict[str, float | int]:
        lead = "lead_epochs" if self.converged else "base_epochs"
        return {lead: self.base_epochs, "cycle_epochs": self.cycle_epochs}
