"""ASHA in a compare search: rungs per variant, so two variants' trials are never ranked together."""

from __future__ import annotations

from types import SimpleNamespace

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from flatbasin.search.schedulers import PerVariantASHA

SETTINGS = dict(time_attr="rung_epoch", metric="score", mode="max", max_t=8, grace_period=2,
                reduction_factor=2)  # fmt: skip


def trial(trial_id: str, variant: str) -> SimpleNamespace:
    """What ASHA reads of a trial: its id and, here, the variant in its config."""
    return SimpleNamespace(trial_id=trial_id, config={"variant": variant})


def feed(scheduler, trials_scores: list[tuple[SimpleNamespace, float]]) -> list[str]:
    """Every trial reaches the first rung (epoch 2) with its score; the decisions, in order."""
    for t, _ in trials_scores:
        scheduler.on_trial_add(None, t)
    return [
        scheduler.on_trial_result(None, t, {"rung_epoch": 2, "score": score})
        for t, score in trials_scores
    ]


# Snapshot trials mid-cycle look strong at epoch 2, plain sgd trials weak: a shared ASHA stops the sgd
# trials for being behind another variant.
RACE = [
    ("s1", "snapshot", 0.90),
    ("s2", "snapshot", 0.91),
    ("g1", "sgd", 0.60),
    ("g2", "sgd", 0.62),
]


def test_a_shared_asha_stops_a_variant_for_being_behind_another():
    decisions = feed(ASHAScheduler(**SETTINGS), [(trial(i, v), s) for i, v, s in RACE])
    assert decisions[2:] == [TrialScheduler.STOP, TrialScheduler.STOP]


def test_per_variant_rungs_never_mix_variants():
    scheduler = PerVariantASHA(**SETTINGS)
    decisions = feed(scheduler, [(trial(i, v), s) for i, v, s in RACE])
    assert decisions[2] == TrialScheduler.CONTINUE  # the first sgd trial is judged among sgd trials
    for variant, prefix in (("snapshot", "s"), ("sgd", "g")):
        recorded = {tid for _, scores in scheduler.rungs(variant) for tid in scores}
        assert recorded and all(tid.startswith(prefix) for tid in recorded), (variant, recorded)
    # Within a variant ASHA still does its job: the weaker of two sgd trials at the same rung stops.
    assert decisions[3] == TrialScheduler.CONTINUE  # 0.62 beats the rung's cut of 0.60..0.62
    late = trial("g3", "sgd")
    scheduler.on_trial_add(None, late)
    assert (
        scheduler.on_trial_result(None, late, {"rung_epoch": 2, "score": 0.30})
        == TrialScheduler.STOP
    )


def test_it_survives_a_save_and_restore(tmp_path):
    scheduler = PerVariantASHA(**SETTINGS)
    feed(scheduler, [(trial(i, v), s) for i, v, s in RACE])
    scheduler.save(str(tmp_path / "s.pkl"))
    restored = PerVariantASHA(**SETTINGS)
    restored.restore(str(tmp_path / "s.pkl"))
    assert restored.rungs("sgd") == scheduler.rungs("sgd")
