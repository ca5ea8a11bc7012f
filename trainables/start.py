"""Post-convergence trials: continue one converged model instead of a fresh random initialisation.

A `StartPoint` names the converged weights by the SHA-256 of every tensor and says where they are
kept. The loop loads them into the freshly built model and checks the hash of what it loaded, so a
trial that says it continues a base starts from exactly those weights, on any node. Plain PyTorch:
no MLflow, no Ray.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict, Field
from torch import Tensor, nn

from flatbasin.trainables.checkpoint import CheckpointError, read_checkpoint
from flatbasin.trainables.strict import NoBoolNumbers

Weights = dict[str, Tensor]

# The settings that make two trials see the same examples in the same splits. A model trained on
# another split has seen this search's validation examples, so its scores there would mean nothing.
DATA_KEYS = (
    "dataset", "image_size", "val_frac", "test_frac", "split_seed", "val_seed", "data_seed",
    "mnist1d_signals",
)  # fmt: skip


class StartPoint(NoBoolNumbers):
    """The converged model a post-convergence trial continues (TrialConfig.start)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1)  # as the user named it: base, an MLflow run id, a file
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the weights: names, dtypes, shapes, values
    run_id: str | None = None  # the MLflow run whose checkpoint.pt holds them (reproduce reads it)
    path: str | None = None  # the checkpoint file they were read from, when no run holds them
    epochs: int = Field(0, ge=0)  # epochs the converged model was trained for


@dataclass(frozen=True)
class Converged:
    """A converged model read from a checkpoint: its weights and the config that trained it."""

    weights: Weights  # on the CPU
    config: dict[str, Any]
    epochs: int
    sha256: str


def weights_sha256(weights: Mapping[str, Tensor]) -> str:
    """One hash for a state dict, independent of the device it lives on and of key order."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_converged(path: Path) -> Converged:
    """The trained weights in a flatbasin checkpoint (`flatbasin train --checkpoint`, a trial's).

    The live weights, not the variant's average or ensemble: they are where training stood, which is
    what a tail continues (and an ensemble is no single model to continue).
    """
    state = read_checkpoint(path)
    weights, config = state.get("model"), state.get("config")
    if not isinstance(weights, dict) or not all(isinstance(t, Tensor) for t in weights.values()):
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path} does not say which trial wrote it")
    bad = [k for k, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds non-finite weights ({', '.join(bad[:3])}): a diverged model "
            "cannot be continued"
        )
    return Converged(weights, config, int(state.get("epoch", 0)), weights_sha256(weights))


def write_converged(checkpoint: Path, target: Path) -> None:
    """What a later trial needs to continue a checkpoint (the weights, the config that trained them,
    the epoch), without what only a resume needs (optimiser, averager, curve, RNG states): for a
    snapshot ensemble those are several more copies of the model. `read_converged` reads it back."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    kept = {k: state[k] for k in ("format", "config", "model", "epoch", "step") if k in state}
    torch.save(kept, target)


def data_differences(trained: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """'key (trained on X, now Y)' for each data setting that differs (defaults filled in)."""
    from flatbasin.trainables.data_spec import DataSpec

    def spec(config: Mapping[str, Any]) -> dict[str, Any]:
        given = {k: config[k] for k in DATA_KEYS if k in config}
        return DataSpec.model_validate(given).model_dump(mode="json")

    was, is_ = spec(trained), spec(now)
    return [
        f"{key} (trained on {was[key]!r}, now {is_[key]!r})"
        for key in DATA_KEYS
        if was[key] != is_[key]
    ]


def apply_start(model: nn.Module, start: StartPoint, weights: Mapping[str, Tensor] | None) -> None:
    """Load the converged weights into the freshly built model and prove they are the named ones."""
    if weights is None:
        raise CheckpointError(
            f"this trial continues the converged model {start.source} "
            f"(sha256 {start.sha256[:12]}), but its weights were not given"
        )
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"the converged model {start.source} does not fit this trial's model: {first}"
        ) from err
    loaded = weights_sha256(model.state_dict())
    if loaded != start.sha256:
        raise CheckpointError(
            f"the weights given for {start.source} are not the ones this trial names (sha256 "
            f"{loaded[:12]}, expected {start.sha256[:12]})"
        )
