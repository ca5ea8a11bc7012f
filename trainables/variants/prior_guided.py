"""`prior_guided`: prior-guided training (seed 004). Plain SGD, and at each stall of validation
accuracy (a gain under `threshold` between two epochs) a switch: the next epoch updates the conv
layers with the gradients a focus library regresses from their weights, with no pass over the data,
until the next stall switches back. Early stopping with `patience`. Deploys the final weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from flatbasin.trainables.averagers import Averager, BatchSource, Live
from flatbasin.trainables.focus import KINDS, FocusLibrary
from flatbasin.trainables.history import patience_exhausted
from flatbasin.trainables.records import DATA_PHASE
from flatbasin.trainables.schedules import Schedule
from flatbasin.trainables.variants.base import BaseScheduleParams, Variant, base_schedule

if TYPE_CHECKING:
    from flatbasin.trainables.records import EpochMetrics

FOCUS_PHASE = "focus"
# Accuracies are multiples of 1/(validation examples): a gain of exactly the threshold (4/400 against
# 0.01) must not fall below it through rounding.
TOLERANCE = 1e-9


class PriorGuidedParams(BaseScheduleParams):
    # Constant by default: the paper's plain SGD runs until early stopping ends it, so where the
    # budget ends is not known and a schedule decaying towards it would decay at an arbitrary pace;
    # the base schedules stay available (focus steps do not advance the schedule's step counter).
    schedule: Literal["constant", "step", "cosine", "warmup_cosine"] = "constant"
    library: Path  # the focus library (flatbasin focus-library), fitted on this model's conv layers
    threshold: float = Field(0.01, ge=0, le=1)  # validation accuracy gain below which it switches
    focus_steps: int | None = Field(None, ge=1, le=1_000_000)  # per focus epoch; None: an epoch's
    strength: float = Field(1.0, gt=0, le=100)  # focus step = lr * strength * regressed gradient
    layers: str = "all"  # conv layers the focus steps update: all, or names joined by commas
    patience: int | None = Field(5, ge=1)  # epochs without a better val accuracy; None: no stop

    @field_validator("layers", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):  # --set layers=[features.0, features.3]
            value = ",".join(str(v) for v in value)
        if isinstance(value, str):
            names = [n.strip() for n in value.split(",")]
            if not all(names):
                raise ValueError("needs 'all' or conv layer names separated by commas")
            return ",".join(names)
        return value


def next_phase(history: Sequence[EpochMetrics], threshold: float) -> str:
    """The paper's switch rule: after each epoch, compare validation accuracy with the epoch before;
    a gain under `threshold` (a stall) switches between data and focus epochs, otherwise the method
    that is working goes on. The first two epochs are data epochs (nothing to compare before them)."""
    if len(history) < 2:
        return DATA_PHASE
    current = history[-1].phase
    if history[-1].val_acc - history[-2].val_acc < threshold - TOLERANCE:
        return FOCUS_PHASE if current == DATA_PHASE else DATA_PHASE
    return current


class PriorGuided(Variant[PriorGuidedParams]):
    name = "prior_guided"
    Params = PriorGuidedParams
    file_params = ("library",)
    model_params = ("library", "layers")
    phases = (FOCUS_PHASE,)

    def __init__(self, params: PriorGuidedParams, *, epochs: int, lr: float):
        super().__init__(params, epochs=epochs, lr=lr)
        # Read on first use (not when configs are validated), once per device.
        self._library: tuple[torch.device, FocusLibrary] | None = None

    def schedule(self, steps_per_epoch: int) -> Schedule:
        return base_schedule(self.params, self.lr, self.epochs * steps_per_epoch)

    def averager(self, model: nn.Module, steps_per_epoch: int, bn_batches: BatchSource) -> Averager:
        return Live()

    def library(self, device: torch.device) -> FocusLibrary:
        if self._library is None or self._library[0] != device:
            self._library = (device, FocusLibrary.load(self.params.library, device))
        return self._library[1]

    def check(self, model: nn.Module) -> None:
        library = self.library(next(model.parameters()).device)
        library.check(model)
        library.select(self.params.layers)

    def phase(self, history: Sequence[EpochMetrics]) -> str:
        return next_phase(history, self.params.threshold)

    def epoch_without_data(
        self, phase: str, model: nn.Module, lr: float, steps_per_epoch: int
    ) -> None:
        """`focus_steps` steps w ← w − lr·strength·(a⊙w + c) on the selected conv layers' weights
        and biases; everything else (other layers, batch-norm statistics, the optimizer's momentum)
        is left untouched, as the paper keeps only the update of the conv layers."""
        if phase != FOCUS_PHASE:
            super().epoch_without_data(phase, model, lr, steps_per_epoch)
        library = self.library(next(model.parameters()).device)
        parameters = dict(model.named_parameters())
        keys = [
            f"{layer}.{kind}"
            for layer in library.select(self.params.layers)
            for kind in KINDS
            if f"{layer}.{kind}" in library.slopes
        ]
        rate = lr * self.params.strength
        with torch.no_grad():
            for _ in range(self.params.focus_steps or steps_per_epoch):
                for key in keys:
                    parameters[key].sub_(library.gradient(key, parameters[key]), alpha=rate)

    def stop(self, history: Sequence[EpochMetrics]) -> bool:
        return patience_exhausted(history, self.params.patience)
