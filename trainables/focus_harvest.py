"""The harvesting run of prior-guided training: plain SGD through the one loop on a similar data set,
recording every conv layer's parameters and gradients at every iteration, then the focus library
(focus.py) fitted on what it recorded."""

from __future__ import annotations

import torch
from torch import nn

import flatbasin
from flatbasin.trainables.config import TrialConfig
from flatbasin.trainables.data import Data, load_data
from flatbasin.trainables.focus import (
    DEFAULT_RIDGE,
    FocusLibrary,
    Harvest,
    LibraryError,
    Regression,
)
from flatbasin.trainables.loop import TrialResult, resolve_device, train
from flatbasin.trainables.models import resolve_name


def fit_focus_library(
    config: TrialConfig,
    *,
    data: Data | None = None,
    regression: Regression = "elementwise",
    ridge: float = DEFAULT_RIDGE,
) -> tuple[FocusLibrary, TrialResult]:
    """Train `config` (plain SGD on the source data) through the one loop, recording every conv
    weight, bias and gradient at every iteration, and fit the library; the trial's result comes back
    too (its accuracy says how good the prior is)."""
    if config.variant != "sgd":
        raise LibraryError(
            f"a focus library is harvested from plain SGD (variant sgd), not {config.variant!r}"
        )
    if ridge < 0:
        raise LibraryError(f"ridge must be 0 or more (got {ridge})")
    if config.threads is not None:
        # Before loading, as train() does: the normalisation statistics are float32 reductions whose
        # rounding depends on the thread count, and the harvest must see train()'s own data.
        torch.set_num_threads(config.threads)
    if data is None:
        data = load_data(config.data_spec, str(resolve_device(config.device)))
    harvests: list[Harvest] = []

    def record(model: nn.Module) -> None:
        if not harvests:
            harvests.append(Harvest(model))
            if not harvests[0].parameters:
                raise LibraryError(
                    f"model '{resolve_name(config.model, data.shape)}' has no conv layer: a focus "
                    "library regresses conv layers' gradients"
                )
        harvests[0].record()

    result = train(config, data=data, on_backward=record)
    if result.diverged:
        raise LibraryError(
            f"the harvesting run diverged at epoch {result.history[-1].epoch} (the loss is not "
            "finite), so its gradients say nothing; lower lr"
        )
    spec = config.data_spec
    meta = {
        "source": {
            "dataset": spec.dataset,
            "data_seed": spec.data_seed,
            "fingerprint": data.fingerprint,
            "data_spec": spec.model_dump(mode="json"),
        },
        "model": result.model,
        "harvest_config": config.model_dump(mode="json"),
        "epochs": len(result.history),
        "source_val_acc": result.score,
        "source_test_acc": result.test_acc,
        "flatbasin_version": flatbasin.__version__,
    }
    return harvests[0].fit(regression, ridge, meta), result
