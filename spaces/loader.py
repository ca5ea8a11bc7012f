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

Post-convergence (every trial continues one converged model and `epochs` is the tail's budget):

    from: base                  # train the base once; or an MLflow run id, or a checkpoint file
    base: {epochs: 20, lr: 0.05}  # the base phase: a plain sgd trial (default: `epochs` at lr 0.05)
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, ValidationError

from flatbasin.search.errors import short
from flatbasin.trainables.conditions import in_order
from flatbasin.trainables.config import (
    TrialConfig,
    conditions,
    config_keys,
    defaults,
    idle_settings,
    make_config,
    names_user_code,
)
from flatbasin.trainables.strict import NoBoolNumbers
from flatbasin.trainables.variants import REGISTRY

MAX_CORNERS = 20_000  # configs validated per variant; beyond it, range ends only (see _corners)
# Settings that must be the same for every variant: a comparison on different budgets or data is none.
# TTA is too: it changes how every accuracy is measured, and it trains nothing worth searching.
SHARED = frozenset(
    {"epochs", "dataset", "data_dir", "download", "val_frac", "test_frac", "split_seed", "val_seed",
     "data_seed", "mnist1d_signals", "tta", "data_args", "loader_workers"}
)  # fmt: skip
# A search's name is a folder under --storage and an MLflow experiment: no path separators, no spaces.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# What `from:` (and --from) takes besides a checkpoint file: `base`, or an MLflow run id.
BASE = "base"
RUN_ID = re.compile(r"[0-9a-f]{32}")
# Settings a base phase may not set: the data every trial continues on, the model it continues, and
# what the driver decides for every trial (threads, device).
NOT_FOR_BASE = (SHARED - {"epochs"}) | {"model", "threads", "device"}


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
        """Range ends, plus a point inside a float range: `cycles: {uniform: [1, 2]}` is valid at both
        ends and gives non-integers in between, which only an interior point shows."""
        if self.kind == "choice":
            return self.values
        low, high = self.values
        if self.kind == "int" or low == high:
            return (low, high)
        inside = math.sqrt(low * high) if self.kind == "loguniform" else (low + high) / 2
        return (low, inside, high)


class _SpaceFile(NoBoolNumbers):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    samples: int = Field(16, ge=1, le=100_000)
    confirm_seeds: int = Field(0, ge=0, le=100)  # retrain each variant's best with this many seeds
    epochs: int = Field(20, ge=1)
    dataset: str = "digits"
    model: str = "auto"
    model_args: dict[str, Any] | None = None  # keyword arguments of a zoo's or the user's model
    data_args: dict[str, Any] | None = None  # keyword arguments of the user's data callable
    fixed: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any] | None] = Field(min_length=1)
    start: str | None = Field(None, alias="from")  # base, an MLflow run id or a checkpoint file
    base: dict[str, Any] | None = None  # from: base: the base phase's own settings


@dataclass(frozen=True)
class Space:
    path: Path | None  # the space file; None for a space given as a dict (flatbasin.search)
    name: str
    samples: int
    settings: dict[str, Any]  # fixed trial settings shared by every variant
    variants: dict[str, tuple[dict[str, Dist], dict[str, Any]]]  # name -> (searched, fixed)
    confirm_seeds: int = 0  # after the search, retrain each variant's best with this many seeds
    start_from: str | None = None  # `from:`: base, a run id, or a checkpoint file (absolute)
    base: dict[str, Any] = dataclasses.field(default_factory=dict)  # `base:` settings (from: base)
    start: dict[str, Any] | None = None  # the StartPoint every trial continues (set by the driver)
    digest: str = ""  # of the file's content as read (not its comments or layout): see space_digest
    raw: Any = None  # the content as read (a file's YAML, or the dict): what the search records
    # Top-level keys flatbasin.search(model=..., data=...) set over the file's (model, dataset)
    overridden: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        """How messages name the space: its file, or the dict it was given as."""
        return str(self.path) if self.path is not None else DICT

    @property
    def file_name(self) -> str:
        """The name the space is recorded under with the search's run."""
        return self.path.name if self.path is not None else f"{self.name}.yaml"

    def define_by_run(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run: the variant, then its parameters.

        The variant is not sampled: trials take the variants in turn (trial number modulo their
        count), so every variant gets its share of the samples. Left to TPE, the variant choice
        starved some variants of trials (4 for one, 1 for another in a 16-trial search) before their
        parameters were explored at all. Each variant's parameters carry its prefix, so TPE models
        each variant on that variant's trials only: a sampler state per variant, in one study.
        """
        names = list(self.variants)
        variant = names[trial.number % len(names)]
        trial.set_user_attr("variant", variant)
        searched, fixed = self.variants[variant]
        # A parameter that does nothing in this configuration (swa_lr_max when swa_mode is
        # constant) is not sampled: TPE models it on the trials where it acted, and the trial's
        # params hold what ran. Those it depends on are sampled first.
        decides = conditions(variant)
        values = {**self.settings, **fixed}
        for key in in_order(list(searched), decides):
            if key in decides and key in idle_settings(variant, {**values, key: None}):
                continue
            values[key] = searched[key].suggest(trial, f"{variant}/{key}")
        config = {"variant": variant, "settings": {**self.settings, **fixed}}
        return config if self.start is None else {**config, "start": self.start}

    def with_settings(self, **settings: Any) -> Space:
        """The same space with extra fixed settings (the driver adds threads, device)."""
        return dataclasses.replace(self, settings={**self.settings, **settings})

    def corner_configs(self) -> Iterator[TrialConfig]:
        """The trial configs at every corner of every variant's ranges (what preflight checks run on)."""
        for variant, (searched, fixed) in self.variants.items():
            for values in _corners(searched):
                values = _acting(variant, {**self.settings, **fixed}, values)
                yield make_config(variant, {**self.settings, **fixed, **values}, start=self.start)

    def base_config(self) -> TrialConfig:
        """The base phase a `from: base` search trains once: a plain `sgd` trial on the space's
        data, model and fixed settings, `base:` on top. Unless `base:` says otherwise it trains for
        `epochs`, as long as a trial's tail: the split the variants make by default (base_frac
        0.5)."""
        return make_config("sgd", {**self.settings, **self.base})

    def tail_only(self) -> tuple[Space, dict[str, list[str]]]:
        """This space for trials that continue a converged model: settings that shape only a
        variant's base phase (its `base_only`: lr, base_frac, swa_start_frac) are left out, since
        that phase is not trained. Returns the space and what was left out, per variant."""
        variants, left_out = {}, {}
        for name, (searched, fixed) in self.variants.items():
            drop = REGISTRY[name].base_only
            gone = sorted((set(searched) | set(fixed)) & drop)
            if gone:
                left_out[name] = gone
            variants[name] = (
                {k: v for k, v in searched.items() if k not in drop},
                {k: v for k, v in fixed.items() if k not in drop},
            )
        return dataclasses.replace(self, variants=variants), left_out

    def continuing(self, start: dict[str, Any]) -> tuple[Space, dict[str, list[str]]]:
        """The space of a post-convergence search: tail only, every trial continuing `start` (a
        StartPoint). Every corner is checked again, since the budgets now hold the tail alone."""
        space, left_out = self.tail_only()
        space = dataclasses.replace(space, start=start)
        for name, (searched, fixed) in space.variants.items():
            _check_corners(self.where, name, space.settings, searched, fixed, start)
        return space, left_out


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
        raise SpaceError(f"{where}: {kind} takes two numbers [low, high], got {short(args)}")
    low, high = args
    if not all(math.isfinite(a) for a in args):
        raise SpaceError(f"{where}: {kind} takes finite numbers, got {short(args)}")
    if low > high:
        raise SpaceError(f"{where}: low ({low}) is above high ({high})")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}: loguniform needs low > 0, got {low}")
    if kind == "int" and not all(isinstance(a, int) for a in args):
        raise SpaceError(f"{where}: int takes two integers, got {short(args)}")
    return Dist(kind, (low, high))


BUNDLED = Path(__file__).resolve().parent
DICT = "the space dict"  # how messages name a space given as a dict (flatbasin.search({...}))


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


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.message, self.line = message, line


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, list | dict):
                raise _DuplicateKey(f"a key must be a plain value, got {short(key)}", line)
            if key in seen:
                raise _DuplicateKey(f"key {key!r} appears twice in one mapping", line)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Numbers as YAML 1.2 (and every user) reads them, not as PyYAML's YAML 1.1: `1e-3` is 0.001 (1.1
# needs a dot), `010` is ten (1.1: octal 8), `1:30` is a string (1.1: sexagesimal 90); octal and hex
# are spelled 0o17 and 0x1f. The 1.1 number resolvers are dropped and the 1.2 ones put in their place.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    _INT,
    re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_StrictLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    if text.startswith(("0o", "0x")):
        return int(text, 0)
    return int(text, 10)  # leading zeros are decimal in YAML 1.2


_StrictLoader.add_constructor(_INT, _yaml12_int)


def read_yaml(text: str) -> Any:
    """YAML text as the space files read it: strict keys, 1.2 floats, safe types only."""
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects


def yaml_problem(err: yaml.YAMLError) -> str:
    """'line 3, column 5: ...' from a YAML error, without the parser's echo of the source."""
    if isinstance(err, _DuplicateKey):
        return f"line {err.line}: {err.message}"
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        what = " ".join(p for p in (err.context, err.problem) if p)
        return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {what}"
    return f"YAML syntax error: {err}"


def check_name(name: str, where: str) -> str:
    if not NAME.fullmatch(name):
        raise SpaceError(
            f"{where}: the search name {name!r} must be 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it names a folder and an MLflow experiment)"
        )
    return name


def load_space(name_or_path: str | Path, start_from: str | None = None) -> Space:
    """`start_from`: --from, which wins over the file's `from:`: with either, the trials run the
    tail alone, and that is how the corners are checked."""
    path, raw = read_space(name_or_path)
    return make_space(raw, path, start_from)


def space_from_dict(raw: Any, start_from: str | None = None) -> Space:
    """A space given as a dict (flatbasin.search({...})), validated exactly as a file is; messages
    name "the space dict", and its relative paths and the user's modules are found from the
    current folder."""
    return make_space(raw, None, start_from)


def code_folder(path: Path | None) -> Path:
    """Where a space's `module:callable` names are found first: beside its file; for a dict or a
    bundled space, in the current folder (as for `train`)."""
    return path.parent if path is not None and path.parent != BUNDLED else Path.cwd()


def read_space(name_or_path: str | Path) -> tuple[Path, Any]:
    """A space file's path and its content, read (not yet validated)."""
    path = resolve(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SpaceError(
            f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "save the space file as UTF-8"
        ) from err
    except OSError as err:
        raise SpaceError(f"{path}: cannot read the space file: {err.strerror or err}") from err
    try:
        raw = read_yaml(text)
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: {yaml_problem(err)}") from err
    return path, raw


def make_space(raw: Any, path: Path | None, start_from: str | None = None) -> Space:
    """A space from its content as read: from the file at `path`, or a dict (path None)."""
    label = str(path) if path is not None else DICT
    _check_top_level(label, raw)
    if path is None and not raw.get("name"):
        raise SpaceError(
            f"{label}: name: give the search a name (in the dict, or as name=): it names the "
            "search's Tune folder and MLflow experiment"
        )
    try:
        spec = _SpaceFile.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            ".".join(map(str, e["loc"]))
            + ": " * bool(e["loc"])
            + e["msg"].removeprefix("Value error, ")
            for e in err.errors()
        )
        raise SpaceError(f"{label}: {problems}") from err

    fixed_settings = dict(spec.fixed)
    if isinstance(fixed_settings.get("data_dir"), str) and fixed_settings["data_dir"]:
        # Trials run in Tune's trial folders, not here: a relative path means this directory.
        fixed_settings["data_dir"] = str(Path(fixed_settings["data_dir"]).expanduser().resolve())
    settings = {
        "epochs": spec.epochs,
        "dataset": spec.dataset,
        "model": spec.model,
        **fixed_settings,
    }
    if spec.data_args:
        for key, value in spec.data_args.items():
            if _parse_dist(f"{label}: data_args.{key}", value) is not None:
                raise SpaceError(
                    f"{label}: data_args.{key}: the data is shared by every trial of a search (what "
                    "every variant is compared on), so its arguments are fixed values, not ranges"
                )
        settings["data_args"] = dict(spec.data_args)
    # model_args at the top level: for every variant, each a fixed value or a searched range.
    shared_model_args = {f"model_args.{k}": v for k, v in (spec.model_args or {}).items()}
    own_start = _from(label, path.parent if path is not None else Path.cwd(), spec)
    start_from = start_from or own_start  # --from on the command line wins over the file's from:
    if spec.base is not None and start_from != BASE:
        raise SpaceError(
            f"{label}: base: sets the base phase that `from: base` (or --from base) trains; this "
            + (f"search continues {start_from}" if start_from else "space has no `from:`")
            + ", so there is no base phase to set; add `from: base` or remove base:"
        )
    variants: dict[str, tuple[dict[str, Dist], dict[str, Any]]] = {}
    for variant, entries in spec.variants.items():
        if variant not in REGISTRY:
            raise SpaceError(
                f"{label}: variants.{variant}: unknown variant; choose from {', '.join(sorted(REGISTRY))}"
            )
        top, own = config_keys(variant)
        for key in spec.fixed:
            if key not in top:
                raise SpaceError(
                    f"{label}: fixed.{key}: not a trial setting; allowed: {', '.join(sorted(top))}"
                )
        searched: dict[str, Dist] = {}
        fixed: dict[str, Any] = {}
        for key, value in {**shared_model_args, **_args_flat(label, variant, entries)}.items():
            where = f"{label}: variants.{variant}.{key}"
            if key.startswith("model_args.") and key.removeprefix("model_args."):
                pass  # the model's own keyword: its builder's signature is checked before Ray
            elif key not in top | own:
                raise SpaceError(
                    f"{where}: unknown key; {variant} parameters: {', '.join(sorted(own))}; trial settings: {', '.join(sorted(top))}"
                )
            if key in SHARED:
                raise SpaceError(
                    f"{where}: {key} is shared by every trial of a search (the budget, the data "
                    "and how accuracy is measured: what every variant is compared on); set it at "
                    "the top level or under fixed"
                )
            dist = _parse_dist(where, value)
            if dist is None:
                fixed[key] = value
            else:
                searched[key] = dist
        fixed, searched = _absolute_files(variant, fixed, searched)
        if start_from is None:
            _check_corners(label, variant, settings, searched, fixed)
        else:  # its trials run the tail alone (Space.continuing): check the corners they will have
            drop = REGISTRY[variant].base_only
            tail = {k: v for k, v in searched.items() if k not in drop}
            kept = {k: v for k, v in fixed.items() if k not in drop}
            _check_corners(label, variant, settings, tail, kept, CHECKING)
        variants[variant] = (searched, fixed)
    name = check_name(spec.name or (path.stem if path else ""), f"{label}: name")
    if _names_user_code(settings, variants):
        # Where its modules are found first, on every worker: beside the file, else here.
        settings["code_dir"] = str(code_folder(path))
    base = _base(label, spec, settings)
    space = Space(path, name, spec.samples, settings, variants, spec.confirm_seeds)
    return dataclasses.replace(
        space, start_from=start_from, base=base, digest=space_digest(raw), raw=raw
    )


def _args_flat(where: str, variant: str, entries: dict[str, Any] | None) -> dict[str, Any]:
    """A variant's entries with `model_args: {width: ...}` spread out as `model_args.width`."""
    out: dict[str, Any] = {}
    for key, value in (entries or {}).items():
        if key == "model_args":
            if not isinstance(value, dict):
                raise SpaceError(
                    f"{where}: variants.{variant}.model_args: expected a mapping of the model's "
                    f"keyword arguments, got {short(value)}"
                )
            out |= {f"model_args.{k}": v for k, v in value.items()}
        else:
            out[key] = value
    return out


def _names_user_code(
    settings: dict[str, Any], variants: dict[str, tuple[dict[str, Dist], dict[str, Any]]]
) -> bool:
    """Whether any trial of the space imports the user's code (a model or a data set named
    module:callable)."""
    models = {settings.get("model", "auto")}
    for searched, fixed in variants.values():
        models |= {fixed["model"]} if "model" in fixed else set()
        models |= set(searched["model"].values) if "model" in searched else set()
    return any(names_user_code(m, settings.get("dataset")) for m in models)


# What a message shows of a file's unknown top-level keys: a few, each cut short. A file that is not
# a space file (a path mistyped, a link to /etc/shadow) is named as such, its contents never shown.
SHOWN_KEYS, SHOWN_KEY_CHARS = 3, 24


def _check_top_level(path: str | Path, raw: Any) -> None:
    """A space file is a mapping with at least one of a space file's keys; its unknown keys are named,
    a few and cut short. Anything else is not a space file, and nothing of it is echoed."""
    known = set(_SpaceFile.model_fields) - {"start"} | {"from"}
    keys = list(raw) if isinstance(raw, dict) else []
    if not any(isinstance(k, str) and k in known for k in keys):
        found = (
            f"none of its {len(keys)} top-level keys is a space file's" if keys else "not a mapping"
        )
        raise SpaceError(
            f"{path}: not a space file ({found}); expected a mapping with at least 'variants' "
            "(see spaces/compare.yaml); check the path"
        )
    unknown = [k for k in keys if not (isinstance(k, str) and k in known)]
    if unknown:
        shown = [_cut(str(k)) for k in unknown[:SHOWN_KEYS]]
        more = f" and {len(unknown) - SHOWN_KEYS} more" if len(unknown) > SHOWN_KEYS else ""
        raise SpaceError(
            f"{path}: unknown key{'s' * (len(unknown) > 1)} {', '.join(shown)}{more}; a space "
            f"file's keys are {', '.join(sorted(known))}"
        )


def _cut(key: str) -> str:
    return repr(key if len(key) <= SHOWN_KEY_CHARS else key[: SHOWN_KEY_CHARS - 1] + "…")


def space_digest(raw: Any) -> str:
    """What a space file says, hashed: a resumed search compares it with the one it started with
    (Tune resumes the space it pickled, whatever the file says now). Comments and layout do not count."""
    try:
        canonical = json.dumps(raw, sort_keys=True, default=repr)
    except TypeError:  # keys of mixed types cannot be sorted: hash them as Python writes them
        canonical = repr(raw)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def changed_keys(old: Any, new: Any, where: str = "") -> list[str]:
    """The dotted keys whose values differ between two read space files, deepest first found."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [where or "(the whole file)"]
    keys = sorted(set(old) | set(new), key=str)
    found: list[str] = []
    for key in keys:
        found += changed_keys(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
    return found


# What the corners of a post-convergence space are checked with before the converged model is known.
CHECKING = {"source": "(checking)", "sha256": "0" * 64}


def _from(where: str, folder: Path, spec: _SpaceFile) -> str | None:
    """`from:`: base, a run id, or a checkpoint file (relative to the space file's folder; to the
    current one for a dict)."""
    start = spec.start.strip() if spec.start is not None else None
    if start == "":
        raise SpaceError(f"{where}: from: give base, an MLflow run id or a checkpoint file")
    if start is not None and start != BASE and not RUN_ID.fullmatch(start):
        start = str((folder / Path(start).expanduser()).resolve())
    return start


def _base(where: str, spec: _SpaceFile, settings: dict[str, Any]) -> dict[str, Any]:
    """`base:`, checked as the plain sgd trial it makes with the space's own settings."""
    base = dict(spec.base or {})
    top, own = config_keys("sgd")
    for key in base:
        if key in NOT_FOR_BASE:
            raise SpaceError(
                f"{where}: base.{key}: the base phase trains on the space's data and model, on the "
                "trials' device; set it at the top level or under fixed"
            )
        if key not in top | own:
            raise SpaceError(
                f"{where}: base.{key}: unknown key; the base phase is a plain sgd trial: "
                f"{', '.join(sorted((top | own) - NOT_FOR_BASE))}"
            )
    try:
        make_config("sgd", {**settings, **base})
    except ValidationError as err:
        key, message = _first_problem(err)
        raise SpaceError(f"{where}: base{key}: {message}") from err
    except ValueError as err:
        raise SpaceError(f"{where}: base: {err}") from err
    return base


def _absolute_files(
    variant: str, fixed: dict[str, Any], searched: dict[str, Dist]
) -> tuple[dict[str, Any], dict[str, Dist]]:
    """File parameters (prior_guided's library) made absolute, from the folder the search starts in:
    Ray runs each trial in a working folder of its own, where a relative path names nothing."""

    def absolute(value: Any) -> Any:
        return str(Path(value).expanduser().resolve()) if isinstance(value, str) else value

    fixed, searched = dict(fixed), dict(searched)
    for key in REGISTRY[variant].file_params:
        if key in fixed:
            fixed[key] = absolute(fixed[key])
        if key in searched and searched[key].kind == "choice":
            searched[key] = Dist("choice", tuple(absolute(v) for v in searched[key].values))
    return fixed, searched


def _corners(searched: dict[str, Dist]) -> list[dict[str, Any]]:
    """Every combination of range ends, interior points and choices; [{}] when nothing is searched.

    With many searched keys (3**10 is 59,049) the interior points are dropped from the product and
    each is tried alone, the other keys at their low ends; past that the space is refused rather
    than checked in part.
    """
    keys = list(searched)
    full = [searched[k].corners for k in keys]
    if math.prod(len(c) for c in full) <= MAX_CORNERS:
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*full)] or [{}]
    ends = [
        (c[0], c[-1]) if searched[k].kind != "choice" else c
        for k, c in zip(keys, full, strict=True)
    ]
    if math.prod(len(c) for c in ends) > MAX_CORNERS:
        raise SpaceError(
            f"{len(keys)} searched keys with {math.prod(len(c) for c in ends):,} combinations of their "
            f"ends and choices: too many to check (at most {MAX_CORNERS:,}); fix some of them"
        )
    combos = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*ends)]
    lows = {k: c[0] for k, c in zip(keys, ends, strict=True)}
    combos += [{**lows, k: c[1]} for k, c in zip(keys, full, strict=True) if len(c) == 3]
    return combos


def _check_corners(
    where: str,
    variant: str,
    settings: dict[str, Any],
    searched: dict[str, Dist],
    fixed: dict[str, Any],
    start: dict[str, Any] | None = None,
) -> None:
    """Every combination of range ends (and choices) must make a valid trial, budget included."""
    try:
        corners = _corners(searched)
    except SpaceError as err:
        raise SpaceError(f"{where}: variants.{variant}: {err}") from err
    named = set(searched) | set(fixed)
    acted: set[str] = set()
    for values in corners:
        idle = idle_settings(variant, {**settings, **fixed, **values})
        acted |= named - set(idle)
        values = _acting(variant, {**settings, **fixed}, values)
        try:
            make_config(variant, {**settings, **fixed, **values}, start=start)
        except ValidationError as err:
            key, message = _first_problem(err)
            at = (
                f" (at {', '.join(f'{k}={short(v)}' for k, v in values.items())})" if values else ""
            )
            raise SpaceError(f"{where}: variants.{variant}{key}: {message}{at}") from err
        except ValueError as err:
            raise SpaceError(f"{where}: variants.{variant}: {err}") from err
    decides = conditions(variant)
    for key in sorted(named - acted):  # named, and idle in every configuration of the space
        needs = decides[key]
        held = ", ".join(f"{k}: {short({**settings, **fixed}.get(k, defaults(variant).get(k)))}" for k in needs.on if k not in searched)  # fmt: skip
        raise SpaceError(
            f"{where}: variants.{variant}.{key}: does nothing unless {needs.says}, and no trial of "
            f"this space has that{f' ({held})' if held else ''}; remove {key}, or set or search "
            f"{' and '.join(needs.on)}"
        )


def _acting(variant: str, settings: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A corner's searched values without those that do nothing in it, as define_by_run samples
    them: what a trial at that corner runs with."""
    idle = idle_settings(variant, {**settings, **values})
    return {k: v for k, v in values.items() if k not in idle}


def _first_problem(err: ValidationError) -> tuple[str, str]:
    """('.key', 'what is wrong (got value)') of a config's first validation error. Field errors
    carry their key; budget errors (whole-config) name their keys in the text."""
    first = err.errors()[0]
    key = f".{first['loc'][-1]}" if first["loc"] else ""
    message = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    if first["loc"] and not isinstance(given, dict) and given is not None:
        message += f" (got {short(given)})"
    return key, message
