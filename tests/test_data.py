"""The real loaders on files the tests write in the real on-disk formats; no network."""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from flatbasin.trainables.augment import flip_and_crop, random_shift
from flatbasin.trainables.data import channel_statistics, load_data
from flatbasin.trainables.data_spec import MNIST1D_SEED, DataError, DataSpec
from flatbasin.trainables.models import CNN1d, build_model


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar10(root: Path, n_train: int = 60, n_test: int = 20) -> Path:
    """A CIFAR-10 python batch directory; torchvision checks md5s, so the test registers ours."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", n_train), ("test_batch", n_test)):
        batch = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": [i % 10 for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return folder


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    folder = write_cifar10(tmp_path)
    monkeypatch.setattr(
        datasets.CIFAR10, "train_list", [["data_batch_1", md5(folder / "data_batch_1")]]
    )
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", md5(folder / "test_batch")]])
    meta = {**datasets.CIFAR10.meta, "md5": md5(folder / "batches.meta")}
    monkeypatch.setattr(datasets.CIFAR10, "meta", meta)
    load_data.cache_clear()
    return tmp_path


def test_cifar10_pickle_batches_load_through_torchvision(cifar_root):
    data = load_data(DataSpec(dataset="cifar10", data_dir=cifar_root, val_frac=0.25), "cpu")
    assert data.shape == (3, 32, 32) and data.num_classes == 10
    assert len(data.x_train) == 45 and len(data.x_val) == 15 and len(data.x_test) == 20
    # normalised with training statistics
    assert data.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-4


def test_cifar_with_wrong_checksum_is_a_clear_error(cifar_root):
    (cifar_root / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cifar10"):
        load_data(DataSpec(dataset="cifar10", data_dir=cifar_root), "cpu")


def write_mnist(root: Path, n: int) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, count in (("train", n), ("t10k", n // 2)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) % 10
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, count) + labels.tobytes()
        )


def test_mnist_idx_files_load(tmp_path):
    write_mnist(tmp_path, 40)
    data = load_data(DataSpec(dataset="mnist", data_dir=tmp_path), "cpu")
    assert data.shape == (1, 28, 28)
    assert len(data.x_test) == 20 and len(data.x_train) + len(data.x_val) == 40


def write_image_folder(root: Path, per_class: int = 6) -> None:
    rng = np.random.default_rng(2)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")


def test_image_folder_loads_and_resizes(tmp_path):
    write_image_folder(tmp_path)
    data = load_data(
        DataSpec(dataset="image_folder", data_dir=tmp_path, image_size=16, test_frac=0.25), "cpu"
    )
    assert data.shape == (3, 16, 16) and data.num_classes == 2
    assert len(data.x_train) + len(data.x_val) + len(data.x_test) == 12


@pytest.mark.parametrize(
    ("per_class", "empty"), [(1, "validation and test splits are"), (3, "validation split is")]
)
def test_a_folder_too_small_to_split_is_refused(tmp_path, per_class, empty):
    write_image_folder(tmp_path, per_class=per_class)
    with pytest.raises(DataError, match=f"the {empty} empty"):
        load_data(DataSpec(dataset="image_folder", data_dir=tmp_path, image_size=16), "cpu")


def test_truncated_jpeg_names_the_file(tmp_path):
    write_image_folder(tmp_path)
    good = tmp_path / "dog" / "ok.jpg"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8) + 99).save(good, quality=95)
    bad = tmp_path / "dog" / "broken.jpg"
    bad.write_bytes(good.read_bytes()[:200])  # truncated mid-scan
    with pytest.raises(DataError, match=r"broken\.jpg"):
        load_data(DataSpec(dataset="image_folder", data_dir=tmp_path), "cpu")


def test_image_folder_scan_skips_hidden_folders_loops_and_pipes(tmp_path):
    """A notebook's checkpoint folder is no class, a link back up the tree is visited once, a FIFO
    named like an image is listed (opening it would wait forever), and so is every bad file at once."""
    import os

    write_image_folder(tmp_path)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "cat" / "loop").symlink_to(tmp_path / "cat")  # cat/loop/loop/... forever
    (tmp_path / "dog" / "stray").symlink_to(tmp_path / "dog")
    (tmp_path / "dog" / "up").symlink_to(tmp_path)  # back to the root: cat's images are no dogs
    (tmp_path / "cat" / "dogs").symlink_to(tmp_path / "dog")  # into another class
    with pytest.raises(DataError) as caught:
        os.mkfifo(tmp_path / "dog" / "pipe.png")
        (tmp_path / "cat" / "notes.png").write_text("not an image")
        load_data(DataSpec(dataset="image_folder", data_dir=tmp_path), "cpu")
    message = str(caught.value)
    assert "2 unreadable file(s)" in message and "pipe.png" in message and "notes.png" in message
    assert "not a regular file" in message
    (tmp_path / "dog" / "pipe.png").unlink()
    (tmp_path / "cat" / "notes.png").unlink()
    data = load_data(DataSpec(dataset="image_folder", data_dir=tmp_path, image_size=8), "cpu")
    assert data.num_classes == 2  # no third class from the hidden folder
    assert len(data.x_train) + len(data.x_val) + len(data.x_test) == 12  # each image once


def test_image_folder_refuses_an_empty_class_and_bad_files_together(tmp_path):
    write_image_folder(tmp_path)
    (tmp_path / "bird").mkdir()
    (tmp_path / "bird" / "readme.txt").write_text("no images")
    (tmp_path / "cat" / "bad.png").write_text("not an image")
    with pytest.raises(
        DataError, match=r"without images: bird.*1 unreadable file\(s\): cat/bad\.png"
    ):
        load_data(DataSpec(dataset="image_folder", data_dir=tmp_path), "cpu")


def test_sixteen_bit_images_keep_their_contrast(tmp_path):
    """PIL's RGB conversion clips 16-bit values to white; they are scaled to 8 bits instead."""
    from flatbasin.trainables.image_folder import decode

    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    pixels = decode(tmp_path / "ramp.png", 16)
    assert pixels.shape == (3, 16, 16)
    assert pixels.min() == 0 and pixels.max() == 255 and 100 < pixels.mean() < 155


def test_an_image_too_large_to_decode_is_a_listed_problem(tmp_path, monkeypatch):
    write_image_folder(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 24x20 images are now "bombs"
    with pytest.raises(DataError, match="too large to decode safely"):
        load_data(DataSpec(dataset="image_folder", data_dir=tmp_path), "cpu")


def test_data_dir_for_a_built_in_set_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="built in"):
        DataSpec(dataset="digits", data_dir=Path("/somewhere"))
    with pytest.raises(ValidationError, match="built in"):
        DataSpec(dataset="mnist1d", download=True)


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(DataSpec(dataset="cifar10", data_dir=tmp_path / "nope"), "cpu")
    with pytest.raises(DataError, match="needs data_dir"):
        load_data(DataSpec(dataset="svhn"), "cpu")


def test_digits_split_is_fixed_by_split_seed():
    a = load_data(DataSpec(split_seed=0), "cpu")
    b = load_data(DataSpec(split_seed=1), "cpu")
    assert len(a.x_train) + len(a.x_val) + len(a.x_test) == 1797
    assert a.fingerprint == b.fingerprint  # same raw data
    assert not torch.equal(a.y_test, b.y_test)
    load_data.cache_clear()
    assert torch.equal(load_data(DataSpec(split_seed=0), "cpu").y_test, a.y_test)


def test_flip_and_crop_keeps_shape_and_content_range():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = flip_and_crop(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert set(out.unique().tolist()) <= set(x.unique().tolist())


# --- MNIST-1D: generated locally by the mnist1d package, 1-D signals (N, 1, 40) ----------------------


@pytest.fixture(scope="module")
def mnist1d():
    load_data.cache_clear()
    return load_data(DataSpec(dataset="mnist1d"), "cpu")


def test_mnist1d_has_the_standard_shapes_splits_and_classes(mnist1d):
    assert mnist1d.shape == (1, 40) and mnist1d.num_classes == 10
    assert len(mnist1d.x_train) == 3600 and len(mnist1d.x_val) == 400  # val_frac 0.1 of 4,000
    assert len(mnist1d.x_test) == 1000  # the official test split, untouched
    assert set(mnist1d.y_train.unique().tolist()) == set(range(10))
    # normalised over every dim but the channels, with training statistics
    assert mnist1d.x_train.mean().abs() < 1e-4 and (mnist1d.x_train.std() - 1).abs() < 1e-3


def test_mnist1d_fingerprint_follows_the_generation_parameters(mnist1d):
    state = np.random.get_state()[1].copy()
    other = load_data(DataSpec(dataset="mnist1d", data_seed=MNIST1D_SEED + 1), "cpu")
    assert np.array_equal(np.random.get_state()[1], state)  # the generator's global seeding undone
    assert other.fingerprint != mnist1d.fingerprint
    assert not torch.equal(other.x_test, mnist1d.x_test)
    load_data.cache_clear()
    again = load_data(DataSpec(dataset="mnist1d"), "cpu")
    assert again.fingerprint == mnist1d.fingerprint
    assert torch.equal(again.x_test, mnist1d.x_test)
    resplit = load_data(DataSpec(dataset="mnist1d", split_seed=1), "cpu")
    assert resplit.fingerprint == mnist1d.fingerprint  # same draw, another validation split
    assert not torch.equal(resplit.y_val, mnist1d.y_val)


@pytest.mark.parametrize("dataset", ["mnist1d", "digits"])
def test_normalised_data_is_the_same_with_1_and_2_threads(dataset):
    # torch's float32 mean and std split their sums over its threads: MNIST-1D's statistics, so
    # every input and every number trained from them, once differed in their last bits with
    # the thread count. Both thread counts in one process, the loader's cache cleared between.
    loaded = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            load_data.cache_clear()
            loaded[threads] = load_data(DataSpec(dataset=dataset), "cpu")
    finally:
        load_data.cache_clear()
    one = loaded[1]
    for other in (loaded[2], loaded[3]):
        for split in ("x_train", "x_val", "x_test"):
            assert torch.equal(getattr(one, split), getattr(other, split)), split


def test_channel_statistics_match_a_float64_reference():
    x = torch.randn(2500, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 3 + 1
    mean, std = channel_statistics(x)
    ref = x.double().transpose(0, 1).reshape(3, -1)  # blocks of 1,024 examples: three of them
    assert mean.shape == std.shape == (1, 3, 1, 1) and mean.dtype == std.dtype == torch.float32
    assert torch.allclose(mean.flatten().double(), ref.mean(1), rtol=1e-7, atol=0)
    assert torch.allclose(std.flatten().double(), ref.std(1), rtol=1e-7)


def test_data_seed_is_refused_for_fixed_data():
    with pytest.raises(
        ValueError, match=r"data_seed\n.*applies only to generated data \(mnist1d, synthetic\)"
    ):
        DataSpec(dataset="digits", data_seed=7)


def test_cnn1d_is_auto_for_signals_and_takes_them(mnist1d):
    model = build_model("auto", mnist1d.shape, mnist1d.num_classes)
    assert isinstance(model, CNN1d)
    assert model(mnist1d.x_train[:8]).shape == (8, 10)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_image_model_on_signals_is_refused_by_name(name):
    with pytest.raises(ValueError, match=rf"model '{name}' needs 2-D images.*\(1, 40\)"):
        build_model(name, (1, 40), 10)


def test_cnn1d_on_images_is_refused_by_name():
    with pytest.raises(ValueError, match=r"model 'cnn1d' needs 1-D signals.*\(1, 8, 8\)"):
        build_model("cnn1d", (1, 8, 8), 10)


def test_random_shift_keeps_shape_rolls_each_signal_and_is_seeded():
    x = torch.randn(16, 1, 40)
    out = random_shift(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for row, shifted in zip(x[:, 0], out[:, 0], strict=True):
        assert any(torch.equal(row.roll(k), shifted) for k in range(-3, 4))
    assert torch.equal(out, random_shift(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, random_shift(x, torch.Generator().manual_seed(1)))


def test_augmented_signal_batches_keep_their_shape(mnist1d):
    batches = mnist1d.train_batches(64, torch.Generator().manual_seed(0), augment=True)
    x, y = next(iter(batches))
    assert x.shape == (64, 1, 40) and y.shape == (64,)


def test_data_check_lists_every_bad_file_and_exits_2(tmp_path):
    from typer.testing import CliRunner

    from flatbasin.search.cli import app

    write_image_folder(tmp_path)
    runner = CliRunner()
    clean = runner.invoke(app, ["data", "check", str(tmp_path)])
    assert clean.exit_code == 0 and "every image decodes" in clean.output, clean.output
    for k in range(12):  # more than an error message names: the check lists them all
        (tmp_path / "cat" / f"bad{k}.jpg").write_bytes(b"\xff\xd8\xff" + bytes(k))
    (tmp_path / "fish").mkdir()
    found = runner.invoke(app, ["data", "check", str(tmp_path)])
    assert found.exit_code == 2, found.output
    assert all(f"bad{k}.jpg" in found.output for k in range(12))
    assert "empty class: fish" in found.output and "13 problem(s)" in found.output
    missing = runner.invoke(app, ["data", "check", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_notes_say_an_image_folder_is_resized_and_a_small_validation_split_is_coarse(tmp_path):
    from flatbasin.trainables.data_notes import data_notes

    for c in range(2):  # 2 classes of 25: 10 test images (test_frac 0.2), 4 of the 40 left for val
        (tmp_path / f"c{c}").mkdir()
        for i in range(25):
            Image.new("RGB", (40 + i, 20), (10 * i, 100 * c, 0)).save(
                tmp_path / f"c{c}" / f"{i}.png"
            )
    spec = DataSpec(dataset="image_folder", data_dir=tmp_path, image_size=16)
    notes = data_notes(spec, load_data(spec, "cpu"))
    assert len(notes) == 2 and notes[0].startswith(f"image folder {tmp_path}: every image is resized to 16x16")  # fmt: skip
    assert "image_size" in notes[0]
    assert "holds 4 examples, so one example moves the score (validation accuracy) by 25.0 points" in notes[1]  # fmt: skip
    digits = DataSpec()  # 144 validation examples: one is 0.7 points, no note
    assert data_notes(digits, load_data(digits, "cpu")) == []
