"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates"; fastai's lr_find): train with a
learning rate raised exponentially every step, record the loss, and read off where it falls fastest.

Plain PyTorch: a model, its optimiser and a stream of batches go in; arrays come out. The model and
the optimiser are put back in the state they came in, so the test never changes what it measured.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy.signal import lfilter
from torch import Tensor, nn

BETA = 0.98  # smoothing of the recorded loss: an average over about 1 / (1 - BETA) = 50 steps
# The first steps the suggestion leaves out: while the average still holds fewer than half its weight
# in real losses (beta^(i+1) > 1/2, 35 steps at beta 0.98), batch noise looks like a slope.
WARM_STEPS = math.ceil(math.log(0.5) / math.log(BETA))
DIVERGE_FACTOR = 4.0  # the sweep stops once the smoothed loss exceeds this multiple of its minimum
MIN_FALL = 0.05  # a loss that never falls by this share of its start gives no suggestion
SMALL_DIVISOR = 10.0  # the small suggestion is the large one over this

T = TypeVar("T")


def smooth(values: Iterable[float] | np.ndarray, beta: float = BETA) -> np.ndarray:
    """Exponential moving average with bias correction (as Adam's moments):
    avg_i = beta * avg_{i-1} + (1 - beta) * x_i, avg_{-1} = 0, reported as avg_i / (1 - beta^(i+1)).

    Without the correction the first values would be pulled towards 0; with it, value i is the
    weighted mean of x_0..x_i with weights beta^(i-k). A non-finite value makes every later one
    non-finite, which is how divergence shows.
    """
    x = np.asarray(values, dtype=np.float64)
    averaged = lfilter([1.0 - beta], [1.0, -beta], x) if x.size else x
    return averaged / (1.0 - beta ** np.arange(1, x.size + 1))


def geometric_lrs(start: float, end: float, steps: int) -> np.ndarray:
    """`steps` learning rates from `start` to `end`, each a constant factor above the one before."""
    return np.geomspace(start, end, steps)


def forever(epoch: Callable[[], Iterable[T]]) -> Iterator[T]:
    """Epoch after epoch of batches: a sweep may need more steps than one epoch holds."""
    return itertools.chain.from_iterable(epoch() for _ in itertools.count())


@dataclass(frozen=True)
class Sweep:
    """What one range test recorded, one entry per step taken."""

    lrs: np.ndarray  # the learning rate of each step
    losses: np.ndarray  # the training loss of each step's batch, before its update
    # smooth(losses): each value averages about the last 1 / (1 - BETA) = 50 steps, so the curve
    # trails the raw loss (by 1.7 decades of lr at 200 steps over 7 decades), as fastai's does.
    smoothed: np.ndarray
    planned: int  # steps asked for
    stop: str  # why it ended: "all steps taken", or the divergence that cut it short
    seconds: float

    @property
    def diverged(self) -> bool:
        return len(self.lrs) < self.planned


def range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Tensor, Tensor]],
    lrs: np.ndarray,
    *,
    beta: float = BETA,
    diverge_factor: float = DIVERGE_FACTOR,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> Sweep:
    """One optimiser step per learning rate in `lrs`, recording each batch's loss; stops early when
    the smoothed loss turns non-finite or exceeds `diverge_factor` times its minimum (past that point
    the loss only explodes, and each further step costs time for nothing).

    `model` and `optimizer` (weights, batch-norm statistics, momentum buffers, learning rates) are
    restored afterwards, whatever happens.
    """
    model_state = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    was_training = model.training
    losses: list[float] = []
    stop = "all steps taken"
    started = time.perf_counter()
    model.train()
    try:
        for lr, (x, y) in zip(lrs, batches, strict=False):  # batches may never end
            for group in optimizer.param_groups:
                group["lr"] = float(lr)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            so_far = smooth(losses, beta)  # microseconds for a few thousand steps
            now = so_far[-1]
            if not math.isfinite(now):
                stop = f"diverged at lr {lr:.2g}: the loss is not finite"
                break
            lowest = so_far.min()
            if len(losses) < len(lrs) and now > diverge_factor * lowest:
                stop = (
                    f"diverged at lr {lr:.2g}: the smoothed loss ({now:.3g}) is above "
                    f"{diverge_factor:g}x its minimum ({lowest:.3g})"
                )
                break
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        model.train(was_training)
    taken = np.asarray(lrs[: len(losses)], dtype=np.float64)
    return Sweep(
        lrs=taken,
        losses=np.asarray(losses, dtype=np.float64),
        smoothed=smooth(losses, beta),
        planned=len(lrs),
        stop=stop,
        seconds=time.perf_counter() - started,
    )


@dataclass(frozen=True)
class Suggestion:
    """Bounds for a learning-rate search, or the reason there are none."""

    large: float | None  # where the smoothed loss falls fastest (per decade of lr)
    small: float | None  # large / SMALL_DIVISOR
    steepest: int | None  # index into the sweep of the large suggestion
    lowest: int | None  # index of the smoothed loss's minimum
    problem: str | None = None  # why there is no suggestion


def suggest(
    lrs: np.ndarray, smoothed: np.ndarray, *, skip: int | None = None, beta: float = BETA
) -> Suggestion:
    """The large bound is the learning rate at which the smoothed loss falls fastest against log lr,
    looking only up to its minimum: there training makes the most progress per step while still
    stable, and past the minimum a steep slope is the rise of divergence, not learning.

    The small bound is the large one over 10. The alternative, where the loss starts to fall, hangs
    on a threshold applied to the flattest and noisiest stretch of the curve; one decade below the
    steepest point is a rule that is stable from run to run, a learning rate that still trains
    (slowly) everywhere we tried it, and a range that loguniform sampling covers evenly.

    The first `skip` points (default: while beta^(i+1) > 1/2, about 34 steps at beta 0.98) are left
    out: there the average holds only a few batches, and batch-to-batch noise looks like a slope.
    """
    lrs, smoothed = np.asarray(lrs, dtype=np.float64), np.asarray(smoothed, dtype=np.float64)
    finite = np.isfinite(smoothed)
    n = int(np.argmin(finite)) if not finite.all() else len(smoothed)  # the finite prefix
    if skip is None:
        skip = math.ceil(math.log(0.5) / math.log(beta)) if 0 < beta < 1 else 0  # WARM_STEPS
    if n - skip < 3:
        return Suggestion(None, None, None, None, f"too few steps to read a slope ({n} recorded)")
    lowest = skip + int(np.argmin(smoothed[skip:n]))
    start = smoothed[skip]
    if smoothed[lowest] > (1 - MIN_FALL) * start:
        return Suggestion(
            None, None, None, lowest,
            f"the smoothed loss never fell by {MIN_FALL:.0%} or more (from {start:.3g}; lowest "
            f"{smoothed[lowest]:.3g} at lr {lrs[lowest]:.2g}); widen the range (a lower start, a higher "
            "end) or take more steps",
        )  # fmt: skip
    slope = np.gradient(smoothed[:n], np.log10(lrs[:n]))  # loss per decade of lr
    steepest = skip + int(np.argmin(slope[skip : lowest + 1]))
    if slope[steepest] >= 0:
        return Suggestion(None, None, None, lowest, "the smoothed loss never falls")
    large = lrs[steepest]
    return Suggestion(float(large), float(large / SMALL_DIVISOR), steepest, lowest)
