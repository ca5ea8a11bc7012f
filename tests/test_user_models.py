"""Any model, every variant: the user's own networks (no batch norm, dropout, buffers that are not BN
statistics, a conv net a focus library can guide) and the zoos' (torchvision, timm), on the user's
arrays, through the one training loop. Seconds each, on tiny data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flatbasin.trainables.config import make_config
from flatbasin.trainables.data import load_data
from flatbasin.trainables.focus_harvest import fit_focus_library
from flatbasin.trainables.footprint import estimate
from flatbasin.trainables.loop import train
from flatbasin.trainables.models import build_model
from flatbasin.trainables.variants import REGISTRY

MODELS = '''
import torch
from torch import nn

class Odd(nn.Module):
    """No batch norm; dropout; a buffer that is not a BN statistic (a fixed input scale)."""
    def __init__(self, features, classes, width):
        super().__init__()
        self.register_buffer("scale", torch.full((features,), 0.5))
        self.body = nn.Sequential(nn.Linear(features, width), nn.GELU(), nn.Dropout(0.2),
                                  nn.Linear(width, classes))
    def forward(self, x):
        return self.body(x.flatten(1) * self.scale)

def odd(input_shape, num_classes, width=16):
    return Odd(input_shape[0] * input_shape[1] * input_shape[2], num_classes, width)

def conv(input_shape, num_classes, width=8):
    return nn.Sequential(
        nn.Conv2d(input_shape[0], width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
'''

DATA = '''
import numpy as np

def images(n=192, classes=3, seed=0):
    """uint8 images (N, 1, 8, 8): a bright square whose corner is the class, in noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.integers(0, 60, size=(n, 1, 8, 8)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, 0, 2 * c : 2 * c + 3, 2 * c : 2 * c + 3] = 250
    return x[:144], y[:144].astype(np.int32), x[144:], y[144:].astype(np.int32)
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    here = tmp_path_factory.mktemp("mine")
    (here / "usr_nets.py").write_text(MODELS)
    (here / "usr_images.py").write_text(DATA)
    return here


def config(folder: Path, variant: str, model: str, **extra):
    settings = {**REGISTRY[variant].smoke, "epochs": 2, "batch_size": 16, "threads": 1,
                "dataset": "usr_images:images", "model": model, "code_dir": str(folder), **extra}  # fmt: skip
    return make_config(variant, settings)


@pytest.mark.parametrize("variant", sorted(set(REGISTRY) - {"prior_guided"}))
def test_every_variant_trains_a_model_without_batch_norm(variant, folder):
    """swa's BN pass has nothing to do, EMA averages a plain buffer, dropout is the model's own."""
    cfg = config(folder, variant, "usr_nets:odd", model_args={"width": 12})
    first, again = train(cfg), train(cfg)
    assert not first.diverged and first.test_acc is not None
    assert first.history == again.history and first.curve == again.curve  # exact on the CPU
    assert first.model == "usr_nets:odd"


def test_prior_guided_guides_the_users_conv_layers(folder, tmp_path):
    source = config(folder, "sgd", "usr_nets:conv", epochs=1)
    library, _ = fit_focus_library(source)
    library.save(tmp_path / "focus.pt")
    result = train(
        config(folder, "prior_guided", "usr_nets:conv", library=str(tmp_path / "focus.pt"))
    )
    assert not result.diverged


def test_the_users_arrays_take_the_built_in_path(folder):
    data = load_data(config(folder, "sgd", "auto").data_spec)
    assert data.shape == (1, 8, 8) and data.num_classes == 3
    assert (
        data.x_train.dtype == torch.float32 and abs(float(data.x_train.mean())) < 1e-4
    )  # normalised
    assert len(data.y_val) == round(144 * 0.1) and len(data.y_test) == 48
    other = load_data(config(folder, "sgd", "auto", data_args={"seed": 1}).data_spec)
    assert other.fingerprint != data.fingerprint  # the arguments are part of what the data is


def test_torchvision_models_take_any_channel_count():
    model = build_model("torchvision:resnet18", (1, 32, 32), 7)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert build_model("torchvision:mobilenet_v3_small", (3, 32, 32), 5)(
        torch.randn(2, 3, 32, 32)
    ).shape == (2, 5)


def test_timm_models_get_the_datas_channels_and_classes():
    pytest.importorskip("timm")
    model = build_model("timm:resnet10t", (2, 32, 32), 4, model_args={"drop_rate": 0.1})
    assert model(torch.randn(2, 2, 32, 32)).shape == (2, 4)


def test_the_gpu_memory_estimate_covers_user_models(folder):
    cfg = config(folder, "swa", "usr_nets:conv", model_args={"width": 16})
    data = load_data(cfg.data_spec)
    small = estimate(cfg, data, autocast_dtype=None, eval_batch_size=256)
    wide = estimate(config(folder, "swa", "usr_nets:conv", model_args={"width": 64}), data,
                    autocast_dtype=None, eval_batch_size=256)  # fmt: skip
    assert 0 < small.weights < wide.weights and small.averages >= small.weights
    assert wide.training_batch > small.training_batch
