"""How much GPU memory one trial takes, estimated on the CPU before any trial runs, so that a search
can refuse to pack more trials on a GPU than fit (search/preflight.py).

Everything that scales with the model or the data is measured, not looked up: the trial's own model,
optimiser and averager are built on the CPU, one small batch goes forward and backward with the
trial's autocast, and autograd's saved tensors are counted. What cannot be measured without a GPU
(the CUDA context, the allocator's slack) is a stated allowance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatbasin.trainables.config import TrialConfig
from flatbasin.trainables.data import Data
from flatbasin.trainables.memory import size
from flatbasin.trainables.optim import build_optimizer
from flatbasin.trainables.sanity import build

# Per trial process, on top of its tensors: the CUDA context with lazily loaded kernels (300 to
# 500 MB as reported for CUDA 12; the driver decides), cuBLAS' and cuDNN's workspaces. Not measured
# here: no GPU has been lent to measure it on.
CUDA_CONTEXT_BYTES = 512 * 2**20
# The caching allocator rounds blocks up and keeps freed ones; counted tensors are scaled by this.
ALLOCATOR_SLACK = 1.1
PROBE_SIZES = (2, 4)  # the batch sizes measured; two, to split per-example from fixed bytes


@dataclass(frozen=True)
class Footprint:
    """Bytes one trial holds on its GPU at its peak. `total` is what the packing check compares."""

    weights: int  # parameters and buffers, fp32
    gradients: int
    optimizer: int  # its state: momentum, Adam's two moments, ...
    averages: int  # the averager's copies of the model at most (average, EMA, snapshots)
    data: int  # the whole data set, resident on the device
    training_batch: int  # what autograd keeps for the backward pass of one batch
    evaluation_batch: int  # an evaluation batch (no gradients, fp32): the widest layer's in and out
    context: int = CUDA_CONTEXT_BYTES

    @property
    def total(self) -> int:
        # Training and evaluation take turns, so only the larger of the two batches counts.
        tensors = (
            self.weights + self.gradients + self.optimizer + self.averages + self.data
            + max(self.training_batch, self.evaluation_batch)
        )  # fmt: skip
        return math.ceil(tensors * ALLOCATOR_SLACK) + self.context

    def parts(self) -> str:
        """'weights 43 MiB, gradients 43 MiB, ...': each part, for a message."""
        return ", ".join(
            f"{f.name.replace('_', ' ')} {size(getattr(self, f.name))}" for f in fields(self)
        )


@dataclass(frozen=True)
class Probe:
    """What one model, optimiser and precision take, measured once and shared by every trial that
    differs only in batch size or variant parameters."""

    model: nn.Module  # the probed model (CPU, with gradients): the averagers are built around it
    weights: int
    gradients: int
    optimizer: int
    fixed: float  # saved-tensor bytes that do not grow with the batch (autocast's weight copies)
    per_example: float  # saved-tensor bytes per training example
    widest: int  # the largest input plus output of a layer, per example, in eval mode (fp32)


def probe(config: TrialConfig, data: Data, autocast_dtype: torch.dtype | None) -> Probe:
    """Train one step of `config`'s model and optimiser on PROBE_SIZES examples on the CPU, under
    the trial's autocast, counting what autograd saves (parameters and buffers excluded, each
    storage once); the two sizes split the bytes into a per-example part and a fixed part. CPU
    autocast keeps the same tensors in bf16 as CUDA's does, to within a few layers. The caller's
    random state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build(config, data).train()
        optimizer = build_optimizer(
            config.optimizer, model.parameters(),
            lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
        )  # fmt: skip
        saved = [_saved_bytes(model, data, n, autocast_dtype) for n in PROBE_SIZES]
        optimizer.step()  # the last probe left its gradients: the optimiser makes its state
    per_example = (saved[1] - saved[0]) / (PROBE_SIZES[1] - PROBE_SIZES[0])
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return Probe(
        model=model,
        weights=_bytes([*model.parameters(), *model.buffers()]),
        gradients=_bytes([p.grad for p in model.parameters() if p.grad is not None]),
        optimizer=_bytes(state),
        fixed=max(saved[0] - per_example * PROBE_SIZES[0], 0.0),
        per_example=per_example,
        widest=_widest_layer_bytes(model, data.examples(slice(0, 1))[0]),
    )


def footprint(config: TrialConfig, probe: Probe, data: Data, eval_batch_size: int) -> Footprint:
    """`config`'s peak GPU memory from its model's probe.

    Training batch: the probe's saved bytes extended linearly to `batch_size`. Evaluation batch:
    twice the widest layer's input plus output (a residual branch keeps its input alive beside
    them) times `eval_batch_size`, or the largest split scored when it is smaller. Averages: as many copies of the weights as the variant's
    averager keeps at most. Not counted: cuDNN's algorithm workspaces, the gradients of activations
    in flight during the backward pass (a layer or two), prior_guided's focus library;
    ALLOCATOR_SLACK and CUDA_CONTEXT_BYTES stand for them. torch.compile usually needs less.
    """
    steps = data.steps_per_epoch(config.batch_size)
    averager = config.build_variant().averager(probe.model, steps, lambda: iter(()))
    largest_split = max(data.size("val"), data.size("test"))  # scored in batches of eval_batch_size
    return Footprint(
        weights=probe.weights,
        gradients=probe.gradients,
        optimizer=probe.optimizer,
        averages=averager.model_copies() * probe.weights,
        data=data.resident_bytes(),
        training_batch=math.ceil(probe.fixed + probe.per_example * config.batch_size),
        evaluation_batch=2 * probe.widest * min(eval_batch_size, largest_split),
    )


def estimate(
    config: TrialConfig, data: Data, *, autocast_dtype: torch.dtype | None, eval_batch_size: int
) -> Footprint:
    """One trial's peak GPU memory (probe and footprint in one go)."""
    return footprint(config, probe(config, data, autocast_dtype), data, eval_batch_size)


def _bytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _saved_bytes(
    model: nn.Module, data: Data, batch_size: int, autocast_dtype: torch.dtype | None
) -> int:
    """Bytes autograd saves for the backward pass of one training step on `batch_size` examples;
    runs that backward pass too, so the model is left with its gradients."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    x, y = data.examples(slice(0, batch_size))
    model.zero_grad(set_to_none=True)
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    low = autocast_dtype or torch.bfloat16
    with hooks, torch.autocast("cpu", dtype=low, enabled=autocast_dtype is not None):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return sum(storages.values())


@torch.no_grad()
def _widest_layer_bytes(model: nn.Module, x: Tensor) -> int:
    """The largest input plus output of any leaf layer, in bytes, for one example in eval mode."""
    widest = 0

    def measure(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal widest
        tensors = [t for t in (*inputs, output) if torch.is_tensor(t)]
        widest = max(widest, _bytes(tensors) // len(x))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(measure) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return widest
