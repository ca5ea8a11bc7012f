"""The variant interface: validated parameters, a schedule, an averager, and where the cycles end.

A variant never touches the loop: it answers `lr_at(step)` (through `schedule`), says which model to
keep and deploy (through `averager`), and may add a term to the loss (`penalty`). It may also decide,
from the recorded history alone, what each epoch is (`phase`, `epoch_without_data`) and when the trial
ends early (`stop`); and refuse a model it cannot train (`check`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import ConfigDict, Field, field_validator
from torch import Tensor, nn

from flatbasin.trainables import schedules
from flatbasin.trainables.averagers import Averager, BatchSource
from flatbasin.trainables.conditions import Condition, OneOf
from flatbasin.trainables.records import DATA_PHASE, EpochMetrics
from flatbasin.trainables.strict import NoBoolNumbers


class VariantParams(NoBoolNumbers):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Parameters that act only when others take certain values (trainables/conditions.py): a
    # search samples and records them only then.
    acts_when: ClassVar[dict[str, Condition]] = {}


class BudgetError(ValueError):
    """The variant's cycles do not fit the epoch budget."""


P = TypeVar("P", bound=VariantParams)


class Variant(ABC, Generic[P]):
    name: ClassVar[str]
    Params: ClassVar[type[VariantParams]]
    # Parameters that make the variant fit a 2-epoch smoke run (used by the contract test and `--smoke`).
    smoke: ClassVar[dict[str, Any]] = {}
    # A variant with a base phase (train normally, then an averaging tail) names the settings that
    # shape only that phase. Given a converged model (post-convergence, TrialConfig.start) it is
    # built with converged=True and runs its tail alone, so a search from a converged model leaves
    # these out. Variants without a base phase continue the converged weights with their own
    # schedule.
    base_only: ClassVar[frozenset[str]] = frozenset()
    # Parameters naming a file the trial reads (prior_guided's focus library). A space file's relative
    # paths are made absolute on the driver (Ray runs trials in other working folders), and a variant
    # with one cannot join a space that must run with no file made beforehand (compare.yaml).
    file_params: ClassVar[tuple[str, ...]] = ()
    # Parameters that `check(model)` depends on: preflight checks each distinct value once.
    model_params: ClassVar[tuple[str, ...]] = ()
    # The epochs without data `phase` may name (prior_guided: "focus"). Each is recorded per epoch
    # as a metric of its name (1 in such an epoch, 0 otherwise), by the variants that have it only.
    phases: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: P, *, epochs: int, lr: float, converged: bool = False):
        self.params = params
        self.epochs = epochs
        self.lr = lr
        self.converged = converged  # no base phase: the budget is the tail's (see base_only)

    @abstractmethod
    def schedule(self, steps_per_epoch: int) -> schedules.Schedule: ...

    @abstractmethod
    def averager(
        self, model: nn.Module, steps_per_epoch: int, bn_batches: BatchSource
    ) -> Averager: ...

    def penalty(self, model: nn.Module, averager: Averager) -> Tensor | None:
        """An extra loss term (cyclic_average's pull toward the running average); None for most."""
        return None

    def join_steps(self, steps_per_epoch: int) -> list[int]:
        """Completed-step counts at which a member joins (cycle ends); empty for non-cyclic variants."""
        return []

    def boundaries(self, steps_per_epoch: int) -> list[int]:
        """Epochs after which a member has just joined: the only points where comparing trials is fair."""
        return sorted({math.ceil(s / steps_per_epoch) for s in self.join_steps(steps_per_epoch)})

    def plan(self) -> dict[str, float | int]:
        """Quantities derived from the budget, for the record (cycle lengths in epochs and the like)."""
        return {}

    def check(self, model: nn.Module) -> None:
        """Raise ValueError, naming what is wrong, when this variant cannot train `model`. Called
        before the first step and by the search's preflight on the driver; nothing for most."""

    def phase(self, history: Sequence[EpochMetrics]) -> str:
        """What the next epoch is: "data" (steps over the training data), or a name the variant
        handles in `epoch_without_data`. A pure function of the recorded history: a trial resumed
        from a checkpoint decides exactly as the uninterrupted one did."""
        return DATA_PHASE

    def epoch_without_data(
        self, phase: str, model: nn.Module, lr: float, steps_per_epoch: int
    ) -> None:
        """Run an epoch of `phase` on the weights in place, without a pass over the data; `lr` is the
        schedule's rate at the current step. Only variants whose `phase` names one implement it."""
        raise NotImplementedError(f"variant '{self.name}' has no epoch of phase {phase!r}")

    def stop(self, history: Sequence[EpochMetrics]) -> bool:
        """True to end the trial before its budget (early stopping); a pure function of the history."""
        return False


def cycle_split(
    epochs: int, base_frac: float, cycles: int, field: str = "cycles", converged: bool = False
) -> tuple[int, int]:
    """(base epochs, epochs per cycle): whole-epoch cycles filling the budget after the base phase.

    Cycle length is derived from the budget (budget after the base phase / cycles), never chosen apart
    from it; leftover epochs go to the base phase. A converged start has no base phase: the whole
    budget is the tail's, and only the leftover epochs come before the cycles.
    """
    base = 0 if converged else max(1, round(base_frac * epochs))
    cycle_epochs = (epochs - base) // cycles
    if cycle_epochs < 1 and converged:
        raise BudgetError(
            f"{field}={cycles} does not fit the budget: {epochs} epoch(s) after convergence, and "
            f"each cycle needs at least 1; lower {field} or raise epochs"
        )
    if cycle_epochs < 1:
        raise BudgetError(
            f"{field}={cycles} does not fit the budget: {epochs} epochs with base_frac={base_frac} "
            f"leave {epochs - base} epoch(s) for the cycles, and each cycle needs at least 1; "
            f"lower {field}, lower base_frac or raise epochs"
        )
    return epochs - cycles * cycle_epochs, cycle_epochs


class BaseScheduleParams(VariantParams):
    """The single schedules of plain training (seed 001 and 003)."""

    acts_when: ClassVar[dict[str, Condition]] = {
        "lr_min": OneOf("schedule", ("cosine", "warmup_cosine")),  # the floor of a cosine
        "warmup_frac": OneOf("schedule", ("warmup_cosine",)),
        "step_milestones": OneOf("schedule", ("step",)),
        "step_gamma": OneOf("schedule", ("step",)),
    }

    schedule: Literal["constant", "step", "cosine", "warmup_cosine"] = "cosine"
    lr_min: float = Field(0.0, ge=0)  # floor of cosine schedules
    warmup_frac: float = Field(0.05, ge=0, lt=1)  # share of the budget spent warming up
    step_milestones: tuple[float, ...] = (
        0.5,
        0.75,
    )  # fractions of the budget where lr *= step_gamma
    step_gamma: float = Field(0.1, gt=0, le=1)

    @field_validator("step_milestones")
    @classmethod
    def _fractions_in_order(cls, milestones: tuple[float, ...]) -> tuple[float, ...]:
        if not milestones or any(not 0 < m < 1 for m in milestones):
            raise ValueError("needs fractions of the budget, each between 0 and 1")
        if list(milestones) != sorted(set(milestones)):
            raise ValueError("needs increasing fractions of the budget")
        return milestones


def base_schedule(p: BaseScheduleParams, lr: float, total_steps: int) -> schedules.Schedule:
    if p.schedule == "constant":
        return schedules.Constant(lr)
    if p.schedule == "step":
        milestones = tuple(round(f * total_steps) for f in p.step_milestones)
        return schedules.StepDecay(lr, milestones, p.step_gamma)
    if p.schedule == "cosine":
        return schedules.Cosine(lr, p.lr_min, total_steps)
    warmup = max(1, round(p.warmup_frac * total_steps))
    return schedules.WarmupCosine(lr, p.lr_min, warmup, total_steps)
