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
from flatbasin.search.tracking import Tracker, TrialRecord, seed_sqlite


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
