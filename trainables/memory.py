"""Running out of memory, said as what ran out and which settings to change.

torch says it in its allocator's words ("DefaultCPUAllocator: can't allocate memory", "CUDA out of
memory. Tried to allocate 2.00 GiB") with a traceback through the training loop; numpy says
"Unable to allocate". `named_out_of_memory` turns any of them into one OutOfMemory paragraph: the
memory that ran out (this machine's RAM or the GPU's), what was being done, how much was asked for,
and the settings that decide it, as the search's GPU packing check (search/preflight.py) advises
before any trial runs. Importing this module imports no torch: the CLI catches OutOfMemory.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

if TYPE_CHECKING:
    from flatbasin.trainables.config import TrialConfig

# What torch's and its libraries' allocators say when memory runs out, on any device.
_OUT_OF_MEMORY = re.compile(
    r"can't allocate memory|out of memory|not enough memory|unable to allocate|"
    r"CUDNN_STATUS_(?:NOT_ENOUGH_MEMORY|ALLOC_FAILED)|CUBLAS_STATUS_ALLOC_FAILED",
    re.IGNORECASE,
)
_ASKED = re.compile(
    r"(?:tried to allocate|unable to allocate)\s+([\d.]+)\s*(bytes|[KMGTP]i?B|B)\b", re.IGNORECASE
)
_SCALE = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_ON_GPU = re.compile(r"CUDA|CUDNN|CUBLAS|\bHIP\b|\bMPS\b|\bGPU\b", re.IGNORECASE)


P = ParamSpec("P")
R = TypeVar("R")


class OutOfMemory(RuntimeError):
    """A trial (or a check of one) ran out of memory; the message says what ran out and what to
    change. A RuntimeError, as torch's own: a search retries it as it retried torch's."""


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    return isinstance(err, RuntimeError) and bool(_OUT_OF_MEMORY.search(str(err)))


def memory_advice(config: TrialConfig) -> str:
    """The settings that decide a trial's memory, with their values: what to lower. Shared by the
    search's packing check and every command that trains."""
    advice = (
        f"lower batch_size (now {config.batch_size}) or choose a smaller model (now {config.model})"
    )
    if config.dataset in ("image_folder", "synthetic"):
        advice += f", or a smaller image_size (now {config.image_size})"
    if config.dataset == "synthetic":
        advice += f", or fewer synthetic_images (now {config.synthetic_images})"
    return advice


@contextlib.contextmanager
def named_out_of_memory(config: TrialConfig, doing: str) -> Iterator[None]:
    """Inside: running out of memory raises OutOfMemory (from the allocator's error), naming the
    memory, what was `doing`, and what to change."""
    try:
        yield
    except OutOfMemory:
        raise
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        raise OutOfMemory(out_of_memory_message(err, config, doing)) from err


def names_out_of_memory(
    doing: str,
) -> Callable[[Callable[Concatenate[TrialConfig, P], R]], Callable[Concatenate[TrialConfig, P], R]]:
    """named_out_of_memory around a function whose first argument is the trial's config."""

    def wrap(
        function: Callable[Concatenate[TrialConfig, P], R],
    ) -> Callable[Concatenate[TrialConfig, P], R]:
        @functools.wraps(function)
        def named(config: TrialConfig, *args: P.args, **kwargs: P.kwargs) -> R:
            with named_out_of_memory(config, doing):
                return function(config, *args, **kwargs)

        return named

    return wrap


def size(nbytes: float) -> str:
    """An amount of memory for a message: '2.0 GiB', '43.1 MiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def out_of_memory_message(err: BaseException, config: TrialConfig, doing: str) -> str:
    import torch

    text = str(err)
    on_gpu = isinstance(err, torch.cuda.OutOfMemoryError) or bool(_ON_GPU.search(text))
    asked = _ASKED.search(text)
    amount = None
    if asked:  # "2147483648 bytes" (torch, CPU), "2.00 GiB" (torch, CUDA), "732. GiB" (numpy)
        unit = asked.group(2)
        scale = 1 if unit.lower() == "bytes" else _SCALE[unit[0].upper() if len(unit) > 1 else ""]
        amount = size(float(asked.group(1)) * scale)
    what = "the GPU's memory" if on_gpu else "this machine's memory (RAM)"
    advice = memory_advice(config)
    if on_gpu:
        advice += (
            "; in a search, give each trial more of the GPU (a larger --gpus-per-trial share) or "
            "run fewer at once (--concurrency)"
        )
    else:
        advice += "; in a search, run fewer trials at once (--concurrency)" + (
            "; or train on the GPU (device: cuda)" if torch.cuda.is_available() else ""
        )
    return (
        f"{doing} ran out of {what}"
        + (f" asking for {amount} more" if amount else "")
        + f" ({config.variant}, model {config.model}, data set {config.dataset}, batch_size "
        f"{config.batch_size}): {advice}"
    )
