"""The real path end to end: `flatbasin search` on local Ray, MLflow on a SQLite file, then `reproduce`.

Assertions go through MlflowClient, as a user browsing the UI would see the runs.
"""

from __future__ import annotations

import json
import os
import shlex
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


@pytest.fixture
def spawn(process_groups):
    """Start `flatbasin` with its output piped, as the leader of a new session: the driver and the
    local Ray it starts are killed as one, by the shared process-group fixture, however the test ends."""

    def start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
        return process_groups.spawn(
            [sys.executable, "-m", "flatbasin", *args], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    return start


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


def flatbasin(
    *args: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flatbasin", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )  # fmt: skip


def tune_rows(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_mlflow_holds_tune_results(client: MlflowClient, experiment: Path, trials: list) -> None:
    """Every epoch in Tune's result files is in MLflow once, with the same score, for every trial."""
    by_id = {t.data.tags["flatbasin.trial_id"]: t for t in trials}
    folders = [d for d in experiment.iterdir() if d.is_dir() and (d / "result.json").exists()]
    assert len(folders) == len(by_id)
    for folder in folders:
        rows = tune_rows(folder)
        tune_scores = {r["epoch"]: r["score"] for r in rows if "epoch" in r}
        run = by_id[rows[0]["trial_id"]]
        history = client.get_metric_history(run.info.run_id, "score")
        steps = [m.step for m in history]
        assert sorted(steps) == sorted(set(steps)) == sorted(tune_scores), (folder.name, steps)
        assert {m.step: m.value for m in history} == pytest.approx(tune_scores), folder.name


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
    assert parent.info.status == "FINISHED" and parent.data.tags["flatbasin.state"] == "finished"

    again = flatbasin("search", str(space), "--tracking-uri", uri, "--storage", str(tmp_path / "runs"),
                      cwd=tmp_path)  # fmt: skip
    assert again.returncode == 2, again.stdout + again.stderr
    assert "already exists" in again.stderr and "--resume" in again.stderr
    assert len(trial_runs(client, "it")[1]) == 5  # nothing merged into the first search

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


def test_interrupted_search_exits_130_then_resumes_to_the_end(tmp_path, ray_tmpdir, spawn):
    """Ctrl-C: exit 130, the parent run says interrupted (not FINISHED), the exact --resume command is
    printed, and it finishes the search with one run per trial. A stale current-cluster file from some
    earlier `ray start` is lying around the whole time: a local search never goes near it."""
    stale = ray_tmpdir / "ray" / "ray_current_cluster"
    stale.parent.mkdir(parents=True)
    stale.write_text("127.0.0.2:6379")  # nothing listens there
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write_space(tmp_path, "resumed", samples=6)
    args = search_args(space, uri, tmp_path, seed=1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmpdir)}
    proc = spawn(args, tmp_path, env)
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:  # interrupt once two trials are done
        seen.append(line)
        if "2/6 done" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    text = "".join(seen) + rest
    assert proc.returncode == 130, text
    assert "Connecting to existing Ray cluster" not in text and "127.0.0.2" not in text
    resume = [line.strip() for line in text.splitlines() if line.strip().endswith("--resume")]
    assert resume and resume[0].startswith("flatbasin search ") and "--name resumed" in resume[0], (
        text
    )

    client = MlflowClient(uri)
    parents, before = trial_runs(client, "resumed")
    assert 2 <= len(before) < 6, text
    assert parents[0].info.status == "KILLED"
    assert parents[0].data.tags["flatbasin.state"] == "interrupted"

    done = flatbasin(*shlex.split(resume[0])[1:], cwd=tmp_path, env={"RAY_TMPDIR": str(ray_tmpdir)})
    assert done.returncode == 0, done.stdout + done.stderr
    parents, trials = trial_runs(client, "resumed")
    assert len(parents) == 1
    assert (
        parents[0].info.status == "FINISHED"
        and parents[0].data.tags["flatbasin.state"] == "finished"
    )
    ids = [t.data.tags["flatbasin.trial_id"] for t in trials]
    assert len(ids) == len(set(ids)) == 6  # one run per trial, none duplicated
    assert_mlflow_holds_tune_results(client, tmp_path / "runs" / "resumed", trials)


def test_tracking_server_outage_loses_nothing(tmp_path, mlflow_server, spawn):
    uri, start, stop = mlflow_server
    space = write_space(tmp_path, "outage", samples=4)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
    }
    args = search_args(space, uri, tmp_path, seed=3)
    proc = spawn(args, tmp_path, env)
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
def test_driver_killed_then_resumed_reruns_nothing(tmp_path, ray_tmpdir, spawn, process_groups):
    """SIGKILL the driver mid-search; `--resume` finishes it: no finished trial trains again, no run twice."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write_space(tmp_path, "killed", samples=6)
    args = search_args(space, uri, tmp_path, 2, "--checkpoint-interval", "0")
    proc = spawn(
        args, tmp_path, {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmpdir)}
    )
    experiment = tmp_path / "runs" / "killed"

    def finished() -> list[Path]:
        dirs = [d for d in experiment.iterdir() if d.is_dir()] if experiment.exists() else []
        return [d for d in dirs if (r := tune_rows(d)) and r[-1].get("final")]

    assert proc.stdout is not None
    for line in proc.stdout:
        if "2/6 done" in line:
            break
    deadline = time.monotonic() + 30
    while len(finished()) < 2 and time.monotonic() < deadline:  # their final rows on disk
        time.sleep(0.1)
    process_groups.kill(proc)  # the driver and its local Ray: no chance to save anything

    finished_before = finished()
    assert len(finished_before) >= 2

    done = flatbasin(*args, "--resume", cwd=tmp_path, env={"RAY_TMPDIR": str(ray_tmpdir)})
    assert done.returncode == 0, done.stdout + done.stderr
    # A finished trial may report its final result once more, but never trains again.
    for trial_dir in finished_before:
        epochs = [r["epoch"] for r in tune_rows(trial_dir)]
        assert epochs[:3] == [1, 2, 3] and set(epochs[3:]) <= {3}, (trial_dir.name, epochs)
    client = MlflowClient(uri)
    parents, trials = trial_runs(client, "killed")
    assert len(parents) == 1 and len(trials) == 6
    assert len({t.data.tags["flatbasin.trial_id"] for t in trials}) == 6
    assert_mlflow_holds_tune_results(client, experiment, trials)
    for run in trials:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "score")] == [1, 2, 3]
        assert "test_acc" in run.data.metrics
