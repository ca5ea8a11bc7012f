"""Test-time augmentation: a prediction is the mean softmax over an input and a few fixed views of it.

Like a small ensemble that costs inference time instead of training time (seed 003). The views are
fixed, not drawn, so an evaluation with TTA is as deterministic as one without. Images get horizontal
flips and one-pixel diagonal shifts (reflect padding, as the training augmentation pads); 1-D signals
get circular shifts only, since a reversed MNIST-1D signal is another digit, while its own generator
already translates digits circularly.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TTA = Literal["none", "flip_shift"]
IMAGE_SHIFTS = ((0, 0), (1, 1), (-1, -1))  # (rows, columns) in pixels, each with and without flip
SIGNAL_SHIFTS = (0, 1, -1, 2, -2)  # samples, circular


def views(x: Tensor, tta: TTA) -> Tensor:
    """The views of a batch, stacked: (V, N, ...) with view 0 the input itself."""
    if tta == "none":
        return x[None]
    if x.dim() == 3:  # (N, C, L) signals
        return torch.stack([x.roll(s, dims=2) for s in SIGNAL_SHIFTS])
    _, _, h, w = x.shape
    both = torch.stack([x, x.flip(3)])  # (2, N, C, H, W)
    padded = F.pad(both.flatten(0, 1), (1, 1, 1, 1), mode="reflect").unflatten(0, both.shape[:2])
    shifted = [padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in IMAGE_SHIFTS]
    return torch.stack(shifted, dim=1).flatten(0, 1)  # (2 * len(IMAGE_SHIFTS), N, C, H, W)


def softmax(module: nn.Module, x: Tensor, tta: TTA) -> Tensor:
    """Mean softmax of `module` over the views of `x`, shape (N, classes).

    Without TTA this is exactly `module(x).float().softmax(1)`, so runs recorded before TTA existed
    reproduce bit for bit. With it, each view is one forward pass of the caller's batch size: the
    caller sized its batches for memory, and a V-times larger batch could exceed it on a GPU.
    """
    if tta == "none":
        return module(x).float().softmax(dim=1)
    per_view = [module(view).float().softmax(dim=1) for view in views(x, tta)]
    return torch.stack(per_view).mean(dim=0)


class TestTimeAugmented(nn.Module):
    """A deployed model that predicts as it was scored: with its TTA views. Returns log-probabilities,
    like SoftmaxEnsemble, so a softmax of its output gives the mean softmax back."""

    __test__ = False  # a model, not a pytest test class

    def __init__(self, module: nn.Module, tta: TTA):
        super().__init__()
        self.module, self.tta = module, tta

    def forward(self, x: Tensor) -> Tensor:
        return softmax(self.module, x, self.tta).clamp_min(1e-12).log()


def with_tta(module: nn.Module, tta: TTA) -> nn.Module:
    return module if tta == "none" else TestTimeAugmented(module, tta)
