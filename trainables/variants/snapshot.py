"""`snapshot`: Snapshot Ensembles (Huang et al. 2017; seed 002).

Per-iteration cyclic cosine a(t) = a0/2 (cos(pi mod(t-1, ceil(T/M)) / ceil(T/M)) + 1) with a0 = `lr`,
a snapshot at each cycle end, and the softmax average of the snapshots deployed. The curve adds the
newest snapshots first, as in the paper; the weight average of the snapshots is recorded beside it.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from flatbasin.trainables import schedules
from flatbasin.trainables.averagers import Averager, BatchSource, Snapshots
from flatbasin.trainables.variants.base import BudgetError, Variant, VariantParams


class SnapshotParams(VariantParams):
    cycles: int = Field(5, ge=1)  # M snapshots in the budget
    weight_average_curve: bool = True  # also score the equal weight average of the snapshots


class Snapshot(Variant[SnapshotParams]):
    name = "snapshot"
    Params = SnapshotParams
    smoke = {"cycles": 2}

    def __init__(self, params: SnapshotParams, *, epochs: int, lr: float):
        super().__init__(params, epochs=epochs, lr=lr)
        if params.cycles > epochs:
            raise BudgetError(
                f"cycles={params.cycles} does not fit the budget of {epochs} epochs: each cycle needs at least 1"
            )

    def schedule(self, steps_per_epoch: int) -> schedules.SnapshotCosine:
        return schedules.SnapshotCosine(self.lr, self.epochs * steps_per_epoch, self.params.cycles)

    def join_steps(self, steps_per_epoch: int) -> list[int]:
        sched = self.schedule(steps_per_epoch)
        ends = {
            min(k * sched.cycle_steps, sched.total_steps) for k in range(1, self.params.cycles + 1)
        }
        return sorted(ends)

    def averager(self, model: nn.Module, steps_per_epoch: int, bn_batches: BatchSource) -> Averager:
        return Snapshots(
            model,
            self.join_steps(steps_per_epoch),
            ensemble=True,
            newest_first=True,
            weight_average=self.params.weight_average_curve,
            bn_batches=bn_batches,
        )

    def plan(self) -> dict[str, float | int]:
        return {"cycle_epochs": round(self.epochs / self.params.cycles, 3)}
