"""ASHA with its rungs kept per variant, so that a trial is only ever compared with trials of its own
variant. One shared ASHA ranked a cyclic variant mid-cycle against a plain one at the same epoch and
stopped every `sgd` trial next to `snapshot`; the question ASHA answers is which settings of a variant
deserve the rest of the budget, not which variant is ahead at epoch 3."""

from __future__ import annotations

import pickle
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler


class PerVariantASHA(FIFOScheduler):
    """One ASHAScheduler per variant (made on the variant's first trial), each with the same settings.

    Rungs still sit on `time_attr`, which the trainable advances only at cycle ends (`rung_epoch`).
    """

    def __init__(self, **asha: Any):
        super().__init__()
        self._asha = asha
        self._metric = asha["metric"]
        self._by_variant: dict[str, ASHAScheduler] = {}

    def _for(self, trial: Any) -> ASHAScheduler:
        variant = trial.config["variant"]
        if variant not in self._by_variant:
            self._by_variant[variant] = ASHAScheduler(**self._asha)
        return self._by_variant[variant]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # metric and mode are fixed at construction, for every variant alike

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._for(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._for(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self._for(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._for(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._for(trial).on_trial_remove(tune_controller, trial)

    def rungs(self, variant: str) -> list[tuple[float, dict[str, float]]]:
        """(milestone, {trial id: score}) of each rung of the variant's bracket."""
        scheduler = self._by_variant.get(variant)
        if scheduler is None:
            return []
        return [
            (milestone, dict(recorded)) for milestone, recorded in scheduler._brackets[0]._rungs
        ]

    def milestones(self) -> list[int]:
        """The rungs' milestones on `time_attr`, the same for every variant: a trial reports at
        once when it reaches one (it holds short epochs back otherwise)."""
        bracket = ASHAScheduler(**self._asha)._brackets[0]
        return sorted(int(milestone) for milestone, _ in bracket._rungs)

    def debug_string(self) -> str:
        return "\n".join(f"{v}: {s.debug_string()}" for v, s in sorted(self._by_variant.items()))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))
