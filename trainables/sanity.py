"""Checks that a trial can run at all, made before its first step: the data has classes to tell apart,
a batch fits the training split, the model takes the input and gives one score per class, and the
variant can train that model (prior_guided: its focus library was fitted on the same conv layers);
and, before a search, that the model can learn at all (`check_learns`).

They fail in seconds at most with a message naming the setting, instead of a traceback epochs later
or a search of trials that all score chance.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatbasin.trainables import accel, usercode
from flatbasin.trainables.config import TrialConfig
from flatbasin.trainables.data import Data
from flatbasin.trainables.memory import is_out_of_memory, names_out_of_memory
from flatbasin.trainables.models import build_model, model_kind
from flatbasin.trainables.variants import Variant


class TrialError(ValueError):
    """This trial cannot run with this data and model; retrying will not help."""


def check_trial(config: TrialConfig, data: Data) -> None:
    """Raise TrialError naming the setting that makes `config` impossible on `data` (builds the model)."""
    check_data(config, data)
    runtime(config, data, torch.device("cpu"))  # what a device cannot honour is the device's to say
    check_model(config, data, build(config, data))


def runtime(config: TrialConfig, data: Data, device: torch.device) -> accel.Runtime:
    """The trial's precision, memory format and compilation on `device`, resolved once."""
    try:
        return accel.resolve(
            device, data.shape,
            precision=config.precision, channels_last=config.channels_last, compile=config.compile,
        )  # fmt: skip
    except ValueError as err:
        raise TrialError(str(err)) from err


def build(config: TrialConfig, data: Data) -> nn.Module:
    """The trial's model; a model that cannot exist for this data raises TrialError."""
    try:
        return build_model(
            config.model, data.shape, data.num_classes, dropout=config.dropout, init=config.init,
            model_args=config.model_args, code_dir=config.code_dir,
        )  # fmt: skip
    except ValueError as err:  # UserCodeError too: the user's module, named with file and line
        raise TrialError(str(err)) from err


def check_data(config: TrialConfig, data: Data) -> None:
    if data.num_classes < 2:
        raise TrialError(
            f"data set '{config.dataset}' has {data.num_classes} class; a classifier needs at least 2"
        )
    if len(data.shape) not in (2, 3):  # augmentation and TTA views exist for these two only
        for key, value, off in (("augment", config.augment, False), ("tta", config.tta, "none")):
            if value != off:
                raise TrialError(
                    f"{key} {str(value).lower()} applies to images (channels, height, width) and 1-D signals "
                    f"(channels, length); the examples of '{config.dataset}' have shape "
                    f"{data.shape}; leave {key} out"
                )
    n_train = data.size("train")
    if config.batch_size > n_train:
        raise TrialError(
            f"batch_size {config.batch_size} is larger than the training split of '{config.dataset}' "
            f"({n_train} examples once val_frac={config.val_frac} is held out); lower batch_size"
        )


def check_model(
    config: TrialConfig, data: Data, model: nn.Module, variant: Variant | None = None
) -> None:
    """The model takes two training examples and gives one score per class (state left untouched),
    and the variant (`config`'s own when not given) can train it."""
    probe = data.examples(slice(0, 2))[0].to(next(model.parameters()).device)
    was_training = model.training
    model.eval()  # no batch-norm statistics updated, no dropout drawn: the trial's state is untouched
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as err:  # a user's forward can raise anything; say what and where
        if is_out_of_memory(err):  # the input fits; the memory does not (see memory.py)
            raise
        raise TrialError(
            f"model '{config.model}' cannot take the input of '{config.dataset}' "
            f"(examples of shape {tuple(probe.shape[1:])}): {usercode.describe_error(err)}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor):
        raise TrialError(
            f"model '{config.model}' returns a {type(out).__name__} for a batch of "
            f"'{config.dataset}'; it must return one tensor of logits, shape (batch, classes)"
        )
    if tuple(out.shape) != (len(probe), data.num_classes):
        raise TrialError(
            f"model '{config.model}' gives outputs of shape {tuple(out.shape[1:])} for "
            f"'{config.dataset}', which has {data.num_classes} classes"
        )
    try:
        (variant or config.build_variant()).check(model)
    except ValueError as err:
        raise TrialError(str(err)) from err


# The learning check (Karpathy's "overfit one batch"): numbers chosen so that every model flatbasin
# builds fits the batch in a few dozen steps on a CPU, whatever learning rate a search will try.
LEARN_EXAMPLES = 16
LEARN_STEPS = 50
LEARN_LR = 1e-3  # Adam's default: the check must not depend on the searched learning rate
LEARN_BUDGET_S = 10.0  # then it gives up and says so (PreResNet-164 on one CPU core needs 30 s)
INIT_LOSS_FACTOR = 3.0  # an initial loss above this many times ln(classes) is suspicious


@names_out_of_memory("checking that the model can learn (one small batch)")
def check_learns(
    config: TrialConfig,
    data: Data,
    *,
    examples: int = LEARN_EXAMPLES,
    steps: int = LEARN_STEPS,
    budget_s: float | None = None,  # None: LEARN_BUDGET_S
) -> list[str]:
    """Train a fresh copy of the trial's model on one small batch; raise TrialError when it cannot
    learn, return warnings for what is only suspicious.

    Two checks, both independent of the learning rate, the optimiser and the variant a search tries:
    - the loss at initialisation, which for a healthy classifier is near ln(classes). Non-finite is
      refused: the inputs hold NaN or infinity, or the initialisation overflows, and every trial
      would diverge at its first step. Finite but above 3 ln(classes) is a warning only: a large
      initial scale (an `init` without batch norm after it) costs the first epochs, and training
      often recovers, so refusing would stop searches that work;
    - that `examples` training examples, one per class in turn, can be memorised by Adam (lr 1e-3)
      within `steps` steps: every one of them right at some step. Refused otherwise. The model is
      built without dropout: a regulariser is not what decides whether a model can learn, and with
      dropout 0.9 a healthy model misses the 50 steps (measured), which would refuse a good search.

    What it catches: a model whose output does not depend on its weights or inputs (frozen, zero or
    constant output, a broken gradient path) and inputs that do not tell examples apart (blank
    images, constant signals, a normalisation that wipes them out). What it cannot catch: any 16
    labels can be memorised, so labels shuffled against their inputs, or a wrong class mapping,
    pass; only validation accuracy near chance after training shows those. Nor does it say whether a
    learning rate is good; that is what the search is for.

    The driver's state is untouched: the model is a fresh seeded copy, built under a forked RNG, and
    the data tensors are read, never written. It runs on the CPU, so the driver holds no GPU memory,
    with the trial's `threads` (the search sets them from --cpus-per-trial) and then restores the
    driver's: on a shared CPU, more threads than that made it ten times slower (measured).
    A check that runs out of `budget_s` (counted after the first step, which pays one-off set-up)
    before it can decide is a warning, not a refusal: the largest CIFAR nets need about 30 s on one
    CPU core.
    """
    ranks = F.one_hot(data.y_train, data.num_classes).cumsum(0).gather(1, data.y_train[:, None])
    batch = torch.argsort(ranks.squeeze(1), stable=True)[:examples]  # classes take turns
    x, y = (t.cpu() for t in data.examples(batch))
    threads = torch.get_num_threads()
    try:
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        budget_s = LEARN_BUDGET_S if budget_s is None else budget_s
        return _fit_one_batch(config, data, x, y, steps, budget_s)
    finally:
        torch.set_num_threads(threads)


class _Adam:
    """torch's Adam through its functional form (torch.optim.adam.adam, the same arithmetic):
    the first torch.optim optimizer a process makes imports torch._dynamo, 1.3 s of CPU that the
    driver would spend, before every search, on the cores the trials need."""

    def __init__(self, params: list[nn.Parameter], lr: float):
        self.params, self.lr = params, lr
        self.exp_avgs = [torch.zeros_like(p) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in params]
        self.steps = [torch.tensor(0.0) for _ in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        from torch.optim.adam import adam

        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        adam(
            [self.params[i] for i in live], [p.grad for p in self.params if p.grad is not None],
            [self.exp_avgs[i] for i in live], [self.exp_avg_sqs[i] for i in live], [],
            [self.steps[i] for i in live], amsgrad=False, beta1=0.9, beta2=0.999, lr=self.lr,
            weight_decay=0.0, eps=1e-8, maximize=False,
        )  # fmt: skip


def _fit_one_batch(
    config: TrialConfig, data: Data, x: Tensor, y: Tensor, steps: int, budget_s: float
) -> list[str]:
    """check_learns' training: its warnings, or TrialError when the batch cannot be fitted."""
    what = f"model '{config.model}' on '{config.dataset}' (init {config.init})"
    classes = data.num_classes
    chance = math.log(classes)
    warnings: list[str] = []
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(0)
        model = build(config.model_copy(update={"dropout": 0.0}), data).train()
        optimizer = _Adam([p for p in model.parameters() if p.requires_grad], LEARN_LR)
        best = 0
        for step in range(steps):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if step == 0:
                initial = loss.item()
                if not math.isfinite(initial):
                    raise TrialError(
                        f"{what}: the loss at initialisation is {initial} on {len(y)} training "
                        "examples: the inputs hold NaN or infinity, or the model overflows; every "
                        "trial would diverge at its first step"
                    )
                if initial > INIT_LOSS_FACTOR * chance:
                    warnings.append(
                        f"{what}: the loss at initialisation is {initial:.2f}, over "
                        f"{INIT_LOSS_FACTOR:g} x ln({classes}) = {chance:.2f} (a uniform "
                        "guess); its outputs start far too large (check init), and the first "
                        "epochs will go to shrinking them"
                    )
            right = int((logits.argmax(dim=1) == y).sum())
            best = max(best, right)
            if right == len(y):
                break
            optimizer.zero_grad()
            try:
                loss.backward()
            except RuntimeError as err:  # nothing in the graph requires a gradient
                raise TrialError(
                    f"{what} cannot learn: its loss has no gradient ({_first_line(err)}); are its "
                    "parameters frozen?"
                ) from err
            optimizer.step()
            if step == 0:
                started = time.perf_counter()
            elif time.perf_counter() - started > budget_s:
                return [
                    *warnings,
                    f"{what}: could not check in {budget_s:g} s on this machine that it can fit one "
                    f"batch ({step + 1} of {steps} steps done, {best}/{len(y)} right); not checked",
                ]
    if best < len(y) and model_kind(config.model) != "built_in" and loss.item() != initial:
        # Not one of ours, whose pace on 16 examples is known: a user's model that learns slowly
        # (a narrow net at Adam's default rate) may still learn the data in a trial's epochs, so
        # only a loss that does not move at all (no dependence on weights or inputs) is refused.
        return [
            *warnings,
            f"{what}: fitted {best}/{len(y)} of one batch in {steps} Adam steps (loss "
            f"{initial:.3f} -> {loss.item():.3f}); it learns slowly, if at all: not refused",
        ]
    if best < len(y):
        raise TrialError(
            f"{what} cannot fit one batch of {len(y)} training examples: after {steps} Adam steps "
            f"(lr {LEARN_LR:g}) it gets at most {best}/{len(y)} right (loss {initial:.3f} -> "
            f"{loss.item():.3f}; chance is {chance:.3f}). A model that cannot memorise {len(y)} "
            "examples will not learn the data: either its output does not depend on its weights or "
            "inputs, or the inputs do not tell the examples apart (blank images, constant signals)"
        )
    return warnings


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
