"""The tracking URI a command uses: chosen (--tracking-uri, $MLFLOW_TRACKING_URI, ./mlflow.db), its
form checked before anything starts, made absolute; and the SQLite file it names, if any."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from urllib.parse import urlsplit

from flatbasin.search.credentials import redact_uri
from flatbasin.search.errors import UsageError


def browse_hint(uri: str) -> str:
    """How to look at the runs: a server has its own UI; a local store is opened with `mlflow ui`."""
    if uri.startswith(("http://", "https://")):
        return f"open {redact_uri(uri)} in a browser (the MLflow server's UI)"
    return f"mlflow ui --backend-store-uri {shlex.quote(redact_uri(uri))}"


def default_tracking_uri() -> str:
    return absolute_uri(os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")


def chosen_uri(given: str | None) -> str:
    """The tracking URI a command uses: --tracking-uri, else $MLFLOW_TRACKING_URI, else
    ./mlflow.db; a malformed one refused (UsageError, naming where it came from), before anything
    starts; made absolute."""
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if not given and not from_env:
        return default_tracking_uri()
    source, uri = ("--tracking-uri", given) if given else ("$MLFLOW_TRACKING_URI", from_env)
    assert uri is not None
    problem = uri_problem(uri)
    if problem:
        parts = urlsplit(uri)
        shown = uri if parts.password is None else uri.replace(f":{parts.password}@", ":***@", 1)
        raise UsageError(f"{source} {shown}: {problem}")
    return absolute_uri(uri)


SQLITE_FORM = (
    "sqlite:///RELATIVE/PATH.db or sqlite:////ABSOLUTE/PATH.db (the path after three slashes)"
)


SERVER_FORM = "http://HOST:PORT"


DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")


MLFLOW_WORDS = ("", "databricks", "databricks-uc", "uc")  # URIs without a scheme that are no path


def uri_problem(uri: str) -> str | None:
    """What is wrong with the form of a tracking URI, or None. Only the form: whether the store
    answers is Store.check's. Each of these was taken by MLflow and failed only later (an
    in-memory SQLite store, lost at exit and invisible to the trials) or slowly (a host-less
    server's address, looked up for minutes)."""
    try:
        parts = urlsplit(uri)
        port = parts.port  # raises for a port that is not a number from 0 to 65535
    except ValueError as err:
        server = uri.lower().startswith(("http:", "https:"))
        return f"not a URI MLflow can use ({err}); give {SERVER_FORM if server else SQLITE_FORM}"
    scheme = parts.scheme.lower().partition("+")[0]  # postgresql+psycopg2: a driver's name
    if scheme == "sqlite":
        path = uri.partition("?")[0][len(parts.scheme) + 1 :]
        if path == "//":
            return (
                "an in-memory SQLite database, which every run would be lost with when the command "
                f"ends (and which the trials cannot reach); name a file: {SQLITE_FORM}"
            )
        if not path.startswith("///"):
            where = f"a host ({parts.netloc})" if parts.netloc else "too few slashes"
            return f"a SQLite URI names a file, with {where} it names none; give {SQLITE_FORM}"
        if path == "///":
            return f"names no file; give {SQLITE_FORM}"
        if path.endswith("/"):
            return f"ends in '/', so it names a folder, not the database file; give {SQLITE_FORM}"
        return None
    if scheme in ("http", "https"):
        if not parts.hostname:
            return (
                f"names no server host; give {parts.scheme}://HOST:PORT, e.g. http://127.0.0.1:5000"
            )
        if port == 0:
            return "port 0 is no server's port; give the port the MLflow server listens on"
        return None
    if scheme in DATABASE_SCHEMES and port == 0:
        return "port 0 is no database's port; leave it out or give the server's port"
    if scheme == "file" or (not parts.scheme and uri not in MLFLOW_WORDS):  # MLflow's files
        if not _file_store_allowed():
            return (
                "MLflow no longer writes its filesystem store (./mlruns, file:) unless "
                f"MLFLOW_ALLOW_FILE_STORE=true; give {SQLITE_FORM}, or {SERVER_FORM}"
            )
        if scheme == "file" and (
            not uri.startswith("file://") or parts.netloc not in ("", "localhost") or not parts.path
        ):
            return "give the store's folder as file:///ABSOLUTE/PATH or as a plain path"
    return None


def _file_store_allowed() -> bool:
    """MLflow 3 refuses its filesystem store unless MLFLOW_ALLOW_FILE_STORE says yes; MLflow 2 has it."""
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:  # pragma: no cover  # MLflow 2
        return True
    try:
        return bool(MLFLOW_ALLOW_FILE_STORE.get())
    except ValueError:  # neither true nor false: MLflow would refuse it as well
        return False


def absolute_uri(uri: str) -> str:
    """sqlite:///relative.db and plain paths made absolute, so they survive a change of directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri and not uri.startswith("sqlite:"):
        return str(Path(uri).resolve())
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file a sqlite:/// tracking URI names; None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").partition("?")[0])
