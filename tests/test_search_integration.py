"""The real path end to end: `flatbasin search` on local Ray, MLflow on a SQLite file, then `reproduce`.

Assertions go through MlflowClient, as a user browsing the UI would see the runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
from mlflow import MlflowClient

from flatbasin.trainables.data import DataSpec, load_data

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPACE = """
name: {name}
samples: {samples}
epochs: 3
fixed: {{batch_size: 64}}
variants:
  sgd: {{lr: {{loguniform: [0.02, 0.1]}}}}
  swa: {{lr: {{loguniform: [0.02, 0.1]}}, swa_start_frac: 0.5}}
  snapshot: {{lr: {{loguniform: [0.02, 0.1]}}, cycles: {{int: [2, 3]}}}}
"""


def flatbasin(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flatbasin", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def search_args(space: Path, uri: str, tmp: Path, seed: int, *extra: str) -> list[str]:
    return [
        "search",
        str(space),
        "--tracking-uri",
        uri,
        "--storage",
        str(tmp / "runs"),
        "--seed",
        str(seed),
        *extra,
    ]


def write_space(tmp: Path, name: str, samples: int) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(SPACE.format(name=name, samples=samples))
    return path


def trial_runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("flatbasin.role") == "search"]
    trials = [r for r in runs if r.data.tags.get("flatbasin.role") == "trial"]
    return parents, trials


def test_search_records_every_trial_and_reproduces(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write_space(tmp_path, "it", samples=5)
    done = flatbasin("search", str(space), "--tracking-uri", uri, "--storage", str(tmp_path / "runs"),
                     "--seed", "4", "--concurrency", "2", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "best trial per variant" in done.stdout and "flatbasin reproduce" in done.stdout

    client = MlflowClient(uri)
    parents, trials = trial_runs(client, "it")
    assert len(parents) == 1 and len(trials) == 5
    parent = parents[0]
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent.info.run_id}
    assert {t.data.tags["flatbasin.variant"] for t in trials} == {"sgd", "swa", "snapshot"}
    assert len({t.data.tags["flatbasin.trial_id"] for t in trials}) == 5
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "comparison.png", "it.yaml"} <= parent_files
    assert parent.data.params["seed"] == "4"

    for run in trials:
        rid, variant = run.info.run_id, run.data.tags["flatbasin.variant"]
        assert run.info.status == "FINISHED"
        assert run.data.params["variant"] == variant and float(run.data.params["lr"]) > 0
        assert run.data.params["epochs"] == "3"
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "score"):
            assert [m.step for m in client.get_metric_history(rid, key)] == [1, 2, 3], key
        curve = client.get_metric_history(rid, "curve/val_acc")
        expected = {
            "sgd": 1,
            "swa": 1,
            "snapshot": int(run.data.params["cycles"]) if variant == "snapshot" else 0,
        }
        assert sorted(m.step for m in curve) == list(range(1, expected[variant] + 1))
        assert len(client.get_metric_history(rid, "curve/test_acc")) == len(curve)
        assert 0 < run.data.metrics["test_acc"] <= 1
        files = {a.path for a in client.list_artifacts(rid)}
        assert {"trial_config.json", "curve.png"} <= files
        assert run.data.tags["flatbasin.data_fingerprint"]

    summary = json.loads(
        Path(
            client.download_artifacts(parent.info.run_id, "summary.json", str(tmp_path))
        ).read_text()
    )
    best_runs = {row["run_id"] for row in summary["best_per_variant"]}
    assert len(best_runs) == 3
    mlflow.set_tracking_uri(uri)
    digits = load_data(DataSpec(), "cpu")
    for rid in best_runs:  # the deployed model of each variant's best trial loads and predicts
        model = mlflow.pytorch.load_model(f"runs:/{rid}/model")
        with torch.no_grad():
            accuracy = (model(digits.x_test).argmax(1) == digits.y_test).float().mean().item()
        recorded = client.get_run(rid).data.metrics["test_acc"]
        assert accuracy == pytest.approx(recorded, abs=1e-6), rid

    best = summary["best_per_variant"][0]["run_id"]
    again = flatbasin("reproduce", best, "--tracking-uri", uri, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "exact match" in again.stdout
    repro = [
        r
        for r in client.search_runs([parent.info.experiment_id])
        if r.data.tags.get("flatbasin.role") == "reproduction"
    ]
    assert len(repro) == 1 and repro[0].data.tags["flatbasin.reproduces"] == best


def test_interrupted_search_resumes_without_duplicates(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write_space(tmp_path, "resumed", samples=6)
    args = search_args(space, uri, tmp_path, seed=1)
    proc = subprocess.Popen([sys.executable, "-m", "flatbasin", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    seen = []
    deadline = time.monotonic() + 300
    assert proc.stdout is not None
    for line in proc.stdout:  # interrupt once two trials are done
        seen.append(line)
        if "2/6 done" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)

    client = MlflowClient(uri)
    _, before = trial_runs(client, "resumed")
    assert 2 <= len(before) < 6, "".join(seen)

    done = flatbasin(*args, "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    parents, trials = trial_runs(client, "resumed")
    assert len(parents) == 1
    ids = [t.data.tags["flatbasin.trial_id"] for t in trials]
    assert len(ids) == len(set(ids)) == 6  # one run per trial, none duplicated
    for run in trials:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "score")]
        assert steps == [1, 2, 3], (run.info.run_id, steps)  # no epoch logged twice
        assert "test_acc" in run.data.metrics


def test_tracking_server_outage_loses_nothing(tmp_path, mlflow_server):
    uri, start, stop = mlflow_server
    space = write_space(tmp_path, "outage", samples=4)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
    }
    args = search_args(space, uri, tmp_path, seed=3)
    proc = subprocess.Popen([sys.executable, "-m", "flatbasin", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    out = []
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        if "1/4 done" in line:
            stop()  # the server goes away mid-search
            break
    out += proc.stdout.readlines()
    assert proc.wait(timeout=300) == 0, "".join(out)
    text = "".join(out)
    assert "MLflow unavailable" in text and "flatbasin sync" in text

    start()
    synced = flatbasin(
        "sync", str(tmp_path / "runs" / "outage"), "--tracking-uri", uri, cwd=tmp_path
    )
    assert synced.returncode == 0, synced.stdout + synced.stderr
    client = MlflowClient(uri)
    parents, trials = trial_runs(client, "outage")
    assert len(parents) == 1 and len(trials) == 4
    for run in trials:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "score")] == [1, 2, 3]
        assert "test_acc" in run.data.metrics
        assert "trial_config.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.flaky(reruns=1)  # the SIGKILL lands at a moment found by polling
def test_driver_killed_then_resumed_reruns_nothing(tmp_path):
    """SIGKILL the driver mid-search; `--resume` finishes it: no finished trial trains again, no run twice."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write_space(tmp_path, "killed", samples=6)
    args = search_args(space, uri, tmp_path, 2, "--checkpoint-interval", "0")
    proc = subprocess.Popen([sys.executable, "-m", "flatbasin", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    experiment = tmp_path / "runs" / "killed"

    def rows(trial_dir: Path) -> list[dict]:
        text = (
            (trial_dir / "result.json").read_text() if (trial_dir / "result.json").exists() else ""
        )
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def finished() -> list[Path]:
        dirs = [d for d in experiment.iterdir() if d.is_dir()] if experiment.exists() else []
        return [d for d in dirs if (r := rows(d)) and r[-1].get("final")]

    assert proc.stdout is not None
    for line in proc.stdout:
        if "2/6 done" in line:
            break
    deadline = time.monotonic() + 30
    while len(finished()) < 2 and time.monotonic() < deadline:  # their final rows on disk
        time.sleep(0.1)
    proc.kill()  # SIGKILL: no chance to save anything
    proc.wait(timeout=60)

    finished_before = finished()
    assert len(finished_before) >= 2

    done = flatbasin(*args, "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    # A finished trial may report its final result once more, but never trains again.
    for trial_dir in finished_before:
        epochs = [r["epoch"] for r in rows(trial_dir)]
        assert epochs[:3] == [1, 2, 3] and set(epochs[3:]) <= {3}, (trial_dir.name, epochs)
    client = MlflowClient(uri)
    parents, trials = trial_runs(client, "killed")
    assert len(parents) == 1 and len(trials) == 6
    assert len({t.data.tags["flatbasin.trial_id"] for t in trials}) == 6
    for run in trials:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "score")] == [1, 2, 3]
        assert "test_acc" in run.data.metrics
