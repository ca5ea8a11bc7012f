"""Confirmation over seeds: a search picks the maximum of noisy numbers, so its winner is biased upward.
Each variant's best configuration is retrained with fresh seeds; these statistics say what survives.

The test is Welch's t (scipy.stats.ttest_ind with equal_var=False) of each variant's validation
accuracies against the best variant's, two-sided at 5%: p >= 0.05 means the difference is within the
seed-to-seed noise that N seeds can resolve. The test split chooses nothing: the winner is the best
mean validation accuracy; test accuracy is reported beside it.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

ALPHA = 0.05


def fresh_seeds(original: int, n: int) -> list[int]:
    """N seeds the search never used for this configuration (it trained with `original`)."""
    return [(original + 1 + k) % 2**32 for k in range(n)]  # seeds are 32-bit


def confirmation_stats(finals: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per variant (finals: variant -> final results of its confirmation trials): mean and standard
    deviation of validation and test accuracy, Welch's p against the best, and a verdict; best first.
    A diverged confirmation counts with its score of 0: a setting that diverges on another seed is
    not a setting to recommend."""
    from scipy import stats

    rows = []
    for variant, results in finals.items():
        val = [float(r["score"]) for r in results]
        test = [float(r["test_acc"]) if r.get("test_acc") is not None else 0.0 for r in results]
        rows.append({
            "variant": variant, "n": len(val), "val": val, "test": test,
            "val_mean": statistics.fmean(val), "val_std": _std(val),
            "test_mean": statistics.fmean(test), "test_std": _std(test),
            "diverged": sum(bool(r.get("diverged")) for r in results),
        })  # fmt: skip
    rows.sort(key=lambda r: (-r["val_mean"], r["variant"]))
    if not rows:
        return rows
    best = rows[0]
    for row in rows:
        if row is best:
            row["p_vs_best"], row["verdict"] = None, "best"
            continue
        if row["n"] < 2 or best["n"] < 2:
            row["p_vs_best"], row["verdict"] = None, "too few seeds to test"
            continue
        if row["val_std"] == 0 and best["val_std"] == 0:
            # Every seed gave the same number on both sides: t is undefined, and a difference of
            # one validation example would read as certain. Say that it cannot be tested.
            same = row["val_mean"] == best["val_mean"]
            row["p_vs_best"], row["verdict"] = None, "tied" if same else "no spread to test"
            continue
        else:
            p = float(stats.ttest_ind(row["val"], best["val"], equal_var=False).pvalue)
        row["p_vs_best"] = p if math.isfinite(p) else 1.0
        row["verdict"] = "within noise" if row["p_vs_best"] >= ALPHA else "worse"
    return rows


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0
