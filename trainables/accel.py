"""How a trial runs on its device: precision, memory format, compilation and evaluation batch size,
resolved once from the trial's options and the device, so that the loop never decides them again.

The defaults change nothing on a CPU (fp32, contiguous, eager): runs there stay bit for bit what
they were. On CUDA they are the fast path of the airbench-style trainers: bf16 autocast around the
forward pass and the loss, channels-last convolutions, large evaluation batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Precision = Literal["auto", "fp32", "bf16"]
Toggle = bool | Literal["auto"]

# Evaluation batch sizes. On the CPU 1024, as before these options existed: a different split of an
# evaluation into batches can change the last bits of its numbers, and recorded runs must reproduce.
# On a GPU larger batches keep it busy (airbench scores in batches of 2,000); evaluation has no
# gradients, so its memory is far below a training batch's of the same size (footprint.py counts it).
EVAL_BATCH_CPU = 1024
EVAL_BATCH_CUDA = 2048


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast runs natively: every CPU torch supports, CUDA from Ampere (compute 8.0) on.
    Emulated bf16 on older GPUs is slower than fp32, so it does not count."""
    if device.type != "cuda":
        return True
    return torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_dtype(precision: Precision, device: torch.device, bf16_ok: bool) -> torch.dtype | None:
    """The dtype autocast computes in, None for fp32 throughout. `auto` is bf16 on a GPU that runs
    it natively and fp32 on the CPU, where bf16 is rarely faster and fp32 keeps runs reproducible."""
    if precision == "fp32" or (precision == "auto" and (device.type != "cuda" or not bf16_ok)):
        return None
    if not bf16_ok:
        raise ValueError(
            f"precision 'bf16' was asked for, but {device} does not run bf16 natively (CUDA "
            "compute capability 8.0 or later); use precision auto or fp32"
        )
    return torch.bfloat16


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: fp32 all through
    channels_last: bool  # images and conv weights in NHWC, what tensor cores want
    compile: bool  # torch.compile the training forward pass
    eval_batch_size: int

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """Around the forward pass and the loss only. The optimiser, the averages (AveragedModel
        copies, EMA), batch-norm re-estimation and every evaluation stay in fp32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def batch(self, x: Tensor) -> Tensor:
        """A training batch in the memory format of the weights (a no-op when it is already)."""
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def training_forward(self, model: nn.Module) -> Callable[[Tensor], Tensor]:
        """What the step calls: the model itself, or its compiled forward. Only the training step is
        compiled: it always sees the same batch shape (the last partial batch is dropped), while
        evaluation batches vary in size and would each compile anew."""
        return torch.compile(model) if self.compile else model

    def record(self) -> dict[str, str | bool | int]:
        """What ran, for the trial's result and its MLflow run."""
        return {
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "eval_batch_size": self.eval_batch_size,
        }


def resolve(
    device: torch.device,
    example_shape: tuple[int, ...],
    *,
    precision: Precision = "auto",
    channels_last: Toggle = "auto",
    compile: bool = False,
) -> Runtime:
    """Raises ValueError naming the setting when the device or the data cannot honour it."""
    images = len(example_shape) == 3  # (C, H, W); 1-D signals are (C, L)
    if channels_last is True and not images:
        raise ValueError(
            f"channels_last applies to images (channels, height, width); this data set is 1-D "
            f"signals of shape {example_shape}: leave channels_last at auto or false"
        )
    cuda = device.type == "cuda"
    return Runtime(
        device=device,
        autocast_dtype=autocast_dtype(precision, device, bf16_supported(device)),
        channels_last=images and (cuda if channels_last == "auto" else bool(channels_last)),
        compile=compile,
        eval_batch_size=EVAL_BATCH_CUDA if cuda else EVAL_BATCH_CPU,
    )
