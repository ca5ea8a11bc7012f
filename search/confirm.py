"""Confirmation: each variant's best configuration retrained on fresh seeds and fresh validation splits,
and a paired test that says which differences survive. A search picks the maximum of noisy numbers
on one validation split, so its winner is biased upward twice: by the seed and by the examples.

Run k of every variant trains with the same seed k and is scored on the same fresh validation split
k (the test split never moves; see DataSpec.val_seed), so variants are compared pairwise, run by run:
the split-to-split and seed-to-seed luck that every variant shares drops out of the differences. The
leader (best mean validation accuracy) is compared with each other variant by a t-test of their mean
paired difference, two-sided at 5%, against the noise pooled over all variants (the residual of the
two-way layout variant x run, a randomised block design); the spread of a difference is taken as at
least one validation example (an accuracy counts examples: agreement finer than that is resolution,
not certainty). A winner is named only when it is better than every other variant beyond noise (each
test rejects: an intersection-union test, which needs no multiplicity correction); otherwise the
leading variants tie and the one that costs least is said. The test split chooses nothing: it is
reported beside.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ALPHA = 0.05
BEST, TIED, NOISE, WORSE = "best", "tied", "within noise", "worse"
FEW = "too few seeds to test"
FLAT = "no spread to test"


def fresh_seeds(original: int, n: int) -> list[int]:
    """N seeds after `original` (which the search used): never it, and 32-bit."""
    return [(original + 1 + k) % 2**32 for k in range(n)]


def search_val_seed(settings: Mapping[str, Any]) -> int:
    """The seed of the validation split a search's trials were scored on (DataSpec.val_split_seed)."""
    if settings.get("val_seed") is not None:
        return int(settings["val_seed"])
    return int(settings.get("split_seed", 0)) + 1


def plan(best: Sequence[Mapping[str, Any]], n: int) -> list[dict[str, Any]]:
    """The confirmation trials' configs: each variant's best config (`best` rows hold the search's
    Tune config under "config" and its trial under "trial_id") retrained `n` times. Run k of every
    variant trains with the same fresh seed and, in a search from scratch, on the same fresh
    validation split; a post-convergence search (its configs continue a converged `start`) keeps
    the search's split, since its base model trained on the rest of the data and a fresh split
    would score it on examples it has learned."""
    if not best:
        return []
    settings = [row["config"]["settings"] for row in best]
    # One set of seeds for every variant, none of them a seed any variant's best trained with.
    seeds = fresh_seeds(max(int(s.get("seed", 0)) for s in settings), n)
    configs = []
    for row, own in zip(best, settings, strict=True):
        fresh_split = "start" not in row["config"]
        val_seeds = fresh_seeds(search_val_seed(own), n)
        for k in range(n):
            update = {"seed": seeds[k], **({"val_seed": val_seeds[k]} if fresh_split else {})}
            configs.append(
                {**row["config"], "settings": {**own, **update}, "confirm_of": row["trial_id"]}
            )
    return configs


def fresh_splits(best: Sequence[Mapping[str, Any]]) -> bool:
    """Whether `plan` gives the confirmation runs fresh validation splits (not in a search --from)."""
    return bool(best) and all("start" not in row["config"] for row in best)


def pair_key(trial_config: Mapping[str, Any]) -> str:
    """What pairs the runs of two variants: the seed and the validation split they ran with."""
    return f"seed {trial_config.get('seed')}, val_seed {trial_config.get('val_seed')}"


def models_per_prediction(final: Mapping[str, Any]) -> int:
    """Models a variant's deployed model runs per prediction: its members for an ensemble (which
    records their diversity), else one (an average of weights is one model)."""
    curve = final.get("curve") or []
    return int(curve[-1]["count"]) if final.get("diversity") and curve else 1


def confirmation_stats(
    finals: Mapping[str, Sequence[Mapping[str, Any]]], val_size: int | None = None
) -> list[dict[str, Any]]:
    """Per variant (finals: variant -> its confirmation runs' results, each with "score",
    "test_acc", "diverged" and, to pair runs across variants, "pair"; "models" per prediction
    optional): mean and standard deviation of validation and test accuracy and the paired test
    against the leader; best first. `val_size`: examples in a validation split (the resolution of
    a score); None when unknown. A diverged run counts with its score of 0: a setting that diverges
    on another seed is not a setting to recommend."""
    rows: list[dict[str, Any]] = []
    for variant, results in finals.items():
        val = [float(r["score"]) for r in results]
        test = [float(r["test_acc"]) if r.get("test_acc") is not None else 0.0 for r in results]
        pairs = [str(r.get("pair", k)) for k, r in enumerate(results)]
        if len(set(pairs)) < len(pairs):  # runs recorded without their seeds: paired by position
            pairs = [str(k) for k in range(len(results))]
        rows.append({
            "variant": variant, "n": len(val), "val": val, "test": test,
            "val_mean": statistics.fmean(val), "val_std": _std(val),
            "test_mean": statistics.fmean(test), "test_std": _std(test),
            "diverged": sum(bool(r.get("diverged")) for r in results),
            "models": max((int(r.get("models", 1)) for r in results), default=1),
            "by_pair": dict(zip(pairs, val, strict=True)),
        })  # fmt: skip
    # Equal means: the cheaper variant leads (it is the one to recommend), then the name.
    rows.sort(key=lambda r: (-r["val_mean"], r["models"], r["variant"]))
    if rows:
        noise = pooled_noise([r["by_pair"] for r in rows if not r["diverged"]])
        for row in rows:
            row.update(_compare(rows[0], row, noise, val_size))
    for row in rows:
        del row["by_pair"]
    return rows


def pooled_noise(scores: Sequence[Mapping[str, float]]) -> tuple[float, int] | None:
    """The spread of one score once its run's shared part is taken out, pooled over variants, and
    its degrees of freedom: the residual of the two-way layout variant x run (runs every variant
    has: complete blocks). None when there are fewer than two variants or two such runs. Pooled,
    every comparison with the leader has the same yardstick, so a variant with a smaller gap is
    never "worse" while one with a larger gap is "within noise"."""
    import numpy as np

    runs = [k for k in scores[0] if all(k in s for s in scores)] if scores else []
    if len(scores) < 2 or len(runs) < 2:
        return None
    y = np.array([[s[k] for k in runs] for s in scores], dtype=np.float64)
    residual = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + y.mean()
    df = (y.shape[0] - 1) * (y.shape[1] - 1)
    return math.sqrt(float((residual**2).sum()) / df), df


def _compare(
    leader: dict[str, Any],
    row: dict[str, Any],
    noise: tuple[float, int] | None,
    val_size: int | None,
) -> dict[str, Any]:
    """The paired test of leader - row over the runs they share: the mean difference against the
    pooled noise (else, without a pool, the differences' own spread, a plain paired t-test)."""
    none = {"pairs": 0, "diff_mean": None, "diff_low": None, "diff_high": None, "p_vs_best": None}
    if row is leader:
        return {**none, "pairs": row["n"], "verdict": BEST}
    shared = [k for k in leader["by_pair"] if k in row["by_pair"]]
    diffs = [leader["by_pair"][k] - row["by_pair"][k] for k in shared]
    out = {**none, "pairs": len(diffs)}
    if len(diffs) < 2:
        return {**out, "verdict": FEW}
    mean = statistics.fmean(diffs)
    if all(d == 0 for d in diffs):
        return {**out, "diff_mean": 0.0, "diff_low": 0.0, "diff_high": 0.0, "p_vs_best": 1.0,
                "verdict": TIED}  # fmt: skip
    if noise is not None:
        spread, df = noise[0] * math.sqrt(2), noise[1]  # a difference of two scores
    else:
        spread, df = statistics.stdev(diffs), len(diffs) - 1
    spread = max(spread, 1.0 / val_size if val_size else 0.0)
    if spread == 0:  # every run differs by the same amount and the resolution is unknown
        return {**out, "diff_mean": mean, "verdict": FLAT}
    p, half = t_test(mean, spread / math.sqrt(len(diffs)), df)
    # An interval of accuracies stays where accuracies can be: the lead is at most the leader's
    # mean (the other at 0%) and at least its mean minus 100% (the other at 100%).
    top = leader["val_mean"]
    return {
        **out, "diff_mean": mean,
        "diff_low": max(mean - half, top - 1.0), "diff_high": min(mean + half, top),
        "p_vs_best": p, "verdict": NOISE if p >= ALPHA else WORSE,
    }  # fmt: skip


def t_test(mean: float, error: float, df: int) -> tuple[float, float]:
    """Two-sided p of a t statistic mean / error with df degrees of freedom, and the half-width of
    the 95% interval of the mean. From the t distribution directly: scipy's ttest_rel warns (on the
    user's console) when the differences barely vary."""
    from scipy import stats

    p = float(2 * stats.t.sf(abs(mean) / error, df))
    return min(max(p, 0.0), 1.0), float(stats.t.ppf(1 - ALPHA / 2, df) * error)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class Verdict:
    """What a confirmation concludes, in one paragraph (`text`) and its parts."""

    winner: str | None  # better than every other variant beyond noise; None otherwise
    leading: tuple[str, ...]  # the leader and the variants within noise of it
    cheapest: tuple[str, ...]  # of the leading ones, those with the fewest models per prediction
    recommended: str | None  # the winner, else the cheapest leading variant with the best mean
    text: str


def verdict(
    rows: Sequence[Mapping[str, Any]], val_size: int | None = None, fresh: bool | None = None
) -> Verdict:
    """The answer first: which variant, by how much, over how many seeds and examples, and what is
    within noise. `val_size`: a validation split's examples; `fresh`: whether each run had a fresh
    validation split; either, when not given, as the rows say (the search's rows carry both)."""
    if not rows:
        return Verdict(None, (), (), None, "No variant was confirmed.")
    val_size = val_size if val_size is not None else rows[0].get("val_size")
    fresh = fresh if fresh is not None else rows[0].get("fresh_splits")
    leader = rows[0]
    seeds = max(int(r["n"]) for r in rows)
    where = _where(seeds, val_size, fresh)
    if len(rows) == 1:
        text = (f"Only {leader['variant']} was confirmed: {_pct(leader['val_mean'])} mean validation "
                f"accuracy {where}; there is nothing to compare it with.")  # fmt: skip
        return Verdict(None, (leader["variant"],), (leader["variant"],), leader["variant"], text)
    beaten = [r for r in rows[1:] if r["verdict"] == WORSE]
    leading = [leader] + [r for r in rows[1:] if r["verdict"] != WORSE]
    fewest = min(int(r["models"]) for r in leading)
    cheapest = [r for r in leading if int(r["models"]) == fewest]
    if len(leading) == 1:
        second = rows[1]
        text = (
            f"Winner: {leader['variant']}, {_pct(leader['val_mean'])} mean validation accuracy "
            f"{where}: {_points(second['diff_mean'])} above the next best, {second['variant']} "
            f"(95% interval {_interval(second)}; paired test, p = {second['p_vs_best']:.2g})"
            + (", and every other variant is worse beyond noise." if len(rows) > 2 else ".")
        )
        return Verdict(leader["variant"], (leader["variant"],), (leader["variant"],),
                       leader["variant"], text)  # fmt: skip
    if seeds < 2:
        why = "one run each: no spread, so no test can tell them apart"
    elif all(r["verdict"] == TIED for r in leading[1:]):
        why = "level with it in every run"
    elif all(r["verdict"] in (FEW, FLAT, TIED) for r in leading[1:]):
        why = "too few paired runs to test the differences"
    else:
        widest = max(r["diff_high"] for r in leading[1:] if r["diff_high"] is not None)
        why = (
            f"within noise of it (paired test, p ≥ {ALPHA}); the runs cannot rule out a lead "
            f"of {_points(widest)}"
        )
        if seeds == 2:  # one degree of freedom per pair: only very large gaps can be told apart
            why += " (2 runs each tell apart only large gaps: --confirm-seeds 3 or more)"
    others = [r["variant"] for r in leading[1:]]
    cost = (
        f"All of them cost the same ({_models(fewest)} per prediction)."
        if len(cheapest) == len(leading)
        else f"Of these, {_join([r['variant'] for r in cheapest])} "
        f"{'costs' if len(cheapest) == 1 else 'cost'} least ({_models(fewest)} per prediction)."
    )
    text = (
        f"No winner beyond noise: {leader['variant']} leads with {_pct(leader['val_mean'])} mean "
        f"validation accuracy {where}, but {_join(others)} {'is' if len(others) == 1 else 'are'} "
        f"{why}. {cost}"
        + (f" Worse beyond noise: {_join([r['variant'] for r in beaten])}." if beaten else "")
    )
    return Verdict(None, tuple(r["variant"] for r in leading), tuple(r["variant"] for r in cheapest),
                   cheapest[0]["variant"], text)  # fmt: skip


def _where(seeds: int, val_size: int | None, fresh: bool | None) -> str:
    runs = f"over {seeds} run{'s' * (seeds != 1)}"
    size = f" of {val_size:,} examples" if val_size else ""
    if fresh:
        return f"{runs}, each with a fresh seed and a fresh validation split{size}"
    if fresh is False:
        return f"{runs} with fresh seeds, on the search's own validation split{size}"
    return f"{runs} with fresh seeds" + (f", validation splits{size}" if size else "")


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _points(value: float | None) -> str:
    return "?" if value is None else f"{100 * value:+.2f} points"


def _interval(row: Mapping[str, Any]) -> str:
    return f"{100 * row['diff_low']:+.2f} to {100 * row['diff_high']:+.2f} points"


def _models(n: int) -> str:
    return "one model" if n == 1 else f"{n} models"


def _join(names: Iterable[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def winner(confirmed: list[dict[str, Any]]) -> str | None:
    """The winner after confirmation: better than every other variant beyond noise; None without a
    confirmation, or when the leading variants tie (confirm.verdict)."""
    return verdict(confirmed).winner if confirmed else None


def within_noise(confirmed: list[dict[str, Any]]) -> list[str]:
    """Variants the confirmation cannot tell from the leader (the best mean validation accuracy)."""
    return list(verdict(confirmed).leading[1:]) if confirmed else []


def to_reproduce(best: list[dict[str, Any]], recommended: str | None) -> dict[str, Any] | None:
    """The trial to reproduce: the recommended variant's best trial (the confirmed winner, or the
    cheapest of the variants that tie), else the best search score."""
    rows = [r for r in best if r["variant"] == recommended] or best
    return rows[0] if rows else None


def recommended(confirmed: list[dict[str, Any]]) -> str | None:
    """The variant to use: the confirmed winner, or the cheapest of the variants that tie."""
    return verdict(confirmed).recommended if confirmed else None
