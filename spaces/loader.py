"""Load and validate a search-space file; produce the Optuna define-by-run function for OptunaSearch.

    name: compare               # experiment name (default: the file's stem)
    samples: 16                 # trials, unless --samples says otherwise
    epochs: 20                  # the budget every trial spends; cycles are derived from it
    dataset: digits
    model: auto
    fixed: {batch_size: 64}     # any trial setting, the same for every trial
    variants:                   # one or more; with several, the variant itself is a choice
      swa:
        lr: {loguniform: [0.01, 0.2]}
        swa_lr: {loguniform: [0.001, 0.05]}
        swa_every: 1            # a plain value is fixed
      snapshot:
        cycles: {int: [2, 6]}

Distributions: loguniform [low, high], uniform [low, high], int [low, high], choice [a, b, ...].
Validation tries every corner of every range (and every choice) through the trial config's own
validators, so a range that can produce an impossible trial is rejected before Ray starts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flatbasin.trainables.config import config_keys, make_config
from flatbasin.trainables.variants import REGISTRY

MAX_CORNERS = 4096


class SpaceError(ValueError):
    """The space file is wrong; the message names the file and the key."""


@dataclass(frozen=True)
class Dist:
    kind: str  # loguniform | uniform | int | choice
    values: tuple[Any, ...]  # (low, high) or the choices

    def suggest(self, trial: Any, name: str) -> Any:
        if self.kind == "loguniform":
            return trial.suggest_float(name, *self.values, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(name, *self.values)
        if self.kind == "int":
            return trial.suggest_int(name, *self.values)
        return trial.suggest_categorical(name, list(self.values))

    @property
    def corners(self) -> tuple[Any, ...]:
        return self.values if self.kind == "choice" else (self.values[0], self.values[-1])


class _SpaceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    samples: int = Field(16, ge=1, le=100_000)
    epochs: int = Field(20, ge=1)
    dataset: str = "digits"
    model: str = "auto"
    fixed: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any] | None] = Field(min_length=1)


@dataclass(frozen=True)
class Space:
    path: Path
    name: str
    samples: int
    settings: dict[str, Any]  # fixed trial settings shared by every variant
    variants: dict[str, tuple[dict[str, Dist], dict[str, Any]]]  # name -> (searched, fixed)

    def define_by_run(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run: sample the variant (when there is a choice) and its parameters."""
        names = list(self.variants)
        variant = trial.suggest_categorical("variant", names) if len(names) > 1 else names[0]
        searched, fixed = self.variants[variant]
        for key, dist in searched.items():
            dist.suggest(trial, f"{variant}/{key}")
        return {"variant": variant, "settings": {**self.settings, **fixed}}

    def with_settings(self, **settings: Any) -> Space:
        """The same space with extra fixed settings (the driver adds threads, device)."""
        return Space(
            self.path, self.name, self.samples, {**self.settings, **settings}, self.variants
        )


def _parse_dist(where: str, value: Any) -> Dist | None:
    """A distribution, or None for a plain fixed value."""
    if not isinstance(value, dict):
        return None
    if len(value) != 1:
        raise SpaceError(
            f"{where}: a distribution is one of loguniform, uniform, int, choice; got keys {sorted(value)}"
        )
    ((kind, args),) = value.items()
    if kind not in ("loguniform", "uniform", "int", "choice"):
        raise SpaceError(
            f"{where}: unknown distribution '{kind}' (use loguniform, uniform, int or choice)"
        )
    if not isinstance(args, list) or not args:
        raise SpaceError(f"{where}: {kind} takes a list, e.g. {kind}: [low, high]")
    if kind == "choice":
        return Dist(kind, tuple(args))
    if len(args) != 2 or not all(
        isinstance(a, int | float) and not isinstance(a, bool) for a in args
    ):
        raise SpaceError(f"{where}: {kind} takes two numbers [low, high], got {args}")
    low, high = args
    if low > high:
        raise SpaceError(f"{where}: low ({low}) is above high ({high})")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}: loguniform needs low > 0, got {low}")
    if kind == "int" and not all(isinstance(a, int) for a in args):
        raise SpaceError(f"{where}: int takes two integers, got {args}")
    return Dist(kind, (low, high))


BUNDLED = Path(__file__).resolve().parent


def resolve(name_or_path: str | Path) -> Path:
    """A space file's path, or the name of a bundled space ('compare', 'swa', ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path.resolve()  # absolute: Ray may change the working directory later
    bundled = BUNDLED / f"{name_or_path}.yaml"
    if path.suffix == "" and bundled.is_file():
        return bundled
    names = ", ".join(sorted(p.stem for p in BUNDLED.glob("*.yaml")))
    raise SpaceError(f"{path}: no such space file (bundled spaces: {names})")


def load_space(name_or_path: str | Path) -> Space:
    path = resolve(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: YAML syntax error: {err}") from err
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping with at least 'variants'")
    try:
        spec = _SpaceFile.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise SpaceError(f"{path}: {problems}") from err

    settings = {"epochs": spec.epochs, "dataset": spec.dataset, "model": spec.model, **spec.fixed}
    variants: dict[str, tuple[dict[str, Dist], dict[str, Any]]] = {}
    for variant, entries in spec.variants.items():
        if variant not in REGISTRY:
            raise SpaceError(
                f"{path}: variants.{variant}: unknown variant; choose from {', '.join(sorted(REGISTRY))}"
            )
        top, own = config_keys(variant)
        for key in spec.fixed:
            if key not in top:
                raise SpaceError(
                    f"{path}: fixed.{key}: not a trial setting; allowed: {', '.join(sorted(top))}"
                )
        searched: dict[str, Dist] = {}
        fixed: dict[str, Any] = {}
        for key, value in (entries or {}).items():
            where = f"{path}: variants.{variant}.{key}"
            if key not in top | own:
                raise SpaceError(
                    f"{where}: unknown key; {variant} parameters: {', '.join(sorted(own))}; trial settings: {', '.join(sorted(top))}"
                )
            dist = _parse_dist(where, value)
            if dist is None:
                fixed[key] = value
            else:
                searched[key] = dist
        _check_corners(path, variant, settings, searched, fixed)
        variants[variant] = (searched, fixed)
    return Space(path, spec.name or path.stem, spec.samples, settings, variants)


def _check_corners(
    path: Path,
    variant: str,
    settings: dict[str, Any],
    searched: dict[str, Dist],
    fixed: dict[str, Any],
) -> None:
    """Every combination of range ends (and choices) must make a valid trial, budget included."""
    keys = list(searched)
    corners = list(
        itertools.islice(itertools.product(*(searched[k].corners for k in keys)), MAX_CORNERS)
    )
    for combo in corners or [()]:
        values = dict(zip(keys, combo, strict=True))
        try:
            make_config(variant, {**settings, **fixed, **values})
        except ValidationError as err:
            first = err.errors()[0]
            # Field errors carry their key; budget errors (whole-config) name their keys in the text.
            key = f".{first['loc'][-1]}" if first["loc"] else ""
            at = f" (at {', '.join(f'{k}={v}' for k, v in values.items())})" if values else ""
            message = first["msg"].removeprefix("Value error, ")
            raise SpaceError(f"{path}: variants.{variant}{key}: {message}{at}") from err
        except ValueError as err:
            raise SpaceError(f"{path}: variants.{variant}: {err}") from err
