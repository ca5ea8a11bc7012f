"""`flatbasin train`: a real local trial, and bad input ending in exit status 2 with a clear message."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from flatbasin.search.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["train", *args])


def test_train_writes_json_with_curve_and_config(tmp_path):
    out = tmp_path / "r.json"
    result = run(
        "--variant",
        "snapshot",
        "--epochs",
        "2",
        "--set",
        "cycles=2",
        "--set",
        "threads=1",
        "--json",
        str(out),
    )
    assert result.exit_code == 0, result.output
    assert "epoch   2/2" in result.output
    assert "  gap " in result.output  # the generalisation gap, every epoch
    assert "disagreement" in result.output and "error corr" in result.output  # under the curve
    record = json.loads(out.read_text())
    assert record["config"]["variant"] == "snapshot"
    assert record["config"]["params"]["cycles"] == 2
    assert [p["count"] for p in record["curve"]] == [1, 2]
    assert len(record["extra_curves"]["weight_avg"]) == 2
    assert [p["count"] for p in record["diversity"]] == [2]
    assert record["history"][-1]["gen_gap"] is not None
    assert 0 < record["test_acc"] <= 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--variant", "nope"], "unknown variant 'nope'"),
        (["--variant", "swa", "--set", "swa_lrr=0.1"], "swa_lrr"),
        (["--variant", "swa", "--set", "swa_lr=-1"], "swa_lr: Input should be greater than 0"),
        (
            ["--variant", "snapshot", "--epochs", "3", "--set", "cycles=5"],
            "cycles=5 does not fit the budget",
        ),
        (
            ["--variant", "sgd", "--set", "optimizer=lbfgs"],
            "optimizer: Input should be 'sgd', 'nesterov'",
        ),
        (["--variant", "sgd", "--set", "noequals"], "expected key=value"),
        (
            ["--variant", "sgd", "--dataset", "cifar10", "--data-dir", "/nonexistent/x"],
            "does not exist",
        ),
    ],
)
def test_bad_input_exits_2_naming_the_problem(args, needle):
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_console_script_runs_and_resumes(tmp_path):
    ckpt = tmp_path / "c.pt"
    base = [
        sys.executable,
        "-m",
        "flatbasin",
        "train",
        "--variant",
        "sgd",
        "--epochs",
        "2",
        "--set",
        "threads=1",
    ]
    done = subprocess.run(
        [*base, "--checkpoint", str(ckpt)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert ckpt.is_file()
    again = subprocess.run(
        [*base, "--checkpoint", str(ckpt), "--resume"], capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert "epoch   1/2" not in again.stdout  # nothing left to train: it resumed after epoch 2


@pytest.mark.parametrize(("given", "ran"), [((), 1), (("--set", "threads=2"), 2)])
def test_train_runs_on_one_thread_unless_told(tmp_path, given, ran):
    # One thread by default, as a search's trial: 32 s against 233 s with two on a busy 2-core
    # machine (docs/reproducibility.md). torch's own default here would be 3.
    import torch

    torch.set_num_threads(3)
    out = tmp_path / "r.json"
    result = run("--variant", "sgd", "--epochs", "1", *given, "--json", str(out))
    assert result.exit_code == 0, result.output
    assert f"{ran} thread(s)" in result.output
    assert json.loads(out.read_text())["threads"] == ran
