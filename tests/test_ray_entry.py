"""The Ray adapter's arithmetic, without starting Ray: config round trip and ASHA rungs on cycle ends."""

from __future__ import annotations

from flatbasin.trainables.config import trial_config
from flatbasin.trainables.ray_entry import CheckpointPolicy, epoch_metrics
from flatbasin.trainables.records import EpochMetrics


def metrics(epoch: int) -> EpochMetrics:
    return EpochMetrics(epoch, epoch * 10, 0.5, 0.8, 0.5, 0.8, 0.01, 0.8, 0)


def test_search_config_becomes_trial_config():
    config = trial_config(
        {
            "variant": "snapshot",
            "settings": {"epochs": 8, "threads": 1},
            "snapshot": {"lr": 0.1, "cycles": 4},
        }
    )
    assert (config.variant, config.epochs, config.lr, config.params.cycles) == (
        "snapshot",
        8,
        0.1,
        4,
    )


def test_rung_epoch_moves_only_at_cycle_boundaries():
    config = trial_config(
        {"variant": "snapshot", "settings": {"epochs": 8}, "snapshot": {"cycles": 3}}
    )
    rungs = config.build_variant().boundaries(
        steps_per_epoch=20
    )  # cycles of 160/3 steps end in epochs 3, 6, 8
    assert rungs == [3, 6, 8]
    assert [epoch_metrics(metrics(e), rungs)["rung_epoch"] for e in range(1, 9)] == [
        0,
        0,
        3,
        3,
        3,
        6,
        6,
        8,
    ]
    # variants without cycles are judged every epoch
    assert [epoch_metrics(metrics(e), [])["rung_epoch"] for e in (1, 2, 3)] == [1, 2, 3]


def test_checkpoint_policy_every_and_interval():
    every_second = CheckpointPolicy(every=2, interval_s=0.0)
    assert [every_second.due(e) for e in range(1, 5)] == [False, True, False, True]
    throttled = CheckpointPolicy(every=1, interval_s=3600.0)
    assert not any(throttled.due(e) for e in range(1, 5))
