"""Schedules against their papers' formulas at the boundaries and against torch's own schedulers."""

from __future__ import annotations

import math

import pytest
import torch

from flatbasin.trainables import schedules as s


def torch_lrs(make_scheduler, steps: int, lr: float) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    sched = make_scheduler(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(("t0", "t_mult", "eta_min"), [(5, 1, 0.0), (4, 2, 0.001), (3, 3, 0.01)])
def test_sgdr_matches_torch_cosine_annealing_warm_restarts(t0, t_mult, eta_min):
    ref = torch_lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            o, T_0=t0, T_mult=t_mult, eta_min=eta_min
        ),
        steps=60,
        lr=0.1,
    )
    ours = s.SGDR(0.1, eta_min, t0, t_mult)
    assert [ours(i) for i in range(60)] == pytest.approx(ref, abs=1e-12)


def test_sgdr_restarts_at_period_boundaries():
    sched = s.SGDR(0.1, 0.0, t0=4, t_mult=2)
    assert [sched(i) for i in (0, 4, 12, 28)] == [0.1] * 4  # periods 4, 8, 16
    assert sched(3) < sched(4)


def test_cosine_matches_torch():
    ref = torch_lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=0.001), 21, 0.1
    )
    ours = s.Cosine(0.1, 0.001, 20)
    assert [ours(i) for i in range(21)] == pytest.approx(ref, abs=1e-12)


def test_step_decay_matches_torch_multistep():
    ref = torch_lrs(
        lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[5, 8], gamma=0.1), 12, 0.1
    )
    ours = s.StepDecay(0.1, (5, 8), 0.1)
    assert [ours(i) for i in range(12)] == pytest.approx(ref, abs=1e-12)


def test_warmup_cosine_boundaries():
    sched = s.WarmupCosine(lr=0.1, lr_min=0.0, warmup=10, steps=110)
    assert sched(0) == pytest.approx(0.01)
    assert sched(9) == pytest.approx(0.1)
    assert sched(10) == pytest.approx(0.1)
    assert sched(60) == pytest.approx(0.05)
    assert sched(110) == pytest.approx(0.0, abs=1e-12)


def test_snapshot_formula():
    # Huang et al. eq. 2 with t 1-based: a(t) = a0/2 (cos(pi mod(t-1, ceil(T/M)) / ceil(T/M)) + 1)
    lr0, total, cycles = 0.2, 100, 3
    sched = s.SnapshotCosine(lr0, total, cycles)
    length = math.ceil(total / cycles)
    for t in range(1, total + 1):
        expected = lr0 / 2 * (math.cos(math.pi * ((t - 1) % length) / length) + 1)
        assert sched(t - 1) == pytest.approx(expected)
    assert sched(0) == sched(length) == sched(2 * length) == lr0  # restarts
    assert sched(length - 1) < 0.001  # near zero at the end of a cycle


def test_swa_base_matches_reference_code():
    # timgaripov/swa train.py: factor 1 until t=0.5, linear to swa_lr/lr at t=0.9, then constant.
    sched = s.SWABase(lr=0.1, swa_lr=0.01, swa_start=100)
    assert sched(0) == sched(50) == pytest.approx(0.1)
    assert sched(70) == pytest.approx(0.1 * (1 - 0.9 * 0.2 / 0.4))
    assert sched(90) == pytest.approx(0.01)
    assert sched(99) == pytest.approx(0.01)


def test_swa_cyclic_formula():
    # Izmailov et al. eq. 2: t(i) = (mod(i-1, c) + 1) / c, a = (1 - t) a1 + t a2, i 1-based.
    sched = s.SWACyclic(lr_1=0.05, lr_2=0.01, cycle_steps=4)
    assert [sched(i) for i in range(8)] == pytest.approx([0.04, 0.03, 0.02, 0.01] * 2)


def test_triangle_goes_down_and_up():
    sched = s.Triangle(lr_1=0.05, lr_2=0.0, cycle_steps=4)
    assert [sched(i) for i in range(8)] == pytest.approx([0.025, 0.0, 0.025, 0.05] * 2)


def test_two_level_cycle():
    sched = s.TwoLevel(lr_large=0.1, lr_small=0.01, cycle_steps=5, large_steps=2)
    assert [sched(i) for i in range(10)] == [0.1, 0.1, 0.01, 0.01, 0.01] * 2


def test_then_counts_steps_from_the_boundary():
    sched = s.Then(s.Constant(1.0), 3, s.SWACyclic(0.5, 0.1, 2))
    assert [sched(i) for i in range(6)] == pytest.approx([1.0, 1.0, 1.0, 0.3, 0.1, 0.3])
