"""Averagers against torch.optim.swa_utils.AveragedModel on the same weights, and the ensemble against
the mean of its members' softmax outputs."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from flatbasin.trainables.averagers import EMA, EqualAverage, Snapshots, SoftmaxEnsemble


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_equal_average_matches_averaged_model_and_update_bn():
    torch.manual_seed(0)
    model = net()
    inputs = [torch.randn(16, 4) for _ in range(3)]
    ours = EqualAverage(model, join_steps=[2, 4, 6], bn_batches=lambda: iter(inputs))
    ref = AveragedModel(model)
    for step in range(1, 7):
        perturb(model, step)
        joined = ours.update(model, step)
        assert joined == (step % 2 == 0)
        if joined:
            ref.update_parameters(model)
            update_bn(inputs, ref)
    assert ours.count == 3
    for a, b in zip(ours.average.state_dict().values(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The equal average is the mean of the three joined weight sets.
    x = torch.randn(5, 4)
    torch.testing.assert_close(ours.deployed(model).eval()(x), ref.eval()(x))


def test_ema_matches_averaged_model_with_ema_fn():
    torch.manual_seed(0)
    model = net()
    ours = EMA(model, decay=0.9)
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(1, 6):
        perturb(model, step)
        ours.update(model, step)
        ref.update_parameters(model)
        # first update copies, later ones: e <- 0.9 e + 0.1 w
        expected = [
            w.detach().clone() if step == 1 else 0.9 * e + 0.1 * w.detach()
            for e, w in zip(expected, model.parameters(), strict=True)
        ]
    for a, b in zip(ours.average.state_dict().values(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, e in zip(ours.average.module.parameters(), expected, strict=True):
        torch.testing.assert_close(a, e)


def test_softmax_ensemble_is_mean_of_member_softmax():
    torch.manual_seed(0)
    members = [net().eval() for _ in range(3)]
    x = torch.randn(7, 4)
    expected = torch.stack([m(x).softmax(1) for m in members]).mean(0)
    got = SoftmaxEnsemble(members)(x).softmax(1)
    torch.testing.assert_close(got, expected)


def test_snapshots_deploy_ensemble_of_saved_weights():
    torch.manual_seed(0)
    model = net().eval()
    snaps = Snapshots(model, join_steps=[1, 3], ensemble=True)
    saved = []
    for step in range(1, 4):
        perturb(model, step)
        if snaps.update(model, step):
            saved.append(copy.deepcopy(model))
    assert snaps.count == 2
    x = torch.randn(6, 4)
    expected = torch.stack([m(x).softmax(1) for m in saved]).mean(0)
    torch.testing.assert_close(snaps.deployed(model).eval()(x).softmax(1), expected)
    last = Snapshots(model, join_steps=[1], ensemble=False)
    last.update(model, 1)
    torch.testing.assert_close(last.deployed(model).eval()(x), model(x))
