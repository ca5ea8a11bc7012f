"""Bad input of every kind through the real CLI: one clear paragraph naming what is wrong, exit status 2,
no traceback, no Ray started, no MLflow run created, no folder made.

Table-driven: each case is a space file (or none), the command's arguments and a text the message must
contain. Every case fails before Ray starts, so the whole table runs in seconds, in process.
"""

from __future__ import annotations

import base64
import http.server
import json
import math
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from flatbasin.search.cli import app
from flatbasin.trainables import sanity

runner = CliRunner()

GOOD = """
epochs: 2
variants:
  sgd: {lr: {loguniform: [0.02, 0.1]}}
"""


@dataclass(frozen=True)
class Case:
    space: str | bytes | None  # the space file's content; None: no file (args name the space)
    args: tuple[str, ...]
    needle: str  # the message must contain this (the offending file, key or option, and why)
    env: dict[str, str] = field(default_factory=dict)


def folder_space(kind: str, model: str = "small_cnn", batch: int = 2) -> str:
    return (
        f"epochs: 1\ndataset: image_folder\nmodel: {model}\n"
        f"fixed: {{data_dir: '{{images}}/{kind}', image_size: 16, batch_size: {batch}, val_frac: 0.2}}\n"
        "variants:\n  sgd: {}\n"
    )


# 15 keys of one variant, each a choice of two: 32,768 combinations, more than a space check tries.
MANY = [
    ("lr", 0.01, 0.02), ("momentum", 0.8, 0.9), ("weight_decay", 0, 0.001), ("dropout", 0, 0.1),
    ("batch_size", 16, 32), ("seed", 0, 1), ("augment", "false", "true"), ("optimizer", "sgd", "nesterov"),
    ("init", "default", "kaiming"), ("swa_lr", 0.001, 0.002), ("swa_lr_max", 0.03, 0.04),
    ("swa_every", 1, 2), ("swa_start_frac", 0.5, 0.6), ("threads", 1, 2), ("image_size", 8, 16),
]  # fmt: skip


# 335 bytes that expand, through anchors and aliases, into a million numbers: the message stays short.
_NEST = "&l0 [" + ",".join(["0.1"] * 10) + "]"
for _k in range(1, 7):
    _NEST = f"&l{_k} [{_NEST}," + ",".join([f"*l{_k - 1}"] * 9) + "]"
BOMB = "variants:\n  sgd:\n    lr: {choice: [" + _NEST + "]}\n"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SEARCH: dict[str, Case] = {
    # ---- the space file itself
    "not utf-8": Case(b"epochs: 2\nname: caf\xe9\nvariants: {sgd: {}}\n", (), "not UTF-8"),
    "duplicate top-level key": Case(
        "epochs: 2\nepochs: 3\nvariants: {sgd: {}}\n", (), "'epochs' appears twice"
    ),
    "duplicate variant key": Case(
        "variants:\n  sgd: {lr: 0.1, lr: 0.2}\n", (), "'lr' appears twice"
    ),
    "yaml syntax": Case("variants: [sgd: {\n", (), "YAML syntax error"),
    "empty file": Case("", (), "expected a mapping"),
    "a list": Case("- sgd\n- swa\n", (), "expected a mapping"),
    "unknown top-level key": Case("epoch: 2\nvariants: {sgd: {}}\n", (), "epoch"),
    "no variants": Case("epochs: 2\nvariants: {}\n", (), "variants"),
    "unknown variant": Case("variants: {adam_magic: {}}\n", (), "variants.adam_magic"),
    "unknown parameter": Case(
        "variants:\n  swa: {swa_lrr: {loguniform: [0.01, 0.1]}}\n", (), "variants.swa.swa_lrr"
    ),
    "low above high": Case(
        "variants:\n  swa: {swa_lr: {uniform: [0.1, 0.01]}}\n", (), "low (0.1) is above high"
    ),
    "non-positive lr": Case(
        "variants:\n  sgd: {lr: {uniform: [0.0, 0.1]}}\n", (), "variants.sgd.lr"
    ),
    "negative fixed lr": Case("variants:\n  sgd: {lr: -0.1}\n", (), "variants.sgd.lr"),
    "zero cycles": Case("variants:\n  snapshot: {cycles: {int: [0, 3]}}\n", (), "cycles"),
    "budget too short": Case(
        "epochs: 4\nvariants:\n  snapshot: {cycles: {int: [2, 6]}}\n", (), "cycles=6 does not fit"
    ),
    "loguniform at zero": Case(
        "variants:\n  sgd: {weight_decay: {loguniform: [0, 0.1]}}\n", (), "loguniform needs low > 0"
    ),
    "nan in a range": Case(
        "variants:\n  sgd: {lr: {uniform: [.nan, 0.1]}}\n", (), "finite numbers"
    ),
    "int range of floats": Case(
        "variants:\n  snapshot: {cycles: {int: [1.5, 3]}}\n", (), "int takes two integers"
    ),
    "empty choice": Case(
        "variants:\n  sgd: {optimizer: {choice: []}}\n", (), "choice takes a list"
    ),
    "unknown choice": Case(
        "variants:\n  sgd: {optimizer: {choice: [sgd, lbfgs]}}\n", (), "optimizer"
    ),
    "unknown distribution": Case(
        "variants:\n  sgd: {lr: {normal: [0.1, 0.2]}}\n", (), "unknown distribution 'normal'"
    ),
    "samples zero": Case("samples: 0\nvariants: {sgd: {}}\n", (), "samples"),
    "negative epochs": Case("epochs: -1\nvariants: {sgd: {}}\n", (), "epochs"),
    "bad name in the file": Case("name: a/b\nvariants: {sgd: {}}\n", (), "'a/b'"),
    "markup in a value": Case("variants:\n  sgd: {optimizer: '[/x] [bold]'}\n", (), "[/x] [bold]"),
    "markup in an unknown key": Case("variants:\n  sgd: {'[/k]': 1}\n", (), "[/k]"),
    "unknown dataset": Case("dataset: imagenet22k\nvariants: {sgd: {}}\n", (), "dataset"),
    "unknown fixed setting": Case("fixed: {bogus: 1}\nvariants: {sgd: {}}\n", (), "fixed.bogus"),
    "missing space file": Case(None, ("does-not-exist.yaml",), "does-not-exist.yaml"),
    "space is a folder": Case(None, (".",), "no such space file"),
    # ---- data and model, checked on the driver before Ray starts
    "batch larger than the split": Case(
        "fixed: {batch_size: 5000}\nvariants: {sgd: {}}\n", (), "batch_size 5000"
    ),
    "model too big for the input": Case("model: resnet18\nvariants: {sgd: {}}\n", (), "resnet18"),
    "cifar without data_dir": Case("dataset: cifar10\nvariants: {sgd: {}}\n", (), "data_dir"),
    "missing data directory": Case(
        "dataset: cifar10\nfixed: {data_dir: /nonexistent/cifar-x}\nvariants: {sgd: {}}\n",
        (),
        "/nonexistent/cifar-x",
    ),
    "cifar folder without the files": Case(
        "dataset: cifar10\nfixed: {data_dir: '{images}/empty'}\nvariants: {sgd: {}}\n",
        (),
        "cifar10",
    ),
    "truncated jpeg": Case(folder_space("truncated"), (), "broken.jpg"),
    "text file named png": Case(folder_space("text_png"), (), "fake.png"),
    "empty image folder": Case(folder_space("empty"), (), "empty"),
    "empty class folders": Case(folder_space("empty_classes"), (), "empty_classes"),
    "one class": Case(folder_space("one_class"), (), "1 class"),
    "batch larger than an image folder": Case(folder_space("good", batch=64), (), "batch_size 64"),
    "cuda without cuda": Case("fixed: {device: cuda}\nvariants: {sgd: {}}\n", (), "cuda"),
    "cuda in one variant": Case("variants: {sgd: {}, swa: {device: cuda}}\n", (), "device: cuda"),
    "cuda as a searched choice": Case(
        "variants: {sgd: {device: {choice: [cpu, cuda]}}}\n", (), "device: cuda"
    ),
    "a pipe named like an image": Case(folder_space("pipe"), (), "pipe.png: not a regular file"),
    # ---- a model that cannot learn its data: one small batch it cannot memorise (sanity.check_learns)
    "images that are all the same": Case(folder_space("identical"), (), "cannot fit one batch"),
    "data_dir for a built-in set": Case(
        "fixed: {data_dir: /tmp}\nvariants: {sgd: {}}\n", (), "'digits' is built in"
    ),
    # ---- values of the wrong kind, and ranges that break a rule between settings
    "yes for a number": Case("variants: {sgd: {lr: true}}\n", (), "lr takes a number"),
    "yes in a range": Case(
        "variants: {sgd: {momentum: {uniform: [true, 0.9]}}}\n", (), "two numbers"
    ),
    "epochs per variant": Case(
        "variants: {sgd: {epochs: {int: [2, 5]}}}\n", (), "epochs is shared by every trial"
    ),
    "tta per variant": Case(
        "variants: {sgd: {}, swa: {tta: flip_shift}}\n", (), "tta is shared by every trial"
    ),
    "unknown tta": Case("fixed: {tta: mirror}\nvariants: {sgd: {}}\n", (), "should be 'none' or"),
    "data set per variant": Case(
        "variants: {sgd: {}, swa: {dataset: mnist1d}}\n", (), "variants.swa.dataset"
    ),
    "lr_min above lr": Case(
        "variants: {sgd: {lr: {loguniform: [1e-3, 0.1]}, lr_min: 0.01}}\n",
        (),
        "lr_min (0.01) is above lr",
    ),
    "milestones out of order": Case(
        "variants: {sgd: {schedule: step, step_milestones: [0.8, 0.5]}}\n", (), "increasing"
    ),
    "too many searched keys": Case(
        "variants:\n  swa:\n"
        + "".join(f"    {key}: {{choice: [{a}, {b}]}}\n" for key, a, b in MANY),
        (),
        "too many to check",
    ),
    # ---- options
    "storage is a file": Case(GOOD, ("--storage", "{space}"), "--storage"),
    "storage under a file": Case(GOOD, ("--storage", "{space}/runs"), "is a file"),
    "name with a slash": Case(GOOD, ("--name", "a/b"), "--name"),
    "name with markup": Case(GOOD, ("--name", "[/x]"), "'[/x]'"),
    "resume of nothing": Case(GOOD, ("--resume",), "no search to resume"),
    "resume with settings Tune keeps": Case(
        GOOD,
        ("--resume", "--samples", "4", "--scheduler", "asha"),
        "--samples, --scheduler would not apply; leave them out",
    ),
    "too many cpus": Case(GOOD, ("--cpus-per-trial", "4096"), "--cpus-per-trial 4096"),
    "gpus without gpus": Case(GOOD, ("--gpus-per-trial", "1"), "--gpus-per-trial 1"),
    "gpu share that wastes a gpu": Case(
        GOOD, ("--gpus-per-trial", "0.3"), "--gpus-per-trial: 0.3 does not divide a GPU"
    ),
    "gpus above one, not whole": Case(
        GOOD, ("--gpus-per-trial", "1.5"), "1.5 is more than one GPU but not a whole number"
    ),
    "channels_last on signals": Case(
        "dataset: mnist1d\nfixed: {channels_last: true}\nvariants: {sgd: {}}\n",
        (),
        "channels_last applies to images",
    ),
    "synthetic_images on fixed data": Case(
        "fixed: {synthetic_images: 100}\nvariants: {sgd: {}}\n",
        (),
        "synthetic_images",
    ),
    "zero concurrency": Case(GOOD, ("--concurrency", "0"), "--concurrency"),
    "unknown scheduler": Case(GOOD, ("--scheduler", "hyperband"), "--scheduler"),
    "negative time budget": Case(GOOD, ("--time-budget", "-5"), "'--time-budget'"),
    "zero samples": Case(GOOD, ("--samples", "0"), "--samples"),
    "address nobody answers": Case(
        GOOD, ("--address", "127.0.0.9:{port}"), "no Ray cluster answers at 127.0.0.9"
    ),
    "RAY_ADDRESS nobody answers": Case(
        GOOD, (), "$RAY_ADDRESS 127.0.0.9", env={"RAY_ADDRESS": "127.0.0.9:{port}"}
    ),
    "address is a dashboard": Case(GOOD, ("--address", "http://127.0.0.1:8265"), "dashboard"),
    "address without a port": Case(GOOD, ("--address", "127.0.0.9"), "HOST:PORT"),
    "address auto without a cluster": Case(
        GOOD, ("--address", "auto"), "no Ray cluster was started"
    ),
    "tracking server down": Case(
        GOOD, ("--tracking-uri", "http://127.0.0.1:{port}"), "http://127.0.0.1:{port}"
    ),
    "tracking uri of no known scheme": Case(GOOD, ("--tracking-uri", "htp:/x"), "htp:/x"),
    "tracking uri of a scheme MLflow lacks": Case(
        GOOD, ("--tracking-uri", "bogus://x"), "MLflow has no tracking store for 'bogus://'"
    ),
    "sqlite in a folder that takes no file": Case(
        GOOD, ("--tracking-uri", "sqlite:////proc/mlflow.db"), "the folder /proc is not writable"
    ),
    "sqlite in a missing folder": Case(
        GOOD, ("--tracking-uri", "sqlite:///{space}/mlflow.db"), "space.yaml/mlflow.db"
    ),
    "sqlite uri naming a folder": Case(
        GOOD, ("--tracking-uri", "sqlite:///{images}"), "is a folder"
    ),
    "sqlite uri naming a text file": Case(
        GOOD, ("--tracking-uri", "sqlite:///{space}"), "is not a SQLite database"
    ),
    "a server that answers everything with {}": Case(
        GOOD, ("--tracking-uri", "http://127.0.0.1:{empty}"), "not an MLflow tracking server"
    ),
    "storage where no folder can be made": Case(
        GOOD, ("--storage", "/proc/flatbasin-runs"), "cannot create a folder in /proc"
    ),
    "yes for the budget": Case("epochs: true\nvariants: {sgd: {}}\n", (), "epochs takes a number"),
    "a seed beyond 32 bits": Case(
        "fixed: {seed: 18446744073709551616}\nvariants: {sgd: {}}\n", (), "seed"
    ),
    "a negative split seed": Case(
        "fixed: {split_seed: -1}\nvariants: {sgd: {}}\n", (), "split_seed"
    ),
    "a negative validation seed": Case(
        "fixed: {val_seed: -1}\nvariants: {sgd: {}}\n", (), "val_seed"
    ),
    "a validation seed per variant": Case(
        "variants: {sgd: {val_seed: 3}}\n", (), "val_seed is shared by every trial of a search"
    ),
    "mnist1d_signals on fixed data": Case(
        "fixed: {mnist1d_signals: 2000}\nvariants: {sgd: {}}\n",
        (),
        "applies only to the mnist1d data set",
    ),
    "too few mnist1d signals": Case(
        "dataset: mnist1d\nfixed: {mnist1d_signals: 10}\nvariants: {sgd: {}}\n",
        (),
        "mnist1d_signals",
    ),
    "a value that YAML aliases blow up": Case(BOMB, (), "Input should be a valid number"),
    # ---- a share of a CPU: Ray's rules, as for a GPU's share, checked before Ray starts
    "cpus below Ray's smallest step": Case(
        GOOD,
        ("--cpus-per-trial", "0.00001"),
        "'--cpus-per-trial': Input should be greater than or equal to 0.0001",
    ),
    "a cpu share that wastes a cpu": Case(
        GOOD,
        ("--cpus-per-trial", "0.3"),
        "--cpus-per-trial: 0.3 does not divide a CPU into whole trials",
    ),
    "a cpu share Ray cannot fit": Case(
        GOOD, ("--cpus-per-trial", "0.3334"), "Ray would fit 2 trial(s) on a CPU"
    ),
    "cpus above one, not whole": Case(
        GOOD, ("--cpus-per-trial", "1.5"), "1.5 is more than one CPU but not a whole number"
    ),
    "cpus not a number": Case(GOOD, ("--cpus-per-trial", "nan"), "'--cpus-per-trial'"),
    "cpus infinite": Case(GOOD, ("--cpus-per-trial", "inf"), "'--cpus-per-trial'"),
    # ---- numbers out of their stated range, refused as the command line is read
    "a seed beyond numpy's": Case(
        GOOD, ("--seed", "4294967296"), "'--seed': Input should be less than or equal to 4294967295"
    ),
    "a negative seed": Case(GOOD, ("--seed", "-1"), "'--seed'"),
    "a time budget of half a second": Case(GOOD, ("--time-budget", "0.5"), "'--time-budget'"),
    "a time budget of nan": Case(GOOD, ("--time-budget", "nan"), "'--time-budget'"),
    "a checkpoint interval of inf": Case(
        GOOD, ("--checkpoint-interval", "inf"), "'--checkpoint-interval'"
    ),
    "checkpoints every 0 epochs": Case(GOOD, ("--checkpoint-every", "0"), "'--checkpoint-every'"),
    "too many retries": Case(GOOD, ("--max-failures", "1000"), "'--max-failures'"),
    "too many confirmation seeds": Case(GOOD, ("--confirm-seeds", "101"), "'--confirm-seeds'"),
    "a word for a number": Case(
        GOOD, ("--samples", "many"), "'--samples': Input should be a valid integer"
    ),
    # ---- malformed tracking URIs, whichever way given: named before anything starts
    "in-memory sqlite": Case(
        GOOD, ("--tracking-uri", "sqlite://"), "sqlite://: an in-memory SQLite database"
    ),
    "in-memory sqlite from the environment": Case(
        GOOD,
        (),
        "$MLFLOW_TRACKING_URI sqlite://: an in-memory SQLite database",
        env={"MLFLOW_TRACKING_URI": "sqlite://"},
    ),
    "in-memory sqlite with options": Case(
        GOOD, ("--tracking-uri", "sqlite://?cache=shared"), "an in-memory SQLite database"
    ),
    "sqlite without slashes": Case(GOOD, ("--tracking-uri", "sqlite:"), "too few slashes"),
    "sqlite with one slash": Case(GOOD, ("--tracking-uri", "sqlite:/x.db"), "too few slashes"),
    "sqlite with a host": Case(
        GOOD, ("--tracking-uri", "sqlite://host/x.db"), "with a host (host)"
    ),
    "sqlite naming no file": Case(
        GOOD, ("--tracking-uri", "sqlite:///"), "sqlite:///: names no file"
    ),
    "sqlite naming the root folder": Case(
        GOOD, ("--tracking-uri", "sqlite:////"), "names a folder"
    ),
    "sqlite naming a folder by its slash": Case(
        GOOD, ("--tracking-uri", "sqlite:///{images}/"), "ends in '/'"
    ),
    "a server without a host": Case(
        GOOD, ("--tracking-uri", "http://"), "http://: names no server host"
    ),
    "a secure server without a host": Case(
        GOOD, ("--tracking-uri", "https://"), "names no server host"
    ),
    "a server with a port only": Case(
        GOOD, ("--tracking-uri", "http://:5000"), "names no server host"
    ),
    "a server with one slash": Case(
        GOOD, ("--tracking-uri", "http:/127.0.0.1:5000"), "names no server host"
    ),
    "a server's port that is no number": Case(
        GOOD, ("--tracking-uri", "http://127.0.0.1:notaport"), "'notaport'"
    ),
    "a server's port out of range": Case(
        GOOD, ("--tracking-uri", "http://127.0.0.1:99999"), "Port out of range"
    ),
    "a server's port 0": Case(GOOD, ("--tracking-uri", "http://127.0.0.1:0"), "port 0"),
    "no password shown in a malformed uri": Case(
        GOOD,
        ("--tracking-uri", "http://alice:hunter2@:5000"),
        "--tracking-uri http://:5000: names no server host",
    ),
    "a file store MLflow refuses": Case(
        GOOD, ("--tracking-uri", "file:///{images}/mlruns"), "MLFLOW_ALLOW_FILE_STORE=true"
    ),
    "a plain folder for a store": Case(GOOD, ("--tracking-uri", "mlruns"), "filesystem store"),
    "a file uri without its slashes": Case(
        GOOD,
        ("--tracking-uri", "file:mlruns"),
        "file:///ABSOLUTE/PATH",
        env={"MLFLOW_ALLOW_FILE_STORE": "true"},
    ),
    # ---- what a local Ray writes before it starts
    "a home where Ray cannot keep its token": Case(
        GOOD, (), "token in /proc/.ray (from HOME)", env={"HOME": "/proc"}
    ),
    "a Ray temporary folder too long for sockets": Case(
        GOOD, (), "over the 107 a Unix socket allows", env={"RAY_TMPDIR": "/tmp/" + "x" * 60}
    ),
    "a Ray temporary folder that cannot be made": Case(
        GOOD, (), "cannot create a folder in /proc", env={"RAY_TMPDIR": "/proc/ray-tmp"}
    ),
}


@pytest.fixture(scope="module")
def empty_server() -> Iterator[int]:
    """A real HTTP server that answers every request 200 with an empty JSON object: not MLflow."""

    class Empty(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_POST = answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Empty)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Image folders in the real on-disk formats, good and broken in every way the loader must catch."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)

    def picture(path: Path, fmt: str = "PNG") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path, fmt)

    for cls in ("cat", "dog"):
        for i in range(5):
            picture(root / "good" / cls / f"{i}.png")
            picture(root / "truncated" / cls / f"{i}.png")
            picture(root / "text_png" / cls / f"{i}.png")
            picture(root / "one_class" / "only" / f"{cls}{i}.png")
        (root / "empty_classes" / cls).mkdir(parents=True)
    picture(root / "truncated" / "cat" / "broken.jpg", "JPEG")
    whole = (root / "truncated" / "cat" / "broken.jpg").read_bytes()
    (root / "truncated" / "cat" / "broken.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "text_png" / "dog" / "fake.png").write_text("this is not an image\n")
    (root / "empty").mkdir()
    same = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)  # a loader bug that decodes one image
    for cls in ("cat", "dog"):
        (root / "identical" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(same).save(root / "identical" / cls / f"{i}.png")
    for cls in ("cat", "dog"):
        for i in range(3):
            picture(root / "pipe" / cls / f"{i}.png")
    os.mkfifo(root / "pipe" / "dog" / "pipe.png")  # opening it would wait for a writer forever
    return root


def assert_nothing_started(tmp_path: Path, ray_tmpdir: Path, uri: str) -> None:
    import ray

    assert not ray.is_initialized()
    assert not list(ray_tmpdir.rglob("session_*")), "a Ray session was started"
    assert not (tmp_path / "runs").exists(), "the storage folder was made"
    db = tmp_path / "mlflow.db"
    assert not db.exists(), "the MLflow database was made"


def fill(text: str, **values: object) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    return text


@pytest.mark.parametrize("case", sorted(SEARCH), ids=str)
def test_bad_search_input_exits_2_before_ray(
    case, tmp_path, images, empty_server, ray_tmpdir, monkeypatch
):
    spec = SEARCH[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sanity, "LEARN_BUDGET_S", 600.0)  # a loaded machine must not skip the check
    space = tmp_path / "space.yaml"
    port = closed_port()
    values = {"images": images, "space": space, "port": port, "empty": empty_server}
    if isinstance(spec.space, bytes):
        space.write_bytes(spec.space)
    elif spec.space is not None:
        space.write_text(fill(spec.space, **values))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [fill(a, **values) for a in spec.args]
    if not any(a == "--tracking-uri" for a in args) and "MLFLOW_TRACKING_URI" not in spec.env:
        args += ["--tracking-uri", uri]
    if not any(a == "--storage" for a in args):
        args += ["--storage", str(tmp_path / "runs")]
    target = [str(space)] if spec.space is not None else []
    env = {
        "RAY_TMPDIR": str(ray_tmpdir),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
        **{k: fill(v, **values) for k, v in spec.env.items()},
    }
    result = runner.invoke(app, ["search", *target, *args], env=env)
    output = result.output
    assert result.exit_code == 2, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in output
    assert fill(spec.needle, **values) in " ".join(output.split()), output
    assert sum(line.startswith("error:") for line in output.splitlines()) == 1, output
    assert len(output) < 10_000, output[:2000]
    assert "hunter2" not in output
    assert_nothing_started(tmp_path, ray_tmpdir, uri)


def test_a_model_that_cannot_learn_is_refused_before_ray(tmp_path, ray_tmpdir, monkeypatch):
    """A model whose output ignores its weights (here the real one times 0, through the builder the
    check uses: no fake model in the product) would give a search of trials at chance level."""

    class Silenced(torch.nn.Module):
        def __init__(self, module: torch.nn.Module):
            super().__init__()
            self.module = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.module(x) * 0.0

    real = sanity.build_model
    monkeypatch.setattr(sanity, "build_model", lambda *a, **k: Silenced(real(*a, **k)))
    monkeypatch.setattr(sanity, "LEARN_BUDGET_S", 600.0)
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(GOOD)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [str(space), "--tracking-uri", uri, "--storage", str(tmp_path / "runs")]
    result = runner.invoke(app, ["search", *args], env={"RAY_TMPDIR": str(ray_tmpdir)})
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "space.yaml: variants.sgd: model 'auto' on 'digits'" in text, text
    assert "cannot fit one batch of 16 training examples" in text, text
    assert "Traceback" not in result.output
    assert_nothing_started(tmp_path, ray_tmpdir, uri)


# ---- `flatbasin train`: checkpoints and settings
def train_args(*extra: str, variant: str = "sgd", epochs: int = 2) -> list[str]:
    return ["train", "--variant", variant, "--epochs", str(epochs), "--set", "threads=1", *extra]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint of a 1-epoch sgd trial (lr 0.05)."""
    path = tmp_path_factory.mktemp("ckpt") / "sgd.pt"
    result = runner.invoke(app, train_args("--checkpoint", str(path), epochs=1))
    assert result.exit_code == 0, result.output
    return path


TRAIN: dict[str, tuple[list[str], str]] = {
    "markup in a --set value": (["--set", "optimizer=a[/x]"], "a[/x]"),
    "markup in a --set key": (["--set", "[/k]=1"], "[/k]"),
    "--set without =": (["--set", "lr"], "expected key=value"),
    "unreadable --set value": (["--set", "lr=[1,"], "cannot read the value"),
    "resume without a checkpoint file": (["--resume"], "--resume needs an existing --checkpoint"),
    "an existing checkpoint without --resume": (
        ["--checkpoint", __file__],
        "exists; --resume continues the run it holds",
    ),
    "nan for a number": (["--set", "lr=.nan"], "lr: Input should be a finite number"),
    "cuda without cuda": (["--set", "device=cuda"], "cuda"),
    "unknown tta": (["--set", "tta=mirror"], "tta: Input should be 'none' or 'flip_shift'"),
    "batch larger than digits": (["--set", "batch_size=4000"], "batch_size 4000"),
    "resnet on 8x8": (["--set", "model=resnet18"], "resnet18"),
    "airbench on 8x8": (["--set", "model=airbench"], "airbench"),
    "unknown precision": (
        ["--set", "precision=fp16"],
        "precision: Input should be 'auto', 'fp32' or 'bf16'",
    ),
    "channels_last on signals": (
        ["--dataset", "mnist1d", "--set", "channels_last=true"],
        "channels_last applies to images",
    ),
    "a validation seed beyond 32 bits": (["--set", "val_seed=4294967296"], "val_seed"),
    "mnist1d_signals for digits": (
        ["--set", "mnist1d_signals=2000"],
        "applies only to the mnist1d data set",
    ),
    "missing data_dir": (
        ["--dataset", "image_folder", "--data-dir", "/nonexistent/fb-images"],
        "/nonexistent/fb-images",
    ),
}


@pytest.mark.parametrize("case", sorted(TRAIN), ids=str)
def test_bad_train_input_exits_2(case, tmp_path):
    args, needle = TRAIN[case]
    result = runner.invoke(app, train_args(*args))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert needle in " ".join(result.output.split()), result.output


@pytest.mark.parametrize(
    ("case", "variant", "epochs", "extra", "needle"),
    [
        ("another variant", "ema", 1, [], "variant (checkpoint 'sgd', now 'ema')"),
        ("another learning rate", "sgd", 1, ["--set", "lr=0.1"], "lr (checkpoint 0.05, now 0.1)"),
        ("another budget", "sgd", 3, [], "epochs (checkpoint 1, now 3)"),
    ],
)
def test_resume_from_another_config_is_refused(
    checkpoint, tmp_path, case, variant, epochs, extra, needle
):
    copy = tmp_path / "c.pt"
    copy.write_bytes(checkpoint.read_bytes())
    args = train_args(*extra, "--checkpoint", str(copy), "--resume", variant=variant, epochs=epochs)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert needle in " ".join(result.output.split()), result.output


@pytest.mark.parametrize("damage", ["truncated", "text", "empty"])
def test_resume_from_a_corrupt_checkpoint_is_refused(checkpoint, tmp_path, damage):
    bad = tmp_path / "bad.pt"
    whole = checkpoint.read_bytes()
    bad.write_bytes(
        {"truncated": whole[: len(whole) // 3], "text": b"not a checkpoint", "empty": b""}[damage]
    )
    result = runner.invoke(app, train_args("--checkpoint", str(bad), "--resume"))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "cannot be read" in result.output and "bad.pt" in result.output


# ---- the other commands
def test_reproduce_of_an_unknown_run_exits_2(tmp_path):
    from flatbasin.search.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri, "other", search_key="k").parent()  # a store that exists, without that run
    result = runner.invoke(app, ["reproduce", "0123456789abcdef", "--tracking-uri", uri])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "0123456789abcdef" in result.output


@pytest.mark.parametrize(
    "command", [["reproduce", "RUN"], ["train", "--variant", "swa", "--from", "RUN"]]
)
def test_a_store_that_is_not_there_is_named_not_the_run(tmp_path, command):
    """A mistyped SQLite path makes no database; a server that is down is not a missing run."""
    run = "0123456789abcdef0123456789abcdef"
    args = [run if a == "RUN" else a for a in command]
    for uri, needle in (
        (f"sqlite:///{tmp_path / 'typo' / 'mlflow.db'}", "no MLflow store at"),
        (f"http://127.0.0.1:{closed_port()}", "is not reachable"),
    ):
        result = runner.invoke(
            app, [*args, "--tracking-uri", uri], env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        )
        assert result.exit_code == 2, result.output
        assert needle in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "typo").exists()


def test_sync_of_a_folder_that_is_no_search_exits_2(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = runner.invoke(app, ["sync", str(tmp_path), "--tracking-uri", uri])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "no search at" in result.output


def test_the_same_name_under_another_storage_is_refused(tmp_path, ray_tmpdir, monkeypatch):
    """One MLflow experiment per search name: a second --storage would put two searches in it."""
    from flatbasin.search.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri, "twice", search_key=str(tmp_path / "first" / "twice")).parent()
    space = tmp_path / "twice.yaml"
    space.write_text(GOOD)
    args = ["search", str(space), "--tracking-uri", uri, "--storage", str(tmp_path / "second")]
    result = runner.invoke(app, args, env={"RAY_TMPDIR": str(ray_tmpdir)})
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"--storage {tmp_path / 'first'} --resume" in text and "--name NEW_NAME" in text, text
    assert not (tmp_path / "second").exists()


def test_data_check_of_bad_input_exits_2(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    for target, needle in ((tmp_path / "file.txt", "is a file"), (tmp_path, "no class folders")):
        result = runner.invoke(app, ["data", "check", str(target)])
        assert result.exit_code == 2 and needle in result.output, result.output


def test_submit_of_bad_input_exits_2_before_contacting_anything(tmp_path):
    for args, needle in (
        (["--address", "127.0.0.1:8265"], "http://HOST:PORT"),
        (["--bogus"], "no such option: --bogus"),
        (["compare", "--bogus"], "No such option: --bogus"),
        (["compare", "--samples", "x"], "--samples"),
    ):
        result = runner.invoke(app, ["submit", *args])
        assert result.exit_code == 2, result.output
        assert needle in result.output and "Usage: search" not in result.output, result.output


def test_the_installed_entry_point_says_the_same(tmp_path):
    """Through a real process, as a user runs it: the message, exit status 2, no traceback."""
    space = tmp_path / "bad.yaml"
    space.write_text("variants:\n  sgd: {lr: '[/red] not a number'}\n")
    done = subprocess.run(
        [sys.executable, "-m", "flatbasin", "search", str(space), "--storage", str(tmp_path / "runs"),
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "[/red] not a number" in done.stderr
    version = subprocess.run(
        [sys.executable, "-m", "flatbasin", "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0 and version.stdout.startswith("flatbasin ")


def test_resume_with_an_edited_space_is_refused(tmp_path):
    """Tune resumes the space it pickled: an edited file would be ignored silently, so it is refused,
    naming what changed; comments and layout are no change."""
    from flatbasin.search.errors import UsageError
    from flatbasin.search.resume import check_same_space
    from flatbasin.search.tracking import Tracker
    from flatbasin.spaces import load_space

    path = tmp_path / "edited.yaml"
    path.write_text(GOOD)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "edited", search_key="k")
    parent = tracker.parent(space_file=path, space_digest=load_space(path).digest)
    path.write_text("# a comment, and another layout\n" + GOOD.replace(": ", ":  "))
    check_same_space(tracker, parent, load_space(path))
    path.write_text(GOOD.replace("epochs: 2", "epochs: 3"))
    with pytest.raises(UsageError, match=r"has changed since .*\(epochs\).*--name NEW_NAME"):
        check_same_space(tracker, parent, load_space(path))


def test_a_second_driver_of_a_running_search_is_refused(tmp_path, ray_tmpdir, monkeypatch):
    """Started while the first still runs, a second search of the same name passed every check (nothing
    was recorded yet) and merged into it; the search's lock refuses it, naming the first."""
    from flatbasin.search import preflight

    monkeypatch.chdir(tmp_path)
    space = tmp_path / "busy.yaml"
    space.write_text(GOOD)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["search", str(space), "--tracking-uri", uri, "--storage", str(tmp_path / "runs")]
    with preflight.only_search(tmp_path / "runs", "busy"):  # the first driver, holding its lock
        result = runner.invoke(app, args, env={"RAY_TMPDIR": str(ray_tmpdir)})
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "a search named 'busy' is running" in text and f"pid {os.getpid()}" in text, text
    assert not list(ray_tmpdir.rglob("session_*")) and not (tmp_path / "mlflow.db").exists()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".busy.lock"]


# ---- the user's own model and data (model: / dataset: module:callable), before Ray as well.
USER_MODULES = {
    "usr_raises.py": "import numpy\n\ndef helper():\n    raise RuntimeError('my own bug')\n\nhelper()\n",
    "usr_syntax.py": "def load(:\n    pass\n",
    "usr_models.py": """
import torch
from torch import nn

def number(input_shape, num_classes):
    return 42

def wrong_outputs(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes + 1))

def wrong_input(input_shape, num_classes):
    return nn.Linear(7, num_classes)

def raises(input_shape, num_classes):
    raise ValueError("width must be even")

class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
    def forward(self, x):
        return self.fc(x.flatten(1)), x

def pair(input_shape, num_classes):
    return Pair()

def frozen(input_shape, num_classes):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
    for p in model.parameters():
        p.requires_grad_(False)
    return model

def width(input_shape, num_classes, width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, num_classes))
""",
    "usr_data.py": """
import numpy as np
import torch
from torch.utils.data import Dataset

rng = np.random.default_rng(0)
x, xt = rng.normal(size=(200, 4)).astype("float32"), rng.normal(size=(50, 4)).astype("float32")
y, yt = np.arange(200) % 2, np.arange(50) % 2

def three(): return x, y, xt
def one(): return x
def lengths(): return x, y[:-1], xt, yt
def float_labels(): return x, y.astype(float), xt, yt
def gap(): return x, y * 2, xt, yt
def negative(): return x, y - 1, xt, yt
def one_hot(): return x, np.eye(2)[y], xt, yt
def one_class(): return x, y * 0, xt, yt * 0
def strings(): return [["a"]] * 200, y, xt, yt
def test_shape(): return x, y, xt[:, :3], yt
def nan():
    bad = x.copy(); bad[7, 1] = np.nan
    return bad, y, xt, yt
def raises(): raise OSError("no such file: /data/train.csv")
def takes(n=1): return x[:n], y[:n], xt, yt

class Ragged(Dataset):
    def __len__(self): return 100
    def __getitem__(self, i): return torch.zeros(4 + (i == 99)), i % 2

class NoLabel(Dataset):
    def __len__(self): return 100
    def __getitem__(self, i): return torch.zeros(4)

class TextLabel(Dataset):
    def __len__(self): return 100
    def __getitem__(self, i): return torch.zeros(4), "cat"

class NanItems(Dataset):
    def __len__(self): return 100
    def __getitem__(self, i): return torch.full((4,), float("nan")), i % 2

class RaisesAt77(Dataset):
    def __len__(self): return 100
    def __getitem__(self, i):
        if i == 77:
            raise RuntimeError("corrupt record 77")
        return torch.zeros(4), i % 2

def huge_label():
    big = y.copy(); big[0] = 10**12
    return x, big, xt, yt
def complex_inputs(): return x.astype(complex), y, xt, yt
def raises_at_77(): return RaisesAt77(), Ragged()
def ragged(): return Ragged(), Ragged()
def no_label(): return NoLabel(), NoLabel()
def text_label(): return TextLabel(), TextLabel()
def nan_items(): return NanItems(), NanItems()
def lists(): return [1, 2], [3, 4]
""",
}


def user_space(dataset: str = "digits", model: str = "small_cnn", extra: str = "") -> str:
    return f"epochs: 1\ndataset: {dataset}\nmodel: {model}\n{extra}variants:\n  sgd: {{}}\n"


USER_CODE: dict[str, Case] = {
    "module missing": Case(user_space("usr_nothere:load"), (), "no module named 'usr_nothere'"),
    "module raises": Case(
        user_space("usr_raises:load"), (), "RuntimeError: my own bug (at {code}/usr_raises.py:4)"
    ),
    "module syntax": Case(user_space("usr_syntax:load"), (), "usr_syntax.py:1"),
    "callable missing": Case(user_space("usr_data:nothere"), (), "has no 'nothere'"),
    "data raises": Case(
        user_space("usr_data:raises"),
        (),
        "OSError: no such file: /data/train.csv (at {code}/usr_data.py",
    ),
    "data three things": Case(user_space("usr_data:three"), (), "returned a tuple of 3"),
    "data one array": Case(
        user_space("usr_data:one"), (), "usr_data:one returned a ndarray; return four arrays"
    ),
    "data lists": Case(user_space("usr_data:lists"), (), "not two torch.utils.data.Dataset"),
    "data lengths differ": Case(
        user_space("usr_data:lengths"), (), "x_train holds 200 examples but y_train 199 labels"
    ),
    "data float labels": Case(
        user_space("usr_data:float_labels"), (), "y_train is of type float64"
    ),
    "data missing class": Case(
        user_space("usr_data:gap"), (), "class(es) 1 have no training example"
    ),
    "data negative labels": Case(user_space("usr_data:negative"), (), "negative labels"),
    "data one-hot labels": Case(user_space("usr_data:one_hot"), (), "(not one-hot)"),
    "data one class": Case(user_space("usr_data:one_class"), (), "at least 2 classes"),
    "data strings": Case(user_space("usr_data:strings"), (), "x_train is not a numeric array"),
    "data test shape": Case(user_space("usr_data:test_shape"), (), "test examples (3,)"),
    "data nan": Case(
        user_space("usr_data:nan"),
        (),
        "NaN or infinite values in 1 example(s), the first at index 7",
    ),
    "data unknown argument": Case(
        user_space("usr_data:takes", extra="data_args: {count: 3}\n"),
        (),
        "unknown argument(s) count",
    ),
    "data argument searched": Case(
        user_space("usr_data:takes", extra="data_args: {n: {choice: [1, 2]}}\n"), (), "data_args.n"
    ),
    "data args for a built-in set": Case(
        user_space("digits", extra="data_args: {n: 1}\n"),
        (),
        "data_args (n) apply to your own data set",
    ),
    "dataset ragged items": Case(
        user_space("usr_data:ragged"), (), "inconsistent shapes: item 0 is (4,), item 99 is (5,)"
    ),
    "dataset items without labels": Case(
        user_space("usr_data:no_label"),
        (),
        "item 0 is a Tensor; each item must be (input_tensor, integer_label)",
    ),
    "dataset text labels": Case(user_space("usr_data:text_label"), (), "label is 'cat'"),
    "data huge label": Case(
        user_space("usr_data:huge_label"), (), "labels run 0..1000000000000, but class(es) 2, 3"
    ),
    "data complex inputs": Case(
        user_space("usr_data:complex_inputs"), (), "x_train is not a numeric array"
    ),
    "dataset item raises": Case(
        user_space("usr_data:raises_at_77"),
        (),
        "item 77 cannot be read: RuntimeError: corrupt record 77 (at {code}/usr_data.py",
    ),
    "dataset nan items": Case(user_space("usr_data:nan_items"), (), "item 0's input holds NaN"),
    "model not a module": Case(
        user_space(model="usr_models:number"), (), "returned an int, not a torch.nn.Module"
    ),
    "model raises": Case(
        user_space(model="usr_models:raises"),
        (),
        "ValueError: width must be even (at {code}/usr_models.py",
    ),
    "model wrong outputs": Case(
        user_space(model="usr_models:wrong_outputs"), (), "gives outputs of shape (11,)"
    ),
    "model wrong input": Case(
        user_space(model="usr_models:wrong_input"),
        (),
        "cannot take the input of 'digits' (examples of shape (1, 8, 8))",
    ),
    "model returns a pair": Case(user_space(model="usr_models:pair"), (), "returns a tuple"),
    "model frozen": Case(user_space(model="usr_models:frozen"), (), "without trainable parameters"),
    "model unknown argument": Case(
        user_space(model="usr_models:width", extra="model_args: {depth: 3}\n"),
        (),
        "unknown argument(s) depth",
    ),
    "model unknown form": Case(user_space(model="not a model"), (), "unknown model 'not a model'"),
    "model args for a built-in": Case(
        user_space(extra="model_args: {width: 3}\n"),
        (),
        "the built-in 'small_cnn' takes dropout and init",
    ),
    "model dropout for a user model": Case(
        user_space(model="usr_models:width", extra="fixed: {dropout: 0.1}\n"),
        (),
        "give 'usr_models:width' its own dropout",
    ),
    "torchvision unknown": Case(
        user_space(model="torchvision:resnt18"),
        (),
        "torchvision has no model builder 'resnt18'; similar: resnet18",
    ),
    "timm unknown": Case(
        user_space(model="timm:resnt18"), (), "timm has no model 'resnt18'; similar: resnet18"
    ),
    "zoo model on signals": Case(
        user_space("mnist1d", model="torchvision:resnet18"), (), "is an image model"
    ),
}


@pytest.fixture(scope="module")
def user_code(tmp_path_factory) -> Path:
    """One folder of user modules for every case: a module is imported once per process."""
    folder = tmp_path_factory.mktemp("user_code")
    for name, text in USER_MODULES.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("case", sorted(USER_CODE), ids=str)
def test_bad_user_code_exits_2_before_ray(case, user_code, tmp_path, ray_tmpdir, monkeypatch):
    spec = USER_CODE[case]
    monkeypatch.chdir(tmp_path)
    space = user_code / f"{case.replace(' ', '_')}.yaml"  # beside the modules, as a user keeps it
    space.write_text(str(spec.space))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["search", str(space), "--tracking-uri", uri, "--storage", str(tmp_path / "runs")]
    result = runner.invoke(app, args, env={"RAY_TMPDIR": str(ray_tmpdir)})
    output = result.output
    assert result.exit_code == 2, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in output
    assert fill(spec.needle, code=user_code) in " ".join(output.split()), output
    assert str(space) in output, output  # the file named
    assert sum(line.startswith("error:") for line in output.splitlines()) == 1, output
    assert_nothing_started(tmp_path, ray_tmpdir, uri)


def test_timm_missing_says_how_to_install(monkeypatch):
    """Without timm, a timm: model says which extra brings it (checked with timm hidden)."""
    from flatbasin.trainables.models import build_model

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ValueError, match=r'pip install "flatbasin\[timm\]"'):
        build_model("timm:resnet18", (3, 32, 32), 10)


# ---- every numeric option: a range stated in --help, and the checks hold to it
COMMANDS: dict[tuple[str, ...], list[str]] = {  # each command, with what it needs to parse
    ("search",): [], ("train",): ["--variant", "sgd"], ("lr-find",): [],
    ("focus-library",): ["out.pt"], ("data", "check"): ["images"], ("submit",): [],
    ("sync",): ["runs/x"], ("reproduce",): ["RUN"], ("report",): ["SEARCH"],
}  # fmt: skip
ROW = re.compile(r"│\s+(--[a-z-]+)\s.*?<(int|float)( range)?>\s*(.*?)\s*│\s*$")


@dataclass(frozen=True)
class Stated:
    low: float
    high: float
    default: float | None
    kind: type


def stated_options(command: tuple[str, ...]) -> dict[str, Stated]:
    """Every numeric option of `command` as its --help states it (through a real process, wide
    enough that no row wraps): the range and the default. An option without both ends fails."""
    done = subprocess.run(
        [sys.executable, "-m", "flatbasin", *command, "--help"], capture_output=True, text=True,
        timeout=120, env={**os.environ, "TERMINAL_WIDTH": "400"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = {}
    for line in done.stdout.splitlines():
        row = ROW.search(line)
        if not row:
            continue
        option, kind, ranged, rest = row.groups()
        bounds = re.search(r"\[([-0-9.e+]+)<=x<=([-0-9.e+]+)\]", rest)
        assert ranged and bounds, (
            f"{' '.join(command)} {option} states no range from low to high: {line}"
        )
        default = re.search(r"\[default: ([-0-9.e+]+)\]", rest)
        number = int if kind == "int" else float
        found[option] = Stated(
            number(bounds[1]), number(bounds[2]), number(default[1]) if default else None, number
        )
    return found


def search_field(field: str) -> Callable[[float], object]:
    from flatbasin.search.options import SearchOptions

    return lambda v: SearchOptions(
        tracking_uri="sqlite:///x.db", storage=Path("runs"), **{field: v}
    )


def trial_setting(key: str, **settings: object) -> Callable[[float], object]:
    from flatbasin.trainables.config import make_config

    return lambda v: make_config("sgd", {**settings, key: v})


def lr_find_check(tmp_path: Path, **fixed: float) -> Callable[[float], object]:
    """lr-find's own check of its options; --start must stay below --end, the one rule between
    them, so at the shared bound (10 for --start, 1e-8 for --end) only that rule may complain."""
    from flatbasin.search.errors import UsageError
    from flatbasin.search.lrfind import LrFindOptions, check_options
    from flatbasin.trainables.config import make_config

    def check(v: float) -> None:
        values: dict[str, Any] = {"start": 1e-6, "end": 10.0, "steps": 200, **fixed}
        values[next(k for k in ("start", "end", "steps") if k not in fixed)] = v
        options = LrFindOptions(**values, plot=tmp_path / "f.png", write=None)
        try:
            check_options(options, make_config("sgd", {}))
        except UsageError as err:
            if "must be below --end" not in str(err) or values["start"] != values["end"]:
                raise

    return check


def focus_ridge(tmp_path: Path) -> Callable[[float], object]:
    """focus-library's own check of --ridge: it comes before the settings are read, so an unknown
    setting is what a ridge it accepts leads to."""

    def check(v: float) -> None:
        args = ["focus-library", str(tmp_path / "lib.pt"), "--ridge", repr(v), "--set", "bogus=1"]
        result = runner.invoke(app, args)
        assert "unknown setting(s) bogus" in result.output, result.output

    return check


def validators(tmp_path: Path) -> dict[tuple[str, str], Callable[[float], object]]:
    """The check below the command line that each numeric option's value meets."""
    return {
        ("search", "--samples"): search_field("samples"),
        ("search", "--concurrency"): search_field("concurrency"),
        ("search", "--cpus-per-trial"): search_field("cpus_per_trial"),
        ("search", "--gpus-per-trial"): search_field("gpus_per_trial"),
        ("search", "--seed"): search_field("seed"),
        ("search", "--time-budget"): search_field("time_budget_s"),
        ("search", "--max-failures"): search_field("max_failures"),
        ("search", "--checkpoint-every"): search_field("checkpoint_every"),
        ("search", "--checkpoint-interval"): search_field("checkpoint_interval_s"),
        ("search", "--confirm-seeds"): search_field("confirm_seeds"),
        ("train", "--epochs"): trial_setting("epochs"),
        ("train", "--seed"): trial_setting("seed"),
        ("focus-library", "--epochs"): trial_setting("epochs"),
        ("focus-library", "--seed"): trial_setting("seed"),
        ("focus-library", "--ridge"): focus_ridge(tmp_path),
        ("lr-find", "--start"): lr_find_check(tmp_path, end=10.0, steps=200),
        ("lr-find", "--end"): lr_find_check(tmp_path, start=1e-8, steps=200),
        ("lr-find", "--steps"): lr_find_check(tmp_path, start=1e-6, end=10.0),
        ("data check", "--image-size"): trial_setting("image_size", dataset="synthetic"),
    }


def beyond(value: float, kind: type, direction: float) -> str:
    """The value just past `value` in `direction`: the next integer, or the next float."""
    return (
        str(int(value + direction))
        if kind is int
        else repr(math.nextafter(value, direction * math.inf))
    )


def test_every_numeric_option_states_its_range_and_its_checks_agree(tmp_path, monkeypatch):
    """Each command's --help states every numeric option's range and default; the value just past
    either end is refused while the command line is read (one paragraph, exit 2, nothing done), and
    the ends and the default pass the command line and the check the value meets below it."""
    monkeypatch.chdir(tmp_path)
    checks = validators(tmp_path)
    group = typer.main.get_command(app)
    seen = set()
    for command, needs in COMMANDS.items():
        click_command = group
        for name in command:
            click_command = click_command.commands[name]  # type: ignore[attr-defined]
        for option, stated in stated_options(command).items():
            key = (" ".join(command), option)
            seen.add(key)
            assert key in checks, f"{key}: a numeric option with no check named in this test"
            assert (
                stated.low
                <= (stated.default if stated.default is not None else stated.low)
                <= stated.high
            )
            for edge, direction in ((stated.low, -1.0), (stated.high, 1.0)):
                bad = beyond(edge, stated.kind, direction)
                result = runner.invoke(app, [*command, *needs, option, bad])
                assert result.exit_code == 2, (key, bad, result.output)
                assert result.output.startswith("error: ") and f"'{option}'" in result.output, (
                    result.output
                )
                assert "Traceback" not in result.output and len(result.output.splitlines()) == 1
            if stated.kind is float:
                result = runner.invoke(app, [*command, *needs, option, "nan"])
                assert result.exit_code == 2 and f"'{option}'" in result.output, (
                    key,
                    result.output,
                )
            for good in {stated.low, stated.high, stated.default} - {None}:
                click_command.make_context(command[-1], [*needs, option, str(good)])  # parses
                checks[key](good)  # and the check below accepts it
    assert seen == set(checks), f"checks for options --help does not state: {set(checks) - seen}"


# ---- running out of memory: what ran out, and what to change
def test_an_allocation_that_cannot_be_had_is_named_with_what_to_change():
    """Real allocators refusing (a petabyte is beyond any machine's address space, so nothing is
    taken): torch's and numpy's errors become one OutOfMemory paragraph; other errors pass as they are."""
    from flatbasin.trainables.config import make_config
    from flatbasin.trainables.memory import OutOfMemory, named_out_of_memory

    config = make_config("sgd", {"dataset": "synthetic", "image_size": 64, "batch_size": 32})
    for allocate, amount in (
        (lambda: torch.empty(2**50, dtype=torch.uint8), "1024.0 TiB"),
        (lambda: np.empty(2**50, dtype=np.uint8), "1024.0 TiB"),
    ):
        with pytest.raises(OutOfMemory) as caught, named_out_of_memory(config, "training"):
            allocate()
        text = str(caught.value)
        assert text.startswith(
            f"training ran out of this machine's memory (RAM) asking for {amount} more"
        ), text
        for advice in (
            "batch_size (now 32)",
            "model (now auto)",
            "image_size (now 64)",
            "synthetic_images (now 60000)",
        ):
            assert advice in text, text
    with pytest.raises(RuntimeError, match=r"^unrelated$"), named_out_of_memory(config, "training"):
        raise RuntimeError("unrelated")


MEMORY_LIMITED = """
import resource, sys
import torch  # its own mappings are part of what the process starts with
status = open("/proc/self/status").read()
size = int(status.split("VmSize:")[1].split()[0]) * 1024
limit = size + int(sys.argv[1]) * 2**20  # this much more address space, then allocations fail
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from flatbasin.search.cli import main
sys.argv = ["flatbasin", *sys.argv[2:]]
main()
"""


def run_with_memory(
    tmp_path: Path, headroom_mib: int, *args: str, **env: str
) -> subprocess.CompletedProcess:
    """flatbasin in a process whose address space ends `headroom_mib` past what importing torch
    took: what it cannot have fails at once, and the machine's memory is never at stake."""
    script = tmp_path / "limited.py"
    script.write_text(MEMORY_LIMITED)
    return subprocess.run(
        [sys.executable, str(script), str(headroom_mib), *args], capture_output=True, text=True,
        timeout=280, cwd=tmp_path, env={**os.environ, **env},
    )  # fmt: skip


@pytest.mark.slow
def test_train_that_runs_out_of_memory_says_what_ran_out_and_what_to_change(tmp_path):
    """512-pixel images in batches of 64: the first convolution's output alone is 2 GiB, more than
    the process may have; the data (100 images) and the model fit."""
    done = run_with_memory(
        tmp_path, 1536, "train", "--variant", "sgd", "--epochs", "1", "--dataset", "synthetic",
        "--set", "image_size=512", "--set", "synthetic_images=100", "--set", "model=small_cnn",
        "--set", "threads=1",
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    # The error is one paragraph on stderr; stdout may hold the data's notes printed before training
    # (here: a validation split of 8 examples).
    assert "Traceback" not in output and done.stderr.startswith("error: "), output
    text = " ".join(output.split())
    assert "training ran out of this machine's memory (RAM) asking for 2.0 GiB more" in text, text
    assert "lower batch_size (now 64) or choose a smaller model (now small_cnn)" in text, text
    assert "a smaller image_size (now 512)" in text, text


@pytest.mark.slow
def test_a_search_whose_data_cannot_fit_is_refused_before_ray(tmp_path, ray_tmpdir):
    """A million 512-pixel synthetic images (732 GiB): the driver's check of the data, before Ray."""
    (tmp_path / "big.yaml").write_text(
        "epochs: 1\ndataset: synthetic\nfixed: {image_size: 512, synthetic_images: 1000000}\n"
        "variants: {sgd: {}}\n"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = run_with_memory(
        tmp_path, 1536, "search", "big.yaml", "--storage", str(tmp_path / "runs"),
        "--tracking-uri", uri, RAY_TMPDIR=str(ray_tmpdir),
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output and output.startswith("error: "), output
    text = " ".join(output.split())
    assert (
        "variants.sgd: loading the data and checking the model ran out of this machine's memory"
        in text
    ), text
    assert "fewer synthetic_images (now 1000000)" in text, text
    assert not list(ray_tmpdir.rglob("session_*")), "a Ray session was started"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


# ---- a file that is not a space file: named as such, its contents never echoed
SHADOW = "root:$6$saltsalt$HASHofROOT0123:19000:0:99999:7:::\nalice:$6$pepper$HASHofALICE4567:19000:0:99999:7:::\n"
NOT_SPACES = {
    "a shadow file": (SHADOW, ["HASHofROOT", "HASHofALICE", "alice"]),
    "a JSON of secrets": (
        '{"password": "hunter2-json", "api_key": "sk-json-0123"}',
        ["hunter2", "sk-json", "password"],
    ),
    "a compose file": (
        "services:\n  db:\n    environment: {PGPASSWORD: pg-compose-9}\n",
        ["pg-compose-9", "PGPASSWORD"],
    ),
    "a plain text file": ("the secret phrase is tulip-azure-88\nand more\n", ["tulip-azure-88"]),
    "a list": ("- token-in-a-list-77\n", ["token-in-a-list-77"]),
}


@pytest.mark.parametrize("case", sorted(NOT_SPACES), ids=str)
@pytest.mark.parametrize("through", ["search", "search via a link", "lr-find --write"])
def test_a_file_that_is_not_a_space_file_is_named_not_echoed(case, through, tmp_path):
    text, secrets = NOT_SPACES[case]
    real = tmp_path / "not-a-space"
    real.write_text(text)
    path = real
    if through == "search via a link":  # as a link to /etc/shadow would be
        path = tmp_path / "space.yaml"
        path.symlink_to(real)
    if through == "lr-find --write":
        args = ["lr-find", "--write", str(path), "--plot", str(tmp_path / "lr.png")]
    else:
        args = ["search", str(path), "--storage", str(tmp_path / "runs"),
                "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "not a space file" in result.output and "Traceback" not in result.output, result.output
    assert [s for s in secrets if s in result.output] == [], result.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "lr.png").exists()


def test_unknown_keys_of_a_space_file_are_a_few_cut_short(tmp_path):
    """A file that looks like a space file (it has one of its keys) gets its unknown keys named:
    three at most, each cut to a few words."""
    long_key = "a_key_far_longer_than_anyone_would_type_" + "x" * 200
    path = tmp_path / "typo.yaml"
    path.write_text(f"epoch: 2\nvariants: {{sgd: {{}}}}\n{long_key}: 1\nk3: 1\nk4: 1\nk5: 1\n")
    result = runner.invoke(app, ["search", str(path), "--storage", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "unknown keys 'epoch', 'a_key_far_longer_than_a…', 'k3' and 2 more" in text, text
    assert "x" * 20 not in text and "k4" not in text


# ---- outputs: a regular file or nothing; never a device, a pipe, a socket or a folder
def make_node(path: Path, kind: str) -> Path:
    """`kind` at `path`: a private character device (a copy of /dev/null's numbers: never the
    real one), a FIFO, a listening Unix socket, a folder, or a link to a FIFO."""
    if kind == "character device":
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(path, 0o666 | stat.S_IFCHR, os.stat("/dev/null").st_rdev)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.close()  # the socket file stays
    elif kind == "folder":
        path.mkdir()
    elif kind == "link to a fifo":
        os.mkfifo(path.with_name(path.name + ".fifo"))
        path.symlink_to(path.with_name(path.name + ".fifo"))
    return path


OUTPUT_KINDS = ["character device", "fifo", "socket", "folder", "link to a fifo"]
OUTPUTS = {  # the command, with {out} where the output goes; what the message names
    "train --json": (train_args("--json", "{out}"), "--json"),
    "train --checkpoint": (train_args("--checkpoint", "{out}"), "--checkpoint"),
    "lr-find --plot": (["lr-find", "--plot", "{out}"], "--plot"),
    "lr-find --write": (["lr-find", "--write", "{out}"], "--write"),
    "focus-library OUT": (["focus-library", "{out}"], "OUT.pt"),
    "report, a file in --out": (["report", "s", "--out", "{folder}"], "report.html there is"),
    "report --out": (["report", "s", "--out", "{out}"], "--out"),
}


@pytest.mark.parametrize("kind", OUTPUT_KINDS)
@pytest.mark.parametrize("output", sorted(OUTPUTS), ids=str)
def test_an_output_that_is_no_regular_file_is_refused_before_work(
    output, kind, tmp_path, monkeypatch
):
    if output == "report --out" and kind == "folder":
        pytest.skip("a folder is what --out takes")
    monkeypatch.chdir(tmp_path)  # a default output (lr_find.png, ./mlflow.db) lands here, if any
    args, names = OUTPUTS[output]
    folder = tmp_path / "reportdir"
    folder.mkdir()
    inside = "a file in" in output
    out = make_node(folder / "report.html" if inside else tmp_path / "out.png", kind)
    before = {p.name: os.lstat(p) for p in (*tmp_path.iterdir(), *folder.iterdir())}
    filled = [a.replace("{out}", str(out)).replace("{folder}", str(folder)) for a in args]
    result = runner.invoke(app, filled)
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert names in text, text
    assert any(why in text for why in ("not a regular file", "not a folder", "is a folder")), text
    assert "Traceback" not in result.output and "epoch" not in text, text  # before any training
    after = {p.name: os.lstat(p) for p in (*tmp_path.iterdir(), *folder.iterdir())}
    assert {n: (s.st_ino, s.st_mode) for n, s in after.items()} == {
        n: (s.st_ino, s.st_mode) for n, s in before.items()
    }, "an output was made or replaced"


def test_an_output_made_a_device_during_the_run_is_not_replaced(tmp_path):
    """The check is made again just before the rename: a FIFO that appears meanwhile stays."""
    from flatbasin.trainables.files import NotAFileError, write_whole

    target = tmp_path / "out.json"

    def write(handle) -> None:
        handle.write(b"{}")
        os.mkfifo(target)  # appears while the temporary file is written

    with pytest.raises(NotAFileError, match="named pipe"):
        write_whole(target, write)
    assert stat.S_ISFIFO(os.lstat(target).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary file left


# ---- a full disk at the end of a run: what can be written is, the rest named in one paragraph
@pytest.fixture
def full_disk(tmp_path) -> Iterator[Path]:
    """A 256 KiB tmpfs filled to the last byte (root only; skipped where mounting is refused)."""
    mount = tmp_path / "full"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {made.stderr.strip()}")
    try:
        (mount / "old.json").write_text('{"old": true}')
        with suppress(OSError), open(mount / "filler", "wb") as filler:
            while True:
                filler.write(b"\0" * 4096)
                filler.flush()
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_train_on_a_full_disk_keeps_its_result(full_disk, tmp_path):
    spare_before = set(Path(tempfile.gettempdir()).glob("flatbasin-*.json"))
    args = train_args(
        "--json", str(full_disk / "old.json"), "--checkpoint", str(full_disk / "c.pt")
    )
    result = runner.invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "deployed model" in text, text  # the run is shown
    assert (
        "warning: the checkpoint of epoch 1 could not be written (No space left on device)" in text
    )
    paragraph = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(paragraph) == 1, result.output
    assert f"--checkpoint {full_disk / 'c.pt'} could not be written from epoch 1 on" in text
    assert f"--json {full_disk / 'old.json'} could not be written (No space left on device)" in text
    spare = set(Path(tempfile.gettempdir()).glob("flatbasin-*.json")) - spare_before
    assert len(spare) == 1 and str(next(iter(spare))) in text, text
    try:
        assert json.loads(next(iter(spare)).read_text())["config"]["variant"] == "sgd"
    finally:
        next(iter(spare)).unlink()
    # The old file is whole (a failed write never truncates it) and no temporary file is left.
    assert (full_disk / "old.json").read_text() == '{"old": true}'
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "old.json"]


def test_lr_find_on_a_full_disk_says_so_in_one_paragraph(full_disk, tmp_path):
    result = runner.invoke(app, ["lr-find", "--steps", "50", "--plot", str(full_disk / "lr.png")])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "suggested" in text.lower() or "suggest" in text.lower(), text
    assert f"--plot {full_disk / 'lr.png'} could not be written (No space left on device)" in text
    assert "Traceback" not in result.output
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "old.json"]


# ---- credentials in a tracking URI: never shown, never on a command line
def test_submit_refuses_credentials_in_the_tracking_uri(tmp_path):
    """A job's entrypoint is shown on the cluster's dashboard: they are refused, never sent."""
    for uri in ("http://alice:pw-submit-0123@127.0.0.1:5000", "https://alice@127.0.0.1:5000"):
        for form in (["--tracking-uri", uri], [f"--tracking-uri={uri}"]):
            result = runner.invoke(
                app, ["submit", "compare", "--address", "http://127.0.0.1:9", *form]
            )
            text = " ".join(result.output.split())
            assert result.exit_code == 2, result.output
            assert "carries credentials" in text and "--tracking-uri http" in text, text
            assert "pw-submit-0123" not in text and "alice" not in text, text


CLEAN_ENV = {k: None for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI",
             "FLATBASIN_TRACKING_USERNAME_FROM", "FLATBASIN_TRACKING_PASSWORD_FROM")}  # fmt: skip


@pytest.mark.parametrize("command", [["reproduce", "0123456789abcdef0123456789abcdef"], ["report", "s"],
                                     ["sync", "{tmp}"], ["search", "{space}"]])  # fmt: skip
def test_a_password_in_the_uri_is_in_no_message(command, tmp_path, ray_tmpdir):
    """A server that is down, named without the user-info its URI was given with (nor its password)."""
    space = tmp_path / "space.yaml"
    space.write_text(GOOD)
    secret = "pw/with%special@chars-0123"
    port = closed_port()
    uri = f"http://alice:{urllib.parse.quote(secret, safe='')}@127.0.0.1:{port}"
    args = [a.replace("{tmp}", str(tmp_path)).replace("{space}", str(space)) for a in command]
    env = {**CLEAN_ENV, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "RAY_TMPDIR": str(ray_tmpdir)}
    result = runner.invoke(app, [*args, "--tracking-uri", uri, "--storage", str(tmp_path / "runs")]
                           if command[0] == "search" else [*args, "--tracking-uri", uri], env=env)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for leak in (secret, urllib.parse.quote(secret, safe=""), "alice"):
        assert leak not in result.output, result.output
    if command[0] != "sync":  # sync first finds no search in the folder
        assert f"http://127.0.0.1:{port}" in result.output, result.output


def test_credentials_leave_the_command_line_and_reach_the_server(process_groups, tmp_path):
    """`python -m flatbasin ... --tracking-uri http://alice:PASSWORD@HOST` execs itself without them
    (Ray records a driver's command line, `ps` shows it): while the server holds the first request,
    the process's command line is clean and the request carries them; the refusal says where they
    came from."""
    secret = "pw/cmdline%0123"
    seen: list[dict[str, str]] = []
    asked, answer = threading.Event(), threading.Event()

    class Refuses(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(dict(self.headers))
            asked.set()
            answer.wait(120)
            self.send_response(401)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        uri = f"http://alice:{urllib.parse.quote(secret, safe='')}@127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
        env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="120")
        log = tmp_path / "out.log"
        proc = process_groups.spawn(
            [sys.executable, "-m", "flatbasin", "reproduce", "0" * 32, "--tracking-uri", uri],
            log=log, env=env,
        )  # fmt: skip
        assert asked.wait(120), log.read_text()
        command_line = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        answer.set()
        deadline = time.monotonic() + 120
        while process_groups.running(proc) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        answer.set()
        server.shutdown()
    assert secret not in command_line and urllib.parse.quote(secret, safe="") not in command_line
    assert f"http://127.0.0.1:{port}" in command_line and "alice" not in command_line, command_line
    expected = base64.b64encode(f"alice:{secret}".encode()).decode()
    assert seen[0].get("Authorization") == f"Basic {expected}", seen[0]
    process_groups.kill(proc)
    assert proc.returncode == 2
    text = " ".join(log.read_text().split())
    assert (
        "the credentials of user 'alice' (both from the user-info of --tracking-uri) are wrong"
        in text
    ), text
    assert secret not in text and urllib.parse.quote(secret, safe="") not in text


def test_a_fifo_where_the_searchs_report_goes_is_refused_before_ray(
    tmp_path, ray_tmpdir, monkeypatch
):
    """The report a search writes at its end (./reports/NAME) would have hung on a FIFO there."""
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "rep.yaml"
    space.write_text(GOOD)
    (tmp_path / "reports" / "rep").mkdir(parents=True)
    os.mkfifo(tmp_path / "reports" / "rep" / "report.html")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["search", str(space), "--tracking-uri", uri, "--storage", str(tmp_path / "runs")]
    result = runner.invoke(app, args, env={"RAY_TMPDIR": str(ray_tmpdir)})
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "the search's report folder reports/rep: report.html there is a named pipe" in text, text
    assert_nothing_started(tmp_path, ray_tmpdir, uri)
