"""Checkpoints with everything a resumed trial needs to end bit for bit where an uninterrupted one would:
weights, optimiser, averager (n_averaged, snapshot members), curve so far, counters, every RNG state.

Written with torch.save and read with weights_only=True: only tensors and plain containers, no pickled code.
Each checkpoint carries its format version and the trial config that wrote it: resuming with another
variant or other settings would silently mix two trials, so it is refused with the differing keys named.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from flatbasin.trainables.files import write_whole
from flatbasin.trainables.records import EpochMetrics

if TYPE_CHECKING:
    from flatbasin.trainables.averagers import Averager
    from flatbasin.trainables.curve import Curve


FORMAT = 1
# Settings that may differ between the run that wrote a checkpoint and the one that resumes it.
# Memory format and compilation are how a device runs the same trial, like the device itself; so is
# the number of DataLoader workers reading streamed data (each batch is read under its own seed).
RUNTIME_KEYS = frozenset(
    {"threads", "device", "data_dir", "download", "channels_last", "compile", "loader_workers"}
)
# Settings added after checkpoints of this format were first written, with the value that means what
# the older code did: a checkpoint without the key was written with that value.
ADDED_SETTINGS = {"tta": "none", "precision": "auto", "channels_last": "auto", "compile": False}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that another trial configuration wrote."""


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
    config: dict[str, Any],
) -> None:
    from dataclasses import asdict

    state: dict[str, Any] = {
        "format": FORMAT,
        "config": config,
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
    # A checkpoint is either the old one or the new one, never half of each; never over a device.
    write_whole(path, lambda handle: torch.save(state, handle), f"checkpoint {path}")


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A flatbasin checkpoint file's contents, or CheckpointError saying why it cannot be one."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {path} does not exist") from err
    except IsADirectoryError as err:
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file") from err
    except (
        Exception
    ) as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on bad files
        # Not torch's text: it advises weights_only=False, which runs the file's code.
        raise CheckpointError(
            f"checkpoint {path} cannot be read (truncated, corrupt or not a flatbasin checkpoint; "
            f"{type(err).__name__})"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise CheckpointError(
            f"checkpoint {path} is not a flatbasin checkpoint of format {FORMAT} (found {reprlib.repr(found)})"
        )
    return state


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    averager: Averager,
    curve: Curve,
    order: torch.Generator,
    *,
    config: dict[str, Any],
) -> Resumed:
    state = _read_matching(path, model, config)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        averager.load_state_dict(state["averager"])
        curve.load_state_dict(state["curve"])
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint {path} does not fit this trial: {_first_line(err)}"
        ) from err
    order.set_state(state["order_rng"].cpu())
    torch.set_rng_state(state["torch_rng"].cpu())
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    history = [EpochMetrics(**m) for m in state["history"]]
    return Resumed(epoch=state["epoch"], step=state["step"], history=history)


def load_deployable(
    path: Path, model: nn.Module, averager: Averager, *, config: dict[str, Any]
) -> None:
    """The weights and the averager's state of a checkpoint: all that the model a trial deploys
    needs (no optimiser, whose first making imports torch._dynamo: 1.3 s of CPU in a driver)."""
    state = _read_matching(path, model, config)
    try:
        model.load_state_dict(state["model"])
        averager.load_state_dict(state["averager"])
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint {path} does not fit this trial: {_first_line(err)}"
        ) from err


def _read_matching(path: Path, model: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's state, on the model's device; CheckpointError when another configuration
    wrote it."""
    state = read_checkpoint(path, next(model.parameters()).device)
    differing = _differences(state["config"], config)
    if differing:
        raise CheckpointError(
            f"checkpoint {path} was written by another trial configuration; it differs in "
            + ", ".join(differing)
            + ". Resume with the settings that wrote it, or start without --resume"
        )
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key (checkpoint X, now Y)' for every setting that changes the trial, variant parameters included."""

    def flat(config: dict[str, Any]) -> dict[str, Any]:
        params = config.get("params") or {}
        return {**{k: v for k, v in config.items() if k != "params"}, **params}

    was, now = {**ADDED_SETTINGS, **flat(saved)}, flat(current)
    return [
        f"{key} (checkpoint {was.get(key)!r}, now {now.get(key)!r})"
        for key in sorted(set(was) | set(now))
        if key not in RUNTIME_KEYS and was.get(key) != now.get(key)
    ]
