"""The user's own data (`dataset: module:callable`): arrays held in memory like the built-in sets, and
Datasets streamed through DataLoader workers behind the same interface, with the same numbers for
the same seed whatever the worker count, and every part of a trial working on them: the BN pass,
TTA, the generalisation gap, lr-find, the sanity checks, a resumed run."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STREAMED_TEST, STREAMED_TRAIN, DigitImages
from rich.console import Console
from torch.optim.swa_utils import update_bn
from torch.utils.data import Dataset, Subset, get_worker_info
from typer.testing import CliRunner

from flatbasin.search.cli import app
from flatbasin.search.lrfind import LrFindOptions, run_lr_find
from flatbasin.trainables import user_data
from flatbasin.trainables.config import make_config
from flatbasin.trainables.curve import accuracy
from flatbasin.trainables.data import Data, load_data, load_raw
from flatbasin.trainables.data_spec import DataSpec
from flatbasin.trainables.loop import assemble, load_deployed, predict, train
from flatbasin.trainables.sanity import TrialError, check_learns, check_model, check_trial
from flatbasin.trainables.variants import REGISTRY

CPU = torch.device("cpu")
MODULE = "userdata16"  # the user's module below, imported once per test process from its folder
SOURCE = '''
"""A user's data and model, as a test writes them."""
import os
import signal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, get_worker_info

from flatbasin.trainables.data import DataSpec, load_raw


class Digits(Dataset):
    """Digits with a random transform, as torchvision's transforms draw it."""

    def __init__(self, images, labels):
        self.images, self.labels = torch.from_numpy(images), [int(y) for y in labels]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        # The test's way to kill the trial at a known point: the first item read once the
        # checkpoint exists, which is in epoch 2 (with loader_workers 0 the trial reads it itself).
        die_when = os.environ.get("USERDATA16_DIE_WHEN")
        if die_when and os.path.exists(die_when) and get_worker_info() is None:
            os.kill(os.getpid(), signal.SIGKILL)
        x = self.images[index]
        return (x.int() + torch.randint(0, 9, x.shape)).clamp(0, 255).to(torch.uint8), self.labels[index]


def datasets(train=720, test=200):
    x, y, _, _ = load_raw(DataSpec())
    return Digits(x[:train], y[:train]), Digits(x[train : train + test], y[train : train + test])


def arrays(kind):
    """Digits (or, for "tabular", digits flattened to 64 features) as the kind of array named."""
    x, y, _, _ = load_raw(DataSpec())  # uint8 (1797, 1, 8, 8)
    x, y = x[:900], y[:900]
    if kind == "uint8":
        pass
    elif kind == "tabular":
        x = x.reshape(len(x), 64).astype(np.float64)  # float64 features: held as float32
    else:
        x = x.astype(np.float32) / np.float32(255)
    if kind == "torch":
        x, y = torch.from_numpy(x), torch.from_numpy(y)
    if kind in ("int32", "tabular"):
        y = y.astype(np.int32)
    return x[:700], y[:700], x[700:], y[700:]


def mlp(input_shape, num_classes, width=32):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), width), nn.ReLU(),
                         nn.Linear(width, num_classes))
'''


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("user")
    (folder / f"{MODULE}.py").write_text(SOURCE)
    return folder


def epoch(data, seed: int, augment: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of batches of 32 drawn by a generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [(x.clone(), y.clone()) for x, y in data.train_batches(32, generator, augment)]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )


def positions(data, split: str) -> list[int]:
    if split == "test":
        return list(range(len(data.test_set)))
    fit = data.train_index[: len(data.val_index)]
    return {"train": data.train_index, "val": data.val_index, "fit": fit}[split].tolist()


def read_directly(data, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's inputs and labels read straight from the (unjittered) Dataset, in the split's order,
    scaled as a uint8 image is: what the loaders must deliver."""
    dataset = data.test_set if split == "test" else data.train_set
    items = [dataset[i] for i in positions(data, split)]
    x = torch.stack([x for x, _ in items]).float() / 255
    return x, torch.tensor([y for _, y in items])


# ---------------------------------------------------------------------------------- streamed batches


def test_the_same_seed_gives_the_same_batches_in_a_trial_and_its_reproduction(
    streamed_small, make_streamed
):
    """A reproduction runs in a new process: new loaders, new workers, maybe another worker count.
    Its batches, including the Dataset's own random transform, are the trial's."""
    trial = [epoch(streamed_small, seed=5, augment=True) for _ in range(2)]
    again = epoch(streamed_small, seed=5, augment=True)  # the same trial's first epoch, run again
    reproduction = make_streamed(workers=2, jitter=True)
    in_the_trial_process = make_streamed(workers=0, jitter=True)

    assert len(trial[0]) == streamed_small.steps_per_epoch(32) == 20
    assert all(x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 for x, _ in trial[0])
    assert all(y.shape == (32,) and y.dtype == torch.int64 for _, y in trial[0])
    assert same_batches(trial[0], again)
    assert same_batches(trial[0], epoch(reproduction, seed=5, augment=True))
    assert same_batches(trial[0], epoch(in_the_trial_process, seed=5, augment=True))
    assert not same_batches(trial[0], epoch(streamed_small, seed=6, augment=True))


def test_an_epoch_is_whole_batches_of_the_training_split(make_streamed):
    data = make_streamed(workers=2)
    generator = torch.Generator().manual_seed(0)
    first, second = (list(data.train_batches(32, generator, augment=False)) for _ in range(2))
    images, labels = read_directly(data, "train")
    pairs = {(bytes(x.numpy()), int(y)) for x, y in zip(images, labels, strict=True)}
    for batches in (first, second):
        assert sum(len(y) for _, y in batches) == 640  # the last 8 of 648 are dropped
        assert all(
            (bytes(x.numpy()), int(y)) in pairs for b in batches for x, y in zip(*b, strict=True)
        )
        counts = torch.bincount(torch.cat([y for _, y in batches]), minlength=10)
        assert (counts <= torch.bincount(labels, minlength=10)).all()
    assert not torch.equal(first[0][0], second[0][0]), "each epoch draws a new order"


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batch_size", [7, 1024])
def test_every_split_streams_in_order_with_its_labels(make_streamed, workers, batch_size):
    data = make_streamed(workers=workers)
    for split in ("train", "val", "fit", "test"):
        x, y = read_directly(data, split)
        streamed = list(data.inputs(split, batch_size))
        assert all(len(b) <= batch_size for b in streamed)
        assert torch.equal(torch.cat(streamed), x)
        assert torch.equal(data.labels(split), y)
        assert data.size(split) == len(y)
    assert (data.size("train"), data.size("val"), data.size("test")) == (648, 72, STREAMED_TEST)
    idx = torch.tensor([3, 0, 17])
    x, y = data.examples(idx)
    assert torch.equal(y, data.y_train[idx]), "examples line up with the held labels"
    assert torch.equal(x, read_directly(data, "train")[0][idx])


class WhoReads(Dataset):
    """Each item says which worker read it (-1: the trial's own process)."""

    def __len__(self):
        return 400

    def __getitem__(self, index):
        worker = get_worker_info()
        return torch.full((1, 2), float(worker.id if worker is not None else -1)), index % 2


def test_one_evaluation_batch_is_read_by_every_worker():
    """A pass of one evaluation batch (the 360 training examples, batches of 1,024; the BN pass) is
    read by both workers, in pieces, not by one while the other waits; the batch comes out whole."""
    data = streamed(WhoReads(), WhoReads(), workers=2)
    (batch,) = list(data.inputs("train", 1024))
    assert batch.shape == (360, 1, 2)
    assert set(batch[:, 0, 0].tolist()) == {0.0, 1.0}
    data.close()


def test_train_is_bit_for_bit_repeatable_and_the_same_with_0_or_2_workers(
    streamed_small, make_streamed
):
    """swa on a BN model with dropout: the BN passes read through the loaders, and with 0 workers
    the Dataset's random transform runs in the trial's process without moving its dropout draws."""
    config = make_config(
        "swa", {**REGISTRY["swa"].smoke, "epochs": 2, "batch_size": 32, "threads": 1,
                "dropout": 0.2, "augment": True},
    )  # fmt: skip
    first = train(config, data=streamed_small)
    second = train(config, data=streamed_small)
    without_workers = train(config, data=make_streamed(workers=0, jitter=True))

    assert not first.diverged and first.score > 0.3
    for other in (second, without_workers):
        assert other.history == first.history
        assert other.curve == first.curve
        assert (other.score, other.test_acc) == (first.score, first.test_acc)
        assert other.data_fingerprint == first.data_fingerprint


# ------------------------------------------------------------------------------ parts of a trial


def test_bn_reestimation_reads_the_training_split_through_the_loader(make_streamed):
    """swa's update_bn path: the average's BN statistics are those of the training inputs."""
    data = make_streamed(workers=2)
    config = make_config("swa", {**REGISTRY["swa"].smoke, "epochs": 2, "batch_size": 32})
    model, optimizer, averager, _, order = assemble(config, data, CPU)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for x, y in data.train_batches(32, order, augment=False):  # the live statistics move
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    join = min(config.build_variant().join_steps(data.steps_per_epoch(32)))
    assert averager.update(model, join)

    expected = copy.deepcopy(averager.average)
    inputs, _ = read_directly(data, "train")
    update_bn([inputs[i : i + 1024] for i in range(0, len(inputs), 1024)], expected)
    pairs = [
        (name, buffer, dict(expected.named_buffers())[name])
        for name, buffer in averager.average.named_buffers()
        if "running" in name
    ]
    assert pairs
    for name, got, want in pairs:
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), name
    live = dict(model.named_buffers())
    assert any(
        not torch.allclose(got, live[name.removeprefix("module.")]) for name, got, _ in pairs
    ), "the average got statistics of its own, not the live model's"


def test_tta_on_streamed_images(make_streamed):
    """flip_shift views of 2-D images read from a Dataset: the same predictions as on the tensors."""
    data = make_streamed(workers=2)
    config = make_config("sgd", {"epochs": 2, "batch_size": 32, "threads": 1, "tta": "flip_shift"})
    result = train(config, data=data)
    assert not result.diverged and result.score > 0.2
    assert result.runtime and result.history[-1].gen_gap is not None

    model = assemble(config, data, CPU).model
    val, _ = read_directly(data, "val")
    for tta in ("none", "flip_shift"):
        assert torch.allclose(
            predict(model, data.inputs("val", 16), tta), predict(model, val.split(16), tta)
        )
    assert not torch.allclose(
        predict(model, data.inputs("val"), "flip_shift"), predict(model, data.inputs("val"), "none")
    )


def test_the_generalisation_gap_on_streamed_data(make_streamed, tmp_path):
    """gen_gap is the accuracy on the head of the training split minus val_acc, both scored on the
    inputs as the Dataset gives them."""
    data = make_streamed(workers=2)
    config = make_config("sgd", {"epochs": 2, "batch_size": 32, "threads": 1})
    ckpt = tmp_path / "last.pt"
    result = train(config, data=data, on_epoch=lambda metrics, save: save(ckpt))
    model = load_deployed(config, ckpt, data)  # sgd deploys the trained weights as they are

    fit_x, fit_y = read_directly(data, "fit")
    val_x, val_y = read_directly(data, "val")
    assert len(fit_y) == len(val_y) == 72
    gap = accuracy(predict(model, [fit_x]), fit_y) - accuracy(predict(model, [val_x]), val_y)
    assert result.history[-1].gen_gap == pytest.approx(gap, abs=1e-9)


def test_lr_find_on_streamed_data_through_load_data(user_folder, tmp_path):
    """`flatbasin lr-find` on a user's Datasets: more steps than an epoch holds, the last epoch left
    unfinished; a trial on the same (cached) data afterwards still gets whole epochs."""
    config = make_config(
        "sgd", {"dataset": f"{MODULE}:datasets", "code_dir": str(user_folder), "epochs": 1,
                "batch_size": 32, "threads": 1},
    )  # fmt: skip
    plot = tmp_path / "lr.png"
    try:
        found = run_lr_find(
            config,
            LrFindOptions(start=1e-4, end=1.0, steps=50, plot=plot, write=None),
            Console(file=open(os.devnull, "w"), width=120),  # noqa: SIM115
        )
        data = load_data(config.data_spec, "cpu")
        assert isinstance(data, user_data.StreamedData) and data.steps_per_epoch(32) == 20
        assert plot.is_file() and isinstance(found, bool)
        after = train(config, data=data)
        assert not after.diverged and after.history[0].train_loss is not None
    finally:
        load_data(config.data_spec, "cpu").close()
        load_data.cache_clear()


def test_sanity_checks_read_streamed_examples(streamed_small, make_streamed):
    config = make_config("sgd", {"epochs": 2, "batch_size": 32, "threads": 1})
    check_trial(config, streamed_small)
    check_model(config, streamed_small, assemble(config, streamed_small, CPU).model)
    assert check_learns(config, streamed_small) == []

    blank = make_streamed(workers=0, blank=True)
    with pytest.raises(TrialError, match="cannot fit one batch of 16"):
        check_learns(config, blank)


def test_reading_examples_leaves_the_trials_random_numbers_alone(make_streamed):
    """The sanity checks read items in the trial's process; a random transform there must not move
    the generators that draw the trial's dropout."""
    data = make_streamed(workers=0, jitter=True)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    first = data.examples(slice(0, 4))[0]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(data.examples(slice(0, 4))[0], first)
    list(data.inputs("val"))
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------------------------- the labels


def streamed(train_set, test_set, workers: int = 0):
    return user_data.streamed(
        DataSpec(dataset="tests:labels", loader_workers=workers), (train_set, test_set), "tests"
    )


@pytest.mark.parametrize("form", ["list", "numpy", "tensor"])
def test_a_dataset_with_targets_and_one_without_give_the_same_labels(form):
    x, y, _, _ = load_raw(DataSpec())
    end = STREAMED_TRAIN + STREAMED_TEST
    plain = streamed(
        DigitImages(x[:STREAMED_TRAIN], y[:STREAMED_TRAIN]),
        DigitImages(x[STREAMED_TRAIN:end], y[STREAMED_TRAIN:end]),
    )
    sets = [
        DigitImages(x[:STREAMED_TRAIN], y[:STREAMED_TRAIN], targets=True),
        DigitImages(x[STREAMED_TRAIN:end], y[STREAMED_TRAIN:end], targets=True),
    ]
    for ds in sets:
        ds.targets = {"list": list, "numpy": np.asarray, "tensor": torch.tensor}[form](ds.targets)
    with_targets = streamed(*sets)
    for split in ("train", "val", "fit", "test"):
        assert torch.equal(with_targets.labels(split), plain.labels(split))
    assert with_targets.fingerprint == plain.fingerprint
    assert with_targets.num_classes == plain.num_classes == 10


@pytest.mark.parametrize(
    "label",
    [
        np.int64,
        np.int32,
        torch.tensor,
        lambda y: torch.tensor([y]),
        lambda y: torch.tensor(y)[None],
    ],
    ids=["numpy int64", "numpy int32", "0-d tensor", "1-element tensor", "(1,) tensor"],
)
def test_labels_of_every_integer_kind_stream_as_plain_ints(make_streamed, label):
    class Labelled(DigitImages):
        def __getitem__(self, index):
            x, y = super().__getitem__(index)
            return x, label(y)

    x, y, _, _ = load_raw(DataSpec())
    end = STREAMED_TRAIN + STREAMED_TEST
    data = streamed(
        Labelled(x[:STREAMED_TRAIN], y[:STREAMED_TRAIN]),
        Labelled(x[STREAMED_TRAIN:end], y[STREAMED_TRAIN:end]),
    )
    plain = make_streamed(workers=0)
    for split in ("train", "val", "test"):
        assert torch.equal(data.labels(split), plain.labels(split))
    assert same_batches(epoch(data, seed=1), epoch(plain, seed=1))


def test_random_split_subsets_stream_as_plain_datasets(make_streamed):
    x, y, _, _ = load_raw(DataSpec())
    whole = DigitImages(x, y, jitter=True)
    end = STREAMED_TRAIN + STREAMED_TEST
    subsets = streamed(
        Subset(whole, range(STREAMED_TRAIN)), Subset(whole, range(STREAMED_TRAIN, end)), 2
    )
    plain = make_streamed(workers=0, jitter=True)
    for split in ("train", "val", "test"):
        assert torch.equal(subsets.labels(split), plain.labels(split))
    assert same_batches(epoch(subsets, seed=1), epoch(plain, seed=1))
    subsets.close()


# ---------------------------------------------------------------------------------- arrays


def array_config(user_folder, kind: str, **extra):
    return make_config(
        "sgd", {"dataset": f"{MODULE}:arrays", "data_args": {"kind": kind}, "code_dir": str(user_folder),
                "epochs": 2, "batch_size": 32, "threads": 1, **extra},
    )  # fmt: skip


def test_arrays_of_every_kind_are_held_like_the_built_in_sets(user_folder):
    """numpy float, torch, uint8 images and int32 labels: the same tensors in memory, normalised
    with the training statistics, labels int64."""
    loaded = {
        kind: load_data(array_config(user_folder, kind).data_spec, "cpu")
        for kind in ("float", "torch", "uint8", "int32")
    }
    reference = loaded["float"]
    assert isinstance(reference, Data) and reference.shape == (1, 8, 8)
    assert (len(reference.x_train), len(reference.x_val), len(reference.x_test)) == (630, 70, 200)
    mean = reference.x_train.mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(1), atol=1e-5), "normalised with training statistics"
    for kind, data in loaded.items():
        assert data.y_train.dtype == data.y_test.dtype == torch.int64, kind
        assert data.x_train.dtype == torch.float32, kind
        for name in ("x_train", "x_val", "x_test", "y_train", "y_val", "y_test"):
            assert torch.allclose(
                getattr(data, name).float(), getattr(reference, name).float(), atol=1e-5
            ), (kind, name)
    assert loaded["torch"].fingerprint != loaded["float"].fingerprint  # another data_args
    load_data.cache_clear()


def test_tabular_arrays_train_with_the_users_model(user_folder):
    config = array_config(user_folder, "tabular", model=f"{MODULE}:mlp")
    data = load_data(config.data_spec, "cpu")
    assert data.shape == (64,) and data.y_train.dtype == torch.int64
    per_feature = data.x_train.std(dim=0)
    assert torch.allclose(per_feature[per_feature > 0.5], torch.ones(1), atol=1e-4)
    result = train(config, data=data)
    assert not result.diverged and result.score > 0.5
    assert result.model == f"{MODULE}:mlp"
    load_data.cache_clear()


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ([], "model 'auto': the built-in networks take images"),
        (["--set", "model=small_cnn"], "model 'small_cnn': the built-in networks take images"),
        (
            ["--set", f"model={MODULE}:mlp", "--set", "augment=true"],
            "augment true applies to images",
        ),
        (["--set", f"model={MODULE}:mlp", "--set", "tta=flip_shift"], "tta flip_shift applies to"),
    ],
)
def test_feature_vectors_refuse_what_only_images_and_signals_have(
    user_folder, monkeypatch, settings, needle
):
    """Before: an IndexError traceback (auto, small_cnn) or 'not enough values to unpack'."""
    monkeypatch.chdir(user_folder)  # train finds the user's module in the current folder
    args = ["train", "--variant", "sgd", "--dataset", f"{MODULE}:arrays", "--epochs", "1",
            "--set", "data_args.kind=tabular", *settings]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())
    assert "(64,)" in result.output and "Traceback" not in result.output
    load_data.cache_clear()


# ---------------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_a_killed_streamed_run_resumes_through_the_cli_to_the_same_result(user_folder, tmp_path):
    """`flatbasin train --checkpoint` killed (SIGKILL) in epoch 2, then `--resume`: the same history,
    curve and accuracies as an uninterrupted run. The killed run reads with 0 workers, the others
    with 2: the worker count is how a machine runs the trial, like its threads."""
    base = [sys.executable, "-m", "flatbasin", "train", "--variant", "swa", "--dataset",
            f"{MODULE}:datasets", "--epochs", "3", "--set", "threads=1", "--set", "augment=true",
            "--set", "swa_start_frac=0.34", "--set", "dropout=0.1"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*base, *args], cwd=user_folder, env={**env, **extra}, capture_output=True, text=True,
            timeout=240,
        )  # fmt: skip

    full = run("--set", "loader_workers=2", "--json", str(tmp_path / "full.json"))
    assert full.returncode == 0, full.stderr
    ckpt = tmp_path / "c.pt"
    killed = run(
        "--set", "loader_workers=0", "--checkpoint", str(ckpt), USERDATA16_DIE_WHEN=str(ckpt)
    )
    assert killed.returncode == -9, killed.stderr  # SIGKILL: no handler ran, no clean exit
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    resumed = run(
        "--set", "loader_workers=2", "--checkpoint", str(ckpt), "--resume",
        "--json", str(tmp_path / "resumed.json"),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch   1/3" not in resumed.stdout and "epoch   2/3" in resumed.stdout

    want, got = (json.loads((tmp_path / f).read_text()) for f in ("full.json", "resumed.json"))
    drop = lambda history: [{k: v for k, v in m.items() if k != "elapsed_s"} for m in history]  # noqa: E731
    assert drop(got["history"]) == drop(want["history"])
    for key in ("score", "test_acc", "curve", "data_fingerprint"):
        assert got[key] == want[key], key
