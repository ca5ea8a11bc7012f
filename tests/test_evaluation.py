"""The evaluation toolkit of seed 003: test-time augmentation, the diversity of ensemble members, the
generalisation gap per epoch, and the check that a model can learn before a search starts.

Tiny data and two-epoch trials: seconds each, on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatbasin.trainables import sanity
from flatbasin.trainables.checkpoint import load_checkpoint
from flatbasin.trainables.config import make_config
from flatbasin.trainables.curve import Curve, accuracy, diversity
from flatbasin.trainables.data import load_data
from flatbasin.trainables.data_spec import DataSpec
from flatbasin.trainables.loop import (
    assemble,
    fit_accuracy,
    load_deployed,
    predict,
    train,
)
from flatbasin.trainables.records import EpochMetrics
from flatbasin.trainables.tta import IMAGE_SHIFTS, SIGNAL_SHIFTS, TestTimeAugmented, softmax, views


def tiny(name: str, **settings):
    return make_config(name, {"epochs": 2, "batch_size": 32, "threads": 1, **settings})


@pytest.fixture(scope="module")
def signals():
    """640 MNIST-1D training signals (N, 1, 40)."""
    data = load_data(DataSpec(dataset="mnist1d"), "cpu")
    return dataclasses.replace(data, x_train=data.x_train[:640], y_train=data.y_train[:640])


# ------------------------------------------------------------------------------ test-time augmentation
def reflect_shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[i, j] = x[i + dy, j + dx], indices reflected at the border: written out index by index."""

    def index(n: int, d: int) -> torch.Tensor:
        i = (torch.arange(n) + d).abs()
        return torch.where(i > n - 1, 2 * (n - 1) - i, i)

    return x[..., index(x.shape[2], dy), :][..., index(x.shape[3], dx)]


def test_image_views_are_the_input_its_flip_and_one_pixel_shifts_of_both():
    x = torch.randn(3, 2, 5, 6)
    got = views(x, "flip_shift")
    expected = [reflect_shift(img, dy, dx) for img in (x, x.flip(3)) for dy, dx in IMAGE_SHIFTS]
    assert got.shape == (6, 3, 2, 5, 6)
    assert torch.equal(got[0], x)
    for view, want in zip(got, expected, strict=True):
        assert torch.equal(view, want)
    assert torch.equal(views(x, "flip_shift"), got)  # fixed views: nothing is drawn


def test_signal_views_are_circular_shifts_and_never_reversed():
    x = torch.randn(4, 1, 40)
    got = views(x, "flip_shift")
    assert got.shape == (len(SIGNAL_SHIFTS), 4, 1, 40)
    for view, shift in zip(got, SIGNAL_SHIFTS, strict=True):
        assert torch.equal(
            view, torch.cat([x[..., -shift:], x[..., :-shift]], dim=2) if shift else x
        )
    assert not any(torch.equal(view, x.flip(2)) for view in got)


def test_tta_softmax_is_the_mean_over_views_and_none_is_the_plain_softmax():
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 38, 5)).eval()
    x = torch.randn(7, 1, 40)
    with torch.no_grad():
        plain = softmax(model, x, "none")
        assert torch.equal(plain, model(x).float().softmax(dim=1))  # old runs reproduce exactly
        per_view = [model(x.roll(s, dims=2)).softmax(dim=1) for s in SIGNAL_SHIFTS]
        torch.testing.assert_close(softmax(model, x, "flip_shift"), torch.stack(per_view).mean(0))
        wrapped = TestTimeAugmented(model, "flip_shift")(x).softmax(dim=1)
        torch.testing.assert_close(wrapped, softmax(model, x, "flip_shift"))


def test_tta_changes_every_evaluation_and_no_training_step(signals, tmp_path):
    """Same seed, with and without TTA: the same training (losses bit for bit), other accuracies; the
    ensemble averages its members' TTA outputs, and the deployed model predicts what was scored."""
    plain = train(tiny("snapshot", cycles=2, dataset="mnist1d"), data=signals)
    config = tiny("snapshot", cycles=2, dataset="mnist1d", tta="flip_shift")
    checkpoint = tmp_path / "last.pt"
    augmented = train(config, data=signals, on_epoch=lambda m, save: save(checkpoint))

    assert [m.train_loss for m in augmented.history] == [m.train_loss for m in plain.history]
    assert [m.val_loss for m in augmented.history] != [m.val_loss for m in plain.history]
    assert augmented.curve != plain.curve
    assert augmented.config.flat()["tta"] == "flip_shift"  # recorded like any setting

    deployed = load_deployed(config, checkpoint, signals)
    assert isinstance(deployed, TestTimeAugmented)
    probs = predict(deployed, signals.inputs("test"))
    assert accuracy(probs, signals.y_test) == augmented.test_acc
    assert augmented.curve[-1].test_acc == augmented.test_acc  # mean of the members' TTA outputs


def test_a_checkpoint_from_before_tta_and_the_gap_still_resumes(small, tmp_path):
    """Written before `tta` and `gen_gap` existed: no tta key in its config, no gen_gap in its history."""
    config = tiny("sgd")
    checkpoint = tmp_path / "old.pt"

    class Stop(Exception):
        pass

    def stop_after_first(metrics, save):
        save(checkpoint)
        raise Stop

    with pytest.raises(Stop):
        train(config, data=small, on_epoch=stop_after_first)
    state = torch.load(checkpoint, weights_only=True)
    del state["config"]["tta"]
    for row in state["history"]:
        del row["gen_gap"]
    torch.save(state, checkpoint)

    resumed = train(config, data=small, resume=checkpoint)
    assert [m.gen_gap is None for m in resumed.history] == [True, False]
    assert not resumed.diverged

    with pytest.raises(ValueError, match=r"tta \(checkpoint 'none', now 'flip_shift'\)"):
        load_checkpoint(
            checkpoint, *assemble(config, small, torch.device("cpu")),
            config={**config.model_dump(mode="json"), "tta": "flip_shift"},
        )  # fmt: skip


# ------------------------------------------------------------------------------ diversity
def one_hot(bits: str) -> torch.Tensor:
    return F.one_hot(torch.tensor([int(b) for b in bits]), 2).float()


def test_diversity_of_the_seeds_three_classifiers_by_hand():
    """Seed 003's example: truth 1111111111; two members 1111111100, one 1011111100.
    Disagreement: pairs (1,2) 0, (1,3) 1/10, (2,3) 1/10 -> 1/15.
    Errors e1 = e2 = 0000000011, e3 = 0100000011: corr(e1, e2) = 1; corr(e1, e3) =
    (0.2 - 0.2 * 0.3) / sqrt(0.2 * 0.8 * 0.3 * 0.7) = 0.14 / sqrt(0.0336) -> mean (1 + 2 * that) / 3."""
    labels = torch.ones(10, dtype=torch.long)
    members = [one_hot("1111111100"), one_hot("1111111100"), one_hot("1011111100")]
    two, three = diversity(members, labels)
    assert (two.count, two.disagreement, two.error_corr) == (2, 0.0, pytest.approx(1.0))
    assert three.count == 3
    assert three.disagreement == pytest.approx(1 / 15)
    assert three.error_corr == pytest.approx((1 + 2 * 0.14 / math.sqrt(0.0336)) / 3)
    # and the seed's point: a majority vote of these three is no better than the best of them
    vote = (torch.stack([m.argmax(1) for m in members]).float().mean(0) > 0.5).long()
    assert (vote == labels).float().mean() == 0.8


def test_diversity_leaves_out_pairs_without_error_variance():
    labels = torch.ones(4, dtype=torch.long)
    always_right, half = one_hot("1111"), one_hot("1100")
    (point,) = diversity([always_right, half], labels)
    assert point.disagreement == 0.5
    assert point.error_corr is None  # undefined, not 0: a member that never errs
    assert diversity([half], labels) == []


def test_curve_diversity_follows_the_curve_order():
    labels = torch.zeros(4, dtype=torch.long)
    a, b, c = one_hot("0000"), one_hot("0011"), one_hot("0111")
    curve = Curve("ensemble", newest_first=True, y_val=labels, y_test=labels)
    for member in (a, b, c):
        curve.add("member", member, member)
    newest = curve.diversity()
    assert [p.count for p in newest] == [2, 3]
    assert newest[0].disagreement == 0.25  # c and b, the two newest
    assert newest[1].disagreement == pytest.approx((0.25 + 0.75 + 0.5) / 3)
    assert Curve("prefix", False, labels, labels).diversity() == []


# ------------------------------------------------------------------------------ generalisation gap
def test_gap_is_training_accuracy_scored_like_val_minus_val(small, tmp_path):
    config = tiny("sgd")
    checkpoint = tmp_path / "last.pt"
    result = train(config, data=small, on_epoch=lambda m, save: save(checkpoint))
    model = load_deployed(config, checkpoint, small)  # sgd ships the live weights
    n = len(small.y_val)
    train_acc = accuracy(predict(model, [small.x_train[:n]]), small.y_train[:n])
    last = result.history[-1]
    assert last.gen_gap == pytest.approx(train_acc - last.val_acc)
    assert fit_accuracy(model, small, "none") == train_acc
    assert all(-1 <= m.gen_gap <= 1 for m in result.history)


def test_old_histories_without_the_gap_load_and_print():
    from flatbasin.search.output import print_epoch
    from flatbasin.search.tags import EPOCH_METRICS
    from flatbasin.search.tracking import TrialRecord, trial_record

    old = {"epoch": 1, "step": 10, "train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.6,
           "val_acc": 0.7, "lr": 0.1, "score": 0.7, "members": 0}  # fmt: skip
    metrics = EpochMetrics(**old)
    assert metrics.gen_gap is None
    print_epoch(metrics, 2)
    final = {**old, "final": True, "score": 0.7, "test_acc": 0.7, "diverged": False, "curve": [],
             "trial_config": {"seed": 0}, "threads": 1, "data_fingerprint": "x"}  # fmt: skip
    record = trial_record(TrialRecord("t", {}, [old, final]), final)
    assert "gen_gap" in EPOCH_METRICS
    assert record["recorded"]["history"][0]["gen_gap"] is None


# ------------------------------------------------------------------------------ MLflow
def test_gap_per_epoch_and_diversity_reach_mlflow(small, tmp_path):
    pytest.importorskip("ray")
    from mlflow import MlflowClient

    from flatbasin.search.callbacks import KEPT
    from flatbasin.search.tracking import Tracker, TrialRecord
    from flatbasin.trainables.ray_entry import epoch_metrics, final_metrics

    config = tiny("snapshot", cycles=2)
    result = train(config, data=small)
    results = [epoch_metrics(m, []) for m in result.history[:-1]] + [final_metrics(result, [])]
    search_config = {"variant": "snapshot", "settings": {"epochs": 2, "batch_size": 32, "threads": 1},
                     "snapshot": {"cycles": 2}}  # fmt: skip
    record = TrialRecord(
        "trial_0", search_config, [{k: v for k, v in r.items() if k in KEPT} for r in results]
    )
    record.status = "FINISHED"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "evaluation", search_key=str(tmp_path / "runs" / "evaluation"))
    tracker.write(record)

    client = MlflowClient(uri)
    run_id = tracker.run_id("trial_0")
    gaps = client.get_metric_history(run_id, "gen_gap")
    assert [(m.step, m.value) for m in gaps] == [(m.epoch, m.gen_gap) for m in result.history]
    for key in ("disagreement", "error_corr"):
        logged = client.get_metric_history(run_id, f"diversity/{key}")
        assert [(m.step, m.value) for m in logged] == [
            (p.count, getattr(p, key)) for p in result.diversity
        ]
    assert client.get_run(run_id).data.params["tta"] == "none"
    path = client.download_artifacts(run_id, "trial_config.json", str(tmp_path))
    saved = json.loads(Path(path).read_text())
    assert [row["gen_gap"] for row in saved["recorded"]["history"]] == [
        m.gen_gap for m in result.history
    ]


# ------------------------------------------------------------------------------ can it learn at all?
@pytest.fixture(autouse=True)
def _patient(monkeypatch):
    """A shared, loaded CPU must not turn a refusal into the out-of-time warning."""
    monkeypatch.setattr(sanity, "LEARN_BUDGET_S", 600.0)


class Scaled(nn.Module):
    """The real model with its output multiplied: 0 makes it unable to learn, 100 starts it far off."""

    def __init__(self, module: nn.Module, factor: float):
        super().__init__()
        self.module, self.factor = module, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) * self.factor


def test_a_healthy_model_learns_and_the_driver_state_is_untouched(small, signals):
    torch.set_num_threads(2)  # the driver's; the check runs with the trial's 1 and gives them back
    for data, dataset in ((small, "digits"), (signals, "mnist1d")):
        before_rng, before_x = torch.get_rng_state(), data.x_train.clone()
        assert sanity.check_learns(tiny("sgd", dataset=dataset, dropout=0.5), data) == []
        assert torch.equal(torch.get_rng_state(), before_rng)
        assert torch.equal(data.x_train, before_x)
        assert torch.get_num_threads() == 2


def model_hook(monkeypatch, change):
    real = sanity.build_model
    monkeypatch.setattr(sanity, "build_model", lambda *a, **k: change(real(*a, **k)))


def test_a_zero_output_model_is_refused(small, monkeypatch):
    model_hook(monkeypatch, lambda m: Scaled(m, 0.0))
    with pytest.raises(sanity.TrialError, match="cannot fit one batch of 16 training examples"):
        sanity.check_learns(tiny("sgd"), small)


def test_a_frozen_model_is_refused(small, monkeypatch):
    model_hook(monkeypatch, lambda m: m.requires_grad_(False))
    with pytest.raises(sanity.TrialError, match="no gradient"):
        sanity.check_learns(tiny("sgd"), small)


def test_inputs_that_do_not_differ_are_refused_and_shuffled_labels_are_not(small):
    blank = dataclasses.replace(small, x_train=torch.zeros_like(small.x_train))
    with pytest.raises(sanity.TrialError, match="do not tell the examples apart"):
        sanity.check_learns(tiny("sgd"), blank)
    shuffled = torch.randperm(len(small.y_train), generator=torch.Generator().manual_seed(0))
    relabelled = dataclasses.replace(small, y_train=small.y_train[shuffled])
    assert sanity.check_learns(tiny("sgd"), relabelled) == []  # what this check cannot see


def test_non_finite_inputs_are_refused_and_a_large_initial_loss_is_a_warning(small, monkeypatch):
    poisoned = dataclasses.replace(small, x_train=small.x_train.clone())
    poisoned.x_train[:] = float("nan")
    with pytest.raises(sanity.TrialError, match="loss at initialisation is nan"):
        sanity.check_learns(tiny("sgd"), poisoned)
    model_hook(monkeypatch, lambda m: Scaled(m, 100.0))
    (warning,) = sanity.check_learns(tiny("sgd"), small)
    assert "loss at initialisation" in warning and "ln(10)" in warning


def test_a_check_out_of_time_is_a_warning_not_a_refusal(small):
    (warning,) = sanity.check_learns(tiny("sgd"), small, budget_s=0.0)
    assert "not checked" in warning
