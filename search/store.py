"""The tracking store itself: a client made on first use, checked before anything starts (a server
that is down or refuses us, a SQLite file that is not MLflow's), and the experiment a search writes to."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import read_mlflow_creds

from flatbasin.search.credentials import PASSWORD, USERNAME, redact_uri, scrub, source_of
from flatbasin.search.errors import short
from flatbasin.search.sqlite_store import read_only, seed_sqlite
from flatbasin.search.tags import EXPERIMENT_KIND, TRAINING_KIND
from flatbasin.search.tracking_uri import sqlite_file
from flatbasin.trainables.files import not_a_file


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached or refuses to work."""


class TrackingRefused(TrackingUnavailable):
    """The tracking server answered and refused the request (HTTP 401 or 403): credentials are
    missing or wrong, or the user may not read there. Starting the server again would not help."""


def refusal_message(uri: str, status: int) -> str:
    """What to do about a 401/403: whose credentials were refused and where each came from (a
    tracking URI's user-info, MLflow's variables, ~/.mlflow/credentials); never the password."""
    creds = read_mlflow_creds()  # from the environment, else ~/.mlflow/credentials
    where = f"MLflow tracking server at {redact_uri(uri)} refused the request (HTTP {status})"
    user_from, password_from = _came_from(USERNAME), _came_from(PASSWORD)
    if creds.username is None and creds.password is None:
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        sent = " (only the token in MLFLOW_TRACKING_TOKEN was sent)" if token else ""
        if status == 403:
            return (
                f"{where}: anonymous requests may not read experiments there{sent}. Set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account with access."
            )
        return (
            f"{where}: it requires credentials and none were given{sent}: no user-info in the "
            "tracking URI, no MLFLOW_TRACKING_USERNAME or MLFLOW_TRACKING_PASSWORD in the "
            "environment, no ~/.mlflow/credentials. Set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD in the environment (they are never logged)."
        )
    if creds.username is None or creds.password is None:
        given, source, missing = (
            ("a password", password_from, "username")
            if creds.username is None
            else (f"user '{creds.username}'", user_from, "password")
        )
        return (
            f"{where}: {given} came from {source}, but no {missing}, so no credentials were "
            "sent; give both (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)."
        )
    if (user_from, password_from) == (f"${USERNAME}", f"${PASSWORD}"):
        source = f"from the environment: {USERNAME} and {PASSWORD}"
    elif user_from == password_from:
        source = f"both from {user_from}"
    else:
        source = f"the username from {user_from}, the password from {password_from}"
    if status == 403:
        return (
            f"{where}: user '{creds.username}' ({source}) has no permission to read experiments "
            "there. Ask the server's admin for access, or give another account's credentials."
        )
    return f"{where}: the credentials of user '{creds.username}' ({source}) are wrong; correct them there."


def _came_from(variable: str) -> str:
    """Where MLflow's username or password came from; MLflow reads its variable, else the file."""
    if os.environ.get(variable):
        return source_of(variable)
    return "~/.mlflow/credentials"


class Store:
    """One tracking store and, for a search, its experiment (made on first use)."""

    def __init__(self, uri: str, experiment: str, search_key: str):
        self.uri, self.experiment, self.search_key = uri, experiment, search_key
        self._client: MlflowClient | None = None  # made on first use, inside check()'s handling
        self._experiment_id: str | None = None

    def __getstate__(self) -> dict[str, str]:  # Tune pickles its callbacks: keep only the address,
        # without credentials (a restored search gets this process's live tracker back: callbacks.py)
        uri = redact_uri(self.uri)
        return {"uri": uri, "experiment": self.experiment, "search_key": self.search_key}

    @property
    def shown(self) -> str:
        """The URI as messages show it: without credentials."""
        return redact_uri(self.uri)

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            path = sqlite_file(self.uri)
            if path is not None and not path.exists():
                seed_sqlite(path)  # the client would build the database: copy a built one instead
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def check(self) -> None:
        """Fail fast, before any trial starts, when the tracking store is unreachable or refuses us.
        A SQLite file that does not exist yet is not made here: bad input found later leaves no file."""
        if sqlite_file(self.uri) is not None and self._new_sqlite():
            return
        try:
            self.client.search_experiments(max_results=1)
            # A reader (read_store) names no experiment, and a server refuses an empty name.
            found = self.client.get_experiment_by_name(self.experiment) if self.experiment else None
        except MlflowException as err:
            status = err.get_http_status_code()
            if status in (401, 403):
                raise TrackingRefused(refusal_message(self.uri, status)) from err
            if status not in (None, 500, 502, 503, 504) and "error code" in str(err):
                raise TrackingUnavailable(
                    f"{self.shown} answered HTTP {status} to MLflow's API, so it is not an MLflow "
                    "tracking server (or not its root address); give the server's address, e.g. "
                    "http://HOST:5000"
                ) from err
            if not self.uri.startswith(("http://", "https://")):  # a store, not a server
                raise TrackingUnavailable(_store_refused(self.uri, err)) from err
            raise TrackingUnavailable(
                f"MLflow tracking server at {self.shown} is not reachable: {first_line(err)}"
            ) from err
        except Exception as err:
            if self.uri.startswith(("http://", "https://")):
                raise TrackingUnavailable(
                    f"MLflow tracking server at {self.shown} is not reachable: {scrub(str(err))}"
                ) from err
            raise TrackingUnavailable(
                f"MLflow tracking URI {self.shown} cannot be used: {first_line(err)}"
            ) from err
        if found is not None and (not found.experiment_id or found.name != self.experiment):
            # An MLflow server answers a name it lacks with 404, and one it has with that
            # experiment; a server that answers everything with an empty 200 is something else.
            raise TrackingUnavailable(
                f"{self.shown} answers MLflow's API with empty replies, so it is not an MLflow "
                "tracking server (or not its root address); give the server's address, e.g. "
                "http://HOST:5000"
            )

    def _new_sqlite(self) -> bool:
        """True when the SQLite file is yet to be made (and can be); raises when it cannot be."""
        path = sqlite_file(self.uri)
        assert path is not None
        if path.is_dir():
            raise TrackingUnavailable(
                f"MLflow tracking URI {self.shown}: {path} is a folder; name a file, e.g. "
                f"sqlite:///{path / 'mlflow.db'}"
            )
        kind = not_a_file(path)
        if kind is not None:  # opening a named pipe would wait for a writer forever
            raise TrackingUnavailable(
                f"MLflow tracking URI {self.shown}: {path} is {kind}, not a database file; name "
                "a new file or MLflow's own database"
            )
        if path.exists():
            self._check_mlflow_database(path)
            return False
        folder = path.parent
        if not folder.is_dir():
            what = "is a file" if folder.exists() else "does not exist"
            raise TrackingUnavailable(
                f"MLflow tracking URI {self.shown}: the folder {folder} {what}, so the database "
                "cannot be made there"
            )
        from flatbasin.search.preflight import takes_files

        if not takes_files(folder):
            raise TrackingUnavailable(
                f"MLflow tracking URI {self.shown}: the folder {folder} is not writable"
            )
        return True

    def _check_mlflow_database(self, path: Path) -> None:
        """An existing file must be MLflow's database (or empty): MLflow would otherwise add its
        tables to whatever SQLite database, or fail on a file that is not one."""
        try:
            with read_only(path) as db:
                tables = {row[0] for row in db.execute("select name from sqlite_master")}
        except sqlite3.Error as err:
            raise TrackingUnavailable(
                f"MLflow tracking URI {self.shown}: {path} is not a SQLite database ({err}); name "
                "a new file or MLflow's own database"
            ) from err
        if tables and not {"experiments", "runs", "alembic_version"} <= tables:
            raise TrackingUnavailable(
                f"MLflow tracking URI {self.shown}: {path} is a SQLite database of something else "
                f"(tables {short(sorted(tables))}); MLflow would add its tables to it; name a new "
                "file or MLflow's own database"
            )

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                self._experiment_id = self.client.create_experiment(
                    self.experiment, tags={EXPERIMENT_KIND: TRAINING_KIND}
                )
            else:
                self._experiment_id = found.experiment_id
                if EXPERIMENT_KIND not in found.tags:  # made before flatbasin set it, or by hand
                    # How the UI opens it, never worth failing a search over (a server may refuse).
                    with contextlib.suppress(MlflowException):
                        self.client.set_experiment_tag(
                            found.experiment_id, EXPERIMENT_KIND, TRAINING_KIND
                        )
        return self._experiment_id


def _store_refused(uri: str, err: Exception) -> str:
    """Why MLflow cannot use a tracking URI that names no server."""
    scheme = uri.partition("://")[0] if "://" in uri else ""
    if "unsupported URI" in str(err) and scheme:
        return (
            f"MLflow tracking URI {redact_uri(uri)}: MLflow has no tracking store for '{scheme}://'; give "
            "sqlite:///PATH.db, a server's http://HOST:PORT, or a database URI such as "
            "postgresql://HOST/DB"
        )
    return f"MLflow tracking URI {redact_uri(uri)} cannot be used: {first_line(err)}"


def read_store(uri: str) -> MlflowClient:
    """A client for a store that must already hold runs (report, reproduce, --from RUN_ID): a SQLite
    file that does not exist is never made (a mistyped path would make an empty database), and a
    server that is down is named as such, not as a run that is missing. Raises TrackingUnavailable."""
    path = sqlite_file(uri)
    if path is not None and not path.is_file():
        raise TrackingUnavailable(
            f"no MLflow store at {path} (from --tracking-uri {redact_uri(uri)})"
        )
    store = Store(uri, experiment="", search_key="")
    store.check()
    return store.client


def first_line(err: BaseException) -> str:
    text = scrub(str(err)).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
