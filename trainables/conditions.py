"""When a setting acts: the settings whose values decide whether another one does anything.

`swa_lr_max` shapes the SWA learning rate in cyclic mode only; with `swa_mode: constant` it does
nothing. A search must not sample such a value (TPE would model noise) nor record it (the run's
params would say something ran that did not). Each variant's parameters name theirs
(`VariantParams.acts_when`), the trial settings theirs (config.TRIAL_ACTS_WHEN); the space loader
turns them into Optuna's define-by-run conditions, and TrialConfig.flat() records only what acts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


class Condition(Protocol):
    @property
    def on(self) -> tuple[str, ...]: ...  # the settings it reads

    def holds(self, values: Mapping[str, Any]) -> bool: ...

    @property
    def says(self) -> str: ...  # "swa_mode is cyclic": how messages and docs name it


@dataclass(frozen=True)
class OneOf:
    """Acts when `key` takes one of `values`."""

    key: str
    values: tuple[Any, ...]

    @property
    def on(self) -> tuple[str, ...]:
        return (self.key,)

    def holds(self, values: Mapping[str, Any]) -> bool:
        return values[self.key] in self.values

    @property
    def says(self) -> str:
        shown = [str(v).lower() if isinstance(v, bool) else str(v) for v in self.values]
        if len(shown) > 2:
            return f"{self.key} is one of {', '.join(shown)}"
        return f"{self.key} is {' or '.join(shown)}"


@dataclass(frozen=True)
class AtLeast:
    """Acts when the number `key` is at least `low`."""

    key: str
    low: int

    @property
    def on(self) -> tuple[str, ...]:
        return (self.key,)

    def holds(self, values: Mapping[str, Any]) -> bool:
        return values[self.key] >= self.low

    @property
    def says(self) -> str:
        return f"{self.key} is at least {self.low}"


@dataclass(frozen=True)
class EitherOf:
    """Acts when any of its conditions holds."""

    conditions: tuple[OneOf | AtLeast, ...]

    @property
    def on(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for c in self.conditions for k in c.on))

    def holds(self, values: Mapping[str, Any]) -> bool:
        return any(c.holds(values) for c in self.conditions)

    @property
    def says(self) -> str:
        return " or ".join(c.says for c in self.conditions)


def in_order(keys: list[str], conditions: Mapping[str, Condition]) -> list[str]:
    """`keys` with every setting a condition reads before the setting it decides (Optuna must
    sample `swa_mode` before it can tell whether to sample `swa_lr_max`); otherwise as given."""
    placed: list[str] = []

    def place(key: str, seen: tuple[str, ...]) -> None:
        if key in placed or key in seen:
            return
        for parent in conditions[key].on if key in conditions else ():
            if parent in keys:
                place(parent, (*seen, key))
        placed.append(key)

    for key in keys:
        place(key, ())
    return placed


def inactive(
    values: Mapping[str, Any], conditions: Mapping[str, Condition], defaults: Mapping[str, Any]
) -> dict[str, str]:
    """The settings among `values` that do nothing, each with the condition it lacks ("swa_mode is
    cyclic"). A setting that does nothing counts at its default for the settings it decides."""
    seen = {**defaults, **values}
    out: dict[str, str] = {}
    for key in in_order(list(conditions), conditions):
        condition = conditions[key]
        if key in values and not condition.holds(seen):
            out[key] = condition.says
            seen[key] = defaults.get(key)
    return out
