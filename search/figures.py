"""Every figure flatbasin draws: a trial's curve, the comparison of the variants' best curves, and the
parameter importances. matplotlib's object API only (no pyplot state) and fixed axes (no layout pass),
so that a trial's curve.png, drawn on the driver while trials run, costs tens of milliseconds.

A curve is what a trial's final result holds: {"curve": [{"count", "val_acc", "test_acc"}, ...],
"extra_curves": {name: [points]}}. Accuracies are fractions; the axes show percent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # matplotlib loads on the first figure, not when tracking.py is imported
    from matplotlib.figure import Figure

# One colour per variant wherever it appears (tab10), so a reader matches figures at a glance.
VARIANT_COLORS = {
    "sgd": "#7f7f7f",
    "swa": "#1f77b4",
    "cyclic_average": "#d62728",
    "snapshot": "#2ca02c",
    "sgdr": "#9467bd",
    "fge": "#ff7f0e",
    "ema": "#8c564b",
}
SPARE_COLORS = ("#e377c2", "#17becf", "#bcbd22", "#393b79", "#637939", "#843c39")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DASHES = ((6, 3), (2, 2), (8, 2, 2, 2), (4, 4), (1, 3))

MIN_SPAN = 0.05  # the y-axis spans at least 5 accuracy points ...
MIN_EXAMPLES = 8  # ... and at least this many validation examples, so one example never fills it
MIN_DISTINCT = 8  # distinct accuracies needed before the validation set size is inferred from them
MAX_VAL_SIZE = 200_000
DPI = 100


def variant_color(name: str, index: int = 0) -> str:
    return VARIANT_COLORS.get(name, SPARE_COLORS[index % len(SPARE_COLORS)])


def infer_val_size(accuracies: Iterable[float]) -> int | None:
    """The validation set size, from accuracies measured on it (each is correct/N, rounded to float32).

    The smallest N that explains every value; None when there are too few distinct values to trust
    the answer (with few values a divisor of the true N can explain them all) or none is found.
    """
    distinct = {round(v, 7): v for v in accuracies if 0.0 < v < 1.0 and math.isfinite(v)}
    if len(distinct) < MIN_DISTINCT:
        return None
    sizes = np.arange(1, MAX_VAL_SIZE + 1)
    fits = np.ones(MAX_VAL_SIZE, dtype=bool)
    for value in distinct.values():
        counts = value * sizes
        fits &= np.abs(counts - np.round(counts)) <= 1e-6 * sizes + 1e-6  # float32 rounding
    found = np.flatnonzero(fits)
    return int(sizes[found[0]]) if found.size else None


def accuracy_limits(values: Sequence[float], val_size: int | None) -> tuple[float, float]:
    """y-limits that show the data and never make a difference of one example look large."""
    low, high = min(values), max(values)
    span = max(high - low, MIN_SPAN, MIN_EXAMPLES / val_size if val_size else 0.0)
    pad = 0.08 * span
    middle = (low + high) / 2
    low, high = middle - span / 2 - pad, middle + span / 2 + pad
    if high > 1.0 + pad:  # keep 100% on the axis, shift the window down instead of past it
        low, high = low - (high - 1.0 - pad), 1.0 + pad
    if low < 0.0:
        low, high = 0.0, max(high, min(1.0 + pad, span + 2 * pad))
    return low, high


def step_note(val_size: int | None) -> str:
    if not val_size:
        return "the accuracy axis spans at least 5 points, so small differences are not magnified"
    return f"validation set: {val_size} examples, one example = {100 / val_size:.2g} points"


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI)


def _percent_axis(ax: Any, low: float, high: float) -> None:
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    ax.set_ylim(low, high)
    # The span is at least MIN_SPAN, so ticks 1, 2 or 5 points apart are whole percents.
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 5, 10]))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))


def _count_axis(ax: Any, max_count: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(0.5, max_count + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(max_count, 10)))
    ax.set_xlabel("models averaged / ensembled")


def _points(final: Mapping[str, Any]) -> list[dict[str, float]]:
    return sorted(final.get("curve") or [], key=lambda p: p["count"])


def _empty(fig: Figure, message: str) -> Figure:
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, color="#555555")
    return fig


# ----------------------------------------------------------------------------- one trial


def trial_figure(
    variant: str, final: Mapping[str, Any], trial_id: str | None = None, val_size: int | None = None
) -> Figure:
    """One trial: validation (solid) and test (dashed) accuracy against models averaged, and the
    extra curves (e.g. the snapshots' weight average) dotted. A variant that deploys one final model
    (sgd, ema) gets two labelled reference lines instead of a one-point curve."""
    points = _points(final)
    extras = {name: sorted(p, key=lambda q: q["count"]) for name, p in (final.get("extra_curves") or {}).items() if p}  # fmt: skip
    fig = _new_figure(6.4, 3.6)
    who = f"{variant} (trial {trial_id})" if trial_id else variant
    if not points:
        fig.suptitle(who, fontsize=11)
        return _empty(fig, "no curve recorded (the trial diverged or did not finish)")
    color = variant_color(variant)
    values = [p[k] for p in points for k in ("val_acc", "test_acc")]
    values += [p[k] for ps in extras.values() for p in ps for k in ("val_acc", "test_acc")]
    val_size = val_size or infer_val_size(
        [p["val_acc"] for p in [*points, *(q for ps in extras.values() for q in ps)]]
    )
    low, high = accuracy_limits(values, val_size)
    max_count = max(p["count"] for p in [*points, *(q for ps in extras.values() for q in ps)])

    if max_count <= 1:  # one deployed model: no x-axis to speak of
        ax = fig.add_axes((0.13, 0.12, 0.84, 0.68))
        val, test = points[-1]["val_acc"], points[-1]["test_acc"]
        ax.axhline(val, color=color, lw=2.2)
        ax.axhline(test, color=color, lw=2.2, ls=(0, (6, 3)))
        # The higher line's label above it, the lower one's below (validation above on a tie).
        for y, text, above in ((val, f"validation {val:.1%}", val >= test),
                               (test, f"test {test:.1%}", test > val)):  # fmt: skip
            ax.annotate(text, (0.02, y), xycoords=("axes fraction", "data"), fontsize=10,
                        xytext=(0, 5 if above else -5), textcoords="offset points",
                        va="bottom" if above else "top", color="#222222")  # fmt: skip
        ax.set_xticks([])
        ax.set_xlim(0, 1)
        ax.set_xlabel("final model (no averaging curve)", fontsize=9, color="#444444")
        _percent_axis(ax, low, high)
        ax.set_ylabel("accuracy")
        ax.grid(axis="y", alpha=0.3)
        fig.suptitle(f"{who}: final model", fontsize=11, x=0.13, ha="left", y=0.96)
        fig.text(0.13, 0.845, step_note(val_size), fontsize=8, color="#555555")
        return fig

    ax = fig.add_axes((0.12, 0.15, 0.58, 0.65))
    counts = [p["count"] for p in points]
    ax.plot(counts, [p["val_acc"] for p in points], color=color, marker="o", lw=2,
            label="validation")  # fmt: skip
    ax.plot(counts, [p["test_acc"] for p in points], color=color, marker="o", lw=1.5, ls="--",
            mfc="white", label="test")  # fmt: skip
    for i, (name, extra) in enumerate(extras.items()):
        xs = [p["count"] for p in extra]
        shade = SPARE_COLORS[i % len(SPARE_COLORS)]
        ax.plot(xs, [p["val_acc"] for p in extra], color=shade, marker="s", ms=4, lw=1.5, ls=":",
                label=f"{name} validation")  # fmt: skip
    _count_axis(ax, max_count)
    _percent_axis(ax, low, high)
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.suptitle(f"{who}: accuracy vs. models averaged", fontsize=11, x=0.12, ha="left", y=0.96)
    fig.text(0.12, 0.845, step_note(val_size), fontsize=8, color="#555555")
    return fig


# ----------------------------------------------------------------------------- several variants


def comparison_figure(
    finals: Mapping[str, Mapping[str, Any]],
    val_size: int | None = None,
    title: str = "validation accuracy of each variant's best trial",
    confirmed: Mapping[str, tuple[float, float, int]] | None = None,
) -> Figure:
    """The best trial of each variant, validation accuracy against models averaged, on one axes.

    Curves are nudged sideways a little (a tenth of a step between variants) and carry their own
    marker so none hides another; variants with one deployed model are horizontal reference lines
    labelled "final model". The legend sits outside the axes and names each variant's final value.

    `confirmed` (variant -> mean, sd, seeds of its confirmation runs): a search trial's score is
    one seed's, picked as the best of several, so it flatters; each confirmed variant gets a bar at
    the right, mean ± sd over fresh seeds, and the legend gives both numbers.
    """
    fig = _new_figure(8.6, 4.4)
    curves = {label: _points(final) for label, final in finals.items()}
    curves = {label: points for label, points in curves.items() if points}
    if not curves:
        return _empty(fig, "no variant has a finished, non-diverged trial")
    values = [p["val_acc"] for points in curves.values() for p in points]
    val_size = val_size or infer_val_size(values)
    low, high = accuracy_limits(values, val_size)
    confirmed = {k: v for k, v in (confirmed or {}).items() if k in curves}
    if confirmed:
        values += [m + sign * sd for m, sd, _ in confirmed.values() for sign in (-1, 1)]
        low, high = accuracy_limits(values, val_size)
    max_count = int(max(p["count"] for points in curves.values() for p in points))
    if max_count <= 1:
        return _final_models_figure(fig, curves, val_size, title, low, high, confirmed)

    if (
        confirmed
    ):  # room for the panel of confirmation runs, its names and the legend's second lines
        fig.set_size_inches(11.6, 4.9)
    ax = fig.add_axes((0.07, 0.2, 0.46, 0.58) if confirmed else (0.09, 0.13, 0.57, 0.68))
    multi = [label for label, points in curves.items() if len(points) > 1]
    offsets = {label: (i - (len(multi) - 1) / 2) * min(0.08, 0.4 / len(multi)) for i, label in enumerate(multi)}  # fmt: skip
    # Best first in the legend; drawn best last so it lies on top.
    order = sorted(curves, key=lambda label: -curves[label][-1]["val_acc"])
    for rank, label in enumerate(order):
        points, color = curves[label], variant_color(label, rank)
        final = points[-1]["val_acc"]
        z = 3 + len(order) - rank
        models = "final model" if len(points) == 1 else f"{points[-1]['count']} models"
        text = f"{label}: {final:.1%} ({models})"
        if label in confirmed:
            mean, sd, seeds = confirmed[label]
            text += f"\n    confirmed: {mean:.1%} ± {sd:.1%}, {seeds} seeds"
        if len(points) == 1:
            ax.axhline(final, color=color, lw=2, ls=(0, DASHES[rank % len(DASHES)]), zorder=z,
                       label=text)  # fmt: skip
            continue
        xs = [p["count"] + offsets[label] for p in points]
        ax.plot(xs, [p["val_acc"] for p in points], color=color, lw=2, alpha=0.9, zorder=z,
                marker=MARKERS[rank % len(MARKERS)], ms=7, mec="white", mew=0.8, label=text)  # fmt: skip
    _count_axis(ax, max_count)
    _percent_axis(ax, low, high)
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    legend_ax = ax
    if confirmed:
        ax.set_title("best search trial of each variant (one seed)", fontsize=9, loc="left",
                     color="#444444")  # fmt: skip
        legend_ax = _confirmed_panel(fig, ax, confirmed, order, low, high)
    legend_ax.legend(*ax.get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(1.04, 1.0),
                     fontsize=9, frameon=False, title="variant: deployed model", title_fontsize=9,
                     alignment="left")  # fmt: skip
    left = ax.get_position().x0
    fig.suptitle(title, fontsize=12, x=left, ha="left", y=0.965)
    fig.text(left, 0.87 if confirmed else 0.855, step_note(val_size), fontsize=8.5, color="#555555")
    return fig


def _confirmed_panel(
    fig: Figure,
    ax: Any,
    confirmed: Mapping[str, tuple[float, float, int]],
    order: Sequence[str],
    low: float,
    high: float,
) -> Any:
    """The confirmation runs in a panel of their own beside the curves, on the same accuracy scale:
    one bar per variant (mean ± sd over its runs), best mean on the left. Apart from the "models
    averaged" axis, so that no bar reads as more models."""
    box = ax.get_position()
    panel = fig.add_axes((box.x1 + 0.025, box.y0, 0.034 + 0.024 * len(confirmed), box.height),
                         sharey=ax)  # fmt: skip
    ranked = sorted(confirmed, key=lambda label: -confirmed[label][0])
    for i, label in enumerate(ranked):
        mean, sd, _ = confirmed[label]
        color = variant_color(label, order.index(label) if label in order else i)
        panel.errorbar([i], [mean], yerr=[sd], fmt="D", color=color, ms=6, capsize=4, lw=1.6)
    seeds = sorted({n for _, _, n in confirmed.values()})
    panel.set_xlim(-0.6, len(ranked) - 0.4)
    panel.set_xticks(range(len(ranked)), ranked, rotation=60, ha="right", fontsize=8)
    panel.tick_params(axis="y", labelleft=False)
    panel.set_ylim(low, high)
    panel.grid(axis="y", alpha=0.3)
    runs = f"{seeds[0]} runs" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]} runs"
    panel.set_title(f"confirmed:\nmean ± sd, {runs}", fontsize=9, loc="left", color="#444444")
    return panel


def _final_models_figure(
    fig: Figure,
    curves: Mapping[str, list[dict[str, float]]],
    val_size: int | None,
    title: str,
    low: float,
    high: float,
    confirmed: Mapping[str, tuple[float, float, int]],
) -> Figure:
    """Every variant deploys one final model: a dot per variant, best on top, value written next to
    it; a confirmed variant's mean ± sd over fresh seeds as a bar just below its dot."""
    from matplotlib.ticker import PercentFormatter

    order = sorted(curves, key=lambda label: curves[label][-1]["val_acc"])
    fig.set_size_inches(8.6, 1.6 + 0.45 * len(order))
    height = 1 - 1.0 / fig.get_figheight() - 0.55 / fig.get_figheight()
    ax = fig.add_axes((0.2, 0.55 / fig.get_figheight(), 0.7, height))
    for i, label in enumerate(order):
        value = curves[label][-1]["val_acc"]
        ax.plot([value], [i], "o", ms=9, color=variant_color(label, i))
        ax.annotate(f"{value:.1%}", (value, i), xytext=(8, 0), textcoords="offset points",
                    va="center", fontsize=9)  # fmt: skip
        if label in confirmed:
            mean, sd, seeds = confirmed[label]
            ax.errorbar([mean], [i - 0.28], xerr=[sd], fmt="D", ms=5, capsize=3,
                        color=variant_color(label, i))  # fmt: skip
            ax.annotate(f"confirmed {mean:.1%} ± {sd:.1%} ({seeds} seeds)", (mean + sd, i - 0.28),
                        xytext=(6, 0), textcoords="offset points", va="center", fontsize=8,
                        color="#555555")  # fmt: skip
    ax.set_yticks(range(len(order)), [f"{label} (final model)" for label in order])
    ax.set_ylim(-0.6, len(order) - 0.4)
    ax.set_xlim(low, high + 0.06 * (high - low))
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0 if high - low >= 0.04 else 1))
    ax.set_xlabel("validation accuracy")
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=12, x=0.02, ha="left", y=1 - 0.12 / fig.get_figheight())
    fig.text(
        0.02, 1 - 0.5 / fig.get_figheight(), step_note(val_size), fontsize=8.5, color="#555555"
    )
    return fig


def curve_figure(
    finals: Mapping[str, Mapping[str, Any]],
    trial_id: str | None = None,
    val_size: int | None = None,
) -> Figure:
    """curve.png of one trial (one entry, keyed by its variant) or the comparison of several variants'
    best trials (one entry per variant)."""
    if len(finals) == 1:
        ((variant, final),) = finals.items()
        return trial_figure(variant, final, trial_id=trial_id, val_size=val_size)
    return comparison_figure(finals, val_size=val_size)


# ----------------------------------------------------------------------------- importances


def importance_figure(panels: Mapping[str, Mapping[str, float]]) -> Figure:
    """One horizontal bar panel per study (title -> {parameter: importance}), largest bar on top.

    Laid out in inches, so a panel's bars keep their size however many studies there are."""
    title_in, row_in, gap_in, top_in, bottom_in = 0.3, 0.32, 0.3, 0.55, 0.55
    heights = [title_in + row_in * max(1, len(p)) for p in panels.values()]
    total = top_in + sum(heights) + gap_in * max(0, len(panels) - 1) + bottom_in
    fig = _new_figure(7.6, max(total, 1.6))
    if not panels:
        return _empty(fig, "no importances")
    fig.suptitle("which searched parameters mattered", fontsize=12, x=0.02, ha="left",
                 y=1 - 0.12 / total)  # fmt: skip
    y_in = total - top_in  # top of the next panel, in inches from the bottom
    for i, ((title, importances), height) in enumerate(zip(panels.items(), heights, strict=True)):
        bars_in = height - title_in
        ax = fig.add_axes((0.2, (y_in - height) / total, 0.63, bars_in / total))
        y_in -= height + gap_in
        names = sorted(importances, key=importances.__getitem__)
        values = [importances[n] for n in names]
        ax.barh(range(len(names)), values, color="#4c72b0", height=0.62)
        for j, v in enumerate(values):
            ax.annotate(f"{v:.2f}", (v, j), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=9)  # fmt: skip
        ax.set_yticks(range(len(names)), [n.rpartition("/")[2] for n in names], fontsize=10)
        ax.set_xlim(0, 1.1)
        ax.set_ylim(-0.6, len(names) - 0.4)
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        if i < len(panels) - 1:
            ax.tick_params(axis="x", labelbottom=False)
        else:
            ax.set_xlabel("importance: share of the score's variance (fANOVA)", fontsize=9)
    return fig
