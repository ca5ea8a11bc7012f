"""The compose stack's MLflow service as users run it, without Docker: Debian's PostgreSQL and the real
docker/mlflow-entrypoint.sh (basic auth, served artifacts) on 127.0.0.1, then `flatbasin search` with the
credentials only in its environment. Nothing is mocked; no secret may end up where a run or Tune keeps it.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port
from mlflow import MlflowClient

from flatbasin.search.store import TrackingRefused
from flatbasin.search.tracking import Tracker

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("mlflow_service")]

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "docker" / "mlflow-entrypoint.sh"
ADMIN = "admin"
# '/', '%', '@' and ':' on purpose: the entrypoint has to carry them into a URI and an ini file intact.
ADMIN_PASSWORD = "basin/admin%pass@0123"
POSTGRES_PASSWORD = "pg/secret@:%-4567"
FLASK_SECRET_KEY = "flask-secret-key-89ab"
BASIC_AUTH = base64.b64encode(f"{ADMIN}:{ADMIN_PASSWORD}".encode()).decode()  # the header's value
SECRETS = {
    "the MLflow password": ADMIN_PASSWORD,
    "the MLflow password, URL-encoded": urllib.parse.quote(ADMIN_PASSWORD, safe=""),
    "the basic-auth header": BASIC_AUTH,
    "the PostgreSQL password": POSTGRES_PASSWORD,
    "the Flask secret key": FLASK_SECRET_KEY,
}
SPACE = """
name: {name}
samples: 2
epochs: 2
fixed: {{batch_size: 64}}
variants:
  sgd: {{lr: {{loguniform: [0.02, 0.1]}}}}
"""


@dataclass
class Service:
    uri: str
    artifacts: Path  # MLFLOW_ARTIFACTS_DESTINATION: where the server stores what clients upload
    auth_dir: Path
    logs: list[Path]  # what PostgreSQL and the MLflow server print
    groups: list[int]  # process groups: PostgreSQL's, the MLflow server's


# ----------------------------------------------------------------------------- processes


class ProcessGroups:
    """Processes each in its own process group, stopped group by group, the last started first."""

    def __init__(self) -> None:
        self.started: list[tuple[subprocess.Popen, int]] = []

    def start(self, cmd: list[str], log: Path, stop_signal: int, **kwargs) -> subprocess.Popen:
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, **kwargs)  # fmt: skip
        self.started.append((proc, stop_signal))  # before any wait: a failed start is stopped too
        return proc

    def stop_all(self) -> None:
        while self.started:
            stop_group(*self.started.pop())

    @property
    def ids(self) -> list[int]:
        return [proc.pid for proc, _ in self.started]


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 10) -> None:
    """`sig` to the whole group, then SIGKILL to whatever is left after grace_s."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or the group never looks empty
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_until(ready, proc: subprocess.Popen, log: Path, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if ready():
            return
        time.sleep(0.25)
    raise RuntimeError(f"{what} not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")


def postgres_bin() -> Path | None:
    """Debian keeps the server binaries off PATH, under /usr/lib/postgresql/VERSION/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)  # fmt: skip
    return found[-1].parent if found else None


def postgres_account() -> dict:
    """PostgreSQL refuses to run as root; as root, run it as Debian's `postgres` system user."""
    if os.geteuid() != 0:
        return {}
    try:
        account = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root with no `postgres` user to run PostgreSQL as "
                    "(Debian's postgresql package creates it; `apt-get install -y postgresql`)")  # fmt: skip
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def start_postgres(groups: ProcessGroups, pg_dir: Path, port: int) -> None:
    """A throwaway cluster, as the compose stack's `postgres` service: user and database `mlflow`."""
    import psycopg2

    binaries = postgres_bin()
    if binaries is None:
        pytest.skip("PostgreSQL's server binaries (initdb, postgres) are not installed: "
                    "`apt-get install -y postgresql` (.ci/run does it)")  # fmt: skip
    account = postgres_account()
    password_file = pg_dir / "password"
    password_file.write_text(POSTGRES_PASSWORD + "\n")
    password_file.chmod(0o600)
    if account:
        for path in (pg_dir, password_file):
            os.chown(path, account["user"], account["group"])
    env = {"PATH": os.environ["PATH"], "LC_ALL": "C"}
    initdb = subprocess.run(
        [str(binaries / "initdb"), "-D", str(pg_dir / "data"), "-U", "mlflow", "-E", "UTF8",
         "--locale=C", "--auth=scram-sha-256", f"--pwfile={password_file}"],
        cwd=pg_dir, env=env, capture_output=True, text=True, timeout=120, start_new_session=True,
        **account,
    )  # fmt: skip
    assert initdb.returncode == 0, initdb.stdout + initdb.stderr
    password_file.unlink()
    log = pg_dir / "postgres.log"
    proc = groups.start(
        [str(binaries / "postgres"), "-D", str(pg_dir / "data"), "-p", str(port),
         "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={pg_dir}"],
        log, signal.SIGINT, cwd=pg_dir, env=env, **account,  # SIGINT: PostgreSQL's fast shutdown
    )  # fmt: skip

    def accepts() -> bool:
        try:
            psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", password=POSTGRES_PASSWORD,
                             dbname="postgres", connect_timeout=2).close()  # fmt: skip
        except psycopg2.OperationalError:
            return False
        return True

    wait_until(accepts, proc, log, "PostgreSQL", timeout_s=60)
    conn = psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", password=POSTGRES_PASSWORD,
                            dbname="postgres")  # fmt: skip
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE DATABASE mlflow")
    conn.close()


def start_mlflow(groups: ProcessGroups, work: Path, postgres_port: int, port: int) -> None:
    """docker/mlflow-entrypoint.sh itself, pointed at 127.0.0.1 through its environment variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",  # this install's mlflow, python3
        POSTGRES_HOST="127.0.0.1", POSTGRES_PORT=str(postgres_port), POSTGRES_USER="mlflow",
        POSTGRES_DB="mlflow", POSTGRES_PASSWORD=POSTGRES_PASSWORD,
        MLFLOW_ADMIN_USERNAME=ADMIN, MLFLOW_ADMIN_PASSWORD=ADMIN_PASSWORD,
        MLFLOW_FLASK_SERVER_SECRET_KEY=FLASK_SECRET_KEY, MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(port),
        MLFLOW_ARTIFACTS_DESTINATION=str(work / "mlartifacts"), MLFLOW_AUTH_DIR=str(work / "auth"),
        # Knobs of speed, the stack's defaults otherwise: one worker process instead of four and no
        # runner for MLflow's GenAI jobs (flatbasin starts none), each an import of MLflow to start;
        # a checked password trusted for a minute instead of a ~0.2 s hash on each of the search's
        # hundred-odd requests (a wrong password is still checked, and refused, every time).
        MLFLOW_WORKERS="1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_AUTH_CACHE_TTL_SECONDS="60",
    )  # fmt: skip
    (work / "auth").mkdir()
    log = work / "mlflow.log"
    proc = groups.start(["sh", str(ENTRYPOINT)], log, signal.SIGTERM, cwd=work, env=env)
    health = f"http://127.0.0.1:{port}/health"
    wait_until(lambda: http_status(health, timeout_s=2) == 200, proc, log,
               "the MLflow server (docker/mlflow-entrypoint.sh)", timeout_s=120)  # fmt: skip


def http_status(url: str, auth: tuple[str, str] | None = None, timeout_s: float = 60) -> int | None:
    """The response's status; None when nothing answered. The default timeout is generous: checking
    a password hash takes a while on two busy cores."""
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[Service]:
    """PostgreSQL and the MLflow server for this module; both process groups die in the finaliser."""
    for module in ("psycopg2", "flask_wtf"):  # the service's part of docker/requirements.txt
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is not installed; the compose stack's MLflow service needs it: "
                        "pip install 'mlflow[auth]' psycopg2-binary")  # fmt: skip
    work = tmp_path_factory.mktemp("mlflow-service")
    # Not under tmp_path: pytest's folders are private to root, and PostgreSQL runs as `postgres`.
    pg_dir = Path(tempfile.mkdtemp(prefix="fb-pg-"))
    groups = ProcessGroups()
    try:
        start_postgres(groups, pg_dir, postgres_port := free_port())
        start_mlflow(groups, work, postgres_port, port := free_port())
        logs = [pg_dir / "postgres.log", work / "mlflow.log"]
        yield Service(
            f"http://127.0.0.1:{port}", work / "mlartifacts", work / "auth", logs, groups.ids
        )
    finally:
        groups.stop_all()  # MLflow first, then PostgreSQL
        shutil.rmtree(pg_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- the search


def write_space(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(SPACE.format(name=name))
    return path


def flatbasin_search(
    service: Service, space: Path, tmp: Path, credentials: dict[str, str], uri: str | None = None
):
    """`python -m flatbasin search` in its own process group, credentials only in its environment
    (or in `uri`). Returns the finished process, the files of its Ray session (logs), read before
    they go, and every command line its processes (its session: Ray's too) had while Ray ran."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    ray_tmp = tempfile.mkdtemp(prefix="fbsvc-ray-", dir="/tmp")  # short: Ray's socket paths
    env.update(PYTHONUNBUFFERED="1", RAY_TMPDIR=ray_tmp, **credentials)
    cmd = [sys.executable, "-m", "flatbasin", "search", str(space), "--tracking-uri", uri or service.uri,
           "--storage", str(tmp / "runs"), "--seed", "3", "--concurrency", "2"]  # fmt: skip
    out, err = tmp / f"{space.stem}.out", tmp / f"{space.stem}.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=stdout, stderr=stderr,
                                start_new_session=True)  # fmt: skip
    command_lines: set[str] = set()
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            # From the moment Ray runs: the command as typed is the user's (their shell history
            # has it too); what matters is the one Ray records as its job's entrypoint, and after.
            lines = set(session_command_lines(proc.pid).values())
            if command_lines or any("raylet" in line for line in lines):
                command_lines |= lines
            time.sleep(0.2)
        if proc.returncode is None:
            raise TimeoutError(f"the search ran past 240 s:\n{out.read_text()}{err.read_text()}")
    finally:
        stop_group(proc, signal.SIGKILL, grace_s=5)  # anything it left behind (a Ray it started)
        ray_files = {p: p.read_bytes() for p in Path(ray_tmp).rglob("*") if p.is_file()}
        shutil.rmtree(ray_tmp, ignore_errors=True)
    done = subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(), err.read_text())
    return done, ray_files, command_lines


def admin_client(monkeypatch, service: Service) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    return MlflowClient(service.uri)


def leaks(blob: bytes | str) -> list[str]:
    data = blob.encode() if isinstance(blob, str) else blob
    return [name for name, secret in SECRETS.items() if secret.encode() in data]


def session_command_lines(session: int) -> dict[int, str]:
    """Every live process of this session (a search and the Ray it started), with its command line."""
    lines = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            if int(stat.read_text().rpartition(")")[2].split()[3]) == session:
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
                lines[int(stat.parent.name)] = cmdline.decode(errors="replace")
    return lines


def group_command_lines(groups: list[int]) -> dict[int, str]:
    """Every live process of these process groups, with its command line."""
    lines = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            pgrp = int(stat.read_text().rpartition(")")[2].split()[2])
            if pgrp in groups:
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
                lines[int(stat.parent.name)] = cmdline.decode(errors="replace")
    return lines


def test_the_service_refuses_requests_without_valid_credentials(service):
    search = f"{service.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(search) == 401
    assert http_status(f"{service.uri}/api/2.0/mlflow-artifacts/artifacts") == 401
    assert http_status(search, auth=(ADMIN, ADMIN_PASSWORD)) == 200
    assert http_status(search, auth=(ADMIN, "not-the-password-0123")) == 401  # after a good one
    # What docs/cluster.md promises of the entrypoint: no secret on a command line (every process
    # of both groups, MLflow's workers included) or in its config file, which only its user reads.
    commands = group_command_lines(service.groups)
    assert {"mlflow", "postgres"} <= {
        word for c in commands.values() for word in re.split(r"[\s/]", c)
    }
    assert {pid: leaks(c) for pid, c in commands.items() if leaks(c)} == {}
    ini = service.auth_dir / "basic_auth.ini"
    assert ini.stat().st_mode & 0o777 == 0o600 and leaks(ini.read_text()) == []


def test_search_without_credentials_is_refused_and_starts_nothing(service, tmp_path, monkeypatch):
    space = write_space(tmp_path, "refused")
    done, _, _ = flatbasin_search(service, space, tmp_path, credentials={})
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "refused the request (HTTP 401)" in out and "none were given" in out, out
    assert "MLFLOW_TRACKING_USERNAME" in out and "MLFLOW_TRACKING_PASSWORD" in out
    assert "not reachable" not in out and "Start the server" not in out and "Traceback" not in out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert admin_client(monkeypatch, service).get_experiment_by_name("refused") is None
    # A wrong password is refused the same way, through the same check, and says so.
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password-0123")
    refused = "credentials of user 'admin' (from the environment: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) are wrong"
    with pytest.raises(TrackingRefused, match=re.escape(refused)):
        Tracker(service.uri, "refused", search_key="k").check()


def test_search_is_recorded_whole_and_leaks_no_secret(service, tmp_path, monkeypatch):
    space = write_space(tmp_path, "served")
    credentials = {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}
    done, ray_files, command_lines = flatbasin_search(service, space, tmp_path, credentials)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"open {service.uri} in a browser" in done.stdout
    assert "mlflow ui --backend-store-uri http" not in done.stdout
    # The search's report reads the server back (read_store names no experiment: the server refused
    # the empty name once, and every report, reproduce and --from RUN_ID against a server failed).
    assert "Report:" in done.stdout, done.stdout

    client = admin_client(monkeypatch, service)
    experiment = client.get_experiment_by_name("served")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("flatbasin.role") == "search"]
    trials = [r for r in runs if r.data.tags.get("flatbasin.role") == "trial"]
    assert len(parents) == 1 and len(trials) == 2 and len(runs) == 3
    parent = parents[0].info.run_id
    assert {"served.yaml", "summary.json"} <= {a.path for a in client.list_artifacts(parent)}
    for run in trials:
        rid = run.info.run_id
        assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED"
        assert run.data.params["variant"] == "sgd" and run.data.params["epochs"] == "2"
        for key in ("train_loss", "val_acc", "lr", "score"):
            assert [m.step for m in client.get_metric_history(rid, key)] == [1, 2], key
        assert 0 < run.data.metrics["test_acc"] <= 1 and "curve/val_acc" in run.data.metrics
        assert "trial_config.json" in {a.path for a in client.list_artifacts(rid)}
    best = parents[0].data.tags["flatbasin.best_run_id"]  # curve.png: the best trial's
    assert "curve.png" in {a.path for a in client.list_artifacts(best)}
    # The artifacts went through the server (--serve-artifacts) into its destination folder.
    stored = {p.name for p in service.artifacts.rglob("*") if p.is_file()}
    assert {"served.yaml", "summary.json", "trial_config.json", "curve.png"} <= stored

    assert secrets_found(client, runs, tmp_path, {"search": done}, ray_files, command_lines,
                         service) == {}  # fmt: skip


def secrets_found(
    client: MlflowClient,
    runs: list,
    tmp: Path,
    outputs: dict[str, subprocess.CompletedProcess],
    ray_files: dict[Path, bytes],
    command_lines: set[str],
    service: Service,
) -> dict[str, list[str]]:
    """Where a secret is: the commands' output, every run's params, tags, metric names and
    artifacts, every file under `tmp` (Tune's storage and its pickles, the reports), the Ray
    session's files, the command lines seen while the search ran, the services' logs."""
    found: dict[str, list[str]] = {}

    def scan(where: str, blob: bytes | str) -> None:
        if names := leaks(blob):
            found[where] = names

    for name, done in outputs.items():
        scan(f"{name} stdout", done.stdout)
        scan(f"{name} stderr", done.stderr)
    for run in runs:
        rid = run.info.run_id
        scan(f"run {rid} params", "\n".join(f"{k}={v}" for k, v in run.data.params.items()))
        scan(f"run {rid} tags", "\n".join(f"{k}={v}" for k, v in run.data.tags.items()))
        scan(f"run {rid} metric names", "\n".join(run.data.metrics))
        downloaded = Path(client.download_artifacts(rid, "", str(tmp / "artifacts" / rid)))
        for path in downloaded.rglob("*"):
            if path.is_file():
                scan(f"run {rid} artifact {path.relative_to(downloaded)}", path.read_bytes())
    tune_files = [p for p in (tmp / "runs").rglob("*") if p.is_file()]
    assert len(tune_files) > 5  # the experiment state, each trial's result.json and checkpoint
    assert any(p.name == "tuner.pkl" for p in tune_files)
    for path in tmp.rglob("*"):
        if path.is_file():
            scan(f"file {path.relative_to(tmp)}", path.read_bytes())
    assert any(path.suffix in (".log", ".out", ".err") for path in ray_files)
    for path, blob in ray_files.items():  # not flatbasin's own files, but where a leak would hide
        scan(f"Ray session {path.name}", blob)
    assert any("raylet" in line for line in command_lines), command_lines  # seen while it ran
    for line in command_lines:
        scan(f"command line {line[:80]}", line)
    for path in service.logs:  # the entrypoint's promise: no secret in the services' logs either
        scan(f"log {path.name}", path.read_bytes())
    return found


def run_flatbasin(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m flatbasin ARGS` with no credentials in its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    return subprocess.run([sys.executable, "-m", "flatbasin", *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip


def test_credentials_in_the_uri_leak_nowhere(service, tmp_path, monkeypatch):
    """`--tracking-uri http://admin:PASSWORD@HOST` (the password URL-encoded, as a URI needs): the
    search, then `sync` and `report` the same way, and the password is nowhere a user of the server
    or of the shared storage could read it; the commands printed name the clean URI."""
    space = write_space(tmp_path, "inuri")
    host = service.uri.removeprefix("http://")
    uri = f"http://{ADMIN}:{urllib.parse.quote(ADMIN_PASSWORD, safe='')}@{host}"
    done, ray_files, command_lines = flatbasin_search(service, space, tmp_path, {}, uri=uri)
    assert done.returncode == 0, done.stdout + done.stderr
    text = " ".join(done.stdout.split())
    assert f"open {service.uri} in a browser" in text and "Report:" in text, text
    assert f"--tracking-uri {service.uri}" in text, text  # the Reproduce line, clean
    assert "leave out the credentials given in the tracking URI" in text, text
    synced = run_flatbasin(
        tmp_path, "sync", str(tmp_path / "runs" / "inuri"), "--tracking-uri", uri
    )
    assert synced.returncode == 0, synced.stdout + synced.stderr
    reported = run_flatbasin(tmp_path, "report", "inuri", "--tracking-uri", uri,
                             "--out", str(tmp_path / "report-again"))  # fmt: skip
    assert reported.returncode == 0, reported.stdout + reported.stderr
    assert (tmp_path / "reports" / "inuri" / "report.html").is_file()  # the search's own
    page = (tmp_path / "report-again" / "report.html").read_text()
    assert f"<code>{service.uri}</code>" in page and f"{ADMIN}@" not in page

    client = admin_client(monkeypatch, service)
    runs = client.search_runs([client.get_experiment_by_name("inuri").experiment_id])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    parent = next(r for r in runs if r.data.tags.get("flatbasin.role") == "search")
    assert "report" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    outputs = {"search": done, "sync": synced, "report": reported}
    found = secrets_found(client, runs, tmp_path, outputs, ray_files, command_lines, service)
    assert found == {}


@pytest.mark.parametrize("given", ["uri", "uri user, environment password", "environment"])
def test_a_wrong_password_says_where_it_came_from(service, tmp_path, given):
    host = service.uri.removeprefix("http://")
    wrong = "not-the-password-0123"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "FLATBASIN_"))
    }
    uri, source = {
        "uri": (f"http://{ADMIN}:{wrong}@{host}", "both from the user-info of --tracking-uri"),
        "uri user, environment password": (
            f"http://{ADMIN}@{host}",
            "the username from the user-info of --tracking-uri, the password from "
            "$MLFLOW_TRACKING_PASSWORD",
        ),
        "environment": (service.uri, "from the environment: MLFLOW_TRACKING_USERNAME and "
                        "MLFLOW_TRACKING_PASSWORD"),
    }[given]  # fmt: skip
    if given != "uri":
        env["MLFLOW_TRACKING_PASSWORD"] = wrong
    if given == "environment":
        env["MLFLOW_TRACKING_USERNAME"] = ADMIN
    space = write_space(tmp_path, "wrong")
    done = subprocess.run(
        [sys.executable, "-m", "flatbasin", "search", str(space), "--tracking-uri", uri,
         "--storage", str(tmp_path / "runs")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    text = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, text
    assert (
        f"refused the request (HTTP 401): the credentials of user 'admin' ({source}) are wrong"
        in text
    ), text
    assert wrong not in text and "none were given" not in text and "Traceback" not in text, text
