"""The one training loop. Every variant runs through `train`; a variant only supplies the schedule,
the averager and an optional loss term, so this file reads top to bottom like a plain PyTorch loop.

Three small hooks let a variant shape the epochs without special cases here, each a pure function of
the recorded history so that a resumed trial makes the same decisions: `phase(history)` (a data epoch,
or one the variant runs itself without data), `epoch_without_data(...)`, and `stop(history)`.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatbasin.trainables.accel import resolve_device
from flatbasin.trainables.averagers import Averager
from flatbasin.trainables.checkpoint import load_checkpoint, load_deployable, save_checkpoint
from flatbasin.trainables.config import TrialConfig
from flatbasin.trainables.curve import Curve, CurvePoint, DiversityPoint, accuracy
from flatbasin.trainables.data import Data, load_data
from flatbasin.trainables.history import seconds_to_best
from flatbasin.trainables.memory import names_out_of_memory
from flatbasin.trainables.models import resolve_name
from flatbasin.trainables.optim import build_optimizer
from flatbasin.trainables.records import DATA_PHASE, EpochMetrics
from flatbasin.trainables.sanity import build, check_data, check_model, runtime
from flatbasin.trainables.start import apply_start
from flatbasin.trainables.tta import TTA, softmax, with_tta


@dataclass
class TrialResult:
    config: TrialConfig
    history: list[EpochMetrics]
    score: float
    test_acc: float | None  # None when the trial diverged
    curve: list[CurvePoint]
    extra_curves: dict[str, list[CurvePoint]]
    diverged: bool
    data_fingerprint: str
    plan: dict[str, float | int]
    threads: int
    device: str
    # total, averaging (joins + BN), eval, to_best (training time to the best epoch's end)
    seconds: dict[str, float] = field(default_factory=dict)
    model: str = ""  # the model built: `auto` resolved for the data (cnn1d, small_cnn, resnet18)
    diversity: list[DiversityPoint] = field(default_factory=list)  # ensembles: first k members
    # How it ran (accel.Runtime.record): device, precision, channels_last, compile, eval batch size
    runtime: dict[str, str | bool | int] = field(default_factory=dict)
    # The validation accuracy of always answering the most common class: a score near it learned nothing
    chance: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(mode="json"),
            "history": [asdict(m) for m in self.history],
            "score": self.score,
            "test_acc": self.test_acc,
            "curve": [asdict(p) for p in self.curve],
            "extra_curves": {k: [asdict(p) for p in v] for k, v in self.extra_curves.items()},
            "diverged": self.diverged,
            "data_fingerprint": self.data_fingerprint,
            "plan": self.plan,
            "threads": self.threads,
            "device": self.device,
            "seconds": self.seconds,
            "model": self.model,
            "diversity": [asdict(p) for p in self.diversity],
            "runtime": self.runtime,
            "chance": self.chance,
        }


# The score of a diverged trial: the worst an accuracy can be, so that no ranking (ours, TPE's, ASHA's)
# can put a diverged trial above a real one, however badly the real one did.
DIVERGED_SCORE = 0.0

# Called after every epoch with the metrics and a function that writes a checkpoint to a path.
EpochCallback = Callable[[EpochMetrics, Callable[[Path], None]], None]
# Called after every backward pass, before the optimizer step: where the gradients can be read.
BackwardCallback = Callable[[nn.Module], None]


@torch.no_grad()
def predict(module: nn.Module, batches: Any, tta: TTA = "none") -> Tensor:
    """Softmax outputs of `module` in eval mode (restoring its mode afterwards); with `tta`, the mean
    softmax over each input's fixed views. Every evaluation of a trial goes through here."""
    was_training = module.training
    module.eval()
    probs = torch.cat([softmax(module, x, tta) for x in batches])
    module.train(was_training)
    return probs


def fit_accuracy(model: nn.Module, data: Data, tta: TTA, batch_size: int = 1024) -> float:
    """Accuracy on the first len(val) training examples, scored exactly as val_acc is. The running
    train_acc is no match for val_acc: it mixes an epoch of changing weights, train-mode batch norm,
    dropout and augmentation. The training split is a random permutation, so its head is a sample."""
    return accuracy(predict(model, data.inputs("fit", batch_size), tta), data.labels("fit"))


def nll(probs: Tensor, labels: Tensor) -> float:
    return -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean().item()


class Parts(NamedTuple):
    """Everything a trial's state lives in: what a checkpoint saves and restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    averager: Averager
    curve: Curve
    order: torch.Generator  # batch order and augmentation


def assemble(
    config: TrialConfig,
    data: Data,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Parts:
    """Model, optimiser, averager, curve and batch-order RNG, seeded and in their initial state.
    The averager copies the model after it is on `device` in `memory_format`, so the averages are
    laid out like the weights they follow."""
    torch.manual_seed(config.seed)  # model initialisation, then dropout
    model = build(config, data).to(device).to(memory_format=memory_format)
    optimizer = build_optimizer(
        config.optimizer, model.parameters(),
        lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
    )  # fmt: skip
    steps_per_epoch = data.steps_per_epoch(config.batch_size)
    averager = config.build_variant().averager(model, steps_per_epoch, lambda: data.inputs("train"))
    curve = Curve(averager.curve_kind, averager.newest_first, data.y_val, data.y_test)
    return Parts(model, optimizer, averager, curve, torch.Generator().manual_seed(config.seed))


def load_deployed(config: TrialConfig, checkpoint: Path, data: Data | None = None) -> nn.Module:
    """The model a checkpointed trial would ship (average, ensemble or plain weights), in eval mode."""
    device = resolve_device(config.device)
    data = data if data is not None else load_data(config.data_spec, str(device))
    torch.manual_seed(config.seed)  # as assemble builds it; the checkpoint overwrites the weights
    model = build(config, data).to(device)
    averager = config.build_variant().averager(
        model, data.steps_per_epoch(config.batch_size), lambda: data.inputs("train")
    )
    load_deployable(checkpoint, model, averager, config=config.model_dump(mode="json"))
    return with_tta(averager.deployed(model), config.tta).eval()


@names_out_of_memory("training")
def train(
    config: TrialConfig,
    *,
    data: Data | None = None,
    resume: Path | None = None,
    on_epoch: EpochCallback | None = None,
    start_weights: Mapping[str, Tensor] | None = None,  # the converged model config.start names
    on_backward: BackwardCallback | None = None,
) -> TrialResult:
    """Train one trial. It ends after `config.epochs` epochs, at the variant's stop rule (early
    stopping), or at the first non-finite loss (a diverged result, not an exception)."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    data = data if data is not None else load_data(config.data_spec, str(device))
    variant = config.build_variant()
    steps_per_epoch = data.steps_per_epoch(config.batch_size)

    check_data(config, data)  # a TrialError before the first step, not a traceback mid-epoch
    run = runtime(config, data, device)  # precision, memory format, compilation: decided here only
    if device.type == "cuda":  # one batch shape all trial long: time the conv kernels once
        torch.backends.cudnn.benchmark = True
    model, optimizer, averager, curve, order = assemble(config, data, device, run.memory_format)
    check_model(config, data, model, variant)
    forward = run.training_forward(model)
    inputs = functools.partial(data.inputs, batch_size=run.eval_batch_size)  # evaluation batches
    lr_at = variant.schedule(steps_per_epoch)
    history: list[EpochMetrics] = []
    step, first_epoch = 0, 0
    recorded = config.model_dump(mode="json")  # once: each epoch's save function carries it
    if resume is not None:
        state = load_checkpoint(resume, model, optimizer, averager, curve, order, config=recorded)
        step, first_epoch, history = state.step, state.epoch, state.history
    elif config.start is not None:  # post-convergence: continue the converged model, not the init
        apply_start(model, config.start, start_weights)
        if averager.update(model, 0):  # a member at step 0 is that model (cyclic_average's w_1)
            for name, probe in averager.probes(model).items():
                curve.add(
                    name,
                    predict(probe, inputs("val"), config.tta),
                    predict(probe, inputs("test"), config.tta),
                )

    seconds = {"averaging": 0.0, "eval": 0.0}
    diverged = False
    # Training time so far, carried over a resume so that seconds_to_best covers the whole trial.
    clock = time.perf_counter() - (history[-1].elapsed_s if history else 0.0)
    for epoch in range(first_epoch, config.epochs):
        if variant.stop(history):  # early stopping; checked first, so a resumed trial stops too
            break
        phase = variant.phase(history)
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        lr_low, lr_high = math.inf, -math.inf
        batches: Iterable[tuple[Tensor, Tensor]] = ()
        if phase == DATA_PHASE:
            batches = data.train_batches(config.batch_size, order, config.augment)
        else:
            # The variant updates the weights itself, without a forward or backward pass over the
            # data: no optimizer step, no batch drawn (the batch-order RNG is left as it is).
            lr_low = lr_high = lr_at(step)
            variant.epoch_without_data(phase, model, lr_low, steps_per_epoch)
        # Nothing in a step waits for the device (no .item(), no tensor in an `if`): the loss and the
        # hits add up on the device and are read once, after the epoch. Members joining (cycle ends)
        # are scored at once, which does wait; they are a handful per trial.
        for x, y in batches:
            lr = lr_at(step)
            lr_low, lr_high = min(lr_low, lr), max(lr_high, lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with run.autocast():
                logits = forward(run.batch(x))
                loss = F.cross_entropy(logits, y)
            extra = variant.penalty(model, averager)
            if extra is not None:
                loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if on_backward is not None:
                on_backward(model)
            optimizer.step()
            step += 1
            loss_sum += loss.detach()
            correct += (logits.argmax(dim=1) == y).sum()
            tick = time.perf_counter()
            if averager.update(model, step):
                for name, probe in averager.probes(model).items():
                    curve.add(
                        name,
                        predict(probe, inputs("val"), config.tta),
                        predict(probe, inputs("test"), config.tta),
                    )
            seconds["averaging"] += time.perf_counter() - tick

        tick = time.perf_counter()
        train_loss: float | None = None
        train_acc: float | None = None
        if phase == DATA_PHASE:
            train_loss = loss_sum.item() / steps_per_epoch
            train_acc = correct.item() / (steps_per_epoch * config.batch_size)
            diverged = not math.isfinite(train_loss)
        else:
            diverged = not all(bool(p.isfinite().all()) for p in model.parameters())
        val_probs = predict(model, inputs("val"), config.tta)
        val_acc = accuracy(val_probs, data.y_val)
        score = curve.score()
        if score is None:
            deployed = averager.deployed(model)
            score = (
                val_acc
                if deployed is model
                else accuracy(predict(deployed, inputs("val"), config.tta), data.y_val)
            )
        metrics = EpochMetrics(
            epoch=epoch + 1,
            step=step,
            train_loss=train_loss,
            train_acc=train_acc,
            val_loss=nll(val_probs, data.y_val),
            val_acc=val_acc,
            lr=lr_at(step - 1) if phase == DATA_PHASE else lr_low,
            score=DIVERGED_SCORE if diverged else score,
            members=averager.count,
            lr_low=lr_low,
            lr_high=lr_high,
            gen_gap=fit_accuracy(model, data, config.tta, run.eval_batch_size) - val_acc,
            phase=phase,
            elapsed_s=time.perf_counter() - clock,
        )
        history.append(metrics)
        seconds["eval"] += time.perf_counter() - tick
        if diverged:  # large learning rates are what is searched: report, do not crash
            break
        if on_epoch is not None:
            save = functools.partial(
                save_checkpoint,
                model=model, optimizer=optimizer, averager=averager, curve=curve, order=order,
                epoch=epoch + 1, step=step, history=list(history), config=recorded,
            )  # fmt: skip
            on_epoch(metrics, save)

    test_acc: float | None = None
    points: list[CurvePoint] = []
    score = DIVERGED_SCORE
    if not diverged:
        deployed = averager.deployed(model)
        if deployed is model and history:  # the weights the last epoch scored, unchanged since:
            score = history[-1].val_acc  # the same number without another pass over val
        else:
            score = accuracy(predict(deployed, inputs("val"), config.tta), data.y_val)
        test_acc = accuracy(predict(deployed, inputs("test"), config.tta), data.y_test)
        points = curve.points() if curve.kind != "final" else [CurvePoint(1, score, test_acc)]
    seconds["total"] = time.perf_counter() - started
    to_best = seconds_to_best(history)
    if to_best is not None:
        seconds["to_best"] = to_best
    return TrialResult(
        config=config,
        history=history,
        score=score,
        test_acc=test_acc,
        curve=points,
        extra_curves=curve.extra() if not diverged else {},
        diverged=diverged,
        data_fingerprint=data.fingerprint,
        plan=variant.plan(),
        threads=torch.get_num_threads(),
        device=str(device),
        seconds=seconds,
        model=resolve_name(config.model, data.shape),
        diversity=curve.diversity() if not diverged else [],
        runtime=run.record(),
        chance=chance_level(data.y_val),
    )


def chance_level(labels: Tensor) -> float:
    """The accuracy of always answering the most common class of `labels`."""
    return float(torch.bincount(labels.cpu()).max()) / max(len(labels), 1)
