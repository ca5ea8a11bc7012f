"""The MLflow side of a search, on real SQLite stores: how a new store is made, and how the driver's
writer batches a trial's epochs."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from rich.console import Console

from flatbasin.search.callbacks import MlflowWriter
from flatbasin.search.sqlite_store import seed_sqlite
from flatbasin.search.tracking import Tracker, TrialRecord


def _schema(path: Path) -> tuple[set[str], list[tuple[str, ...]]]:
    with sqlite3.connect(path) as db:
        names = {row[0] for row in db.execute("select name from sqlite_master")}
        return names, db.execute("select * from alembic_version").fetchall()


def test_a_new_store_is_a_copy_of_one_mlflow_built(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    built = tmp_path / "built.db"
    MlflowClient(f"sqlite:///{built}").search_experiments()  # MLflow's own migrations

    for name in ("first.db", "second.db"):  # the first builds the cached copy, the second reuses it
        tracker = Tracker(f"sqlite:///{tmp_path / name}", "exp", search_key="k")
        tracker.check()
        assert not (tmp_path / name).exists()  # the check alone makes nothing
        tracker.parent({"a": 1})
        assert _schema(tmp_path / name) == _schema(built)
        default = tracker.client.get_experiment("0")  # made by MLflow, for this store, as usual
        assert default.name == "Default"
        assert (
            default.artifact_location
            == MlflowClient(f"sqlite:///{built}").get_experiment("0").artifact_location
        )
    assert len(list((tmp_path / "cache" / "flatbasin").glob("mlflow-*.db"))) == 1
    assert not list(tmp_path.glob(".*.new"))


def test_a_store_made_meanwhile_is_never_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    store = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{store}")
    client.create_experiment("kept")
    seed_sqlite(store)
    assert MlflowClient(f"sqlite:///{store}").get_experiment_by_name("kept") is not None


def test_without_a_writable_cache_mlflow_builds_the_store(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file, not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", search_key="k")
    tracker.parent()
    assert {"experiments", "runs", "alembic_version"} <= _schema(tmp_path / "mlflow.db")[0]


def test_the_writer_batches_a_trials_epochs_and_loses_none(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", search_key="k")
    tracker.parent()
    writes: list[int] = []
    write = tracker.write
    tracker.write = lambda record: (writes.append(len(record.results)), write(record))  # type: ignore[method-assign]
    writer = MlflowWriter(tracker, Console(quiet=True))
    writer.flush_s = 60.0  # nothing but the first event and the drain may write
    trial = SimpleNamespace(
        trial_id="t1", config={"variant": "sgd", "lr": 0.1}, local_path=str(tmp_path), path=None
    )
    writer.on_trial_start(0, [], trial)
    for epoch in range(1, 21):
        writer.on_trial_result(0, [], trial, {"epoch": epoch, "score": epoch / 20, "val_acc": 0.5})
    assert writer.drain()
    assert len(writes) <= 2, writes  # not one write per epoch
    run = tracker.run_for(writer.records["t1"])
    history = tracker.client.get_metric_history(run, "score")
    assert sorted(m.step for m in history) == list(range(1, 21))


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty", "another database"])
def test_a_damaged_cached_store_is_built_again_never_copied(tmp_path, monkeypatch, damage):
    from mlflow.store.db.utils import _get_latest_schema_revision

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    Tracker(f"sqlite:///{tmp_path / 'first.db'}", "exp", search_key="k").parent()
    template = tmp_path / "cache" / "flatbasin" / f"mlflow-{_get_latest_schema_revision()}.db"
    good = template.read_bytes()
    if damage == "truncated":
        template.write_bytes(good[: len(good) // 3])
    elif damage == "random bytes":
        template.write_bytes(bytes(range(256)) * 64)
    elif damage == "empty":
        template.write_bytes(b"")
    else:
        template.unlink()
        with sqlite3.connect(template) as db:
            db.execute("create table foo (x)")

    tracker = Tracker(f"sqlite:///{tmp_path / 'second.db'}", "exp", search_key="k")
    tracker.parent({"a": 1})
    assert _schema(tmp_path / "second.db") == _schema(tmp_path / "first.db")  # no foo, not damaged
    assert _schema(template) == _schema(tmp_path / "first.db")  # the cache is sound again
    assert tracker.client.get_experiment_by_name("exp") is not None


def test_a_folder_where_the_cached_store_goes_is_left_alone(tmp_path, monkeypatch):
    from mlflow.store.db.utils import _get_latest_schema_revision

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "flatbasin" / f"mlflow-{_get_latest_schema_revision()}.db").mkdir(
        parents=True
    )
    Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", search_key="k").parent()
    assert {"experiments", "runs", "alembic_version"} <= _schema(tmp_path / "mlflow.db")[0]
    assert not list((tmp_path / "cache" / "flatbasin").glob("*.db.*"))


def test_only_trials_mlflow_lacks_count_as_unwritten(tmp_path):
    """After the search, every trial is handed to the writer again (read back from Tune's files);
    with the store then away, the trials already whole in MLflow are not reported as unwritten."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", search_key="k")
    tracker.parent()
    writer = MlflowWriter(tracker, Console(quiet=True))
    done = SimpleNamespace(
        trial_id="t1", config={"variant": "sgd"}, local_path=str(tmp_path), path=None
    )
    writer.on_trial_result(0, [], done, {"epoch": 1, "score": 0.5})
    writer.on_trial_complete(0, [], done)
    assert writer.drain()

    class Away:
        def __getattr__(self, name: str):
            raise ConnectionError("the store is away")

    tracker._client = Away()  # type: ignore[assignment]
    writer.add(writer.records["t1"].copy())
    for trial_id in ("t0", "t2"):  # written before and after t1
        writer.add(
            TrialRecord(trial_id, {"variant": "sgd"}, [{"epoch": 1, "score": 0.4}], "FINISHED")
        )
    assert not writer.drain(attempts=1)
    assert writer.unwritten == {"t0", "t2"}


def test_runs_of_trials_tune_never_saved_are_ended_and_not_counted(tmp_path):
    """A driver killed outright (SIGKILL) after a trial's run was made, before Tune saved the
    trial: --resume runs that place again as another trial, and the old run must neither stay
    RUNNING nor count as a trial. Runs Tune knows, and runs already ended, are left as they are."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", search_key="k")
    tracker.parent()
    writer = MlflowWriter(tracker, Console(quiet=True))
    for trial_id, status in (("known", None), ("ended", "FINISHED"), ("lost", None)):
        trial = SimpleNamespace(
            trial_id=trial_id, config={"variant": "sgd"}, local_path=str(tmp_path), path=None
        )
        writer.on_trial_result(0, [], trial, {"epoch": 1, "score": 0.5})
        if status:
            writer.on_trial_complete(0, [], trial)
    assert writer.drain()
    assert tracker.trial_variants() == ["sgd"] * 3

    assert tracker.settle_lost({"known", "ended"}) == 1
    runs = {tracker.run_id(t): t for t in ("known", "ended", "lost")}
    seen = {runs[r.info.run_id]: r for r in tracker.client.search_runs([tracker.experiment_id])
            if r.info.run_id in runs}  # fmt: skip
    assert seen["lost"].info.status == "KILLED"
    assert seen["lost"].data.tags["flatbasin.role"] == "lost"
    assert "killed before Tune saved" in seen["lost"].data.tags["flatbasin.stopped"]
    assert [m.step for m in tracker.client.get_metric_history(tracker.run_id("lost"), "score")] == [
        1
    ]
    assert seen["known"].info.status == "RUNNING"  # Tune will continue it
    assert seen["ended"].info.status == "FINISHED"
    assert sorted(tracker.trial_variants()) == ["sgd", "sgd"]
    assert tracker.settle_lost({"known", "ended"}) == 0  # once


def test_the_experiment_opens_on_its_training_runs(tmp_path):
    # MLflow 3's UI reads `mlflow.experimentKind`: without it a search's experiment opened on the
    # empty GenAI overview. Set on an experiment the search makes and on one made before it; a kind
    # a user chose is left alone.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("older")
    client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    for name, kind in (("new", "custom_model_development"), ("older", "custom_model_development"),
                       ("chosen", "genai_development")):  # fmt: skip
        tracker = Tracker(uri, name, search_key=f"k-{name}")
        tracker.parent()
        assert client.get_experiment_by_name(name).tags["mlflow.experimentKind"] == kind, name


def test_a_run_has_no_phase_metric_its_variant_cannot_have(tmp_path):
    # prior_guided logs its phase per epoch as `focus` (1 or 0); other variants have no focus
    # epochs, so no `focus` metric (it was logged as 0 on every run of every variant).
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", search_key="k")
    tracker.parent()
    phases = ["data", "data", "focus", "data"]
    runs = {}
    for variant in ("sgd", "swa", "prior_guided"):
        results = [{"epoch": e, "score": 0.5, "phase": p} for e, p in enumerate(phases, start=1)]
        record = TrialRecord(variant, {"variant": variant}, results, "RUNNING")
        tracker.write(record)
        runs[variant] = tracker.run_for(record)
    for variant in ("sgd", "swa"):
        metrics = tracker.client.get_run(runs[variant]).data.metrics
        assert "focus" not in metrics and metrics["score"] == 0.5, variant
    history = tracker.client.get_metric_history(runs["prior_guided"], "focus")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [0, 0, 1, 0]


def test_a_trials_params_hold_only_settings_that_acted(tmp_path):
    # swa_lr_max shapes the cyclic SWA schedule only: a constant-mode trial's run does not list it.
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", search_key="k")
    tracker.parent()
    for mode, listed in (("constant", False), ("cyclic", True)):
        config = {"variant": "swa", "settings": {"epochs": 4}, "swa": {"swa_mode": mode}}
        record = TrialRecord(mode, config, [{"epoch": 1, "score": 0.5}], "RUNNING")
        tracker.write(record)
        params = tracker.client.get_run(tracker.run_for(record)).data.params
        assert params["swa_mode"] == mode and ("swa_lr_max" in params) == listed
        assert "swa_lr" in params and "lr_min" not in params  # swa has no lr_min at all
