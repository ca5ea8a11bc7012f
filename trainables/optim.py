"""Optimisers of seed 001: SGD with momentum or Nesterov, Adam, AdamW, RMSprop, Adagrad."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def build_optimizer(
    name: str, params: Iterable[nn.Parameter], *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name in ("sgd", "nesterov"):
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=momentum,
            nesterov=name == "nesterov" and momentum > 0,
            weight_decay=weight_decay,
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")
