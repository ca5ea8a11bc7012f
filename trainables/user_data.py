"""The user's own data set: `dataset: module:callable`, called as `load(**data_args)`, returns either

- four array-likes `(x_train, y_train, x_test, y_test)` (numpy or torch; integer labels): held in
  memory like the built-in sets (normalised, split and augmented exactly as they are); or
- two map-style `torch.utils.data.Dataset`s `(train_set, test_set)` whose items are
  `(input_tensor, integer_label)`: streamed through a DataLoader (`StreamedData`), for data that does
  not fit in memory.

Everything is checked when it is loaded (before Ray, in the driver), so a wrong return value, labels
out of range or NaN inputs end in one DataError naming the callable, not a traceback mid-epoch.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from flatbasin.trainables import usercode
from flatbasin.trainables.augment import flip_and_crop, random_shift
from flatbasin.trainables.data_spec import (
    DataError,
    DataSpec,
    Raw,
    Split,
    check_splits,
    split_indices,
    split_labels,
)

SAMPLED_ITEMS = 64  # items of a Dataset checked (and hashed into its fingerprint), evenly spaced
ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def call(spec: DataSpec) -> tuple[Any, str]:
    """The user's callable's return value, and the SHA-256 of the source it came from."""
    ref = usercode.parse_ref(spec.dataset)
    assert ref is not None  # DataSpec let only built-in names and module:callable through
    what = f"dataset {spec.dataset}"
    try:
        load = usercode.load_callable(ref, spec.code_dir, what)
        usercode.check_kwargs(load, spec.data_args, 0, f"{what}: data_args")
        result = usercode.call_user(load, what, **spec.data_args)
    except usercode.UserCodeError as err:
        raise DataError(str(err)) from None
    source = usercode.code_digest(usercode.source_files(ref.module))
    return result, source


def recipe(spec: DataSpec, source: str) -> bytes:
    """What a user data set's fingerprint starts from: its code and its arguments."""
    return json.dumps(
        {"dataset": spec.dataset, "source_sha256": source, "data_args": spec.data_args},
        sort_keys=True, default=repr,
    ).encode()  # fmt: skip


def is_datasets(result: Any) -> bool:
    return (
        isinstance(result, tuple | list)
        and len(result) == 2
        and all(isinstance(d, Dataset) for d in result)
    )


def arrays(spec: DataSpec, result: Any) -> Raw:
    """Four checked numpy arrays from the user's four array-likes."""
    what = f"dataset {spec.dataset}"
    if not isinstance(result, tuple | list) or len(result) not in (2, 4):
        raise DataError(
            f"{what} returned {_kind(result)}; return four arrays (x_train, y_train, x_test, y_test) "
            "or two torch Datasets (train_set, test_set)"
        )
    if len(result) == 2:
        kinds = ", ".join(type(r).__name__ for r in result)
        raise DataError(
            f"{what} returned two things ({kinds}), not two torch.utils.data.Dataset objects; "
            "return (train_set, test_set) Datasets, or four arrays (x_train, y_train, x_test, y_test)"
        )
    found = {}
    for name, value in zip(ARRAYS, result, strict=True):
        found[name] = _numpy(what, name, value)
    x_train, y_train, x_test, y_test = (found[n] for n in ARRAYS)
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if x.ndim < 2:
            raise DataError(
                f"{what}: x_{split} has shape {x.shape}; give one row per example, (N, ...) "
                "e.g. (N, channels, height, width) for images or (N, features)"
            )
        if len(x) != len(y):
            raise DataError(
                f"{what}: x_{split} holds {len(x)} examples but y_{split} {len(y)} labels"
            )
        if len(x) == 0:
            raise DataError(f"{what}: the {split} arrays are empty")
        _check_inputs(what, f"x_{split}", x)
        _check_labels(what, f"y_{split}", y)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{what}: training examples have shape {x_train.shape[1:]} but test examples "
            f"{x_test.shape[1:]}"
        )
    _check_classes(what, y_train, y_test)
    as_input = lambda x: x if x.dtype == np.uint8 else x.astype(np.float32)  # noqa: E731
    return as_input(x_train), y_train.astype(np.int64), as_input(x_test), y_test.astype(np.int64)


def _kind(value: Any) -> str:
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of {len(value)}"
    return usercode.a_type(value)


def _numpy(what: str, name: str, value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as err:
        raise DataError(f"{what}: {name} is not an array ({type(value).__name__}): {err}") from None
    if (
        array.dtype == object
        or np.issubdtype(array.dtype, np.complexfloating)
        or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_)
    ):
        raise DataError(
            f"{what}: {name} is not a numeric array (a {type(value).__name__} of {array.dtype}); "
            "give numpy arrays or torch tensors of numbers"
        )
    return array


def _check_inputs(what: str, name: str, x: np.ndarray) -> None:
    if x.dtype == np.bool_:
        raise DataError(f"{what}: {name} is boolean; give numbers (0/1 as floats or uint8)")
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{what}: {name} holds NaN or infinite values in {int(bad.sum())} example(s), the "
                f"first at index {first}; every trial would diverge at its first step"
            )


def _check_labels(what: str, name: str, y: np.ndarray) -> None:
    if y.ndim != 1:
        raise DataError(
            f"{what}: {name} has shape {y.shape}; give one integer class index per example, "
            "shape (N,) (not one-hot)"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        raise DataError(
            f"{what}: {name} is of type {y.dtype}; labels are integer class indices 0..K-1"
        )
    if y.min() < 0:
        raise DataError(
            f"{what}: {name} holds negative labels (the least is {int(y.min())}); labels are "
            "class indices 0..K-1"
        )


def _check_classes(what: str, y_train: Any, y_test: Any) -> int:
    """The class count K (largest label + 1); every class must have training examples."""
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    classes = int(max(y_train.max(), y_test.max())) + 1
    seen = np.unique(y_train)
    if len(seen) < classes:  # the first few missing lie below len(seen) + 11: no range of K made
        missing = np.setdiff1d(np.arange(min(classes, len(seen) + 11)), seen)[:10]
        shown = ", ".join(map(str, missing)) + (
            ", ..." if classes - len(seen) > len(missing) else ""
        )
        raise DataError(
            f"{what}: labels run 0..{classes - 1}, but class(es) {shown} have no training "
            f"example ({classes - len(seen)} of {classes}); renumber the classes 0..K-1 without gaps"
        )
    if classes < 2:
        raise DataError(f"{what}: every label is 0; a classifier needs at least 2 classes")
    return classes


# ---------------------------------------------------------------------------------------------------
# Streamed: two map-style Datasets.


def _item(what: str, dataset: Dataset, index: int) -> tuple[Tensor, int]:
    try:  # under a fixed seed: a random transform in the Dataset hashes alike in every process
        item = _Seeded(dataset).__getitems__((EVAL_SEED, [index]))[0]
    except Exception as err:
        raise DataError(
            f"{what}: item {index} cannot be read: {usercode.describe_error(err)}"
        ) from None
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise DataError(
            f"{what}: item {index} is {_kind(item)}; each item must be (input_tensor, integer_label)"
        )
    x, y = item
    if not isinstance(x, Tensor):
        if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.number):
            x = torch.from_numpy(x)
        else:
            raise DataError(
                f"{what}: item {index}'s input is a {type(x).__name__}, not a tensor (a transform "
                "such as torchvision's ToTensor makes one)"
            )
    if isinstance(y, Tensor) and y.numel() == 1 and not y.is_floating_point():
        y = int(y.item())
    if isinstance(y, np.integer):
        y = int(y)
    if not isinstance(y, int) or isinstance(y, bool):
        raise DataError(
            f"{what}: item {index}'s label is {y!r} ({type(y).__name__}); labels are integer "
            "class indices 0..K-1"
        )
    return x, y


def _sample_positions(n: int) -> list[int]:
    return sorted(
        {round(i * (n - 1) / max(SAMPLED_ITEMS - 1, 1)) for i in range(min(n, SAMPLED_ITEMS))}
    )


def _check_sample(what: str, dataset: Dataset, n: int, digest: Any) -> tuple[int, ...]:
    """A deterministic sample of items has one shape, finite inputs and integer labels; hashed."""
    shape: tuple[int, ...] | None = None
    for index in _sample_positions(n):
        x, y = _item(what, dataset, index)
        if shape is None:
            shape, first = tuple(x.shape), index
        elif tuple(x.shape) != shape:
            raise DataError(
                f"{what}: items have inconsistent shapes: item {first} is {shape}, item {index} "
                f"is {tuple(x.shape)}; every input must have one shape (resize in the Dataset)"
            )
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise DataError(f"{what}: item {index}'s input holds NaN or infinite values")
        digest.update(x.detach().cpu().contiguous().numpy().tobytes() + str(y).encode())
    assert shape is not None
    if len(shape) < 1:
        raise DataError(f"{what}: inputs are scalars; each input must be a tensor of features")
    return shape


def _labels(what: str, dataset: Dataset, n: int, workers: int) -> np.ndarray:
    """Every label: from `targets` (torchvision's convention) when the Dataset has it, else by one
    pass over the items through a DataLoader, which also finds items of another shape."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        try:
            labels = np.asarray(targets.cpu() if isinstance(targets, Tensor) else targets)
        except (TypeError, ValueError):
            labels = None
        if labels is not None and labels.shape == (n,) and np.issubdtype(labels.dtype, np.integer):
            return labels.astype(np.int64)
    found = []
    loader = DataLoader(  # its own generator: starting workers draws a seed, not from torch's
        dataset, batch_size=256, num_workers=workers, generator=torch.Generator().manual_seed(0)
    )
    try:
        for _, y in loader:
            found.append(torch.as_tensor(y).reshape(-1))
    except Exception as err:
        # A worker's error says little ("Caught RuntimeError in DataLoader worker process 0"):
        # read the items here, one by one, to name the one that fails and where.
        _find_bad_item(what, dataset, n)
        raise DataError(
            f"{what}: reading every item failed: {usercode.describe_error(err)}"
        ) from None
    labels = torch.cat(found).numpy()
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{what}: labels are of type {labels.dtype}; labels are integer class indices"
        )
    return labels.astype(np.int64)


def _find_bad_item(what: str, dataset: Dataset, n: int) -> None:
    """DataError naming the first item that cannot be read, or whose input has another shape than
    the first's; nothing when every item is fine."""
    shape = None
    for index in range(n):
        x, _ = _item(what, dataset, index)
        if shape is None:
            shape = tuple(x.shape)
        elif tuple(x.shape) != shape:
            raise DataError(
                f"{what}: items have inconsistent shapes: item 0 is {shape}, item {index} is "
                f"{tuple(x.shape)}; every input must have one shape (resize in the Dataset)"
            )


def streamed(spec: DataSpec, result: Sequence[Dataset], source: str) -> StreamedData:
    """Checked, split and fingerprinted Datasets; the validation split is carved from the training
    set by val_seed (or split_seed), as for the built-in sets."""
    train_set, test_set = result
    what = f"dataset {spec.dataset}"
    digest = hashlib.sha256(recipe(spec, source))
    sizes = {}
    for name, ds in (("training", train_set), ("test", test_set)):
        try:
            sizes[name] = len(ds)  # type: ignore[arg-type]
        except TypeError:
            raise DataError(
                f"{what}: the {name} Dataset has no len(); give map-style Datasets "
                "(with __getitem__ and __len__)"
            ) from None
        if sizes[name] == 0:
            raise DataError(f"{what}: the {name} Dataset is empty")
    shape = _check_sample(f"{what} (training set)", train_set, sizes["training"], digest)
    test_shape = _check_sample(f"{what} (test set)", test_set, sizes["test"], digest)
    if test_shape != shape:
        raise DataError(f"{what}: training inputs have shape {shape} but test inputs {test_shape}")
    y_all = _labels(f"{what} (training set)", train_set, sizes["training"], spec.loader_workers)
    y_test = _labels(f"{what} (test set)", test_set, sizes["test"], spec.loader_workers)
    for name, y in (("training", y_all), ("test", y_test)):
        _check_labels(what, f"the {name} labels", y)
    classes = _check_classes(what, y_all, y_test)
    digest.update(y_all.tobytes() + y_test.tobytes() + f"{sizes}".encode())
    train, val = split_indices(len(y_all), spec.val_frac, spec.val_split_seed)
    check_splits(spec, {"training": len(train), "validation": len(val), "test": len(y_test)})
    return StreamedData(
        name=spec.dataset,
        fingerprint=digest.hexdigest()[:16],
        num_classes=classes,
        shape=shape,
        train_set=train_set,
        test_set=test_set,
        train_index=torch.from_numpy(train),
        val_index=torch.from_numpy(val),
        y_train=torch.from_numpy(y_all[train]),
        y_val=torch.from_numpy(y_all[val]),
        y_test=torch.from_numpy(y_test),
        workers=spec.loader_workers,
    )


# A batch as the loaders' batch samplers hand it to the workers: the seed that the user's Dataset
# draws its random transforms from while it reads this batch, and the items' indices.
Batch = tuple[int, list[int]]
EVAL_SEED = 0  # evaluation read k is under seed EVAL_SEED + k: every pass sees the same inputs
READ_ITEMS = 64  # items one worker reads per request in an evaluation pass


class _Passes(Sampler[Batch]):
    """The batches of the pass about to run, set before each pass: a DataLoader with persistent
    workers asks its batch sampler again at every pass, so the order stays the trial's own (drawn
    from its generator, as for data in memory) without new worker processes per epoch."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Seeded(Dataset):
    """The user's Dataset, read one batch at a time under that batch's seed (torch's, numpy's and
    Python's global generators, which torchvision's random transforms and most hand-written ones
    draw from). So what a random transform draws depends on the trial's seed, the epoch and the
    batch only, not on which worker reads the batch, how many workers there are, or whether they
    were started afresh by a resumed trial. In the trial's own process (loader_workers 0) the
    generators are put back afterwards: the trial's dropout draws stay its own."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, batch: Batch) -> list[Any]:
        seed, indices = batch
        if get_worker_info() is not None:  # a worker's generators are its own
            return self._read(seed, indices)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                return self._read(seed, indices)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def _read(self, seed: int, indices: list[int]) -> list[Any]:
        torch.default_generator.manual_seed(seed)  # the CPU one: a GPU trial's draws are its own
        random.seed(seed)
        np.random.seed(seed % 2**32)
        many = getattr(self.dataset, "__getitems__", None)  # a Dataset that reads batches itself
        return list(many(indices)) if many else [self.dataset[i] for i in indices]


def _collate(items: list[Any]) -> tuple[Tensor, Tensor]:
    """Inputs stacked as default_collate does; labels (ints, numpy or one-element tensors) as one
    vector of class indices."""
    x, y = default_collate(items)
    return x, torch.as_tensor(y).reshape(-1).long()


class StreamedData:
    """The same interface as data.Data, with inputs read by DataLoader workers instead of held as
    tensors. Labels are held (they decide the split and score every evaluation); inputs are not.

    Three loaders, each with persistent workers: one for training batches, one for evaluation
    passes over the training set (validation, the "fit" sample, the BN pass) and one for the test
    set. Training needs its own: a member joining mid-epoch is scored while the epoch's loader is
    still running."""

    def __init__(
        self,
        *,
        name: str,
        fingerprint: str,
        num_classes: int,
        shape: tuple[int, ...],
        train_set: Dataset,
        test_set: Dataset,
        train_index: Tensor,
        val_index: Tensor,
        y_train: Tensor,
        y_val: Tensor,
        y_test: Tensor,
        workers: int,
        device: torch.device | None = None,
    ):
        self.name, self.fingerprint, self.num_classes = name, fingerprint, num_classes
        self.shape = shape
        self.train_set, self.test_set = train_set, test_set
        self.train_index, self.val_index = train_index, val_index
        self.workers = workers
        self.device = device or torch.device("cpu")
        self.y_train, self.y_val, self.y_test = (
            t.to(self.device) for t in (y_train, y_val, y_test)
        )
        self._loaders: dict[str, tuple[DataLoader, _Passes]] = {}

    # -- what data.Data offers ------------------------------------------------------------------
    def steps_per_epoch(self, batch_size: int) -> int:
        return max(len(self.train_index) // batch_size, 1)

    def train_batches(
        self, batch_size: int, generator: torch.Generator, augment: bool
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One shuffled epoch in the order the trial's generator draws (as for data in memory), and
        the seed the Dataset's own random transforms read this epoch under, from the same generator;
        the last partial batch is dropped."""
        order = self.train_index[torch.randperm(len(self.train_index), generator=generator)]
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        steps = self.steps_per_epoch(batch_size)
        batches = [order[k * batch_size : (k + 1) * batch_size].tolist() for k in range(steps)]
        seeded = [(seed + k, batch) for k, batch in enumerate(batches)]
        for x, y in self._pass("train", self.train_set, seeded):
            if augment:
                x = flip_and_crop(x, generator) if x.dim() == 4 else random_shift(x, generator)
            yield x, y

    def inputs(self, split: Split, batch_size: int = 1024) -> Iterator[Tensor]:
        """A split's inputs in order, in batches (see data.Data.inputs). The workers read them in
        pieces of READ_ITEMS, all workers at once, joined here into batches of `batch_size`: a
        whole pass is often one or two evaluation batches, which one worker alone would read while
        the others wait."""
        index = self._index(split)
        reads = [
            (EVAL_SEED + k, index[start : start + READ_ITEMS])
            for k, start in enumerate(range(0, len(index), READ_ITEMS))
        ]
        key, dataset = ("test", self.test_set) if split == "test" else ("eval", self.train_set)
        pending: list[Tensor] = []
        held = 0
        for x, _y in self._pass(key, dataset, reads):
            pending.append(x)
            held += len(x)
            while held >= batch_size:
                joined = torch.cat(pending)
                yield joined[:batch_size]
                pending, held = [joined[batch_size:]], held - batch_size
        if held:
            yield torch.cat(pending)

    def labels(self, split: Split) -> Tensor:
        return split_labels(self.y_train, self.y_val, self.y_test, split)

    def size(self, split: Split) -> int:
        return len(self.labels(split))

    def examples(self, index: slice | Tensor) -> tuple[Tensor, Tensor]:
        """Training examples by position, read in this process under the evaluation seed."""
        positions = self.train_index[index].reshape(-1).tolist()
        x, y = _collate(_Seeded(self.train_set).__getitems__((EVAL_SEED, positions)))
        return self._input(x), y.to(self.device)

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.y_train, self.y_val, self.y_test))

    def to(self, device: torch.device) -> StreamedData:
        moved = StreamedData(
            name=self.name, fingerprint=self.fingerprint, num_classes=self.num_classes,
            shape=self.shape, train_set=self.train_set, test_set=self.test_set,
            train_index=self.train_index, val_index=self.val_index, y_train=self.y_train,
            y_val=self.y_val, y_test=self.y_test, workers=self.workers, device=device,
        )  # fmt: skip
        return moved

    def close(self) -> None:
        """Stop the loaders' worker processes."""
        for loader, _ in self._loaders.values():
            workers = getattr(loader, "_iterator", None)
            if workers is not None and hasattr(workers, "_shutdown_workers"):
                workers._shutdown_workers()
        self._loaders.clear()

    # -- inside ---------------------------------------------------------------------------------
    def _index(self, split: Split) -> list[int]:
        if split == "test":
            return list(range(len(self.y_test)))
        return {
            "train": self.train_index, "val": self.val_index,
            "fit": self.train_index[: len(self.val_index)],
        }[split].tolist()  # fmt: skip

    def _pass(
        self, key: str, dataset: Dataset, batches: list[Batch]
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass of `key`'s loader over `batches`, inputs and labels on the device."""
        if key not in self._loaders:
            passes = _Passes()
            loader = DataLoader(
                _Seeded(dataset),
                # (seed, indices) batches, which _Seeded.__getitems__ reads: torch passes whatever
                # the batch sampler yields, though its annotation says lists of indices.
                batch_sampler=passes,  # type: ignore[arg-type]
                collate_fn=_collate,
                num_workers=self.workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.workers > 0,
                # The loader draws its workers' base seed from this generator when it starts them
                # (from torch's global one, the trial's dropout draws, without it). Each batch is
                # read under its own seed, so the value does not matter.
                generator=torch.Generator().manual_seed(0),
            )
            self._loaders[key] = (loader, passes)
        loader, passes = self._loaders[key]
        passes.batches = batches
        for x, y in loader:
            yield self._input(x), y.to(self.device, non_blocking=True)

    def _input(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
