"""Checkpoints with everything a resumed trial needs to end bit for bit where an uninterrupted one would:
weights, optimiser, averager (n_averaged, snapshot members), curve so far, counters, every RNG state.

Written with torch.save and read with weights_only=True: only tensors and plain containers, no pickled code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from flatbasin.trainables.averagers import Averager
    from flatbasin.trainables.curve import Curve
    from flatbasin.trainables.loop import EpochMetrics


@dataclass(frozen=True)
class Resumed:
    epoch: int
    step: int
    history: list[EpochMetrics]


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    averager: Averager,
    curve: Curve,
    order: torch.Generator,
    *,
    epoch: int,
    step: int,
    history: list[EpochMetrics],
) -> None:
    from dataclasses import asdict

    state: dict[str, Any] = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "averager": averager.state_dict(),
        "curve": curve.state_dict(),
        "order_rng": order.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "epoch": epoch,
        "step": step,
        "history": [asdict(m) for m in history],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a checkpoint is either the old one or the new one, never half of each


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    averager: Averager,
    curve: Curve,
    order: torch.Generator,
) -> Resumed:
    from flatbasin.trainables.loop import EpochMetrics

    device = next(model.parameters()).device
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    averager.load_state_dict(state["averager"])
    curve.load_state_dict(state["curve"])
    order.set_state(state["order_rng"].cpu())
    torch.set_rng_state(state["torch_rng"].cpu())
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    history = [EpochMetrics(**m) for m in state["history"]]
    return Resumed(epoch=state["epoch"], step=state["step"], history=history)
