"""The one MLflow writer. Trials and searches become runs here and nowhere else.

Every write is idempotent: runs are found again by their tags (the search's storage path, the trial id),
metrics already in MLflow are not logged twice, and the final results are written once. That is what
lets a restored search, a retry after the server came back, and `flatbasin sync` share this code.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import shutil
import sqlite3
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import read_mlflow_creds
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

import flatbasin
from flatbasin.search.credentials import PASSWORD, USERNAME, redact_uri, scrub, source_of
from flatbasin.search.errors import UsageError, short
from flatbasin.trainables.config import TrialConfig, sampled, trial_config
from flatbasin.trainables.files import not_a_file
from flatbasin.trainables.start import write_converged
from flatbasin.trainables.usercode import text_digest
from flatbasin.trainables.variants import phase_flags

# Per-epoch metrics, step = epoch. train_loss and train_acc are absent in an epoch without a pass over
# the data (prior_guided's focus epochs); elapsed_s is training time since the trial started. A
# variant with epochs without data logs each epoch's phase as a metric (phase_flags: prior_guided's
# `focus`, 1 in a focus epoch, 0 in a data epoch); other variants' runs have no such metric.
EPOCH_METRICS = (
    "train_loss", "train_acc", "val_loss", "val_acc", "lr", "score", "members", "gen_gap", "elapsed_s",
)  # fmt: skip
ROLE, VARIANT, TRIAL_ID, SEARCH_KEY = (
    "flatbasin.role",
    "flatbasin.variant",
    "flatbasin.trial_id",
    "flatbasin.search",
)
FINAL = "flatbasin.final_logged"
STATE = "flatbasin.state"  # of a search: running, finished, failed, interrupted
ERROR = "flatbasin.error"  # of a trial that reported a permanent error
STOPPED = "flatbasin.stopped"  # why a trial ended before its last epoch
STOP_REASONS = {
    "FINISHED": "early stopping (the scheduler or the time budget)",
    "INTERRUPTED": "the search was interrupted; --resume continues this trial",
    "STOPPED": "the search stopped at another trial's permanent error",
}
LOST = (
    "lost: the search's driver was killed before Tune saved this trial, so --resume ran its place "
    "again as another trial; not part of the search"
)
CONFIRMS = "flatbasin.confirms"  # of a confirmation run: the trial id whose best config it retrains
# Post-convergence: the run whose checkpoint.pt holds the converged model a trial (and its search)
# continues, the SHA-256 of those weights, and, on a base run, what the weights came from.
SPACE_DIGEST = "flatbasin.space_digest"  # of a search: what its space file said (space_digest)
BASE_RUN = "flatbasin.base_run"
FROM_SHA = "flatbasin.from_sha256"
BASE_SOURCE = "flatbasin.base_source"
CHECKPOINT_ARTIFACT = "checkpoint.pt"  # a run's final weights: what --from RUN_ID continues
CODE_ARTIFACTS = "code"  # the user's own modules (model:, dataset: module:callable) as they ran
CODE_SHA256 = "flatbasin.code_sha256"
# A search run's answers, one meaning per tag. BEST_SEARCH_RUN: the trial with the best search
# score (validation accuracy of one seed: the maximum of noisy numbers, biased upward); WINNER: the
# variant better than every other beyond noise over the confirmation's fresh seeds and splits
# (absent without a confirmation, or when the leading variants tie); RECOMMENDED: the variant to
# use, the winner or else the cheapest of the variants that tie; VERDICT: the confirmation's answer
# in words; REPRODUCE_RUN: the run the printed `Reproduce:` names (and SearchResult.best_trial): the
# recommended variant's best search trial, else the best search trial. OLD_BEST_RUN:
# BEST_SEARCH_RUN under its former name, kept for the scripts that read it.
BEST_SEARCH_RUN = "flatbasin.best_search_run"
WINNER = "flatbasin.winner"
RECOMMENDED = "flatbasin.recommended"
VERDICT = "flatbasin.verdict"
REPRODUCE_RUN = "flatbasin.reproduce_run"
OLD_BEST_RUN = "flatbasin.best_run_id"
ANSWER_TAGS = (BEST_SEARCH_RUN, OLD_BEST_RUN, WINNER, RECOMMENDED, VERDICT, REPRODUCE_RUN)
# The experiment tag MLflow 3's UI reads for what an experiment holds (the value its own "experiment
# type" selector writes): training runs open on "Training runs", not on the GenAI overview and its
# "Detect issues" prompt. Set on the experiments a search makes, and on existing ones without it
# (a kind a user chose is left alone).
EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
RUNS_PAGE = 1000  # runs per search_runs call where a search reads all of its runs


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
    answers is Tracker.check's. Each of these was taken by MLflow and failed only later (an
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


@functools.cache
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def base_tags() -> dict[str, str]:
    tags = {"flatbasin.version": flatbasin.__version__}
    commit = git_commit()
    if commit:
        tags["flatbasin.git_commit"] = commit
    return tags


@dataclass
class TrialRecord:
    """What Tune told us about one trial: its config, every result in order, and how it ended."""

    trial_id: str
    config: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    status: str = "RUNNING"  # RUNNING, FINISHED, FAILED, INTERRUPTED, STOPPED

    @property
    def final(self) -> dict[str, Any] | None:
        return self.results[-1] if self.results and self.results[-1].get("final") else None

    @property
    def error(self) -> str | None:
        """The permanent error the trial reported (its data or model cannot work), if any."""
        last = self.results[-1] if self.results else {}
        return last.get("permanent_error") or None

    def add(self, result: dict[str, Any]) -> None:
        """One result per epoch: a result for an epoch already held replaces it (a trial restored from
        a checkpoint reports that epoch again; a finished trial may repeat its final result)."""
        epoch = result.get("epoch")
        last = self.results[-1].get("epoch") if self.results else -1
        if epoch is not None and last is not None and epoch > last:
            # The next epoch, as nearly always: appended, not a pass over every earlier one
            self.results.append(result)
            return
        if epoch is not None:
            self.results = [r for r in self.results if r.get("epoch") != epoch]
        self.results.append(result)
        self.results.sort(key=lambda r: (r.get("epoch") is None, r.get("epoch") or 0))

    def copy(self) -> TrialRecord:
        return TrialRecord(self.trial_id, self.config, list(self.results), self.status)


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


def _read_only(path: Path) -> contextlib.closing[sqlite3.Connection]:
    """A SQLite file opened so that nothing can change it, closed at the end of the `with`."""
    return contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True))


def _empty_store(path: Path, revision: str) -> bool:
    """Whether `path` is an undamaged MLflow store of this schema revision holding no experiment."""
    try:
        with _read_only(path) as db:
            sound = db.execute("pragma quick_check").fetchall() == [("ok",)]
            versions = db.execute("select version_num from alembic_version").fetchall()
            experiments = db.execute("select count(*) from experiments").fetchone()[0]
            db.execute("select count(*) from runs").fetchone()
    except sqlite3.Error:
        return False
    return sound and versions == [(revision,)] and experiments == 0


def _store_refused(uri: str, err: Exception) -> str:
    """Why MLflow cannot use a tracking URI that names no server."""
    scheme = uri.partition("://")[0] if "://" in uri else ""
    if "unsupported URI" in str(err) and scheme:
        return (
            f"MLflow tracking URI {redact_uri(uri)}: MLflow has no tracking store for '{scheme}://'; give "
            "sqlite:///PATH.db, a server's http://HOST:PORT, or a database URI such as "
            "postgresql://HOST/DB"
        )
    return f"MLflow tracking URI {redact_uri(uri)} cannot be used: {_first_line(err)}"


def sqlite_file(uri: str) -> Path | None:
    """The database file a sqlite:/// tracking URI names; None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").partition("?")[0])


def read_store(uri: str) -> MlflowClient:
    """A client for a store that must already hold runs (report, reproduce, --from RUN_ID): a SQLite
    file that does not exist is never made (a mistyped path would make an empty database), and a
    server that is down is named as such, not as a run that is missing. Raises TrackingUnavailable."""
    path = sqlite_file(uri)
    if path is not None and not path.is_file():
        raise TrackingUnavailable(
            f"no MLflow store at {path} (from --tracking-uri {redact_uri(uri)})"
        )
    tracker = Tracker(uri, experiment="", search_key="")
    tracker.check()
    return tracker.client


class Tracker:
    def __init__(self, uri: str, experiment: str, search_key: str):
        self.uri, self.experiment, self.search_key = uri, experiment, search_key
        self._client: MlflowClient | None = None  # made on first use, inside check()'s handling
        self._experiment_id: str | None = None
        self._parent: str | None = None
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._logged: dict[str, set[int]] = {}  # run id -> epochs already in MLflow
        self._finalised: set[str] = set()
        self._final_metrics: set[str] = set()  # runs whose final metrics are in, tag not yet
        self._ended: dict[str, str] = {}  # run id -> the record status its run was ended with
        self._stop_tagged: set[str] = set()  # runs tagged STOPPED, which a --resume may finish
        self._known: dict[str, Run] | None = None  # trial id -> its run, read once (_trial_runs)
        self._params: dict[str, list[Param]] = {}  # run id -> params not yet sent

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

    # ------------------------------------------------------------------ search level
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
                f"MLflow tracking server at {self.shown} is not reachable: {_first_line(err)}"
            ) from err
        except Exception as err:
            if self.uri.startswith(("http://", "https://")):
                raise TrackingUnavailable(
                    f"MLflow tracking server at {self.shown} is not reachable: {scrub(str(err))}"
                ) from err
            raise TrackingUnavailable(
                f"MLflow tracking URI {self.shown} cannot be used: {_first_line(err)}"
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
            with _read_only(path) as db:
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

    def find_parent(self) -> str | None:
        """The run of an earlier search with this storage key, if there is one; creates nothing."""
        found = self._search_run("=")
        return found.info.run_id if found else None

    def other_search(self) -> str | None:
        """The Tune folder of another search recorded under this experiment name (another
        --storage), if there is one: a second search there would mix two searches in one experiment."""
        found = self._search_run("!=")
        return found.data.tags.get(SEARCH_KEY) if found else None

    def _search_run(self, key_is: str) -> Run | None:
        """A search's run in this experiment whose storage key is (`=`) or is not (`!=`) ours;
        creates nothing (not even a SQLite file that is yet to exist)."""
        sqlite = sqlite_file(self.uri)
        if sqlite is not None and not sqlite.exists():
            return None  # asking would make the database
        found_experiment = self.client.get_experiment_by_name(self.experiment)
        if found_experiment is None:
            return None
        found = self.client.search_runs(
            [found_experiment.experiment_id],
            filter_string=f"tags.`{ROLE}` = 'search' and tags.`{SEARCH_KEY}` {key_is} '{_quoted(self.search_key)}'",
            max_results=1,
        )
        return found[0] if found else None

    def parent(
        self,
        params: dict[str, Any] | None = None,
        space_file: Path | None = None,
        space_digest: str = "",
    ) -> str:
        """The search's run: found again by its storage key when a search is restored. A store that
        fails here (it answered the check, then went down or refused to write) is TrackingUnavailable."""
        try:
            return self._open_parent(params, space_file, space_digest)
        except (MlflowException, OSError) as err:
            raise TrackingUnavailable(
                f"MLflow tracking store {self.shown} failed when the search's run was made: "
                f"{_first_line(err)}"
            ) from err

    def _open_parent(
        self, params: dict[str, Any] | None, space_file: Path | None, space_digest: str
    ) -> str:
        if self._parent is None:
            found = self.find_parent()
            if found:
                self._parent = found
                self.client.update_run(found, status="RUNNING")  # resumed: running again
                self.client.set_tag(found, STATE, "running")
            else:
                run = self.client.create_run(
                    self.experiment_id,
                    run_name=self.experiment,
                    tags={
                        ROLE: "search",
                        SEARCH_KEY: self.search_key,
                        STATE: "running",
                        **({SPACE_DIGEST: space_digest} if space_digest else {}),
                        **base_tags(),
                    },
                )
                self._parent = run.info.run_id
                if params:
                    self.client.log_batch(
                        self._parent, params=[Param(k, str(v)) for k, v in params.items()]
                    )
                if space_file is not None:
                    self.client.log_artifact(self._parent, str(space_file))
        return self._parent

    def recorded_space(self, run_id: str, file_name: str) -> tuple[str | None, Any]:
        """(digest, content as read) of the space file a search started with; (None, None) for a
        search recorded before digests were, and content None when the file was not logged."""
        import mlflow.artifacts
        import yaml

        from flatbasin.spaces.loader import read_yaml

        digest = self.client.get_run(run_id).data.tags.get(SPACE_DIGEST)
        if digest is None:
            return None, None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=file_name, dst_path=tmp, tracking_uri=self.uri
                )
                return digest, read_yaml(Path(local).read_text(encoding="utf-8"))
            except (MlflowException, OSError, ValueError, yaml.YAMLError):
                return digest, None

    def trial_variants(self) -> list[str]:
        """The variant of every search trial under the parent (confirmations not counted)."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent()}' and tags.`{ROLE}` = 'trial'",
            max_results=50_000,
        )
        return [r.data.tags.get(VARIANT, "?") for r in runs]

    def discard_parent(self) -> bool:
        """Delete the search's run if no trial was recorded under it; True when it was deleted."""
        if self._parent is None:
            return True
        children = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self._parent}'",
            max_results=1,
        )
        if children:
            return False
        self.client.delete_run(self._parent)
        self._parent = None
        return True

    def end_parent(self, state: str) -> None:
        """Mark the search's run: 'finished', 'failed' (a trial failed) or 'interrupted' (resumable)."""
        if self._parent is None:
            return
        status = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}[state]
        self.client.set_tag(self._parent, STATE, state)
        self.client.set_terminated(self._parent, status)

    # ------------------------------------------------------------------ post-convergence base
    def base_run(self) -> str | None:
        """The search's base run (post-convergence), found again on --resume; creates nothing."""
        parent = self._parent or self.find_parent()
        if parent is None:
            return None
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}' and tags.`{ROLE}` = 'base'",
            max_results=1,
        )
        return found[0].info.run_id if found else None

    def record_base(self, checkpoint: Path, source: str, result: dict[str, Any] | None) -> str:
        """The search's base run, under its run: the converged model every trial continues, as
        checkpoint.pt. When the search trained it (`result`, a TrialResult's JSON), also its epochs
        and a trial_config.json that `flatbasin reproduce` reads as it reads a trial's."""
        tags = {MLFLOW_PARENT_RUN_ID: self.parent(), ROLE: "base", TRIAL_ID: "base",
                BASE_SOURCE: source, **base_tags()}  # fmt: skip
        if result is not None:
            tags |= {VARIANT: result["config"]["variant"],
                     "flatbasin.dataset": result["config"]["dataset"],
                     "flatbasin.data_fingerprint": result["data_fingerprint"],
                     "flatbasin.model": result["model"], "flatbasin.diverged": "false"}  # fmt: skip
        run_id = self.client.create_run(self.experiment_id, run_name="base", tags=tags).info.run_id
        if result is not None:
            config = TrialConfig.model_validate(result["config"])
            params = [Param(k, str(v)) for k, v in sorted(config.flat().items())]
            for start in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[start : start + 100])
            now = int(time.time() * 1000)
            history = result["history"]
            metrics = [Metric(k, float(m[k]), now, int(m["epoch"]))
                       for m in history for k in EPOCH_METRICS if m.get(k) is not None]  # fmt: skip
            metrics += [Metric("test_acc", float(result["test_acc"]), now, 0),
                        Metric("final_score", float(result["score"]), now, 0)]  # fmt: skip
            for p in result["curve"]:
                metrics += [Metric("curve/val_acc", p["val_acc"], now, p["count"]),
                            Metric("curve/test_acc", p["test_acc"], now, p["count"])]  # fmt: skip
            for begin in range(0, len(metrics), 1000):
                self.client.log_batch(run_id, metrics=metrics[begin : begin + 1000])
            self.client.log_dict(run_id, {
                "config": result["config"], "seed": result["config"]["seed"],
                "threads": result["threads"], "data_fingerprint": result["data_fingerprint"],
                "flatbasin_version": flatbasin.__version__, "git_commit": git_commit(),
                "trial_id": "base",
                "recorded": {"score": result["score"], "test_acc": result["test_acc"],
                             "diverged": result["diverged"], "curve": result["curve"],
                             "history": [{k: m[k] for k in ("epoch", *EPOCH_METRICS)}
                                         for m in history]},
            }, "trial_config.json")  # fmt: skip
        self.log_checkpoint(run_id, checkpoint)
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def log_checkpoint(self, run_id: str, checkpoint: Path) -> None:
        log_weights(self.client, run_id, checkpoint)

    def discard_base(self) -> None:
        """Delete the search's base run: a search stopped before Tune saved anything leaves no run
        behind, and a base run alone would keep the search's run, so its name, taken."""
        if self._parent is None:
            return
        base = self.base_run()
        if base is not None:
            self.client.delete_run(base)

    def settle_lost(self, known: set[str], role: str = "trial") -> int:
        """End the runs of trials that Tune does not know. A driver killed outright (SIGKILL, the
        OOM killer) after a trial's run was made but before Tune saved that trial leaves a run that
        would say RUNNING forever and count as a trial, while --resume runs the slot again as a new
        trial. Such a run is ended KILLED and its role becomes 'lost', so that no count, summary or
        report takes it for a trial; what it logged stays. Returns how many there were."""
        if self._parent is None:
            return 0
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self._parent}' and "
            f"tags.`{ROLE}` = '{role}' and attributes.status = 'RUNNING'",
            max_results=50_000,
        )
        lost = [run for run in runs if run.data.tags.get(TRIAL_ID) not in known]
        for run in lost:
            tags = [RunTag(ROLE, "lost"), RunTag(STOPPED, LOST)]
            self.client.log_batch(run.info.run_id, tags=tags)
            self.client.set_terminated(run.info.run_id, "KILLED")
        return len(lost)

    # ------------------------------------------------------------------ trial level
    def _trial_runs(self) -> dict[str, Run]:
        """The runs already under the search's run, by trial id (the newest of each), read once, a
        page at a time: a search looked each trial up on its own, one query per trial. This tracker
        is the search's one writer, so the runs it makes itself are all it needs to add."""
        if self._known is None:
            parent, known, token = self.parent(), {}, None
            while True:
                page = self.client.search_runs(
                    [self.experiment_id],
                    filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'",
                    max_results=RUNS_PAGE,
                    page_token=token,
                )  # newest first: MLflow's order
                for run in page:
                    if TRIAL_ID in run.data.tags:
                        known.setdefault(run.data.tags[TRIAL_ID], run)
                token = page.token
                if not token:
                    break
            self._known = known
        return self._known

    def run_for(self, record: TrialRecord) -> str:
        if record.trial_id in self._runs:
            return self._runs[record.trial_id]
        parent = self.parent()
        found = self._trial_runs().get(record.trial_id)
        if found is not None:
            run_id = found.info.run_id
            last = found.data.metrics.get("epochs_run")
            if found.data.tags.get(FINAL) == "true" and last is not None:
                # Whole: its closing batch went in with or after every epoch up to its last. One
                # query per trial less for a sync or a resumed search of a thousand trials.
                # Every epoch up to it, not only those the record holds now: a trial restored from
                # its checkpoint before the last (after a SIGKILL) reports its last epochs again,
                # and the mended result file brings the earlier ones later; none goes in twice.
                self._logged[run_id] = set(range(int(last) + 1))
            else:
                history = self.client.get_metric_history(run_id, "score")
                self._logged[run_id] = {m.step for m in history}
            if found.data.tags.get(STOPPED):
                self._stop_tagged.add(run_id)
            if found.info.status in ("FINISHED", "FAILED"):  # ended as such: not again
                self._ended[run_id] = found.info.status
            if found.data.tags.get(FINAL) == "true":
                self._finalised.add(run_id)
            elif "final_score" in found.data.metrics:
                # Its final metrics went in before the server went away, its tag did not: the
                # rest of the final write is repeated, the metrics are not (they would be twice).
                self._final_metrics.add(run_id)
        else:
            base_run = (record.config.get("start") or {}).get("run_id")
            try:
                config = trial_config(record.config)
                variant, dataset, flat = config.variant, config.dataset, config.flat()
            except ValueError:  # a config the trial itself rejected: record what was sampled
                variant = str(record.config.get("variant"))
                settings = record.config.get("settings", {})
                dataset = str(settings.get("dataset"))
                flat = {**settings, **record.config.get(variant, {}), "variant": variant}
            confirms = record.config.get("confirm_of")
            role = {ROLE: "confirm", CONFIRMS: str(confirms)} if confirms else {ROLE: "trial"}
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{variant}-{'confirm-' if confirms else ''}{record.trial_id}",
                tags={MLFLOW_PARENT_RUN_ID: parent, **role, VARIANT: variant,
                      TRIAL_ID: record.trial_id, "flatbasin.dataset": dataset, **base_tags(),
                      **({BASE_RUN: base_run} if base_run else {})},
            )  # fmt: skip
            run_id = run.info.run_id
            self._trial_runs()[record.trial_id] = run
            # Sent with the run's first metrics, in one call (write)
            self._params[run_id] = [Param(k, str(v)) for k, v in sorted(flat.items())]
            self._logged[run_id] = set()
        self._runs[record.trial_id] = run_id
        return run_id

    def is_written(self, record: TrialRecord) -> bool:
        """Whether this tracker already brought the trial's run up to date with the record (nothing
        for `write` to do): every epoch logged, its final results or error in, its end status set."""
        run_id = self._runs.get(record.trial_id)
        if run_id is None:
            return False
        epochs = {int(r["epoch"]) for r in record.results if r.get("epoch") is not None}
        if not epochs <= self._logged.get(run_id, set()):
            return False
        ended = record.final is not None or record.error is not None
        if ended and run_id not in self._finalised:
            return False
        return record.status == "RUNNING" or self._ended.get(run_id) == record.status

    def write(self, record: TrialRecord) -> None:
        """Bring the trial's run up to date with the record; safe to call again and again.

        A trial's writes are few whatever its length: its run, then one log_batch with its params,
        its new epochs and, once it ended, its final metrics and tags (more only where MLflow's
        limits per call say so), its end status. Each write was a transaction (on SQLite a synced
        commit) on the driver, on the cores the trials train on."""
        run_id = self.run_for(record)
        now = int(time.time() * 1000)
        # Every epoch Tune holds and MLflow does not, whatever order they arrive in: after a restore,
        # an epoch reported just before the driver died arrives after later ones.
        variant = sampled(record.config).get("variant", "")
        epochs = [
            (int(r["epoch"]), _epoch_metrics(r, variant, now))
            for r in record.results
            if r.get("epoch") is not None and int(r["epoch"]) not in self._logged[run_id]
        ]
        if record.error is not None:  # failed for good, however often the record is written again
            tags = [] if run_id in self._finalised else [RunTag(ERROR, record.error[:5000])]
            self._log(run_id, epochs, tags=tags)
            self._finalised.add(run_id)
            self.client.set_terminated(run_id, "FAILED")
            self._ended[run_id] = record.status
            return
        final = record.final
        closing: list[Metric] = []
        tags: list[RunTag] = []
        if final is not None and run_id not in self._finalised:
            closing, tags = self._final_parts(run_id, record, final, now)
        if record.status != "RUNNING" and final is None:
            tags.append(RunTag(STOPPED, STOP_REASONS.get(record.status, "failed")))
        self._log(run_id, epochs, closing, tags)
        if final is not None:
            self._finalised.add(run_id)
            self._final_metrics.add(run_id)
        if record.status != "RUNNING":
            status = {"FINISHED": "FINISHED", "FAILED": "FAILED"}.get(record.status, "KILLED")
            if final is None:
                self._stop_tagged.add(run_id)
            elif run_id in self._stop_tagged:  # interrupted once, finished after --resume
                self.client.delete_tag(run_id, STOPPED)
                self._stop_tagged.discard(run_id)
            if self._ended.get(run_id) != record.status:  # a run found ended so needs no call
                self.client.set_terminated(run_id, status)
                self._ended[run_id] = record.status

    def _log(
        self,
        run_id: str,
        epochs: list[tuple[int, list[Metric]]],
        closing: list[Metric] | None = None,
        tags: list[RunTag] | None = None,
    ) -> None:
        """The run's unsent params, the epochs' metrics, then the closing metrics and tags, in as
        few log_batch calls as MLflow's limits allow (one for a short trial). What each call wrote
        is remembered as it goes: after a failure midway, a retry writes nothing twice."""
        from mlflow.utils.validation import (
            MAX_ENTITIES_PER_BATCH,
            MAX_METRICS_PER_BATCH,
            MAX_PARAMS_TAGS_PER_BATCH,
        )

        params, closing, tags = self._params.get(run_id, []), closing or [], tags or []
        metrics = [m for _, ms in epochs for m in ms] + closing
        if (
            len(params) <= MAX_PARAMS_TAGS_PER_BATCH
            and len(tags) <= MAX_PARAMS_TAGS_PER_BATCH
            and len(metrics) <= MAX_METRICS_PER_BATCH
            and len(params) + len(tags) + len(metrics) <= MAX_ENTITIES_PER_BATCH
        ):
            if params or tags or metrics:
                self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
            self._params.pop(run_id, None)
            self._logged[run_id].update(epoch for epoch, _ in epochs)
            return
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])
        self._params.pop(run_id, None)
        chunk: list[Metric] = []
        sent: list[int] = []  # the epochs in `chunk`: whole epochs per call
        for epoch, ms in [*epochs, (-1, [])]:  # the sentinel sends the rest
            if chunk and (epoch < 0 or len(chunk) + len(ms) > MAX_METRICS_PER_BATCH):
                self.client.log_batch(run_id, metrics=chunk)
                self._logged[run_id].update(sent)
                chunk, sent = [], []
            chunk += ms
            sent.append(epoch)
        for start in range(0, len(closing), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=closing[start : start + MAX_METRICS_PER_BATCH])
        if closing:
            self._final_metrics.add(run_id)  # in: a retry of the tags must not send them again
        for start in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):  # FINAL is the last tag
            self.client.log_batch(run_id, tags=tags[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def _final_parts(
        self, run_id: str, record: TrialRecord, final: dict[str, Any], now: int
    ) -> tuple[list[Metric], list[RunTag]]:
        """The trial's final artifacts, written now (trial_config.json, the user's code), and its
        final metrics and tags for the closing batch, FINAL last: the tag says all of it is in."""
        metrics = (
            [Metric("test_acc", float(final["test_acc"]), now, 0)]
            if final.get("test_acc") is not None
            else []
        )
        metrics.append(Metric("final_score", float(final["score"]), now, 0))
        # Early stopping ends a trial before its budget: how far it went, and how long to its best.
        if final.get("epoch") is not None:
            metrics.append(Metric("epochs_run", float(final["epoch"]), now, 0))
        if final.get("seconds_to_best") is not None:
            metrics.append(Metric("seconds_to_best", float(final["seconds_to_best"]), now, 0))
        for p in final["curve"]:
            metrics += [Metric("curve/val_acc", p["val_acc"], now, p["count"]),
                        Metric("curve/test_acc", p["test_acc"], now, p["count"])]  # fmt: skip
        metrics += diversity_metrics(final.get("diversity", []), now)
        for name, points in final.get("extra_curves", {}).items():
            metrics += [
                Metric(f"curve/{name}/val_acc", p["val_acc"], now, p["count"]) for p in points
            ]
            metrics += [
                Metric(f"curve/{name}/test_acc", p["test_acc"], now, p["count"]) for p in points
            ]
        tags = [
            RunTag("flatbasin.diverged", str(bool(final["diverged"])).lower()),
            RunTag("flatbasin.data_fingerprint", final["data_fingerprint"]),
        ]
        if final.get("model_built"):  # the `model` param may read `auto`: this is what was built
            tags.append(RunTag("flatbasin.model", str(final["model_built"])))
        # The `precision` and `channels_last` params may read `auto` too: this is how it ran.
        for key, value in (final.get("runtime") or {}).items():
            tags.append(RunTag(f"flatbasin.runtime.{key}", str(value).lower()))
        code = final.get("code") or {}
        if code:  # the user's modules as the worker imported them: reproduce compares with these
            tags.append(RunTag(CODE_SHA256, text_digest(code)))
        self.client.log_dict(run_id, trial_record(record, final), "trial_config.json")
        for name, text in code.items():
            self.client.log_text(run_id, text, f"{CODE_ARTIFACTS}/{name}")
        # curve.png is drawn for each variant's best trial at the end (tuner._finish_parent): a
        # figure cost the driver 70 ms of CPU per trial, more than the rest of its writes.
        tags.append(RunTag(FINAL, "true"))
        return [] if run_id in self._final_metrics else metrics, tags

    def run_id(self, trial_id: str) -> str | None:
        return self._runs.get(trial_id)


def _epoch_metrics(result: dict[str, Any], variant: str, now: int) -> list[Metric]:
    """One epoch's metrics, step = epoch; the phase as a metric only where the variant has epochs
    without data (phase_flags: prior_guided's `focus`)."""
    epoch = int(result["epoch"])
    metrics = [
        Metric(k, float(result[k]), now, epoch) for k in EPOCH_METRICS if result.get(k) is not None
    ]
    metrics += [
        Metric(name, flag, now, epoch)
        for name, flag in phase_flags(variant, result.get("phase")).items()
    ]
    return metrics


def diversity_metrics(points: list[dict[str, Any]], now: int) -> list[Metric]:
    """An ensemble's diversity with the curve: step = members, as for curve/test_acc."""
    return [
        Metric(f"diversity/{key}", float(p[key]), now, p["count"])
        for p in points
        for key in ("disagreement", "error_corr")
        if p.get(key) is not None
    ]


def log_weights(client: MlflowClient, run_id: str, checkpoint: Path) -> None:
    """A run's final weights as checkpoint.pt: the weights and the config that trained them, which
    is what --from RUN_ID continues; the optimiser and averager state only a resume needs stay
    out."""
    with tempfile.TemporaryDirectory(prefix="flatbasin-ckpt-") as folder:
        slim = Path(folder) / CHECKPOINT_ARTIFACT
        write_converged(checkpoint, slim)
        client.log_artifact(run_id, str(slim))


def _first_line(err: BaseException) -> str:
    text = scrub(str(err)).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _quoted(value: str) -> str:
    """A value inside a single-quoted MLflow filter string."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def trial_record(record: TrialRecord, final: dict[str, Any]) -> dict[str, Any]:
    """trial_config.json: everything `flatbasin reproduce` needs, and what it will compare against."""
    return {
        "config": final["trial_config"],
        "seed": final["trial_config"]["seed"],
        "threads": final["threads"],
        "runtime": final.get("runtime", {}),
        "data_fingerprint": final["data_fingerprint"],
        "flatbasin_version": flatbasin.__version__,
        "git_commit": git_commit(),
        "trial_id": record.trial_id,
        "recorded": {
            "score": final["score"],
            "test_acc": final["test_acc"],
            "diverged": final["diverged"],
            "curve": final["curve"],
            "history": [
                {k: r.get(k) for k in ("epoch", *EPOCH_METRICS, "phase")} for r in record.results
            ],
        },
    }
