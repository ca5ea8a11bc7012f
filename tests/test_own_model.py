"""The user's own model and data through the real path: `flatbasin search` on local Ray, MLflow on a
SQLite file, `reproduce`; the user's folder is examples/own_model, copied so that a test may edit it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_model"


def flatbasin(*args: str, cwd: Path, ray_tmpdir: Path, groups) -> subprocess.CompletedProcess:
    """Run the CLI as the leader of its own session (the shared fixture kills what is left)."""
    proc = groups.spawn(
        [sys.executable, "-m", "flatbasin", *args], cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmpdir)},
    )  # fmt: skip
    stdout, stderr = proc.communicate(timeout=840)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def user_folder(tmp_path: Path, space: str) -> Path:
    folder = tmp_path / "mine"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "space.yaml").write_text(space)
    return folder


def trials(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no experiment {name}"
    runs = client.search_runs([experiment.experiment_id])
    return [r for r in runs if r.data.tags.get("flatbasin.role") == "trial"]


ARRAYS = """
name: mine
samples: 2
epochs: 3
dataset: arrays:load
data_args: {n: 600, classes: 3}
model: model:build
model_args: {width: {choice: [16, 24]}, depth: 1}
fixed: {batch_size: 32}
variants:
  sgd: {lr: {loguniform: [0.02, 0.1]}}
  swa: {lr: {loguniform: [0.02, 0.1]}, swa_lr: 0.02}
"""


def test_a_search_on_the_users_model_and_arrays_records_its_code_and_reproduces(
    tmp_path, ray_tmpdir, process_groups
):
    folder = user_folder(tmp_path, ARRAYS)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    elsewhere = (
        tmp_path / "elsewhere"
    )  # the search runs from another folder: found beside the space
    elsewhere.mkdir()

    def run(*a, cwd=elsewhere):
        return flatbasin(*a, cwd=cwd, ray_tmpdir=ray_tmpdir, groups=process_groups)

    done = run(
        "search",
        str(folder / "space.yaml"),
        "--tracking-uri",
        uri,
        "--storage",
        str(tmp_path / "runs"),
    )
    assert done.returncode == 0, done.stdout + done.stderr

    client = MlflowClient(uri)
    found = trials(client, "mine")
    assert len(found) == 2
    for trial in found:
        params = trial.data.params
        assert params["model"] == "model:build" and params["dataset"] == "arrays:load"
        assert params["model_args.width"] in ("16", "24") and params["model_args.depth"] == "1"
        assert params["data_args.n"] == "600" and "code_dir" not in params
        files = {a.path for a in client.list_artifacts(trial.info.run_id, "code")}
        assert files == {"code/model.py", "code/arrays.py"}
        assert len(trial.data.tags["flatbasin.code_sha256"]) == 64
        assert trial.data.metrics["test_acc"] > 0.34  # three classes: better than chance
    run_id = found[0].info.run_id

    same = run("reproduce", run_id, "--tracking-uri", uri)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "exact match" in same.stdout and "differs from the code that ran" not in same.stdout

    model = folder / "model.py"
    model.write_text(model.read_text().replace("nn.ReLU()", "nn.Tanh()"))  # another network now
    changed = run("reproduce", run_id, "--tracking-uri", uri)
    assert "differs from the code that ran: model.py" in " ".join(changed.stdout.split())
    assert changed.returncode == 1 and "numbers differ" in changed.stdout

    recorded = run("reproduce", run_id, "--tracking-uri", uri, "--recorded-code")
    assert recorded.returncode == 0, recorded.stdout + recorded.stderr
    assert "using the code recorded with the run" in recorded.stdout
    assert "exact match" in recorded.stdout

    shutil.rmtree(folder)  # the user's folder is gone: the recorded copy is all there is
    gone = run("reproduce", run_id, "--tracking-uri", uri)
    assert gone.returncode == 0 and "cannot be found here" in gone.stdout, gone.stdout + gone.stderr


STREAMED = """
name: streamed
samples: 1
epochs: 3
dataset: streamed:load
data_args: {n: 400, classes: 3}
model: model:build
fixed: {batch_size: 32, loader_workers: 1}
variants:
  swa: {lr: 0.05, swa_lr: 0.02, swa_start_frac: 0.5}
"""

ZOO = """
name: zoo
samples: 2
epochs: 1
dataset: synthetic
fixed: {synthetic_images: 120, image_size: 32, batch_size: 16, data_seed: 3}
variants:
  sgd: {lr: 0.05, model: "torchvision:resnet18"}
  ema: {lr: 0.05, model: "timm:resnet10t", model_args: {drop_rate: 0.1}}
"""


@pytest.mark.parametrize("space", ["streamed", "zoo"])
def test_streamed_datasets_and_zoo_models_search(space, tmp_path, ray_tmpdir, process_groups):
    pytest.importorskip("timm")
    text = {"streamed": STREAMED, "zoo": ZOO}[space]
    folder = user_folder(tmp_path, text)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = flatbasin(
        "search", str(folder / "space.yaml"), "--tracking-uri", uri, "--storage",
        str(tmp_path / "runs"), cwd=tmp_path, ray_tmpdir=ray_tmpdir, groups=process_groups,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    client = MlflowClient(uri)
    found = trials(client, space)
    assert len(found) == {"streamed": 1, "zoo": 2}[space]
    assert all(t.info.status == "FINISHED" and "test_acc" in t.data.metrics for t in found)
    if space == "zoo":
        built = {t.data.params["model"]: t for t in found}
        assert set(built) == {"torchvision:resnet18", "timm:resnet10t"}
        assert built["timm:resnet10t"].data.params["model_args.drop_rate"] == "0.1"
        assert not client.list_artifacts(found[0].info.run_id, "code")  # a zoo is not user code
