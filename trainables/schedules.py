"""Learning-rate schedules as pure functions of the step (0-based index of the update about to happen).

Each schedule is a small frozen dataclass whose call returns the learning rate; `Then` chains phases.
Formulas follow the papers the variants come from; tests hold them against torch's own schedulers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


class Schedule(Protocol):
    def __call__(self, step: int) -> float: ...


@dataclass(frozen=True)
class Constant:
    lr: float

    def __call__(self, step: int) -> float:
        return self.lr


@dataclass(frozen=True)
class StepDecay:
    """Multiply by `gamma` at each milestone (in steps), like torch's MultiStepLR."""

    lr: float
    milestones: tuple[int, ...]
    gamma: float

    def __call__(self, step: int) -> float:
        return self.lr * self.gamma ** sum(step >= m for m in self.milestones)


@dataclass(frozen=True)
class Cosine:
    """Half a cosine from `lr_max` at step 0 to `lr_min` at step `steps` (torch's CosineAnnealingLR)."""

    lr_max: float
    lr_min: float
    steps: int

    def __call__(self, step: int) -> float:
        t = min(step, self.steps) / max(self.steps, 1)
        return self.lr_min + (self.lr_max - self.lr_min) * (1 + math.cos(math.pi * t)) / 2


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up from ~0 to `lr` over `warmup` steps, then cosine to `lr_min` at `steps`."""

    lr: float
    lr_min: float
    warmup: int
    steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        return Cosine(self.lr, self.lr_min, self.steps - self.warmup)(step - self.warmup)


@dataclass(frozen=True)
class SnapshotCosine:
    """Huang et al. 2017, eq. 2: a(t) = a0/2 (cos(pi mod(t-1, ceil(T/M)) / ceil(T/M)) + 1), t 1-based."""

    lr0: float
    total_steps: int  # T
    cycles: int  # M

    @property
    def cycle_steps(self) -> int:
        return math.ceil(self.total_steps / self.cycles)

    def __call__(self, step: int) -> float:
        length = self.cycle_steps
        return self.lr0 / 2 * (math.cos(math.pi * (step % length) / length) + 1)


@dataclass(frozen=True)
class SGDR:
    """Loshchilov & Hutter 2017: cosine between lr_max and lr_min, restarted after periods t0, t0*t_mult, ...

    Same arithmetic as torch.optim.lr_scheduler.CosineAnnealingWarmRestarts stepped once per batch.
    """

    lr_max: float
    lr_min: float
    t0: int  # first period, in steps
    t_mult: int = 1

    def period(self, step: int) -> tuple[int, int]:
        """(steps into the current period, length of the current period)."""
        if self.t_mult == 1:
            return step % self.t0, self.t0
        n = int(math.log(step / self.t0 * (self.t_mult - 1) + 1, self.t_mult))
        start = self.t0 * (self.t_mult**n - 1) // (self.t_mult - 1)
        return step - start, self.t0 * self.t_mult**n

    def __call__(self, step: int) -> float:
        t_cur, t_i = self.period(step)
        return self.lr_min + (self.lr_max - self.lr_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2


@dataclass(frozen=True)
class SWABase:
    """The base schedule of the SWA reference code (timgaripov/swa, train.py), expressed in steps.

    Constant `lr` for the first half of the pre-averaging phase, linear decay to `swa_lr` until 90% of it,
    then `swa_lr`.
    """

    lr: float
    swa_lr: float
    swa_start: int  # steps

    def __call__(self, step: int) -> float:
        t = step / max(self.swa_start, 1)
        ratio = self.swa_lr / self.lr
        if t <= 0.5:
            factor = 1.0
        elif t <= 0.9:
            factor = 1.0 - (1.0 - ratio) * (t - 0.5) / 0.4
        else:
            factor = ratio
        return self.lr * factor


@dataclass(frozen=True)
class SWACyclic:
    """Izmailov et al. 2018, eq. 2: a(i) = (1 - t(i)) a1 + t(i) a2, t(i) = (mod(i-1, c) + 1) / c."""

    lr_1: float
    lr_2: float
    cycle_steps: int

    def __call__(self, step: int) -> float:
        t = (step % self.cycle_steps + 1) / self.cycle_steps
        return (1 - t) * self.lr_1 + t * self.lr_2


@dataclass(frozen=True)
class Triangle:
    """Garipov et al. 2018 (FGE): linear from lr_1 down to lr_2 over half a cycle and back up."""

    lr_1: float
    lr_2: float
    cycle_steps: int

    def __call__(self, step: int) -> float:
        t = (step % self.cycle_steps + 1) / self.cycle_steps
        if t <= 0.5:
            return (1 - 2 * t) * self.lr_1 + 2 * t * self.lr_2
        return (2 - 2 * t) * self.lr_2 + (2 * t - 1) * self.lr_1


@dataclass(frozen=True)
class TwoLevel:
    """Seed 000: each cycle spends `large_steps` at lr_large, then the rest at lr_small."""

    lr_large: float
    lr_small: float
    cycle_steps: int
    large_steps: int

    def __call__(self, step: int) -> float:
        return self.lr_large if step % self.cycle_steps < self.large_steps else self.lr_small


@dataclass(frozen=True)
class Then:
    """`first` for the first `steps` steps, then `rest` with its step counted from the boundary."""

    first: Schedule
    steps: int
    rest: Schedule

    def __call__(self, step: int) -> float:
        return self.first(step) if step < self.steps else self.rest(step - self.steps)
