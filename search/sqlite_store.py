"""A new SQLite tracking store, copied from an empty one that MLflow built once per schema revision
(building it runs every migration: 1.6 s of CPU), and SQLite files opened read-only to check them."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path


def seed_sqlite(path: Path) -> None:
    """Make a new SQLite store as a copy of an empty one that MLflow built.

    Building a store runs every migration of MLflow's schema: about 1.6 s of CPU on a quiet machine,
    paid by every new store, on the cores the trials need (and by each test that makes one). The
    copy is built once per schema revision, by MLflow's own code, in the user's cache folder; MLflow
    then adds its default experiment to the copy as it would to its own. A cached file that is not
    such a store (damaged, emptied, another database) is built again; every copy is checked before
    it becomes the store. Where no cache can be written, or anything fails, MLflow builds the store
    itself, as before.
    """
    from mlflow.store.db import utils

    try:
        revision = utils._get_latest_schema_revision()
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flatbasin"
        template = cache / f"mlflow-{revision}.db"
        if template.exists() and not template.is_file():
            return  # something else is there: not ours to replace
        if not _copy_store(template, path, revision):
            _build_store(template, revision)
            _copy_store(template, path, revision)
    except Exception:  # a cache is never a reason to fail: MLflow builds the store instead
        return


def _build_store(template: Path, revision: str) -> None:
    """An empty store built by MLflow's own migrations, put in place whole (os.replace)."""
    import sqlalchemy
    from mlflow.store.db import utils

    template.parent.mkdir(parents=True, exist_ok=True)
    fd, built = tempfile.mkstemp(dir=template.parent, suffix=".db")
    os.close(fd)
    try:
        engine = sqlalchemy.create_engine(f"sqlite:///{built}")
        try:
            utils._initialize_tables(engine)
        finally:
            engine.dispose()
        if _empty_store(Path(built), revision):
            os.replace(built, template)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(built)


def _copy_store(template: Path, path: Path, revision: str) -> bool:
    """Copy the template to `path` if the copy is a sound, empty store of this revision; never over
    a store that another process made meanwhile. False when there is no usable template."""
    if not template.is_file():
        return False
    copy = path.with_name(f".{path.name}.{os.getpid()}.new")
    try:
        shutil.copyfile(template, copy)
        if not _empty_store(copy, revision):
            return False
        os.link(copy, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(copy)


def read_only(path: Path) -> contextlib.closing[sqlite3.Connection]:
    """A SQLite file opened so that nothing can change it, closed at the end of the `with`."""
    return contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True))


def _empty_store(path: Path, revision: str) -> bool:
    """Whether `path` is an undamaged MLflow store of this schema revision holding no experiment."""
    try:
        with read_only(path) as db:
            sound = db.execute("pragma quick_check").fetchall() == [("ok",)]
            versions = db.execute("select version_num from alembic_version").fetchall()
            experiments = db.execute("select count(*) from experiments").fetchone()[0]
            db.execute("select count(*) from runs").fetchone()
    except sqlite3.Error:
        return False
    return sound and versions == [(revision,)] and experiments == 0
