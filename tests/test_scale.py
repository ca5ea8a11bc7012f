"""What a search costs per trial and per epoch stays flat at any size: short epochs go to Tune several
to a report, a trial's MLflow writes are a handful of calls, nothing is looked up once per trial, and a
search of a few hundred trials records every one of them in MLflow exactly once.

The unit tests run the real loop and a real SQLite store; the MLflow client is the real one, wrapped
only to count (or once refuse) its calls."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from mlflow import MlflowClient
from rich.console import Console

from flatbasin.search.callbacks import MlflowWriter, epoch_rows
from flatbasin.search.tags import FINAL, TRIAL_ID
from flatbasin.search.tracking import Tracker, TrialRecord
from flatbasin.trainables.checkpoint import read_checkpoint
from flatbasin.trainables.config import make_config
from flatbasin.trainables.data import load_data
from flatbasin.trainables.loop import train
from flatbasin.trainables.ray_entry import CheckpointPolicy, EpochReporter

TINY = {"dataset": "synthetic", "synthetic_images": 200, "image_size": 8, "threads": 1}


class Sink:
    """Stands for tune.report: keeps each report, and the epoch and weights of its checkpoint
    (read while the report is made: the reporter removes the folder afterwards)."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, row: dict[str, Any], checkpoint: Any = None) -> None:
        self.reports.append(row)
        if checkpoint is not None:
            state = read_checkpoint(Path(checkpoint.path) / "checkpoint.pt", torch.device("cpu"))
            self.checkpoints[state["epoch"]] = state["model"]


def run_trial(reporter: EpochReporter, epochs: int = 6) -> dict[int, dict[str, torch.Tensor]]:
    """A real tiny trial through the reporter; returns the weights at each epoch's callback."""
    config = make_config("sgd", {**TINY, "epochs": epochs})
    weights = {}

    def on_epoch(metrics: Any, save: Any) -> None:
        model = save.keywords["model"]
        weights[metrics.epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        reporter.on_epoch(metrics, save)

    result = train(config, data=load_data(config.data_spec, "cpu"), on_epoch=on_epoch)
    reporter.finish(result)
    return weights


def rows(sink: Sink) -> list[int]:
    return [row["epoch"] for report in sink.reports for row in epoch_rows(report)]


def test_short_epochs_go_several_to_a_report_and_a_checkpoint_holds_its_own_epoch():
    sink = Sink()
    reporter = EpochReporter([], CheckpointPolicy(every=2, interval_s=0.0), report=sink,
                             interval_s=3600.0)  # fmt: skip
    weights = run_trial(reporter)
    # Reports go out when the held epochs end with a checkpoint (2, 4), and at the end.
    assert [r["epoch"] for r in sink.reports] == [2, 4, 6]
    assert [[e["epoch"] for e in r.get("epochs", [])] for r in sink.reports] == [[1], [3], [5]]
    assert rows(sink) == [1, 2, 3, 4, 5, 6]  # every epoch once, in order
    assert sink.reports[-1]["final"] and "final" not in sink.reports[-1]["epochs"][0]
    # Each checkpoint holds the weights of the epoch it is named for (it held the next epoch's).
    assert sorted(sink.checkpoints) == [2, 4, 6]
    for epoch in (2, 4):
        saved, then = sink.checkpoints[epoch], weights[epoch]
        assert all(torch.equal(saved[k], then[k]) for k in then), epoch


def test_without_checkpoints_reports_wait_for_the_interval_or_an_asha_milestone():
    sink = Sink()
    reporter = EpochReporter([], CheckpointPolicy(every=1, interval_s=3600.0), report=sink,
                             interval_s=3600.0, milestones=[2, 5])  # fmt: skip
    run_trial(reporter, epochs=7)
    assert [r["epoch"] for r in sink.reports] == [2, 5, 7]  # ASHA sees each rung when reached
    assert rows(sink) == list(range(1, 8))
    assert not sink.checkpoints or list(sink.checkpoints) == [7]  # the final one only

    every = Sink()  # interval 0: one report per epoch, as a resumed older search asks
    run_trial(EpochReporter([], CheckpointPolicy(1, 3600.0), report=every, interval_s=0.0), 4)
    assert [r["epoch"] for r in every.reports] == [1, 2, 3, 4]
    assert not any("epochs" in r for r in every.reports)


def test_a_trial_that_fails_reports_the_epochs_it_held_first():
    """A permanent error ends the trial after its epochs so far are sent (ray_entry._run)."""
    sink = Sink()
    reporter = EpochReporter([], CheckpointPolicy(1, 3600.0), report=sink, interval_s=3600.0)
    config = make_config("sgd", {**TINY, "epochs": 3})
    train(config, data=load_data(config.data_spec, "cpu"), on_epoch=reporter.on_epoch)
    assert sink.reports == []  # all three held: the next epoch or the end would send them
    reporter.flush()
    assert rows(sink) == [1, 2, 3] and len(sink.reports) == 1
    reporter.flush()  # nothing held: nothing sent
    assert len(sink.reports) == 1


class Counted:
    """The real MlflowClient, its calls counted; `refuse` names a method to fail once on its
    `nth` call (a store that drops out in the middle of a write)."""

    def __init__(self, client: MlflowClient, refuse: str = "", nth: int = 0) -> None:
        self.client = client
        self.calls: collections.Counter[str] = collections.Counter()
        self.refuse, self.nth = refuse, nth

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if name == self.refuse and self.calls[name] == self.nth:
                raise ConnectionError("the store went away")
            return method(*args, **kwargs)

        return call


def final_result(epochs: int) -> list[dict[str, Any]]:
    """A real trial's results as Tune's reports carry them (every epoch, then the final)."""
    from flatbasin.trainables.ray_entry import epoch_metrics, final_metrics

    config = make_config("swa", {**TINY, "epochs": epochs, "swa_start_frac": 0.5})
    result = train(config, data=load_data(config.data_spec, "cpu"))
    return [epoch_metrics(m, []) for m in result.history[:-1]] + [final_metrics(result, [])]


CONFIG = {"variant": "swa", "settings": {**TINY, "epochs": 4}, "swa": {"swa_start_frac": 0.5}}


def records(results: list[dict[str, Any]], trials: int) -> list[TrialRecord]:
    """Finished trials as the writer holds them once Tune told it everything."""
    return [TrialRecord(f"t{i:03d}", CONFIG, list(results), "FINISHED") for i in range(trials)]


def write(tracker: Tracker, trials: list[TrialRecord]) -> bool:
    """Every trial written once, in this thread (drain writes what the writer holds)."""
    writer = MlflowWriter(tracker, Console(quiet=True))
    for record in trials:
        writer.add(record)
    return writer.drain()


def test_a_report_of_several_epochs_becomes_one_record_row_per_epoch(tmp_path):
    results = final_result(epochs=4)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", search_key="k")
    writer = MlflowWriter(tracker, Console(quiet=True))
    writer.flush_s = 3600.0
    trial = SimpleNamespace(trial_id="t1", config=CONFIG, local_path=str(tmp_path), path=None)
    writer.on_trial_result(0, [], trial, {**results[1], "epochs": results[:1], "trial_id": "t1"})
    writer.on_trial_result(0, [], trial, {**results[3], "epochs": results[2:3], "trial_id": "t1"})
    writer.on_trial_complete(0, [], trial)
    assert [r["epoch"] for r in writer.records["t1"].results] == [1, 2, 3, 4]
    assert writer.records["t1"].final is not None
    assert writer.drain()
    history = tracker.client.get_metric_history(tracker.run_id("t1"), "score")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    rows = epoch_rows({**results[1], "epochs": results[:1], "trial_id": "t1", "node_ip": "n"})
    assert [(r["epoch"], r["trial_id"], r["node_ip"], "epochs" in r) for r in rows] == [
        (1, "t1", "n", False),
        (2, "t1", "n", False),
    ]


def test_a_finished_trial_is_a_handful_of_mlflow_calls_and_none_grows_with_the_trials(tmp_path):
    results = final_result(epochs=4)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "exp", search_key="k")
    tracker.parent()
    tracker._client = counted = Counted(tracker.client)
    assert write(tracker, records(results, 12))
    calls = dict(counted.calls)
    # Per trial: its run, trial_config.json, one batch (params, every epoch, final metrics, tags),
    # its end. Once per search: one query for the runs already there. Nothing else.
    assert calls == {"create_run": 12, "log_dict": 12, "log_batch": 12, "set_terminated": 12,
                     "search_runs": 1}, calls  # fmt: skip
    client = MlflowClient(uri)
    runs = client.search_runs([tracker.experiment_id], "tags.`flatbasin.role` = 'trial'")
    assert sorted(r.data.tags[TRIAL_ID] for r in runs) == [f"t{i:03d}" for i in range(12)]
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags[FINAL] == "true"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "score")]
        assert steps == [1, 2, 3, 4]
        assert run.data.params["swa_start_frac"] == "0.5" and "final_score" in run.data.metrics
        assert len(run.data.params) > 30

    # A second driver (a resumed search, a sync) reads what is there in pages, then writes nothing.
    import flatbasin.search.tracking as tracking

    again = Tracker(uri, "exp", search_key="k")
    again._client = recount = Counted(again.client)
    pages, tracking.RUNS_PAGE = tracking.RUNS_PAGE, 5
    try:
        assert write(again, records(results, 12))
    finally:
        tracking.RUNS_PAGE = pages
    assert recount.calls["search_runs"] == 1 + 3, recount.calls  # its search's run, three pages
    assert "get_metric_history" not in recount.calls  # whole runs are known by their FINAL tag
    assert not {"create_run", "log_batch", "log_dict", "set_terminated"} & set(recount.calls)


def test_a_long_trial_is_written_in_whole_epochs_and_a_retry_writes_nothing_twice(tmp_path):
    """1,100 epochs (11,000 metrics) go in calls of whole epochs under MLflow's limit of 1,000
    metrics a call; the store refuses the third call once: the retry writes each epoch once."""
    epoch = final_result(epochs=2)
    results = [{**epoch[0], "epoch": e} for e in range(1, 1100)] + [{**epoch[-1], "epoch": 1100}]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "exp", search_key="k")
    tracker.parent()
    tracker._client = counted = Counted(tracker.client, refuse="log_batch", nth=3)
    writer = MlflowWriter(tracker, Console(quiet=True))
    writer.retry_s = 0.01
    record = TrialRecord("long", CONFIG, results, "FINISHED")
    writer.add(record)
    assert writer.drain(attempts=3)
    client = MlflowClient(uri)
    run_id = tracker.run_id("long")
    steps = [m.step for m in client.get_metric_history(run_id, "val_acc")]
    assert sorted(steps) == list(range(1, 1101))  # every epoch once, none twice
    assert len(client.get_metric_history(run_id, "final_score")) == 1
    assert client.get_run(run_id).data.tags[FINAL] == "true"
    assert counted.calls["log_batch"] >= 13  # params, 12 calls of epochs, the closing one


def test_an_epoch_that_comes_again_replaces_the_one_held():
    record = TrialRecord("t", {})
    for epoch in (1, 2, 3):
        record.add({"epoch": epoch, "score": epoch})
    record.add({"epoch": 2, "score": 20})  # a trial restored from its epoch-1 checkpoint
    record.add({"epoch": 4, "score": 4})
    assert [(r["epoch"], r["score"]) for r in record.results] == [(1, 1), (2, 20), (3, 3), (4, 4)]


# ----------------------------------------------------------------------------- a search of hundreds

SPACE = """
name: hundreds
samples: {samples}
epochs: 1
fixed: {{dataset: synthetic, synthetic_images: 20, image_size: 8, batch_size: 8}}
variants:
  sgd:
    lr: {{loguniform: [0.02, 0.1]}}
"""


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_search_of_hundreds_of_trials_records_each_once(tmp_path, process_groups):
    """200 one-epoch trials on 20 synthetic 8x8 images (each trains in milliseconds, so the search
    is all overhead): every trial ends up in MLflow once, finished, with its epoch and its final
    results, and the report reads them all."""
    samples = 200
    (tmp_path / "hundreds.yaml").write_text(SPACE.format(samples=samples))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tempfile.TemporaryDirectory(prefix="fbray-", dir="/tmp") as ray:
        proc = process_groups.spawn(
            [sys.executable, "-m", "flatbasin", "search", "hundreds.yaml", "--tracking-uri", uri,
             "--storage", str(tmp_path / "runs"), "--seed", "1"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray},
        )  # fmt: skip
        out, _ = proc.communicate(timeout=540)
        assert proc.returncode == 0, out[-5000:]
        assert not (Path(ray) / "ray" / "ray_current_cluster").exists()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("hundreds")
    runs = client.search_runs([experiment.experiment_id], max_results=5000)
    trials = [r for r in runs if r.data.tags.get("flatbasin.role") == "trial"]
    ids = [r.data.tags[TRIAL_ID] for r in trials]
    assert len(ids) == len(set(ids)) == samples
    tune_ids = {
        p.name.rpartition("_")[2] for p in (tmp_path / "runs" / "hundreds").iterdir() if p.is_dir()
    }
    assert set(ids) == tune_ids
    for run in trials:
        assert run.info.status == "FINISHED" and run.data.tags[FINAL] == "true", run.info.run_id
        assert {"score", "val_acc", "final_score", "test_acc"} <= set(run.data.metrics)
    # Every epoch once: MLflow holds one value per (run, metric, step).
    store = Path(uri.removeprefix("sqlite:///"))
    import sqlite3

    with sqlite3.connect(store) as db:
        repeated = db.execute(
            "select count(*) from (select run_uuid, key, step from metrics "
            "group by run_uuid, key, step having count(*) > 1)"
        ).fetchone()[0]
        scores = db.execute("select count(*) from metrics where key = 'score'").fetchone()[0]
    assert repeated == 0 and scores == samples
    assert f"{samples}/{samples} done" in out
    assert "Report:" in out and (tmp_path / "reports" / "hundreds").is_dir()


# ----------------------------------------------------------------------------- the driver's start


def test_the_learning_check_steps_torchs_adam_without_importing_dynamo():
    """The preflight's one-batch fit steps with torch's functional Adam: the same numbers as
    torch.optim.Adam, without the 1.3 s of CPU that the first torch.optim optimizer spends
    importing torch._dynamo in the driver (checked in a fresh process)."""
    from flatbasin.trainables.sanity import _Adam

    def fit(make: Any) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                    torch.nn.ReLU(), torch.nn.Linear(16, 3))  # fmt: skip
        x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        optimizer = make(list(model.parameters()))
        for _ in range(20):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return [p.detach() for p in model.parameters()]

    ours = fit(lambda params: _Adam(params, 0.01))
    theirs = fit(lambda params: torch.optim.Adam(params, lr=0.01))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))

    code = (
        "import sys\n"
        "from flatbasin.trainables.config import make_config\n"
        "from flatbasin.trainables.data import load_data\n"
        "from flatbasin.trainables.sanity import check_learns\n"
        f"config = make_config('sgd', {TINY!r})\n"
        "print(check_learns(config, load_data(config.data_spec, 'cpu')))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "False"], done.stdout + done.stderr


def test_result_files_cut_short_by_a_full_disk_are_mended(tmp_path):
    """Tune copies its files to the storage on its own schedule: a copy cut short leaves a half
    line, which a resumed search would append after. It is cut off, and the rows of the trial's
    last report that Tune's state holds are written back (search/tune_results.fill_from_grid)."""
    from flatbasin.search.callbacks import append_rows, mend_results, read_results

    trial = tmp_path / "exp" / "sgd_1"
    trial.mkdir(parents=True)
    whole = '{"epoch": 1, "score": 0.5}\n{"epoch": 2, "score": 0.6}\n'
    (trial / "result.json").write_text(whole + '{"epoch": 3, "sco')
    (trial / "progress.csv").write_text("epoch,score\n1,0.5\n2,0.")
    kept = tmp_path / "exp" / "sgd_2"
    kept.mkdir()
    (kept / "result.json").write_text(whole)
    mend_results(tmp_path / "exp")
    assert (trial / "result.json").read_text() == whole == (kept / "result.json").read_text()
    assert (trial / "progress.csv").read_text() == "epoch,score\n1,0.5\n"
    append_rows(trial, epoch_rows({"epoch": 4, "final": True, "epochs": [{"epoch": 3}]}))
    assert [r["epoch"] for r in read_results(trial)] == [1, 2, 3, 4]
    append_rows(tmp_path / "nowhere", [{"epoch": 1}])  # no file, nothing made
    assert not (tmp_path / "nowhere").exists()
