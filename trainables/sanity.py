"""Checks that a trial can run at all, made before its first step: the data has classes to tell apart,
a batch fits the training split, the model takes the input and gives one score per class, and the
variant can train that model (prior_guided: its focus library was fitted on the same conv layers).

They fail in milliseconds with a message naming the setting, instead of a traceback epochs later.
"""

from __future__ import annotations

import torch
from torch import nn

from flatbasin.trainables.config import TrialConfig
from flatbasin.trainables.data import Data
from flatbasin.trainables.models import build_model
from flatbasin.trainables.variants import Variant


class TrialError(ValueError):
    """This trial cannot run with this data and model; retrying will not help."""


def check_trial(config: TrialConfig, data: Data) -> None:
    """Raise TrialError naming the setting that makes `config` impossible on `data` (builds the model)."""
    check_data(config, data)
    check_model(config, data, build(config, data))


def build(config: TrialConfig, data: Data) -> nn.Module:
    """The trial's model; a model that cannot exist for this data raises TrialError."""
    try:
        return build_model(
            config.model, data.shape, data.num_classes, dropout=config.dropout, init=config.init
        )
    except ValueError as err:
        raise TrialError(str(err)) from err


def check_data(config: TrialConfig, data: Data) -> None:
    if data.num_classes < 2:
        raise TrialError(
            f"data set '{config.dataset}' has {data.num_classes} class; a classifier needs at least 2"
        )
    n_train = len(data.x_train)
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
    probe = data.x_train[:2].to(next(model.parameters()).device)
    was_training = model.training
    model.eval()  # no batch-norm statistics updated, no dropout drawn: the trial's state is untouched
    try:
        with torch.no_grad():
            out = model(probe)
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrialError(
            f"model '{config.model}' cannot take the input of '{config.dataset}' "
            f"(examples of shape {tuple(probe.shape[1:])}): {first}"
        ) from err
    finally:
        model.train(was_training)
    if tuple(out.shape) != (len(probe), data.num_classes):
        raise TrialError(
            f"model '{config.model}' gives outputs of shape {tuple(out.shape[1:])} for "
            f"'{config.dataset}', which has {data.num_classes} classes"
        )
    try:
        (variant or config.build_variant()).check(model)
    except ValueError as err:
        raise TrialError(str(err)) from err
