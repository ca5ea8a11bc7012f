"""The validated configuration of one trial: data, model, optimiser, budget, variant parameters.

Validated once, here, with messages that name the field and its allowed values. Everything below
works with these frozen objects, never with raw dicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from flatbasin.trainables.accel import Precision, Toggle
from flatbasin.trainables.conditions import Condition, OneOf, inactive
from flatbasin.trainables.data_spec import DataSpec
from flatbasin.trainables.models import Init, check_model_name, model_kind
from flatbasin.trainables.start import StartPoint
from flatbasin.trainables.tta import TTA
from flatbasin.trainables.usercode import PASSED, parse_ref
from flatbasin.trainables.variants import REGISTRY, Variant, VariantParams

OptimizerName = Literal["sgd", "nesterov", "adam", "adamw", "rmsprop", "adagrad"]


class TrialConfig(DataSpec):
    """One trial. Flat on purpose: `--set key=value`, space files and MLflow params use the same names."""

    variant: str
    params: SerializeAsAny[VariantParams] = Field(default_factory=VariantParams)
    # auto: cnn1d for 1-D signals, small_cnn below 32x32 images, else resnet18; or a zoo's
    # (torchvision:NAME, timm:NAME) or the user's (module:callable, called as
    # build(input_shape, num_classes, **model_args))
    model: str = "auto"
    model_args: dict[str, Any] = Field(default_factory=dict)  # a zoo's or the user's model only
    epochs: int = Field(20, ge=1, le=10_000)  # the budget every variant spends in full
    batch_size: int = Field(64, ge=2, le=65_536)
    optimizer: OptimizerName = "sgd"  # "sgd" is heavy-ball momentum; "nesterov" adds the look-ahead
    lr: float = Field(0.05, gt=0, le=10)  # peak learning rate of the base phase
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD momentum, RMSprop momentum, Adam beta1
    weight_decay: float = Field(5e-4, ge=0, lt=1)  # L2, applied by the optimiser
    dropout: float = Field(0.0, ge=0, lt=1)
    init: Init = "default"
    augment: bool = False  # images: random flip, 2-pixel shift; signals: roll by up to 3 samples
    tta: TTA = "none"  # evaluation only: flip_shift averages fixed views' softmax (tta.py)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # model init, batch order, augmentation, dropout
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # How the device runs it (trainables/accel.py); the defaults change nothing on a CPU.
    precision: Precision = "auto"  # bf16 autocast on a GPU that runs it natively, else fp32
    channels_last: Toggle = "auto"  # images in NHWC memory format; auto: on CUDA
    compile: bool = False  # torch.compile the training forward pass (pays off on long GPU trials)
    threads: int | None = Field(
        None, ge=1, le=256
    )  # torch intra-op threads; None keeps torch's choice
    # Post-convergence: the converged model this trial continues (set by --from, never by hand).
    start: StartPoint | None = None

    @model_validator(mode="before")
    @classmethod
    def _variant_params(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        name = values.get("variant")
        if name not in REGISTRY:
            raise ValueError(
                f"unknown variant {name!r}; choose one of: {', '.join(sorted(REGISTRY))}"
            )
        params = values.get("params") or {}
        if isinstance(params, VariantParams):
            params = params.model_dump()
        return {**values, "params": REGISTRY[name].Params.model_validate(params)}

    @field_validator("model")
    @classmethod
    def _model_form(cls, name: str) -> str:
        return check_model_name(name)

    @model_validator(mode="after")
    def _model_settings(self) -> TrialConfig:
        kind = model_kind(self.model)
        if kind == "built_in" and self.model_args:
            raise ValueError(
                f"model_args ({', '.join(sorted(self.model_args))}) apply to a zoo's or your own "
                f"model; the built-in '{self.model}' takes dropout and init"
            )
        if kind != "built_in" and self.dropout:
            raise ValueError(
                f"dropout applies to the built-in models; give '{self.model}' its own dropout "
                "through model_args"
            )
        return self

    @model_validator(mode="after")
    def _fits_budget(self) -> TrialConfig:
        self.build_variant()  # raises ValueError naming the parameter when the cycles do not fit
        lr_min = getattr(self.params, "lr_min", None)
        if lr_min is not None and lr_min > self.lr:
            raise ValueError(
                f"lr_min ({lr_min:g}) is above lr ({self.lr:g}); the floor must be lower"
            )
        return self

    def build_variant(self) -> Variant:
        cls = REGISTRY[self.variant]
        if self.start is not None and cls.base_only:
            # A converged start replaces the base phase: the variant runs its tail alone.
            return cls(self.params, epochs=self.epochs, lr=self.lr, converged=True)
        return cls(self.params, epochs=self.epochs, lr=self.lr)

    @property
    def data_spec(self) -> DataSpec:
        """The data part of the config; of the callables handed in, the data set's alone (a new
        model function must not make the data load again)."""
        spec = {name: getattr(self, name) for name in DataSpec.model_fields}
        spec["passed"] = {k: v for k, v in self.passed.items() if k == self.dataset}
        return DataSpec(**spec)

    def flat(self) -> dict[str, Any]:
        """Every setting that acts under one flat name (variant parameters unprefixed; the model's
        and the data's arguments as model_args.KEY and data_args.KEY), for logging."""
        values = self.model_dump(
            mode="json",
            exclude={"params", "start", "model_args", "data_args", "code_dir", "passed"},
        )
        for group in ("model_args", "data_args"):
            values |= {f"{group}.{k}": v for k, v in getattr(self, group).items()}
        if self.start is not None:
            values |= {"from": self.start.source, "from_sha256": self.start.sha256}
        values = {**values, **self.params.model_dump(mode="json")}
        # What ran: a setting that does nothing here (swa_lr_max with swa_mode constant) is left out.
        idle = idle_settings(self.variant, {**self.model_dump(), **self.params.model_dump()})
        return {k: v for k, v in values.items() if k not in idle}


# Trial settings that act only when others take certain values (trainables/conditions.py).
TRIAL_ACTS_WHEN: dict[str, Condition] = {
    "momentum": OneOf("optimizer", ("sgd", "nesterov", "adam", "adamw", "rmsprop")),  # not adagrad
}


def conditions(variant: str) -> dict[str, Condition]:
    """Every setting of `variant`'s trials that acts only when others take certain values."""
    return {**TRIAL_ACTS_WHEN, **REGISTRY[variant].Params.acts_when}


def defaults(variant: str) -> dict[str, Any]:
    """The default of every setting and parameter of `variant`'s trials that has one."""
    fields = {**TrialConfig.model_fields, **REGISTRY[variant].Params.model_fields}
    return {k: f.default for k, f in fields.items() if not f.is_required()}


def idle_settings(variant: str, settings: dict[str, Any]) -> dict[str, str]:
    """The settings among the flat `settings` that do nothing in this configuration of `variant`
    (`swa_lr_max` with `swa_mode: constant`), each with the condition it lacks."""
    return inactive(settings, conditions(variant), defaults(variant))


def config_keys(variant: str) -> tuple[set[str], set[str]]:
    """(top-level keys, variant parameter keys) a user may set for `variant` (not `start`: it is
    --from's)."""
    top = set(TrialConfig.model_fields) - {"params", "variant", *DRIVER_SET}
    return top, set(REGISTRY[variant].Params.model_fields)


# Set by the driver, never in a space file or --set: the converged model --from continues, the
# folder the user's code is imported from (the space file's; the current one for train), and what
# a trial records of the callables handed to flatbasin.search or flatbasin.train from Python.
DRIVER_SET = frozenset({"start", "code_dir", "passed"})


def make_config(
    variant: str, settings: dict[str, Any], start: StartPoint | dict[str, Any] | None = None
) -> TrialConfig:
    """Build a config from flat `key: value` settings, routing each key to the trial or the variant.

    `start` is apart from the settings on purpose: only --from sets it, never a space file or --set.
    """
    if variant not in REGISTRY:
        raise ValueError(
            f"unknown variant {variant!r}; choose one of: {', '.join(sorted(REGISTRY))}"
        )
    settings = nest_args(settings)
    top, own = config_keys(variant)
    driver = {k: settings.pop(k) for k in ("code_dir", "passed") if k in settings}  # the driver's
    unknown = sorted(set(settings) - top - own)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(unknown)} for variant '{variant}'; "
            f"variant parameters: {', '.join(sorted(own)) or '(none)'}; "
            f"trial settings: {', '.join(sorted(top))}"
        )
    params = {k: v for k, v in settings.items() if k in own}
    trial = {k: v for k, v in settings.items() if k in top}
    if driver.get("code_dir") is not None:
        trial["code_dir"] = str(driver["code_dir"])
    if driver.get("passed"):
        trial["passed"] = driver["passed"]
    return TrialConfig.model_validate(
        {**trial, "variant": variant, "params": params, "start": start}
    )


def names_user_code(model: object, dataset: object) -> bool:
    """Whether a model or a data set setting names the user's own `module:callable`."""
    user_model = isinstance(model, str) and model_kind(model) == "user"
    return user_model or (isinstance(dataset, str) and parse_ref(dataset) is not None)


def user_modules(model: str, dataset: str) -> list[str]:
    """The user's modules a trial imports: those its `model` and `dataset` name as module:callable
    (a zoo's model and the built-in names are not the user's)."""
    names = []
    for text, is_user in ((model, model_kind(model) == "user"), (dataset, True)):
        ref = parse_ref(text) if is_user else None
        if ref is not None and ref.module != PASSED and ref.module not in names:
            names.append(ref.module)
    return names


def code_in(settings: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`settings` with `folder` as where the user's modules are found first, when they name any
    (train, lr-find and focus-library look in the current folder; a search beside its space file)."""
    if names_user_code(settings.get("model"), settings.get("dataset")):
        return {**settings, "code_dir": str(folder)}
    return settings


ARG_GROUPS = ("model_args", "data_args")


def nest_args(settings: dict[str, Any]) -> dict[str, Any]:
    """`model_args.width: 32` (a --set, a searched key, an MLflow param) into `model_args: {width:
    32}`, on top of any `model_args:` mapping given whole."""
    out: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        group, dot, name = key.partition(".")
        if dot and group in ARG_GROUPS and name:
            nested.setdefault(group, {})[name] = value
        else:
            out[key] = value
    for group, values in nested.items():
        whole = out.get(group)
        if whole is not None and not isinstance(whole, dict):
            raise ValueError(f"{group}: expected a mapping of keyword arguments, got {whole!r}")
        out[group] = {**(whole or {}), **values}
    return out


def sampled(search_config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial's config as sampled: a confirmation trial (a grid over whole configs) carries it
    under 'confirm'; a search trial has it at the top."""
    return {**search_config, **search_config.get("confirm", {})}


def trial_config(search_config: dict[str, Any]) -> TrialConfig:
    """A search's sampled config -> TrialConfig: the shared settings, then the variant's sampled values
    (nested under its name, as OptunaSearch unflattens the 'variant/key' names), and the converged
    model a post-convergence search continues."""
    search_config = sampled(search_config)
    variant = search_config["variant"]
    return make_config(
        variant,
        {**search_config.get("settings", {}), **search_config.get(variant, {})},
        start=search_config.get("start"),
    )
