"""`flatbasin lr-find`: the learning-rate range test on a trial's model, data and optimiser, a figure
of it, and bounds for a learning-rate search, written into a space file when asked (--write).

The test itself is trainables/lr_range.py; this file checks the options, prints, draws and edits YAML.
Nothing is saved or changed but the figure, and the space file given to --write.
"""

from __future__ import annotations

import itertools
import math
import os
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from flatbasin.search.errors import Unwritten, UsageError
from flatbasin.trainables.files import not_a_file, write_bytes_whole, write_whole

if TYPE_CHECKING:  # matplotlib and torch load when the command runs, not when the CLI starts
    from matplotlib.figure import Figure

    from flatbasin.trainables.config import TrialConfig
    from flatbasin.trainables.lr_range import Suggestion, Sweep

MAX_LR = 10.0  # the trial settings' own cap on every learning rate (TrialConfig.lr, variant lrs)
MIN_LR = 1e-8  # a step this small changes no float32 weight: a sweep starting lower learns nothing
MAX_STEPS = 10_000  # a range test is a few hundred steps; more only thins the learning-rate grid
MIN_STEPS = 50  # lr_range.WARM_STEPS (35) left out of the suggestion, then 15 to read a slope on

# How --write maps the two bounds onto a variant's own learning rates. A cycle's high learning rate
# ("high") is a training learning rate like lr and gets the same range, [small, large]; its low end
# ("low"), where the weights settle before they are kept, gets the decade below, [small / 10, small].
# The low range then never rises above the high one at any corner, which every variant requires
# (lr_small <= lr_large, lr_2 <= lr_1, swa_lr <= swa_lr_max). Floors of schedules (lr_min, default 0)
# are not learning rates the test measures and are left as they are.
LR_PARAMETERS: dict[str, dict[str, str]] = {
    "cyclic_average": {"lr_large": "high", "lr_small": "low"},
    "fge": {"lr_1": "high", "lr_2": "low"},
    "swa": {"swa_lr_max": "high", "swa_lr": "low"},  # swa_lr_max only where swa_mode can be cyclic
}
NOT_MEASURED = frozenset({"lr_min"})  # schedule floors: see LR_PARAMETERS


@dataclass(frozen=True)
class LrFindOptions:
    """The sweep's range and length, and where its results go."""

    start: float
    end: float
    steps: int
    plot: Path
    write: Path | None


def check_options(options: LrFindOptions, config: TrialConfig) -> None:
    """Every option refused before a single step is trained, naming the option and what is allowed."""
    from flatbasin.spaces import SpaceError, load_space
    from flatbasin.trainables.lr_range import WARM_STEPS

    start, end, steps, write = options.start, options.end, options.steps, options.write

    for option, lr in (("--start", start), ("--end", end)):
        if not (math.isfinite(lr) and MIN_LR <= lr <= MAX_LR):
            raise UsageError(
                f"{option} {lr:g}: a learning rate from {MIN_LR:g} (smaller steps change no "
                f"float32 weight) to {MAX_LR:g} (the largest a trial accepts)"
            )
    if start >= end:
        raise UsageError(f"--start ({start:g}) must be below --end ({end:g})")
    if steps < MIN_STEPS:
        raise UsageError(
            f"--steps {steps}: at least {MIN_STEPS} (the first {WARM_STEPS} only fill the smoothed "
            "loss's average, and a slope needs steps after them; the default is 200)"
        )
    if steps > MAX_STEPS:
        raise UsageError(
            f"--steps {steps}: at most {MAX_STEPS:,} (the test raises the learning rate from --start "
            "to --end over these steps; a few hundred resolve the curve; the default is 200)"
        )
    check_plot_path(options.plot)
    if write is not None:
        kind = not_a_file(write)
        if kind is not None or not write.is_file():
            what = f"is {kind}, not a regular file" if kind else "does not exist"
            raise UsageError(
                f"--write {write}: {what}; give an existing space file to update (copy a bundled "
                "one first, e.g. spaces/compare.yaml)"
            )
        if not os.access(write, os.W_OK):
            raise UsageError(f"--write {write}: the file is not writable")
        try:
            load_space(write)  # a broken space fails now, not after the sweep
        except SpaceError as err:
            raise UsageError(f"--write: {err}") from err
        differ = differences(write, config)
        if differ:  # bounds measured on another model, data or batch size do not carry over
            raise UsageError(
                f"--write {write}: the space trains otherwise than this test would: "
                + "; ".join(differ)
                + "; run the test as the space trains, so that its bounds carry over"
            )


def check_plot_path(plot: Path) -> None:
    from flatbasin.search.preflight import writable_file

    if plot.suffix.lower() != ".png":
        raise UsageError(f"--plot {plot}: the figure is a PNG; give a path ending in .png")
    writable_file("--plot", plot)


def run_lr_find(config: TrialConfig, options: LrFindOptions, console: Console) -> bool:
    """The range test on `config`'s model, data and optimiser, from their initial state. Prints the
    table and the suggestion, draws the figure, edits the space file if asked. Returns False when
    the loss never fell enough to suggest anything (nothing is written then)."""
    import torch

    from flatbasin.trainables.data import load_data
    from flatbasin.trainables.data_spec import DataError
    from flatbasin.trainables.loop import assemble, resolve_device
    from flatbasin.trainables.lr_range import forever, geometric_lrs, range_test, suggest
    from flatbasin.trainables.memory import named_out_of_memory
    from flatbasin.trainables.models import resolve_name
    from flatbasin.trainables.sanity import check_data, check_model

    with named_out_of_memory(config, "the learning-rate range test"):
        try:  # the checks `train` makes before its first step; TrialError is a ValueError
            device = resolve_device(config.device)
            if config.threads is not None:
                torch.set_num_threads(config.threads)
            data = load_data(config.data_spec, str(device))
            check_data(config, data)
            model, optimizer, _, _, order = assemble(config, data, device)
            check_model(config, data, model)
        except (DataError, ValueError) as err:
            raise UsageError(str(err)) from err

        batches = forever(lambda: data.train_batches(config.batch_size, order, config.augment))
        sweep = range_test(
            model, optimizer, batches, geometric_lrs(options.start, options.end, options.steps)
        )
    suggestion = suggest(sweep.lrs, sweep.smoothed)
    model_name = resolve_name(config.model, data.shape)

    print_sweep(sweep, suggestion, console)
    console.print(
        f"{len(sweep.lrs)} of {sweep.planned} steps in {sweep.seconds:.1f} s on {device} "
        f"(variant {config.variant}, {config.dataset}, {model_name}, optimiser {config.optimizer}, "
        f"batch {config.batch_size}); {sweep.stop}"
    )
    title = f"learning-rate range test: {model_name} on {config.dataset}"
    details = (
        f"optimiser {config.optimizer} (momentum {config.momentum:g}, weight decay "
        f"{config.weight_decay:g}), batch {config.batch_size}, {len(sweep.lrs)} of {sweep.planned} "
        f"steps from lr {options.start:g} to {options.end:g}\n{sweep.stop}"
    )
    figure = lr_find_figure(sweep, suggestion, title, details, (options.start, options.end))
    # Every output that can be written is; those that cannot are named together at the end.
    unwritten = []
    try:
        write_whole(
            options.plot,
            lambda handle: figure.savefig(handle, format="png"),
            f"--plot {options.plot}",
        )
        console.print(f"figure: {options.plot}")
    except OSError as err:
        unwritten.append(f"--plot {options.plot} could not be written ({err.strerror or err})")

    if suggestion.large is None or suggestion.small is None:
        console.print(f"no suggestion: {suggestion.problem}", style="yellow")
        if options.write is not None:
            console.print(f"{options.write} was not changed", style="yellow")
        if unwritten:
            raise Unwritten(f"the range test ran (above), but {'; '.join(unwritten)}")
        return False
    if options.write is not None:
        try:
            changed, kept_comments = write_space(options.write, suggestion.small, suggestion.large)
        except OSError as err:
            unwritten.append(
                f"--write {options.write} could not be written ({err.strerror or err}; it was "
                "left as it was)"
            )
            raise Unwritten(f"the range test ran (above), but {'; '.join(unwritten)}") from err
        console.print(f"updated {options.write}:")
        for line in changed:
            console.print(f"  {line}")
        console.print(
            "  (values edited in place: comments and layout kept)"
            if kept_comments
            else "  (the file was re-written from its parsed YAML: its comments are gone)"
        )
    if unwritten:
        raise Unwritten(f"the range test ran (above), but {'; '.join(unwritten)}")
    return True


# ----------------------------------------------------------------------------- the report


def print_sweep(sweep: Sweep, suggestion: Suggestion, console: Console) -> None:
    """A row per decade of lr and one per point that matters; then the suggested range."""
    marks: dict[int, str] = {}
    lrs = sweep.lrs
    for decade in range(math.floor(math.log10(lrs[0])), math.ceil(math.log10(lrs[-1])) + 1):
        i = int(np.argmin(np.abs(np.log10(lrs) - decade)))
        if abs(math.log10(lrs[i]) - decade) < 0.1:
            marks.setdefault(i, "")
    if suggestion.small is not None and suggestion.steepest is not None:
        marks[int(np.argmin(np.abs(np.log(lrs / suggestion.small))))] = (
            "nearest the small bound (large / 10)"
        )
        marks[suggestion.steepest] = "large bound: steepest fall"
    if suggestion.lowest is not None:
        marks[suggestion.lowest] = "lowest smoothed loss"
    marks.setdefault(0, "first step")
    last = len(lrs) - 1
    marks[last] = marks.get(last) or ("last step: diverged" if sweep.diverged else "last step")

    table = Table(title="learning rate vs. training loss")
    for column in ("step", "lr", "smoothed loss", "loss", ""):
        table.add_column(column, justify="left" if not column else "right")
    for i in sorted(marks):
        table.add_row(
            str(i + 1),
            f"{lrs[i]:.2g}",
            f"{sweep.smoothed[i]:.4g}",
            f"{sweep.losses[i]:.4g}",
            marks[i],
        )
    console.print(table)
    if suggestion.large is None or suggestion.small is None:
        return
    console.print(
        f"suggested lr range: loguniform [{number(suggestion.small)}, {number(suggestion.large)}]\n"
        f"  large {number(suggestion.large)}: the smoothed loss falls fastest here, before its "
        f"minimum at lr {lrs[suggestion.lowest]:.2g} (the smoothed loss averages about 50 steps, "
        "so it trails the raw loss)\n"
        f"  small {number(suggestion.small)}: large / 10, a decade of learning rates that still train"
    )


def lr_find_figure(
    sweep: Sweep, suggestion: Suggestion, title: str, details: str, lr_range: tuple[float, float]
) -> Figure:
    """Smoothed loss (solid) and each batch's loss (faint) against lr on a log axis, the suggested
    range shaded between its two bounds, the lowest point and any divergence marked."""
    from matplotlib.figure import Figure

    from flatbasin.search.figures import DPI

    fig = Figure(figsize=(8.6, 4.8), dpi=DPI)
    ax = fig.add_axes((0.085, 0.115, 0.885, 0.68))
    lrs, raw, smoothed = sweep.lrs, sweep.losses, sweep.smoothed
    ax.plot(lrs, raw, color="#9db3cf", lw=0.9, label="loss of each batch", zorder=2)
    ax.plot(lrs, smoothed, color="#1f4e89", lw=2.4, zorder=4,
            label="smoothed (average of ~50 steps: lags)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlim(*lr_range)
    # The y-axis fits the fall: from the lowest loss to the smoothed start. The divergent tail leaves
    # through the top; scaled to fit it, the part that matters would be squeezed into a strip.
    finite = np.isfinite(smoothed)
    low = min(np.nanmin(np.where(np.isfinite(raw), raw, np.nan)), smoothed[finite].min())
    if suggestion.lowest is not None:
        high = smoothed[: suggestion.lowest + 1].max()
    else:
        high = smoothed[finite].max()
    pad = 0.06 * (high - low) if high > low else 0.1
    ax.set_ylim(low - pad, high + 4 * pad)  # room above the curve for the bounds' labels

    green = "#2a8c3a"
    if (
        suggestion.large is not None
        and suggestion.small is not None
        and suggestion.steepest is not None
    ):
        small, large = suggestion.small, suggestion.large
        ax.axvspan(small, large, color=green, alpha=0.12, lw=0, zorder=1,
                   label="suggested search range")  # fmt: skip
        ax.axvline(large, color=green, lw=1.6, zorder=3)
        ax.axvline(small, color=green, lw=1.6, ls=(0, (5, 3)), zorder=3)
        ax.plot([large], [smoothed[suggestion.steepest]], "o", ms=8, color=green, mec="white",
                zorder=5)  # fmt: skip
        # Each bound's label outside the shaded range, so neither crosses the other however close.
        for x, text, right in ((large, f"large {number(large)}\nsteepest fall", True),
                               (small, f"small {number(small)}\nlarge / 10", False)):  # fmt: skip
            ax.annotate(text, (x, 1), xycoords=("data", "axes fraction"), xytext=(5 if right else -5, -5),
                        textcoords="offset points", ha="left" if right else "right", va="top",
                        fontsize=9, color=green, fontweight="bold")  # fmt: skip
    else:
        message = textwrap.fill(f"no suggestion: {suggestion.problem}", 90)
        ax.text(0.5, 0.97, message, transform=ax.transAxes, ha="center", va="top", fontsize=9,
                color="#a33333", zorder=6, bbox={"fc": "white", "ec": "#a33333", "pad": 4})  # fmt: skip
    if suggestion.lowest is not None and suggestion.large is not None:
        at = suggestion.lowest
        ax.plot([lrs[at]], [smoothed[at]], "v", ms=8, color="#444444", zorder=5)
        ax.annotate(f"lowest\nlr {lrs[at]:.2g}", (lrs[at], smoothed[at]), xytext=(0, -10),
                    textcoords="offset points", ha="center", va="top", fontsize=8.5,
                    color="#444444", bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1})  # fmt: skip
    if sweep.diverged:
        ax.axvspan(lrs[-1], lr_range[1], color="#999999", alpha=0.15, lw=0, zorder=1,
                   label="not reached: stopped, the loss diverged")  # fmt: skip

    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.grid(alpha=0.3, which="major")
    ax.legend(loc="best", fontsize=8.5, frameon=True, framealpha=0.9, edgecolor="none")
    fig.suptitle(title, fontsize=11, x=0.085, ha="left", y=0.97)
    fig.text(0.085, 0.915, details, fontsize=8.5, color="#555555", va="top", linespacing=1.4)
    return fig


def number(value: float) -> str:
    """Two significant digits, positional, so that every YAML reader (1.1 or 1.2) reads a float."""
    return np.format_float_positional(value, precision=2, unique=False, fractional=False, trim="0")


# ----------------------------------------------------------------------------- --write


def ranges(small: float, large: float) -> dict[str, list[float]]:
    """The loguniform [low, high] of each role, rounded as printed so the file shows what was said."""
    small, large = float(number(small)), float(number(large))
    return {"high": [small, large], "low": [float(number(small / 10)), small]}


def new_values(raw: Mapping[str, Any], small: float, large: float) -> dict[str, dict[str, Any]]:
    """variant -> {key: new value} for every variant of a parsed space file."""
    bounds = ranges(small, large)
    changes: dict[str, dict[str, Any]] = {}
    for variant, entries in raw["variants"].items():
        entries = entries or {}
        values = {"lr": {"loguniform": list(bounds["high"])}}  # own lists: no YAML anchors
        for key, role in LR_PARAMETERS.get(variant, {}).items():
            if key == "swa_lr_max" and not _may_be_cyclic(entries.get("swa_mode", "constant")):
                continue  # used only by cyclic SWA; a searched dimension that does nothing hurts TPE
            values[key] = {"loguniform": list(bounds[role])}
        changes[variant] = values
    return changes


# Settings that change what the range test measures; a space that fixes them otherwise gets bounds
# measured on something else.
MEASURED_WITH = ("dataset", "data_seed", "image_size", "model", "batch_size", "optimizer",
                 "momentum", "weight_decay", "dropout", "init", "augment")  # fmt: skip


def differences(path: Path, config: TrialConfig) -> list[str]:
    """The space's shared settings that differ from those the test ran with."""
    from flatbasin.spaces import load_space

    settings = load_space(path).settings
    return [
        f"it sets {key}: {settings[key]}, the test {getattr(config, key)} "
        f"(--set {key}={settings[key]})"
        for key in MEASURED_WITH
        if key in settings and settings[key] != getattr(config, key)
    ]


def _may_be_cyclic(mode: Any) -> bool:
    return mode == "cyclic" or (isinstance(mode, dict) and "cyclic" in (mode.get("choice") or ()))


def write_space(path: Path, small: float, large: float) -> tuple[list[str], bool]:
    """Set the learning-rate ranges of every variant in the space file at `path` and check the result
    with load_space; a file that no longer loads is put back as it was. Returns the changes, one line
    each, and whether comments were kept (values edited in place) or lost (YAML re-dumped)."""
    from flatbasin.spaces import SpaceError, load_space
    from flatbasin.spaces.loader import read_yaml
    from flatbasin.trainables.config import TrialConfig
    from flatbasin.trainables.variants import REGISTRY

    original = path.read_bytes().decode("utf-8")
    raw = read_yaml(original)
    changes = new_values(raw, small, large)
    expected = {**raw, "variants": {
        variant: {**(entries or {}), **changes[variant]} for variant, entries in raw["variants"].items()
    }}  # fmt: skip
    try:
        text = edit_in_place(
            original, {v: {k: flow(x) for k, x in c.items()} for v, c in changes.items()}
        )
        kept = read_yaml(text) == expected
    except (yaml.YAMLError, ValueError):
        kept = False
    if not kept:  # a layout the in-place edit does not handle (anchors, odd nesting): re-dump
        text = yaml.safe_dump(
            expected, sort_keys=False, allow_unicode=True, default_flow_style=None
        )

    lines = []
    for variant, values in changes.items():
        entries = raw["variants"][variant] or {}
        fields = {**TrialConfig.model_fields, **REGISTRY[variant].Params.model_fields}
        for key, value in values.items():
            if key in entries:
                before = flow(entries[key])
            elif key in (raw.get("fixed") or {}):
                before = f"{flow(raw['fixed'][key])} (from fixed)"
            else:
                before = f"{flow(fields[key].default)} (the default)"
            after = flow(value)
            lines.append(f"variants.{variant}.{key}: {before} -> {after}" if before != after
                         else f"variants.{variant}.{key}: {after} (unchanged)")  # fmt: skip
    if "lr" in (raw.get("fixed") or {}):
        lines.append(
            f"fixed.lr ({raw['fixed']['lr']}) stays, but each variant's own lr range now wins over it"
        )
    write_bytes_whole(path, text.encode("utf-8"), f"--write {path}")  # the old file, or the new
    try:
        load_space(path)
    except SpaceError as err:
        write_bytes_whole(path, original.encode("utf-8"), f"--write {path}")
        raise UsageError(
            f"--write {path}: with the suggested ranges the space no longer loads, so the file was "
            f"put back as it was: {err}"
        ) from err
    return lines, kept


def flow(value: Any) -> str:
    """A value as one line of YAML flow text: {loguniform: [0.0021, 0.021]}. Floats are positional
    and exact (the shortest text that reads back as the same number)."""
    if isinstance(value, float):
        return np.format_float_positional(value, trim="0")
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def edit_in_place(text: str, changes: Mapping[str, Mapping[str, str]]) -> str:
    """`changes`: variant -> {key: new value as YAML flow text}. Each value is replaced where it
    stands and a missing key is added after its variant's last one, so comments, key order and
    layout survive. write_space checks the result parses to what was meant."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    newline = "\r\n" if "\r\n" in text else "\n"
    variants = next(v for k, v in root.value if k.value == "variants")
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement), applied back to front
    for key_node, node in variants.value:
        wanted = changes.get(key_node.value)
        if not wanted:
            continue
        if isinstance(node, yaml.MappingNode):
            present = {k.value: (k, v) for k, v in node.value}
            for key, value in wanted.items():
                if key in present:
                    edits.append(_replacement(text, *present[key], value))
            missing = [f"{key}: {value}" for key, value in wanted.items() if key not in present]
            if not missing:
                continue
            if not node.value:  # {}
                edits.append(
                    (node.start_mark.index + 1, node.start_mark.index + 1, ", ".join(missing))
                )
            elif node.flow_style:  # {a: 1}: before the closing brace
                at = _end(node.value[-1][1])
                edits.append((at, at, "".join(f", {m}" for m in missing)))
            else:  # a block mapping: new lines after its last entry, at the same indentation
                indent = " " * node.value[0][0].start_mark.column
                line_end = text.find("\n", _end(node.value[-1][1]))
                at = len(text) if line_end < 0 else line_end + 1
                lines = "".join(f"{indent}{m}{newline}" for m in missing)
                edits.append((at, at, (newline if line_end < 0 else "") + lines))
        else:  # `ema:` with nothing (or null) under it
            body = "{" + ", ".join(f"{key}: {value}" for key, value in wanted.items()) + "}"
            if node.start_mark.index < node.end_mark.index:
                edits.append((node.start_mark.index, node.end_mark.index, body))
            else:
                colon = text.index(":", key_node.end_mark.index) + 1
                edits.append((colon, colon, " " + body))
    edits.sort(reverse=True)
    for (start, _, _), (_, end, _) in itertools.pairwise(edits):
        if end > start:  # an alias (*name) puts one node under two keys: give up, re-dump
            raise ValueError("overlapping edits")
    for start, end, value in edits:
        text = text[:start] + value + text[end:]
    return text


def _replacement(text: str, key: yaml.Node, value: yaml.Node, new: str) -> tuple[int, int, str]:
    """The edit that gives `key` the value `new`: a flow value or a scalar is replaced where it
    stands; a block value (on the lines below its key) from the key's colon on, so the new value
    sits on the key's line, with the comment that line had."""
    if isinstance(value, yaml.MappingNode | yaml.SequenceNode) and not value.flow_style:
        colon = text.index(":", key.end_mark.index) + 1
        rest_of_line = text[colon : value.start_mark.index].split("\n", 1)[0].strip()
        comment = f"  {rest_of_line}" if rest_of_line.startswith("#") else ""
        return colon, _end(value), f" {new}{comment}"
    return value.start_mark.index, _end(value), new


def _end(node: yaml.Node) -> int:
    """Where a value's own text ends: a block collection's end mark lies past the comments and
    blank lines after it, so it ends with its last item instead."""
    if (
        isinstance(node, yaml.MappingNode | yaml.SequenceNode)
        and not node.flow_style
        and node.value
    ):
        last = node.value[-1]
        return _end(last[1] if isinstance(last, tuple) else last)
    return node.end_mark.index
