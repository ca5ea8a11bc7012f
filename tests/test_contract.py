"""One contract every registered variant must pass: a new variant is tested by registering it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from flatbasin.trainables.config import make_config
from flatbasin.trainables.data import load_data
from flatbasin.trainables.data_spec import DataSpec
from flatbasin.trainables.focus_harvest import fit_focus_library
from flatbasin.trainables.loop import DIVERGED_SCORE, assemble, train
from flatbasin.trainables.variants import REGISTRY

METRICS = {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "score", "gen_gap"}


def smoke_config(name: str, files: dict[str, Path] | None = None, **extra):
    """`files`: what a variant that reads a file gets (prior_guided: a focus library fitted on the
    model the test trains, from the `libraries` fixture)."""
    own = {key: str((files or {})[key]) for key in REGISTRY[name].file_params}
    return make_config(
        name, {**REGISTRY[name].smoke, "epochs": 2, "batch_size": 32, "threads": 1, **own, **extra}
    )


@pytest.fixture(scope="module")
def libraries(small, small_mnist1d, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """A focus library per test data set (small_cnn on digits, cnn1d on MNIST-1D), each from a
    one-epoch harvest on the data's first 320 examples, for the variants with file parameters."""
    folder = tmp_path_factory.mktemp("libraries")
    made = {}
    for dataset, data in (("digits", small), ("mnist1d", small_mnist1d)):
        half = dataclasses.replace(data, x_train=data.x_train[:320], y_train=data.y_train[:320])
        config = make_config(
            "sgd", {"dataset": dataset, "epochs": 1, "batch_size": 32, "threads": 1}
        )
        library, _ = fit_focus_library(config, data=half)
        library.save(folder / f"{dataset}.pt")
        made[dataset] = {"library": folder / f"{dataset}.pt"}
    return made


def expected_curve_length(config, steps_per_epoch: int) -> int:
    joins = config.build_variant().join_steps(steps_per_epoch)
    return len(joins) if joins else 1


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_variant_trains_reports_and_resumes_bit_for_bit(name, small, tmp_path, libraries):
    """The killed run recomputes epoch 1 from scratch, so equality also shows determinism."""
    config = smoke_config(name, libraries["digits"])
    full = train(config, data=small)

    assert not full.diverged
    assert [m.epoch for m in full.history] == [1, 2]
    for m in full.history:
        row = asdict(m)
        assert row.keys() >= METRICS
        assert all(math.isfinite(row[k]) for k in METRICS)
        assert 0.0 <= m.score <= 1.0
    assert full.test_acc is not None and 0.0 <= full.test_acc <= 1.0
    assert len(full.curve) == expected_curve_length(config, small.steps_per_epoch(32))
    assert [p.count for p in full.curve] == list(range(1, len(full.curve) + 1))
    assert full.score == pytest.approx(full.history[-1].score)
    assert full.score > 0.3, "two epochs on digits should be well above chance"

    # Interrupted after epoch 1 (the process dies right after its checkpoint), then resumed.
    ckpt = tmp_path / "ckpt.pt"

    class Killed(Exception):
        pass

    def die_after_first_epoch(metrics, save):
        save(ckpt)
        raise Killed

    with pytest.raises(Killed):
        train(config, data=small, on_epoch=die_after_first_epoch)
    resumed = train(config, data=small, resume=ckpt)

    assert resumed.history == full.history  # dataclass equality: every float bit for bit
    assert resumed.curve == full.curve
    assert resumed.extra_curves == full.extra_curves
    assert (resumed.score, resumed.test_acc) == (full.score, full.test_acc)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_divergence_is_a_result_not_a_crash(name, small, libraries):
    poisoned = dataclasses.replace(small, x_train=small.x_train.clone())
    poisoned.x_train[3] = float("inf")  # the loss turns non-finite in the first epoch
    result = train(smoke_config(name, libraries["digits"]), data=poisoned)
    assert result.diverged
    assert len(result.history) == 1
    assert result.score == DIVERGED_SCORE == 0.0  # never above a real trial, however bad
    assert result.history[-1].score == DIVERGED_SCORE
    assert result.test_acc is None and result.curve == []


@pytest.fixture(scope="module")
def small_mnist1d():
    """640 training signals of MNIST-1D (N, 1, 40): the 1-D path, with auto resolving to cnn1d."""
    data = load_data(DataSpec(dataset="mnist1d"), "cpu")
    return dataclasses.replace(
        data, name="mnist1d-small", x_train=data.x_train[:640], y_train=data.y_train[:640]
    )


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_variant_trains_on_1d_signals(name, small_mnist1d, libraries):
    result = train(smoke_config(name, libraries["mnist1d"], dataset="mnist1d"), data=small_mnist1d)
    assert not result.diverged and result.test_acc is not None
    assert all(
        math.isfinite(v) for m in result.history for k, v in asdict(m).items() if k in METRICS
    )
    assert result.score > 0.2, "two epochs on MNIST-1D should be above chance (0.1)"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_variant_evaluates_with_tta_and_ensembles_report_diversity(name, small, libraries):
    """TTA is an evaluation option of every variant; every ensemble reports its members' diversity."""
    config = smoke_config(name, libraries["digits"], tta="flip_shift")
    result = train(config, data=small)
    assert not result.diverged and result.test_acc is not None
    assert result.score > 0.2, "flipped digits are no digits, but two epochs stay above chance"
    ensemble = assemble(config, small, torch.device("cpu")).curve.kind == "ensemble"
    assert [p.count for p in result.diversity] == (
        list(range(2, len(result.curve) + 1)) if ensemble else []
    )
    for p in result.diversity:
        assert 0.0 <= p.disagreement <= 1.0
        assert p.error_corr is None or -1.0 <= p.error_corr <= 1.0


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_variant_trains_and_resumes_on_streamed_data(name, streamed_small, tmp_path, libraries):
    """The same contract on a user's Datasets read by DataLoader workers (with a random transform
    in them): the BN passes, members' scoring and the curve read through the loaders, and a run
    interrupted after epoch 1 resumes bit for bit although its workers start afresh."""
    config = smoke_config(name, libraries["digits"])
    full = train(config, data=streamed_small)

    assert not full.diverged and full.test_acc is not None
    assert [m.epoch for m in full.history] == [1, 2]
    assert all(math.isfinite(v) for m in full.history for k, v in asdict(m).items() if k in METRICS)
    assert len(full.curve) == expected_curve_length(config, streamed_small.steps_per_epoch(32))
    assert full.score == pytest.approx(full.history[-1].score)
    assert full.score > 0.3, "two epochs on digits should be well above chance"

    ckpt = tmp_path / "ckpt.pt"

    class Killed(Exception):
        pass

    def die_after_first_epoch(metrics, save):
        save(ckpt)
        raise Killed

    with pytest.raises(Killed):
        train(config, data=streamed_small, on_epoch=die_after_first_epoch)
    streamed_small.close()  # a resumed trial runs in a new process: new workers, same numbers
    resumed = train(config, data=streamed_small, resume=ckpt)

    assert resumed.history == full.history
    assert resumed.curve == full.curve
    assert resumed.extra_curves == full.extra_curves
    assert (resumed.score, resumed.test_acc) == (full.score, full.test_acc)
