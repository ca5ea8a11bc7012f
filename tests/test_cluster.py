"""Cluster mode on this machine: a Ray head and worker nodes on loopback addresses, with Ray's
token authentication on, an `mlflow server`, and searches submitted through the Jobs API.

Ray rewrites the literal 127.0.0.1 into the machine's network address when it forms a cluster, so
the nodes use 127.0.0.2 and up: loopback addresses that Ray leaves alone.

Hygiene. Every node is `ray start --block` in a session of its own (conftest.ProcessGroups), with
the cluster's own RAY_TMPDIR (short, under /tmp: Ray's socket paths are length-limited), so Ray's
current-cluster file lands there, never in /tmp/ray where `--address auto` would find it later. A
node is stopped by SIGKILL to its process groups, never by `ray stop` (which stops every Ray on the
machine). However a test ends, teardown checks that the groups are empty, the folder is gone and no
current-cluster file in Ray's default place names the cluster.

Placement is arranged, not hoped for. Each cluster's head has 0 CPUs: the job's driver runs there (it
needs none) and a trial, which asks for 1 CPU, cannot. The shared cluster has a single worker, so
the driver runs on one node and every trial on the other, certainly. Trials on two workers at once
would not be certain: Tune reuses actors, and when a trial ends while the next one's actor is still
starting on the other node (slow on a busy machine, and that node first fetches the job's working
directory), Tune hands the finished actor to the next trial and drops the starting one, so every
trial can end up on one node (the likely way the old both-nodes test failed, every trial on the
head). The lost-node test has two workers, but needs only a trial in the middle on either of them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ProcessGroups, free_port, owned_processes, start_mlflow_server
from mlflow import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("cluster")]

HEAD_IP = "127.0.0.2"
WORKER_IP = "127.0.0.3"  # the shared cluster's only node with CPUs
LOST_HEAD_IP, NODE_A_IP, NODE_B_IP = "127.0.0.4", "127.0.0.5", "127.0.0.6"  # the lost-node test's
# Per-test limit, only a safety net: each test takes 1 to 3 minutes here, but on this machine shared
# with others' test runs (load average 16 on 2 cores) a search has taken eight times as long.
LONG_S = 1200


def default_address_files() -> set[Path]:
    """Where Ray's current-cluster file goes without RAY_TMPDIR (what `--address auto` reads)."""
    root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return {Path(root) / "ray" / "ray_current_cluster", Path("/tmp/ray/ray_current_cluster")}


def node_port(ip: str) -> int:
    """A port free on the node's address and on 127.0.0.1 (Ray's agent tries both)."""
    while True:
        port = free_port(ip)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


@dataclass
class Cluster:
    groups: ProcessGroups
    tmpdir: Path  # RAY_TMPDIR of every node: sessions, sockets, logs, the current-cluster file
    env: dict[str, str]
    gcs: str  # HEAD:PORT
    dashboard: str  # http://127.0.0.1:PORT, the Jobs API
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)  # IP -> `ray start --block`

    def start_node(self, ip: str, cpus: int, *head_args: str) -> None:
        """Start a node (the head with --head and its ports in head_args) and wait until it runs."""
        for attempt in (1, 2, 3):
            log = self.tmpdir / f"node-{ip}.log"
            if log.exists():
                log.rename(log.with_suffix(f".{attempt - 1}.log"))  # keep the failed attempt's
            # The ports Ray takes at fixed numbers get free ones: the dashboard agent's 52365 (when
            # another Ray on this machine has it, the Jobs API finds no agent and refuses the job)
            # and the head's client server's 10001 (in head_args).
            cmd = ["ray", "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={cpus}",
                   f"--dashboard-agent-listen-port={node_port(ip)}", "--disable-usage-stats",
                   *(head_args or [f"--address={self.gcs}"])]  # fmt: skip
            proc = self.nodes[ip] = self.groups.spawn(cmd, env=self.env, log=log)
            deadline = time.monotonic() + 300
            while "Ray runtime started" not in log.read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"node {ip} not started after 300 s:\n{log.read_text()[-3000:]}"
                    )
                if not self.groups.running(proc):
                    break
                time.sleep(0.3)
            else:
                return
            # It gave up: Ray allows a node's raylet 30 s to register with the GCS, which a loaded
            # machine can exceed. Again, after killing what the attempt left.
            self.kill_node(ip)
        raise RuntimeError(f"node {ip} did not start, 3 times:\n{log.read_text()[-3000:]}")

    def wait_agents(self, count: int, timeout_s: float = 300) -> None:
        """Until `count` dashboard agents serve HTTP: the Jobs API hands a job to the head's, and
        gives up after 10 s without one. Each agent writes its port (-1: failed) into the session."""
        deadline = time.monotonic() + timeout_s
        while True:
            ports = [
                int(p.read_text() or 0)
                for p in self.tmpdir.glob("ray/session_*/dashboard_agent_listen_port_*")
            ]
            if sum(port > 0 for port in ports) >= count:
                return
            if any(port < 0 for port in ports):
                logs = self.tmpdir.glob("ray/session_*/logs/dashboard_agent.log")
                tails = "\n".join(log.read_text()[-2000:] for log in logs)
                raise RuntimeError(f"a dashboard agent has no HTTP server:\n{tails}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} dashboard agents expected, found ports {ports}")
            time.sleep(0.3)

    def wait_nodes(self, count: int, timeout_s: float = 300) -> None:
        """Until Ray's own view (`ray status`) has `count` live nodes."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = subprocess.run(["ray", "status", f"--address={self.gcs}"], env=self.env,
                                    capture_output=True, text=True, timeout=60)  # fmt: skip
            if status.stdout.split("Pending:")[0].count(" node_") == count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"expected {count} nodes:\n{status.stdout}{status.stderr}")
            time.sleep(1)

    def kill_node(self, ip: str) -> None:
        self.groups.kill(self.nodes[ip])  # the node's raylet and workers with it


@contextmanager
def ray_cluster(head_ip: str, workers: dict[str, int]) -> Iterator[Cluster]:
    """A head with 0 CPUs (the job's driver runs there, no trial can) and `workers` (IP -> CPUs).

    On the way out, however the test ended: every process group killed and checked gone, RAY_TMPDIR
    removed, and no current-cluster file naming this cluster in Ray's default place.
    """
    tmpdir = Path(tempfile.mkdtemp(prefix="fbray-", dir="/tmp"))  # short: socket paths are limited
    unset = ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), PYTHONUNBUFFERED="1",
               RAY_TMPDIR=str(tmpdir))  # fmt: skip
    gcs_port, dashboard_port = node_port(head_ip), free_port()
    try:
        with owned_processes() as groups:
            groups.folders.append(tmpdir)  # removed once the nodes are dead, even on a SIGTERM
            dashboard = f"http://127.0.0.1:{dashboard_port}"
            cluster = Cluster(groups, tmpdir, env, f"{head_ip}:{gcs_port}", dashboard)
            cluster.start_node(head_ip, 0, "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
                               f"--dashboard-port={dashboard_port}",
                               f"--ray-client-server-port={node_port(head_ip)}")  # fmt: skip
            for ip, cpus in workers.items():  # one by one: joining nodes at once overload the GCS
                cluster.start_node(ip, cpus)
            cluster.wait_agents(len(cluster.nodes))
            cluster.wait_nodes(len(cluster.nodes))
            wait_http(cluster.dashboard)
            assert (tmpdir / "ray" / "ray_current_cluster").read_text().strip() == cluster.gcs
            yield cluster
    finally:
        assert not tmpdir.exists(), tmpdir
        for path in default_address_files():
            if path.is_file():
                assert f":{gcs_port}" not in path.read_text(), f"{path} names this test's cluster"


def wait_http(url: str, timeout_s: float = 300) -> None:
    """Until the server answers at all (401 included: the Jobs API wants the token)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=5)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """One cluster for the tests that kill nothing: a 0-CPU head and one worker with 2 CPUs."""
    with ray_cluster(HEAD_IP, {WORKER_IP: 2}) as shared:
        yield shared


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> Iterator[str]:
    """One `mlflow server` for the module; each search is its own experiment."""
    with owned_processes() as groups:
        uri, _, _ = start_mlflow_server(groups, tmp_path_factory.mktemp("mlflow"))
        yield uri


SPACE = """
name: {name}
samples: {samples}
epochs: {epochs}
fixed: {{batch_size: 64}}
variants:
  sgd: {{lr: {{loguniform: [0.02, 0.1]}}}}
  swa: {{lr: {{loguniform: [0.02, 0.1]}}, swa_start_frac: 0.5}}
"""


@contextmanager
def submitted(
    tmp_path: Path, cluster: Cluster, space: str, name: str, uri: str, *extra: str
) -> Iterator[subprocess.Popen]:
    """`flatbasin submit` following the job's logs. If the test leaves it running (it failed or
    timed out), it is killed and its job stopped, so that no search outlives its test on a cluster
    that the next test uses."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(space)
    cmd = [sys.executable, "-m", "flatbasin", "submit", str(path), "--address", cluster.dashboard,
           "--tracking-uri", uri, "--storage", str(tmp_path / "shared"), "--concurrency", "2",
           "--seed", "3", *extra]  # fmt: skip
    with subprocess.Popen(cmd, cwd=tmp_path, env=cluster.env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as job:  # fmt: skip
        try:
            yield job
        finally:
            if job.poll() is None:
                job.kill()
                found = re.search(r"submitted job (\S+) to", job.communicate()[0] or "")
                if found:
                    with suppress(subprocess.SubprocessError):
                        subprocess.run(["ray", "job", "stop", "--address", cluster.dashboard, found.group(1)],
                                       env=cluster.env, capture_output=True, timeout=120)  # fmt: skip


def run_submit(tmp_path: Path, cluster: Cluster, space: str, name: str, uri: str, *extra: str):
    """(exit status, output) of a submitted search, followed to its end; the output is kept in
    tmp_path/NAME.out."""
    with submitted(tmp_path, cluster, space, name, uri, *extra) as job:
        out, _ = job.communicate()  # pytest-timeout bounds the wait
    (tmp_path / f"{name}.out").write_text(out)
    return job.returncode, out


def job_id(out: str) -> str:
    found = re.search(r"submitted job (\S+) to", out)
    assert found, out
    return found.group(1)


def driver_ip(cluster: Cluster, job: str) -> str:
    """The IP of the node where the job's driver ran, as Ray's Jobs and State APIs say."""
    code = (
        "import sys; from ray.job_submission import JobSubmissionClient; from ray.util.state import list_nodes\n"
        "info = JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2])\n"
        "print({n.node_id: n.node_ip for n in list_nodes(address=sys.argv[1])}[info.driver_node_id])"
    )
    found = subprocess.run([sys.executable, "-c", code, cluster.dashboard, job], env=cluster.env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert found.returncode == 0, found.stderr
    return found.stdout.strip()


def tune_rows(experiment: Path) -> dict[str, list[dict]]:
    """Every result Tune wrote, per trial, in order (a line still being written is left out)."""
    rows = {}
    for path in experiment.glob("*/result.json"):
        lines = []
        for line in path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        if lines:
            rows[lines[0]["trial_id"]] = lines
    return rows


def trial_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    return [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("flatbasin.role") == "trial"
    ]


# ----------------------------------------------------------------------------- a node is lost


def mid_trial(rows: dict[str, list[dict]], nodes: tuple[str, ...], epochs: int) -> str | None:
    """A worker node holding a trial that checkpointed at least twice (one checkpoint per epoch) and
    still has at least two epochs to go; None when there is none."""
    for trial in rows.values():
        last = trial[-1]
        if (
            last["node_ip"] in nodes
            and 2 <= last.get("epoch", 0) <= epochs - 2
            and not last.get("final")
        ):
            return last["node_ip"]
    return None


@pytest.mark.timeout(LONG_S * 3 // 2)
def test_lost_node_trials_resume_from_checkpoints(tmp_path, tracking):
    """Its own cluster: a 0-CPU head and two workers with 1 CPU each. The worker holding a trial in
    the middle is killed; its trials go on on the other worker from their latest checkpoints.

    No rerun: the node is killed at a checked moment, not a polled one. When the result files show a
    trial in the middle on a worker, that worker's processes are frozen (SIGSTOP) and the files read
    again. A frozen node advances nothing, and Tune holds a trial's next result back until the driver
    has taken the last one, so at most one more epoch, not the last, can still arrive: if the files
    still show the trial in the middle, it is unfinished when the node is killed. If they do not, the
    node is thawed and the watch goes on.
    """
    epochs, nodes = 8, (NODE_A_IP, NODE_B_IP)
    space = SPACE.format(name="lost", samples=4, epochs=epochs)
    experiment = tmp_path / "shared" / "lost"
    with (
        ray_cluster(LOST_HEAD_IP, dict.fromkeys(nodes, 1)) as cluster,
        submitted(tmp_path, cluster, space, "lost", tracking,
                  "--checkpoint-interval", "0", "--max-failures", "3") as job,
    ):  # fmt: skip
        while True:
            if job.poll() is not None:
                pytest.fail(
                    f"the search ended with no trial seen in the middle:\n{job.communicate()[0]}"
                )
            lost = mid_trial(tune_rows(experiment), nodes, epochs)
            if lost is None:
                time.sleep(0.2)
                continue
            cluster.groups.send(cluster.nodes[lost], signal.SIGSTOP)
            if mid_trial(tune_rows(experiment), (lost,), epochs) == lost:
                cluster.kill_node(lost)
                break
            cluster.groups.send(cluster.nodes[lost], signal.SIGCONT)
        out, _ = job.communicate()
        (tmp_path / "lost.out").write_text(out)
        assert job.returncode == 0, out
    (other,) = set(nodes) - {lost}

    moved = 0
    for trial_id, rows in tune_rows(experiment).items():
        done, where = [r["epoch"] for r in rows], [r["node_ip"] for r in rows]
        assert set(where) <= set(nodes), where  # never on the head: it has no CPU
        # Never back to an epoch already reported, and every trial to the end.
        assert done == sorted(set(done)) and done[-1] == epochs, (trial_id, done)
        if lost in where and where[-1] == other:
            moved += 1
            first_after = done[where.index(other, where.index(lost))]
            assert first_after > 1, (trial_id, list(zip(done, where, strict=True)))
    assert moved >= 1, "no trial moved from the lost node"

    client = MlflowClient(tracking)
    runs = trial_runs(client, "lost")
    assert len(runs) == 4 and len({r.data.tags["flatbasin.trial_id"] for r in runs}) == 4
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "score")]
        assert steps == list(range(1, epochs + 1)), steps
        assert "test_acc" in run.data.metrics


# ----------------------------------------------------------------------------- the shared cluster


@pytest.mark.timeout(LONG_S)
def test_submit_runs_the_driver_on_the_head_and_trials_on_the_worker(tmp_path, cluster, tracking):
    """Certain, not likely: the head has no CPU for a trial, the worker has them all (module doc)."""
    epochs = 4
    space = SPACE.format(name="cluster", samples=4, epochs=epochs)
    code, out = run_submit(tmp_path, cluster, space, "cluster", tracking)
    assert code == 0, out
    assert "best trial per variant" in out and "SUCCEEDED" in out

    rows = tune_rows(tmp_path / "shared" / "cluster")
    assert len(rows) == 4
    assert {row["node_ip"] for trial in rows.values() for row in trial} == {WORKER_IP}
    assert driver_ip(cluster, job_id(out)) == HEAD_IP

    client = MlflowClient(tracking)
    runs = trial_runs(client, "cluster")
    assert len(runs) == 4
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "score")]
        assert steps == list(range(1, epochs + 1))
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "trial_config.json" in artifacts  # curve.png: the best trial's alone
    curves = [{a.path for a in client.list_artifacts(r.info.run_id)} for r in runs]
    variants = {r.data.tags["flatbasin.variant"] for r in runs}
    assert sum("curve.png" in files for files in curves) == len(variants)  # each one's best


OWN_MODEL_SPACE = """
name: ownmodel
samples: 2
epochs: 2
dataset: arrays:load
data_args: {n: 400, classes: 3}
model: model:build
model_args: {width: 16, depth: 1}
fixed: {batch_size: 32}
variants:
  sgd: {lr: {loguniform: [0.02, 0.1]}}
"""


def test_submit_carries_the_users_modules_to_the_worker(tmp_path, cluster, tracking):
    """The space's folder (model.py, arrays.py beside it) is the job's working directory: the
    driver on the head and the trials on the worker import the user's modules from it."""
    example = Path(__file__).resolve().parents[1] / "examples" / "own_model"
    for name in ("model.py", "arrays.py"):
        shutil.copy(example / name, tmp_path / name)
    code, out = run_submit(tmp_path, cluster, OWN_MODEL_SPACE, "ownmodel", tracking)
    assert code == 0, out
    rows = tune_rows(tmp_path / "shared" / "ownmodel")
    assert len(rows) == 2
    assert {row["node_ip"] for trial in rows.values() for row in trial} == {WORKER_IP}
    client = MlflowClient(tracking)
    for run in trial_runs(client, "ownmodel"):
        assert run.info.status == "FINISHED" and run.data.params["model"] == "model:build"
        files = {a.path for a in client.list_artifacts(run.info.run_id, "code")}
        assert files == {"code/model.py", "code/arrays.py"}


DATA_ERROR_SPACE = """
name: dataerr
samples: 2
epochs: 2
dataset: image_folder
fixed: {{batch_size: 64, data_dir: {data_dir}}}
variants:
  sgd: {{lr: {{loguniform: [0.02, 0.1]}}}}
"""


@pytest.mark.timeout(LONG_S)
def test_missing_data_on_the_nodes_fails_the_search_once_without_retries(
    tmp_path, cluster, tracking
):
    """On a cluster the driver leaves a data_dir its own machine lacks to the nodes (it may be
    node-local). There the trial finds it missing and reports a permanent error: not retried (though
    --max-failures allows it), the search ends, and the CLI exits 1 with the error in one paragraph."""
    data_dir = f"/nonexistent/fbdata-{secrets.token_hex(4)}"
    space = DATA_ERROR_SPACE.format(data_dir=data_dir)
    code, out = run_submit(tmp_path, cluster, space, "dataerr", tracking, "--max-failures", "2")
    assert code == 1, out
    summary = [line for line in out.splitlines() if "the search failed:" in line]
    assert len(summary) == 1, out
    assert f"DataError: data_dir {data_dir} does not exist" in summary[0], summary
    assert "Traceback" not in out, out

    experiment = tmp_path / "shared" / "dataerr"
    rows = tune_rows(experiment)  # trials that reported (the stop may end the other before it does)
    assert 1 <= len(rows) <= 2, rows
    for trial in rows.values():  # ran once: one result, the error, from the worker
        assert len(trial) == 1, trial
        assert data_dir in trial[0]["permanent_error"] and trial[0]["node_ip"] == WORKER_IP, trial
    assert not list(experiment.rglob("error.txt")), "a trial raised: Tune retries those"

    # Its MLflow run says why. (A trial the stop ended before its first result has a run too.)
    client = MlflowClient(tracking)
    runs = {r.data.tags["flatbasin.trial_id"]: r for r in trial_runs(client, "dataerr")}
    for trial_id in rows:
        assert data_dir in runs[trial_id].data.tags.get("flatbasin.error", ""), runs[trial_id]
