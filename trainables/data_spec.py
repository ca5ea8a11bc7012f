"""Which data, where it lives and how it is split: the validated DataSpec, and the deterministic
train / validation / test split shared by the built-in sets (data.py) and the user's (user_data.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from torch import Tensor

from flatbasin.trainables import usercode
from flatbasin.trainables.strict import NoBoolNumbers

DatasetName = Literal[
    "mnist1d", "digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "image_folder",
    "synthetic",
]  # fmt: skip
BUILT_IN_NAMES: tuple[str, ...] = get_args(DatasetName)
MNIST1D_SEED = 42  # the mnist1d package's own seed: the published draw
MNIST1D_SIGNALS = 5_000  # the mnist1d package's own count: 4,000 train / 1,000 test
BUILT_IN = ("mnist1d", "digits", "synthetic")  # made or shipped locally: no data_dir, no download
GENERATED = ("mnist1d", "synthetic")  # drawn from data_seed
SYNTHETIC_IMAGES = 60_000  # CIFAR-10's count; with test_frac 1/6, its 50,000 / 10,000 split
LOADER_WORKERS = 2  # DataLoader worker processes for streamed (user Dataset) data


class DataError(ValueError):
    """The data cannot be loaded as configured (missing directory, corrupt file, wrong layout)."""


class DataSpec(NoBoolNumbers):
    """Which data, where it lives and how it is split. Hashable: it keys the per-process cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A built-in set, or the user's `module:callable` (called with **data_args; see user_data.py)
    dataset: str = "digits"
    data_args: dict[str, Any] = Field(default_factory=dict)  # the user's data callable only
    loader_workers: int = Field(LOADER_WORKERS, ge=0, le=64)  # streamed data only
    # The user's folder, where `module:callable` is looked for first (set by the driver, not by hand)
    code_dir: str | None = None
    # Callables handed in from Python (`callable:NAME`), by name: set by the driver, not by hand.
    # A data set's own entry keys the per-process cache: the same name may hold another function.
    passed: dict[str, usercode.PassedCode] = Field(default_factory=dict)
    data_dir: Path | None = None  # root for torchvision sets and image folders
    download: bool = False  # torchvision sets only, and only when asked
    image_size: int = Field(32, ge=8, le=512)  # image folders are resized to this square (and
    # synthetic images made at it)
    synthetic_images: int = Field(SYNTHETIC_IMAGES, ge=20, le=1_000_000)  # synthetic only: how many
    val_frac: float = Field(0.1, gt=0, lt=0.5)  # carved from the training data
    test_frac: float = Field(0.2, gt=0, lt=0.5)  # only for sets without their own test split
    split_seed: int = Field(0, ge=0, le=2**32 - 1)  # the same in every trial: the same split
    # The validation split alone (None: split_seed + 1, as before it existed). The test split never
    # depends on it: a confirmation draws fresh validation examples and is tested on the same ones.
    val_seed: int | None = Field(None, ge=0, le=2**32 - 1)
    # mnist1d only: how many signals are drawn (the package's 5,000 by default); 80% of them are the
    # training data (validation is carved from it), the rest the test split
    mnist1d_signals: int = Field(MNIST1D_SIGNALS, ge=100, le=1_000_000)
    data_seed: int = Field(MNIST1D_SEED, ge=0, le=2**32 - 1)  # mnist1d, synthetic: which draw

    def __hash__(self) -> int:  # data_args is a dict: hash what the spec says, in JSON
        return hash(self.model_dump_json())

    @property
    def val_split_seed(self) -> int:
        """The seed that draws the validation split from the training data."""
        return self.split_seed + 1 if self.val_seed is None else self.val_seed

    @property
    def user(self) -> bool:
        """The data comes from the user's own `module:callable`."""
        return self.dataset not in BUILT_IN_NAMES

    @field_validator("dataset")
    @classmethod
    def _dataset_form(cls, name: str) -> str:
        if name in BUILT_IN_NAMES or usercode.parse_ref(name):
            return name
        raise ValueError(
            f"unknown data set {name!r}; give a built-in one ({', '.join(BUILT_IN_NAMES)}) or "
            "your own as module:callable (mydata:load)"
        )

    @field_validator("data_args")
    @classmethod
    def _args_for_user_data(cls, args: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        dataset = info.data.get("dataset")
        if args and dataset is not None and dataset in BUILT_IN_NAMES:
            raise ValueError(
                f"data_args ({', '.join(sorted(args))}) apply to your own data set "
                f"(dataset: module:callable); '{dataset}' is built in"
            )
        return args

    @field_validator("data_seed")
    @classmethod
    def _only_for_generated_data(cls, seed: int, info: ValidationInfo) -> int:
        dataset = info.data.get("dataset")
        if seed != MNIST1D_SEED and dataset is not None and dataset not in GENERATED:
            raise ValueError(
                f"applies only to generated data ({', '.join(GENERATED)}); '{dataset}' is fixed "
                f"data, so leave data_seed at {MNIST1D_SEED}"
            )
        return seed

    @field_validator("synthetic_images")
    @classmethod
    def _only_for_synthetic(cls, count: int, info: ValidationInfo) -> int:
        dataset = info.data.get("dataset")
        if count != SYNTHETIC_IMAGES and dataset is not None and dataset != "synthetic":
            raise ValueError(
                f"applies only to the synthetic data set; '{dataset}' has the images it has, "
                f"so leave synthetic_images out"
            )
        return count

    @field_validator("mnist1d_signals")
    @classmethod
    def _only_for_mnist1d(cls, count: int, info: ValidationInfo) -> int:
        dataset = info.data.get("dataset")
        if count != MNIST1D_SIGNALS and dataset is not None and dataset != "mnist1d":
            raise ValueError(
                f"applies only to the mnist1d data set; '{dataset}' has the examples it has, "
                "so leave mnist1d_signals out"
            )
        return count

    @field_validator("data_dir", "download")
    @classmethod
    def _only_for_files(cls, value: object, info: ValidationInfo) -> object:
        dataset = info.data.get("dataset")
        if value and dataset in BUILT_IN:
            raise ValueError(
                f"'{dataset}' is built in (nothing to read or fetch), so {info.field_name} does "
                "not apply; leave it out, or set dataset to image_folder or a torchvision set"
            )
        if value is True and dataset == "image_folder":
            raise ValueError("an image folder is local files; there is nothing to download")
        return value


Split = Literal["train", "val", "test", "fit"]


def split_labels(y_train: Tensor, y_val: Tensor, y_test: Tensor, split: Split) -> Tensor:
    """A split's labels; "fit" is the first len(val) training labels (see Data.inputs)."""
    return {"train": y_train, "val": y_val, "test": y_test, "fit": y_train[: len(y_val)]}[split]


# Raw loaders' output: (train examples NCHW or NCL, uint8 or float; train labels; test examples;
# test labels), test arrays None when the set has no official test split.
Raw = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


def split_indices(n: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    cut = round(n * frac)
    return order[cut:], order[:cut]


def check_splits(spec: DataSpec, sizes: dict[str, int]) -> None:
    """Every split holds examples: an empty validation split cannot score a trial, an empty test
    split cannot report one, and a small data set cut by val_frac and test_frac can leave either."""
    empty = [name for name, n in sizes.items() if n == 0]
    if empty:
        counts = ", ".join(f"{n} {name}" for name, n in sizes.items())
        raise DataError(
            f"data set '{spec.dataset}' splits into {counts} example(s): the {' and '.join(empty)} "
            f"split{'s are' if len(empty) > 1 else ' is'} empty (val_frac {spec.val_frac:g}, "
            f"test_frac {spec.test_frac:g}); add examples or raise the fractions"
        )
