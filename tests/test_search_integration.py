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

from flatbasin.trainables.data import load_data
from flatbasin.trainables.data_spec import DataSpec

# Minutes per search on a loaded 2-core machine; the shared search may run in the first test's setup.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.xdist_group("searched"),
    pytest.mark.timeout(900),
]


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


# What Ray, MLflow and Optuna printed on every run before search/quiet.py: Ray's token notice and
# its start and save lines, MLflow's download bars, Optuna's "already reported" for resumed trials,
# Tune's slow-operation notes on a busy machine.
CHATTER = ("Token authentication is enabled", "Started a local Ray instance", "Downloading artifacts",
           "Wrote the latest version of all result files", "is already reported",
           "may be a performance bottleneck")  # fmt: skip


def assert_no_library_chatter(text: str) -> None:
    found = [line for line in text.splitlines() if any(c in line for c in CHATTER)]
    assert not found, found


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
    assert exp is not None, f"no experiment {experiment}"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("flatbasin.role") == "search"]
    trials = [r for r in runs if r.data.tags.get("flatbasin.role") == "trial"]
    return parents, trials


def test_search_records_every_trial_confirms_and_reproduces(searched, tmp_path):
    """The shared search (conftest.searched): what a user finds in MLflow afterwards."""
    uri, folder = searched.uri, searched.folder
    assert searched.returncode == 0, searched.stdout + searched.stderr
    assert "best trial per variant" in searched.stdout and "flatbasin reproduce" in searched.stdout
    assert "confirmed over 2 fresh seeds and validation splits" in searched.stdout
    assert "Verdict:" in searched.stdout
    assert_no_library_chatter(searched.stdout + searched.stderr)

    client = MlflowClient(uri)
    parents, trials = trial_runs(client, "searched")
    assert len(parents) == 1 and len(trials) == 6
    parent = parents[0]
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent.info.run_id}
    assert {t.data.tags["flatbasin.variant"] for t in trials} == {"sgd", "swa", "snapshot"}
    assert len({t.data.tags["flatbasin.trial_id"] for t in trials}) == 6
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "comparison.png", "searched.yaml"} <= parent_files
    assert parent.data.params["seed"] == "4"
    assert parent.info.status == "FINISHED" and parent.data.tags["flatbasin.state"] == "finished"
    # The MLflow UI opens the experiment on its training runs, not on the GenAI overview.
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    again = flatbasin("search", "searched.yaml", "--tracking-uri", uri, "--storage",
                      str(folder / "runs"), cwd=folder)  # fmt: skip
    assert again.returncode == 2, again.stdout + again.stderr
    assert "already exists" in again.stderr and "--resume" in again.stderr
    assert len(trial_runs(client, "searched")[1]) == 6  # nothing merged into the first search

    for run in trials:
        rid, variant = run.info.run_id, run.data.tags["flatbasin.variant"]
        assert run.info.status == "FINISHED"
        assert run.data.params["variant"] == variant and float(run.data.params["lr"]) > 0
        assert run.data.params["epochs"] == "3" and run.data.tags["flatbasin.model"] == "small_cnn"
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "score"):
            assert [m.step for m in client.get_metric_history(rid, key)] == [1, 2, 3], key
        assert "focus" not in run.data.metrics  # prior_guided's alone: no focus epochs here
        curve = client.get_metric_history(rid, "curve/val_acc")
        expected = {
            "sgd": 1,
            "swa": 2,  # averaging starts after epoch 1 of 3 (swa_start_frac 0.34)
            "snapshot": int(run.data.params["cycles"]) if variant == "snapshot" else 0,
        }
        assert sorted(m.step for m in curve) == list(range(1, expected[variant] + 1))
        assert len(client.get_metric_history(rid, "curve/test_acc")) == len(curve)
        assert 0 < run.data.metrics["test_acc"] <= 1
        files = {a.path for a in client.list_artifacts(rid)}
        assert "trial_config.json" in files  # curve.png: the best trials' (below)
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
        run = client.get_run(rid)
        assert accuracy == pytest.approx(run.data.metrics["test_acc"], abs=1e-6), rid
        assert "curve.png" in {a.path for a in client.list_artifacts(rid)}, rid
        # Logging the model reopened the run: it keeps its own end, not the search's.
        assert run.info.end_time < parent.info.end_time - 1, rid

    # Confirmation: each variant's best config, 2 fresh seeds, its own runs under the parent.
    exp = client.get_experiment_by_name("searched").experiment_id
    confirms = [
        r for r in client.search_runs([exp]) if r.data.tags.get("flatbasin.role") == "confirm"
    ]
    assert len(confirms) == 6 and {r.data.tags["mlflow.parentRunId"] for r in confirms} == {
        parent.info.run_id
    }
    by_trial = {t.data.tags["flatbasin.trial_id"]: t for t in trials}
    for run in confirms:
        source = by_trial[run.data.tags["flatbasin.confirms"]]  # the best trial it retrains
        assert source.info.run_id in best_runs
        assert run.data.params["seed"] != source.data.params["seed"]
        for key in ("lr", "variant", "epochs"):
            assert run.data.params[key] == source.data.params[key], key
    assert len({(r.data.tags["flatbasin.confirms"], r.data.params["seed"]) for r in confirms}) == 6
    # Every variant ran on the same seeds and the same fresh validation splits (the search's was
    # split_seed + 1's: its trials have no val_seed); the test split is the search's.
    runs_of = {
        v: sorted((r.data.params["seed"], r.data.params["val_seed"]) for r in confirms
                  if r.data.tags["flatbasin.variant"] == v)
        for v in ("sgd", "swa", "snapshot")
    }  # fmt: skip
    assert runs_of["sgd"] == runs_of["swa"] == runs_of["snapshot"] and len(runs_of["sgd"]) == 2
    assert {t.data.params["val_seed"] for t in trials} == {"None"}
    assert {val_seed for _, val_seed in runs_of["sgd"]}.isdisjoint({"None", "1"})
    assert {r.data.params["split_seed"] for r in confirms} == {
        t.data.params["split_seed"] for t in trials
    }
    assert summary["confirmed"] and {row["variant"] for row in summary["confirmed"]} == {
        "sgd",
        "swa",
        "snapshot",
    }
    assert all(row["fresh_splits"] and row["val_size"] == 144 for row in summary["confirmed"])
    assert parent.data.metrics["confirmed/val_size"] == 144
    # One meaning per tag: the best search trial (also under its former name), the confirmed
    # winner (only beyond noise), the recommended variant (the winner, or the cheapest of a tie),
    # the verdict in words, the run the printed Reproduce: names.
    tags = parent.data.tags
    top = summary["best_per_variant"][0]
    assert tags["flatbasin.best_search_run"] == tags["flatbasin.best_run_id"] == top["run_id"]
    assert tags.get("flatbasin.winner") in (None, summary["confirmed"][0]["variant"])
    assert tags["flatbasin.recommended"] in {"sgd", "swa", "snapshot"}
    if "flatbasin.winner" in tags:
        assert tags["flatbasin.recommended"] == tags["flatbasin.winner"]
    chosen = next(
        r for r in summary["best_per_variant"] if r["variant"] == tags["flatbasin.recommended"]
    )
    assert tags["flatbasin.reproduce_run"] == chosen["run_id"]
    assert f"Reproduce:    flatbasin reproduce {chosen['run_id']} " in searched.stdout
    verdict = tags["flatbasin.verdict"]
    assert verdict.startswith(("Winner: ", "No winner beyond noise: ")) and f"Verdict:      {verdict}\n" in searched.stdout  # fmt: skip

    best = summary["best_per_variant"][0]["run_id"]
    again = flatbasin("reproduce", best, "--tracking-uri", uri, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "exact match" in again.stdout
    assert_no_library_chatter(again.stdout + again.stderr)  # its download: no progress bar
    repro = [
        r
        for r in client.search_runs([parent.info.experiment_id])
        if r.data.tags.get("flatbasin.role") == "reproduction"
    ]
    assert len(repro) == 1 and repro[0].data.tags["flatbasin.reproduces"] == best
    assert repro[0].data.tags["mlflow.parentRunId"] == parent.info.run_id


@pytest.mark.timeout(1200)  # three searches in a row: minutes each on a loaded 2-core machine
def test_interrupted_then_killed_search_resumes_to_the_end(
    tmp_path, ray_tmpdir, spawn, process_groups
):
    """Ctrl-C, then SIGKILL, then the end, in one search of 8 trials:

    - Ctrl-C: exit 130, the parent run says interrupted (not FINISHED), the exact --resume command
      is printed;
    - that command resumes it; once two more trials are done the driver and its local Ray are killed
      (SIGKILL: no chance to save anything);
    - --resume again finishes it: no finished trial trains again, one run per trial, every epoch of
      Tune's result files in MLflow once.

    A stale current-cluster file from some earlier `ray start` lies around the whole time: a local
    search never goes near it."""
    stale = ray_tmpdir / "ray" / "ray_current_cluster"
    stale.parent.mkdir(parents=True)
    stale.write_text("127.0.0.2:6379")  # nothing listens there
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write_space(tmp_path, "resumed", samples=8)
    args = search_args(space, uri, tmp_path, 1, "--checkpoint-interval", "0")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmpdir)}
    experiment = tmp_path / "runs" / "resumed"

    def until_done(proc: subprocess.Popen, count: int) -> str:
        seen = []
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if f"{count}/8 done" in line:
                break
        return "".join(seen)

    def finished() -> list[Path]:
        dirs = [d for d in experiment.iterdir() if d.is_dir()] if experiment.exists() else []
        return [d for d in dirs if (r := tune_rows(d)) and r[-1].get("final")]

    # 1. Ctrl-C once two trials are done.
    proc = spawn(args, tmp_path, env)
    text = until_done(proc, 2)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    text += rest
    assert proc.returncode == 130, text
    assert "Connecting to existing Ray cluster" not in text and "127.0.0.2" not in text
    assert "Tuner.restore" not in text  # flatbasin's own command, not Tune's
    resume = [line.strip() for line in text.splitlines() if line.strip().endswith("--resume")]
    assert resume and resume[0].startswith("flatbasin search ") and "--name resumed" in resume[0], (
        text
    )
    client = MlflowClient(uri)
    parents, before = trial_runs(client, "resumed")
    assert 2 <= len(before) < 8, text
    assert parents[0].info.status == "KILLED"
    assert parents[0].data.tags["flatbasin.state"] == "interrupted"
    assert not any(t.info.status == "RUNNING" for t in before)

    # 2. The printed command resumes it; SIGKILL once two more are done and their rows are on disk.
    proc = spawn(shlex.split(resume[0])[1:], tmp_path, env)
    until_done(proc, 2)
    deadline = time.monotonic() + 30
    while len(finished()) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    process_groups.kill(proc)  # the driver and its local Ray: no chance to save anything
    finished_before = finished()
    assert len(finished_before) >= 4

    # 3. The printed command again, to the end.
    done = flatbasin(*shlex.split(resume[0])[1:], cwd=tmp_path, env={"RAY_TMPDIR": str(ray_tmpdir)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert_no_library_chatter(text + done.stdout + done.stderr)  # resumed trials report again
    # A finished trial may report its final result once more, but never trains again.
    for trial_dir in finished_before:
        epochs = [r["epoch"] for r in tune_rows(trial_dir)]
        assert epochs[:3] == [1, 2, 3] and set(epochs[3:]) <= {3}, (trial_dir.name, epochs)
    parents, trials = trial_runs(client, "resumed")
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["flatbasin.state"] == "finished"
    ids = [t.data.tags["flatbasin.trial_id"] for t in trials]
    assert len(ids) == len(set(ids)) == 8  # one run per trial, none duplicated
    assert_mlflow_holds_tune_results(client, experiment, trials)
    for run in trials:  # every epoch once (MLflow keeps them in the order they were written)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "score")]
        assert sorted(steps) == [1, 2, 3], steps
        assert "test_acc" in run.data.metrics and run.info.status == "FINISHED"


def test_tracking_server_outage_loses_nothing(tmp_path, mlflow_server, spawn):
    uri, start, stop = mlflow_server
    space = write_space(tmp_path, "outage", samples=4)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",  # a stopped server refuses at once; a busy one may be slow
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
