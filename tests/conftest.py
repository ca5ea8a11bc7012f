"""Shared fixtures: tiny in-memory data so that unit and contract tests run in seconds on a CPU."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from flatbasin.trainables.data import Data, DataSpec, load_data


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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback (SQLite backend, served artifacts); restartable."""
    import urllib.request

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts")]  # fmt: skip
    procs: list[subprocess.Popen] = []

    def start() -> None:
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))  # fmt: skip
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start")

    def stop() -> None:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    start()
    yield uri, start, stop
    stop()
