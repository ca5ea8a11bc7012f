"""Augmentation of whole batches on the device, its random draws from the trial's CPU generator
(checkpointed with the trial) moved to the device without waiting for it."""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A freshly drawn CPU tensor onto the device without waiting for the device: a blocking copy
    to a GPU first waits for all queued work, which would make every training step wait. Safe for
    pageable memory: CUDA stages the bytes before the call returns. A no-op on the CPU."""
    return t.to(device, non_blocking=True)


def flip_and_crop(x: Tensor, generator: torch.Generator, pad: int = 2) -> Tensor:
    """Random horizontal flip and random translation by up to `pad` pixels (reflect padding)."""
    n, _, h, w = x.shape
    flip = to_device(torch.rand(n, generator=generator), x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = to_device(torch.randint(0, 2 * pad + 1, (n,), generator=generator), x.device)
    dx = to_device(torch.randint(0, 2 * pad + 1, (n,), generator=generator), x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 3) -> Tensor:
    """Roll each 1-D signal by a random -max_shift..max_shift samples. Circular, as MNIST-1D's own
    generator translates its digits; no flip, since a reversed signal is a different digit."""
    n, _, length = x.shape
    shift = to_device(torch.randint(-max_shift, max_shift + 1, (n,), generator=generator), x.device)
    index = (torch.arange(length, device=x.device)[None, :] - shift[:, None]) % length
    return x.gather(2, index[:, None, :].expand_as(x))
