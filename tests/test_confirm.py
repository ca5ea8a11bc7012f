"""Confirmation statistics: Welch's t against the best variant, checked against scipy directly."""

from __future__ import annotations

import pytest
from scipy import stats

from flatbasin.search.confirm import confirmation_stats, fresh_seeds


def finals(*scores: float) -> list[dict]:
    return [{"score": s, "test_acc": s - 0.01, "diverged": False} for s in scores]


def test_fresh_seeds_never_repeat_the_search_seed():
    assert fresh_seeds(0, 3) == [1, 2, 3]
    assert 7 not in fresh_seeds(7, 5)


def test_winner_is_the_best_mean_and_noise_is_told_apart():
    rows = confirmation_stats({
        "sgd": finals(0.950, 0.952, 0.948),
        "swa": finals(0.962, 0.960, 0.964),
        "ema": finals(0.961, 0.955, 0.966),
    })  # fmt: skip
    assert [r["variant"] for r in rows] == ["swa", "ema", "sgd"]
    by = {r["variant"]: r for r in rows}
    assert by["swa"]["verdict"] == "best" and by["swa"]["val_mean"] == pytest.approx(0.962)
    expected = stats.ttest_ind([0.950, 0.952, 0.948], [0.962, 0.960, 0.964], equal_var=False).pvalue
    assert by["sgd"]["p_vs_best"] == pytest.approx(expected) and by["sgd"]["verdict"] == "worse"
    assert by["ema"]["verdict"] == "within noise"
    assert by["sgd"]["test_mean"] == pytest.approx(0.940)


def test_identical_seeds_and_a_diverged_confirmation():
    rows = confirmation_stats({
        "a": finals(0.9, 0.9),
        "b": finals(0.9, 0.9),
        "c": [*finals(0.95), {"score": 0.0, "test_acc": None, "diverged": True}],
    })  # fmt: skip
    by = {r["variant"]: r for r in rows}
    assert {by["a"]["verdict"], by["b"]["verdict"]} == {"best", "tied"}
    two = {r["variant"]: r for r in confirmation_stats({"x": finals(0.98, 0.98), "y": finals(0.97, 0.97)})}
    assert two["y"]["verdict"] == "no spread to test" and two["y"]["p_vs_best"] is None
    assert by["c"]["diverged"] == 1 and by["c"]["val_mean"] == pytest.approx(0.475)
