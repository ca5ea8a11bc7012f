"""Shared fixtures: tiny in-memory data so that unit and contract tests run in seconds on a CPU."""

from __future__ import annotations

import pytest
import torch

from trainables.data import Data, DataSpec, load_data


@pytest.fixture(scope="session")
def digits() -> Data:
    return load_data(DataSpec(), "cpu")


@pytest.fixture(scope="session")
def small(digits: Data) -> Data:
    """640 training images: 20 steps of 32 per epoch, enough for batch norm statistics to settle."""
    return Data(
        name="digits-small",
        fingerprint=digits.fingerprint,
        num_classes=digits.num_classes,
        x_train=digits.x_train[:640],
        y_train=digits.y_train[:640],
        x_val=digits.x_val,
        y_val=digits.y_val,
        x_test=digits.x_test,
        y_test=digits.y_test,
    )


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
