"""`cyclic_average`: seed 000's averaging in parameter space after convergence.

Train normally, then K cycles of a large learning rate (to leave the current minimum) followed by a
small one (to settle); keep the weights w_i at each cycle end and deploy m(w-bar) after a BN pass.
During the cycles the loss adds prox * ||w - w-bar||^2 (seed eq. 8) on top of the optimiser's L2.
From a converged model (post-convergence) the base phase is that model: w_1 joins at step 0.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from flatbasin.trainables import schedules
from flatbasin.trainables.averagers import Averager, BatchSource, EqualAverage
from flatbasin.trainables.conditions import AtLeast, Condition, EitherOf, OneOf
from flatbasin.trainables.variants.base import Variant, VariantParams, cycle_split


class CyclicAverageParams(VariantParams):
    base_frac: float = Field(0.5, gt=0, lt=1)  # share of the budget trained normally first
    cycles: int = Field(4, ge=1)  # K large/small cycles after the base phase
    lr_large: float = Field(0.05, gt=0, le=10)  # to jump out of the current minimum
    lr_small: float = Field(0.005, gt=0, le=10)  # to settle again before w_i is kept
    large_frac: float = Field(0.5, gt=0, lt=1)  # share of each cycle at lr_large
    prox: float = Field(1e-3, ge=0)  # lambda of seed eq. 8
    average_converged: bool = True  # the converged weights are w_1 (the seed's figure starts there)

    # The pull toward w-bar needs a w-bar: from the first cycle with the converged weights in the
    # average, else from the second cycle on.
    acts_when: ClassVar[dict[str, Condition]] = {
        "prox": EitherOf((OneOf("average_converged", (True,)), AtLeast("cycles", 2))),
    }

    @model_validator(mode="after")
    def _ordered(self) -> CyclicAverageParams:
        if self.lr_small > self.lr_large:
            raise ValueError(
                f"lr_small ({self.lr_small}) must not exceed lr_large ({self.lr_large})"
            )
        return self


class CyclicAverage(Variant[CyclicAverageParams]):
    name = "cyclic_average"
    Params = CyclicAverageParams
    smoke = {"cycles": 1}
    base_only = frozenset({"lr", "base_frac"})

    def __init__(
        self, params: CyclicAverageParams, *, epochs: int, lr: float, converged: bool = False
    ):
        super().__init__(params, epochs=epochs, lr=lr, converged=converged)
        self.base_epochs, self.cycle_epochs = cycle_split(
            epochs, params.base_frac, params.cycles, converged=converged
        )

    def _steps(self, steps_per_epoch: int) -> tuple[int, int, int]:
        base, cycle = self.base_epochs * steps_per_epoch, self.cycle_epochs * steps_per_epoch
        large = min(max(1, round(self.params.large_frac * cycle)), max(cycle - 1, 1))
        return base, cycle, large

    def schedule(self, steps_per_epoch: int) -> schedules.Schedule:
        p = self.params
        base, cycle, large = self._steps(steps_per_epoch)
        # "Train normally to convergence"; from a converged model only the leftover epochs (budget
        # not divisible by the cycles) come first, at lr_small, so the cycles still end the budget.
        first = (
            schedules.Constant(p.lr_small)
            if self.converged
            else schedules.Cosine(self.lr, p.lr_small, base)
        )
        return schedules.Then(first, base, schedules.TwoLevel(p.lr_large, p.lr_small, cycle, large))

    def join_steps(self, steps_per_epoch: int) -> list[int]:
        base, cycle, _ = self._steps(steps_per_epoch)
        ends = [base + k * cycle for k in range(1, self.params.cycles + 1)]
        converged_at = 0 if self.converged else base  # w_1: the converged model
        return [converged_at, *ends] if self.params.average_converged else ends

    def averager(self, model: nn.Module, steps_per_epoch: int, bn_batches: BatchSource) -> Averager:
        return EqualAverage(model, self.join_steps(steps_per_epoch), bn_batches)

    def penalty(self, model: nn.Module, averager: Averager) -> Tensor | None:
        if self.params.prox == 0 or not isinstance(averager, EqualAverage) or averager.count == 0:
            return None
        diffs = torch._foreach_sub(list(model.parameters()), averager.mean_parameters())
        return self.params.prox * sum(d.pow(2).sum() for d in diffs)  # type: ignore[return-value]

    def plan(self) -> dict[str, float | int]:
        e = self.cycle_epochs
        return {
            ("lead_epochs" if self.converged else "base_epochs"): self.base_epochs,
            "cycle_epochs": e,
            "epochs_large": round(self.params.large_frac * e, 3),
            "epochs_small": round((1 - self.params.large_frac) * e, 3),
        }
