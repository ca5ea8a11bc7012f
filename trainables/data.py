"""Data sets as tensors on the trial's device, split deterministically into train / validation / test.

Images are (N, C, H, W), 1-D signals (MNIST-1D) are (N, C, L). Small sets fit in memory, so batches
are index slices of one tensor: no DataLoader workers, no per-batch host-to-device copies (the airbench
way). Loading happens once per worker process. Augmentation works on whole batches on the device; its
random draws come from the trial's CPU generator (checkpointed with the trial) and travel to the
device without waiting for it (augment.to_device).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flatbasin.trainables import usercode
from flatbasin.trainables.augment import flip_and_crop, random_shift, to_device
from flatbasin.trainables.data_spec import (
    DataError,
    DataSpec,
    Raw,
    Split,
    check_splits,
    split_indices,
    split_labels,
)


@dataclass(frozen=True)
class Data:
    name: str
    fingerprint: str
    num_classes: int
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """One example's shape: (channels, height, width) for images, (channels, length) for signals."""
        return tuple(self.x_train.shape[1:])

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(len(self.x_train) // batch_size, 1)

    def train_batches(
        self, batch_size: int, generator: torch.Generator, augment: bool
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One shuffled epoch; the last partial batch is dropped (batch norm needs whole batches)."""
        n = len(self.x_train)
        order = to_device(torch.randperm(n, generator=generator), self.x_train.device)
        for k in range(self.steps_per_epoch(batch_size)):
            idx = order[k * batch_size : (k + 1) * batch_size]
            x = self.x_train[idx]
            if augment:
                x = flip_and_crop(x, generator) if x.dim() == 4 else random_shift(x, generator)
            yield x, self.y_train[idx]

    def inputs(self, split: Split, batch_size: int = 1024) -> Iterator[Tensor]:
        """A split's inputs in order, in batches. "fit": the first len(val) training examples (the
        training split is a random permutation, so its head is a sample), scored like val."""
        x = {
            "train": self.x_train, "val": self.x_val, "test": self.x_test,
            "fit": self.x_train[: len(self.y_val)],
        }[split]  # fmt: skip
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size]

    def labels(self, split: Split) -> Tensor:
        return split_labels(self.y_train, self.y_val, self.y_test, split)

    def size(self, split: Split) -> int:
        return len(self.labels(split))

    def examples(self, index: slice | Tensor) -> tuple[Tensor, Tensor]:
        """Training examples by position (a slice or an index tensor), as stored: unaugmented."""
        return self.x_train[index], self.y_train[index]

    def resident_bytes(self) -> int:
        """What the data set holds on its device."""
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in _TENSORS)

    def close(self) -> None:
        """Nothing to let go: the tensors are the data."""

    def to(self, device: torch.device) -> Data:
        moved = {k: getattr(self, k).to(device) for k in _TENSORS}
        return Data(self.name, self.fingerprint, self.num_classes, **moved)


_TENSORS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


# ---------------------------------------------------------------------------------------------------
# Raw loaders: each returns a data_spec.Raw (train examples, train labels, test examples, test labels).
def mnist1d_args(spec: DataSpec) -> dict[str, object]:
    """The mnist1d package's standard generation arguments (5,000 signals of length 40, 4,000 train /
    1,000 test) with the spec's seed and count. Part of the fingerprint: another draw is another
    data set."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    del args["url"]  # where the published pickle lives; never fetched here
    return {**args, "seed": spec.data_seed, "num_samples": spec.mnist1d_signals}


def _mnist1d(spec: DataSpec) -> Raw:
    """MNIST-1D (Greydanus 2020), generated locally in about a second. make_dataset seeds numpy's and
    Python's global generators, so their states are put back afterwards."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        generated = make_dataset(ObjectView(mnist1d_args(spec)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    signals = lambda a: a[:, None, :].astype(np.float32)  # noqa: E731  (N, L) -> (N, 1, L)
    return (
        signals(generated["x"]),
        generated["y"].astype(np.int64),
        signals(generated["x_test"]),
        generated["y_test"].astype(np.int64),
    )


def _digits(spec: DataSpec) -> Raw:
    """scikit-learn's bundled 8x8 digits (1,797 images). Read straight from the CSV that ships inside
    the package: importing sklearn costs a second in every fresh worker; load_digits is the fallback."""
    spec_sklearn = importlib.util.find_spec("sklearn")
    roots = spec_sklearn.submodule_search_locations if spec_sklearn else None
    csv = Path(next(iter(roots))) / "datasets" / "data" / "digits.csv.gz" if roots else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        pixels, target = table[:, :-1], table[:, -1]
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, target = bunch.data, bunch.target
    images = (
        (pixels.reshape(-1, 1, 8, 8) * (255.0 / 16.0)).round().astype(np.uint8)
    )  # 0..16 -> 0..255
    return images, target.astype(np.int64), None, None


def _synthetic(spec: DataSpec) -> Raw:
    """CIFAR-shaped stand-in data for throughput measurements, made locally from data_seed: each of
    `synthetic_images` RGB images of image_size pixels is one of ten fixed random templates half
    drowned in per-pixel noise. Learnable, so training looks like training, but its accuracy says
    nothing about any real task. No test split of its own: test_frac carves one (1/6 gives
    CIFAR-10's 50,000 / 10,000)."""
    rng = np.random.default_rng(spec.data_seed)
    shape = (3, spec.image_size, spec.image_size)

    def random_bytes(count: int) -> np.ndarray:
        return np.frombuffer(rng.bytes(count * math.prod(shape)), np.uint8).reshape(count, *shape)

    templates = random_bytes(10)
    labels = rng.integers(0, 10, spec.synthetic_images)
    images = templates[labels] // 2 + random_bytes(spec.synthetic_images) // 2  # uint8 throughout
    return images, labels.astype(np.int64), None, None


def _root(spec: DataSpec) -> Path:
    if spec.data_dir is None:
        raise DataError(
            f"data set '{spec.dataset}' needs data_dir (a local directory holding its files)"
        )
    root = spec.data_dir.expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"data_dir {root} is a file; give the folder that holds the data")
    if not root.is_dir() and not spec.download:
        fetch = "" if spec.dataset == "image_folder" else " or set download: true to fetch them"
        raise DataError(
            f"data_dir {root} does not exist; put the '{spec.dataset}' files there{fetch}"
        )
    return root


def _torchvision(spec: DataSpec) -> Raw:
    from torchvision import datasets

    root = _root(spec)
    try:
        if spec.dataset == "svhn":
            train_set = datasets.SVHN(str(root), split="train", download=spec.download)
            test_set = datasets.SVHN(str(root), split="test", download=spec.download)
            return (
                train_set.data,
                train_set.labels.astype(np.int64),
                test_set.data,
                test_set.labels.astype(np.int64),
            )
        cls = {
            "cifar10": datasets.CIFAR10,
            "cifar100": datasets.CIFAR100,
            "mnist": datasets.MNIST,
            "fashion_mnist": datasets.FashionMNIST,
        }[spec.dataset]
        train_set = cls(str(root), train=True, download=spec.download)
        test_set = cls(str(root), train=False, download=spec.download)
    except (RuntimeError, OSError, ValueError) as err:
        raise DataError(f"cannot load '{spec.dataset}' from {root}: {err}") from err

    def arrays(ds: object) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(ds.data)  # type: ignore[attr-defined]
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(images), np.asarray(ds.targets, dtype=np.int64)  # type: ignore[attr-defined]

    return (*arrays(train_set), *arrays(test_set))


def _image_folder(spec: DataSpec) -> Raw:
    """Every image below ROOT/CLASS/, decoded and resized up front; any unreadable file, or a class
    without images, fails the whole load with the list (nothing fails mid-epoch)."""
    from flatbasin.trainables import image_folder

    root = _root(spec)
    found = image_folder.scan(root)
    if not found.classes:
        raise DataError(
            f"image folder {root}: no class folders (expected {root}/CLASS_NAME/IMAGE files)"
        )
    images = np.empty((len(found.samples), 3, spec.image_size, spec.image_size), dtype=np.uint8)
    problems = list(found.problems)
    for i, (path, _) in enumerate(found.samples):
        try:
            images[i] = image_folder.decode(path, spec.image_size)
        except ValueError as err:
            problems.append((path, str(err)))
    wrong = []  # everything at once: a user fixes the folder in one go
    if found.empty_classes:
        wrong.append(
            f"class folder(s) without images: {', '.join(found.empty_classes)} "
            f"(images end in {', '.join(image_folder.EXTENSIONS)})"
        )
    if problems:
        wrong.append(
            f"{len(problems)} unreadable file(s): {image_folder.problem_list(problems, root)}"
        )
    if wrong:
        raise DataError(
            f"image folder {root}: {'; and '.join(wrong)}. Fix or remove them; "
            f"`flatbasin data check {root}` lists them all"
        )
    labels = np.array([label for _, label in found.samples], dtype=np.int64)
    return images, labels, None, None


_LOADERS = {
    "mnist1d": _mnist1d,
    "digits": _digits,
    "image_folder": _image_folder,
    "cifar10": _torchvision,
    "cifar100": _torchvision,
    "mnist": _torchvision,
    "fashion_mnist": _torchvision,
    "svhn": _torchvision,
    "synthetic": _synthetic,
}


def _recipe(spec: DataSpec) -> bytes:
    """How a generated set was made (empty for sets read from files: their bytes say it all)."""
    if spec.dataset == "mnist1d":
        return json.dumps(mnist1d_args(spec), sort_keys=True).encode()
    return b""


def _fingerprint(recipe: bytes, *arrays: np.ndarray | None) -> str:
    digest = hashlib.sha256(recipe)
    for a in arrays:
        if a is not None:
            digest.update(np.ascontiguousarray(a).data)
    return digest.hexdigest()[:16]


def load_raw(spec: DataSpec) -> Raw:
    return _LOADERS[spec.dataset](spec)


@functools.lru_cache(maxsize=4)
def load_data(spec: DataSpec, device: str = "cpu") -> Data:
    """Load, split, normalise with training statistics, move to `device`. Cached per process.

    The user's data (`dataset: module:callable`) comes back as arrays, which take the same path as
    the built-in sets, or as Datasets, which are streamed (user_data.StreamedData: the same
    interface, read by DataLoader workers)."""
    if spec.user:
        from flatbasin.trainables import user_data

        usercode.on_path(spec.code_dir)
        result, source = user_data.call(spec)
        if user_data.is_datasets(result):
            streamed = user_data.streamed(spec, result, source)
            return streamed.to(torch.device(device))  # type: ignore[return-value]
        x, y, x_test, y_test = user_data.arrays(spec, result)
        recipe = user_data.recipe(spec, source)
    else:
        x, y, x_test, y_test = load_raw(spec)
        recipe = _recipe(spec)
    return _in_memory(spec, recipe, x, y, x_test, y_test).to(torch.device(device))


def channel_statistics(x_train: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation (float32, shaped to broadcast over `x_train`).

    Summed in float64 by numpy, whose pairwise summation runs in one thread in a fixed order: torch's
    float32 reductions split the sum over its threads, so the statistics (and every normalised
    input, and every number trained from them) differed in their last bits with the thread count.
    Two passes over fixed blocks of examples: a float64 copy of CIFAR's training split would be a
    gigabyte."""
    values = x_train.numpy()
    axes = tuple(d for d in range(values.ndim) if d != 1)  # every dim but the channels
    blocks = [values[i : i + STATS_BLOCK] for i in range(0, len(values), STATS_BLOCK)]
    count = values.size // values.shape[1]
    total = sum(b.astype(np.float64).sum(axis=axes, keepdims=True) for b in blocks)
    mean = total / count
    squares = sum(
        ((b.astype(np.float64) - mean) ** 2).sum(axis=axes, keepdims=True) for b in blocks
    )
    std = np.maximum(np.sqrt(squares / max(count - 1, 1)), 1e-6)  # unbiased, as torch.std
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32))


STATS_BLOCK = 1024  # examples per block of channel_statistics: fixed, so the order of the sums is


def _in_memory(
    spec: DataSpec,
    recipe: bytes,
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray | None,
    y_test: np.ndarray | None,
) -> Data:
    if len(x) == 0:
        raise DataError(f"data set '{spec.dataset}' is empty")
    fingerprint = _fingerprint(recipe, x, y, x_test, y_test)
    if x_test is None or y_test is None:
        keep, test = split_indices(len(x), spec.test_frac, spec.split_seed)
        x, y, x_test, y_test = x[keep], y[keep], x[test], y[test]
    train, val = split_indices(len(x), spec.val_frac, spec.val_split_seed)
    check_splits(spec, {"training": len(train), "validation": len(val), "test": len(x_test)})

    def tensor(a: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a)).float()
        return t.div_(255.0) if a.dtype == np.uint8 else t

    x_train = tensor(x[train])
    mean, std = channel_statistics(x_train)
    norm = lambda t: ((t - mean) / std).contiguous()  # noqa: E731
    num_classes = int(max(y.max(), y_test.max())) + 1
    data = Data(
        name=spec.dataset,
        fingerprint=fingerprint,
        num_classes=num_classes,
        x_train=norm(x_train),
        y_train=torch.from_numpy(y[train]),
        x_val=norm(tensor(x[val])),
        y_val=torch.from_numpy(y[val]),
        x_test=norm(tensor(x_test)),
        y_test=torch.from_numpy(np.asarray(y_test)),
    )
    return data
