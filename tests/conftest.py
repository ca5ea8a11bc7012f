"""Shared fixtures: tiny in-memory data so that unit and contract tests run in seconds on a CPU, and
processes (servers, Ray nodes) that are stopped by process group whatever way a test ends."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from flatbasin.trainables.data import Data, load_data, load_raw
from flatbasin.trainables.data_spec import DataSpec


@pytest.fixture(scope="session")
def digits() -> Data:
    return load_data(DataSpec(), "cpu")


@pytest.fixture(scope="session")
def small(digits: Data) -> Data:
    """640 training images: 20 steps of 32 per epoch, enough for batch norm statistics to settle."""
    return Data(
        name="digits-small",
        fingerprint=digits.fingerprint,
        num_classes=digits.num_classes,
        x_train=digits.x_train[:640],
        y_train=digits.y_train[:640],
        x_val=digits.x_val,
        y_val=digits.y_val,
        x_test=digits.x_test,
        y_test=digits.y_test,
    )


class DigitImages(Dataset):
    """Digits served as a user's Dataset would: uint8 (1, 8, 8) tensors and int labels, one item at
    a time. `jitter`: a random transform drawn from torch's global generator, as torchvision's are;
    `targets`: the labels as an attribute, torchvision's convention; `blank`: every image zero."""

    def __init__(self, images, labels, *, jitter=False, targets=False, blank=False):
        self.images = (
            torch.zeros_like(torch.from_numpy(images)) if blank else torch.from_numpy(images)
        )
        self.labels, self.jitter = [int(y) for y in labels], jitter
        if targets:
            self.targets = list(self.labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        x = self.images[index]
        if self.jitter:
            x = (x.int() + torch.randint(0, 9, x.shape)).clamp(0, 255).to(torch.uint8)
        return x, self.labels[index]


STREAMED_TRAIN, STREAMED_TEST = 720, 200  # digits: 648 training (20 steps of 32), 72 val, 200 test


@pytest.fixture(scope="session")
def make_streamed() -> Iterator[Callable[..., Any]]:
    """Streamed digits (user_data.StreamedData, as `dataset: module:callable` returning two Datasets
    makes them): make(workers=2, **DigitImages options). Their loaders' workers stop at the end."""
    from flatbasin.trainables import user_data

    x, y, _, _ = load_raw(DataSpec())
    made = []

    def make(workers: int = 2, **options: Any):
        train = DigitImages(x[:STREAMED_TRAIN], y[:STREAMED_TRAIN], **options)
        test_end = STREAMED_TRAIN + STREAMED_TEST
        test = DigitImages(x[STREAMED_TRAIN:test_end], y[STREAMED_TRAIN:test_end], **options)
        spec = DataSpec(dataset="tests:digit_images", loader_workers=workers)
        made.append(user_data.streamed(spec, (train, test), source="conftest"))
        return made[-1]

    yield make
    for data in made:
        data.close()


@pytest.fixture(scope="session")
def streamed_small(make_streamed):
    """Streamed digits read by 2 workers, with a random transform in the Dataset."""
    return make_streamed(workers=2, jitter=True)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- owned processes


def _process_table() -> dict[int, tuple[str, int, int, int]]:
    """pid -> (state, ppid, process group, session) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            state, ppid, pgid, sid = stat.read_text().rpartition(")")[2].split()[:4]
            table[int(stat.parent.name)] = (state, int(ppid), int(pgid), int(sid))
    return table


def _command_line(pid: int) -> str:
    with suppress(OSError):
        return (
            (Path("/proc") / str(pid) / "cmdline")
            .read_bytes()
            .replace(b"\0", b" ")
            .decode(errors="replace")
        )
    return "?"


class ProcessGroups:
    """Processes started each in a session of its own, killed with everything they started.

    `spawn` starts a command as the leader of a new session (so of a new process group). What it
    starts stays in that session, each Ray worker in a process group of its own, unless it makes a
    session of its own, as Ray does for a job's driver and its watcher. `kill` freezes (SIGSTOP)
    every group holding a member of the leader's session, a descendant of the leader or of a member,
    or a member of a session a descendant made, again until no new group turns up (a frozen process
    starts nothing), then SIGKILLs those groups and waits until none holds a live process. Nothing
    else is ever signalled: no `ray stop`, no kill by name.

    A leader is reaped only by `kill`: until then its pid, so its session's id, cannot be taken by
    anyone else's process (use `running`, not Popen.poll or wait, which reap). Sessions that
    descendants made are looked up afresh in each `kill`, never remembered across calls.

    Tests use it through the `process_groups` fixture, or `owned_processes()` in a fixture of wider
    scope: the finaliser kills and checks every group however the test ended (Ctrl-C and
    pytest-timeout run finalisers too). As a last resort, groups still alive are killed at exit and
    on a SIGTERM to pytest (`timeout`'s signal), which then goes on as it would have.
    """

    _live: list[ProcessGroups] = []  # instances whose processes are not killed yet

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []  # leaders not yet killed
        self.seen: dict[int, int] = {}  # process group -> the session it was seen in
        self.folders: list[Path] = []  # removed with the processes (theirs, e.g. a RAY_TMPDIR)

    def spawn(self, cmd: list[str], *, log: Path | None = None, **kwargs) -> subprocess.Popen:
        """Start `cmd` as the leader of a new session; output appended to `log`, or dropped."""
        _watch_sigterm()
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        with open(log if log is not None else os.devnull, "ab") as out:
            kwargs.setdefault("stdout", out)
            kwargs.setdefault("stderr", subprocess.STDOUT)
            proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        self.procs.append(proc)
        if self not in ProcessGroups._live:
            ProcessGroups._live.append(self)
        return proc

    @staticmethod
    def running(proc: subprocess.Popen) -> bool:
        """Whether the leader is still running, without reaping it."""
        if proc.returncode is not None:
            return False
        try:
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:
            return False

    def groups_of(
        self, proc: subprocess.Popen | None = None, sessions: set[int] | None = None
    ) -> set[int]:
        """Process groups holding a live process that `proc` (every leader when None) started: a
        member of its session, a descendant, or a member of a session a descendant made. `sessions`
        collects the session ids found (pass the same set to look again within one operation)."""
        table = _process_table()
        children: dict[int, list[int]] = {}
        for pid, (_, ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        leaders = [p for p in ([proc] if proc is not None else self.procs) if p.returncode is None]
        sessions = sessions if sessions is not None else set()
        sessions |= {p.pid for p in leaders}  # reserved: an unreaped leader keeps its pid
        mine = {p.pid for p in leaders if p.pid in table}
        while True:
            mine |= {pid for pid, row in table.items() if row[3] in sessions}
            stack = list(mine)
            while stack:  # a session that a descendant made cannot be anyone else's
                for child in children.get(stack.pop(), []):
                    if child not in mine:
                        mine.add(child)
                        stack.append(child)
            new = {table[pid][3] for pid in mine} - sessions
            if not new:
                break
            sessions |= new
        live = {pid for pid in mine if table[pid][0] != "Z"}
        self.seen.update((table[pid][2], table[pid][3]) for pid in live)
        return {table[pid][2] for pid in live}

    def send(self, proc: subprocess.Popen, sig: int) -> set[int]:
        """`sig` to every group of `proc` (see groups_of); returns those groups."""
        groups = self.groups_of(proc)
        for group in groups:
            with suppress(ProcessLookupError):
                os.killpg(group, sig)
        return groups

    def kill(self, proc: subprocess.Popen | None = None, timeout_s: float = 60.0) -> None:
        """SIGKILL every group of `proc` (of every leader when None), wait until each is empty, reap
        and forget the leaders; AssertionError naming the survivors if a group is not empty after
        timeout_s."""
        sessions: set[int] = set()
        frozen: set[int] = set()
        while groups := self.groups_of(proc, sessions) - frozen:
            for group in groups:
                with suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGSTOP)
            frozen |= groups
        for group in frozen:
            with suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        leaders = [proc] if proc is not None else list(self.procs)
        deadline = time.monotonic() + timeout_s
        while True:
            for leader in leaders:
                leader.poll()  # reap: never blocks, so safe in a signal handler too
            left = self.survivors(frozen, sessions)
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for leader in leaders:
            if leader.returncode is not None and leader in self.procs:
                self.procs.remove(leader)
        if left:
            raise AssertionError(f"processes outlived SIGKILL of their group: {left}")

    def kill_all(self) -> None:
        """Kill every group and remove the folders; then no group ever seen may hold a live process
        of its session."""
        try:
            self.kill(None)
            left = self.survivors(set(self.seen), set(self.seen.values()))
            assert not left, f"processes of our groups still alive: {left}"
        finally:
            for folder in self.folders:
                shutil.rmtree(folder, ignore_errors=True)
            with suppress(ValueError):
                ProcessGroups._live.remove(self)

    @staticmethod
    def survivors(groups: set[int], sessions: set[int]) -> dict[int, tuple[str, int, str]]:
        """pid -> (state, group, command line) of every live (not zombie) process of these groups
        and sessions (a group's id can be reused once the group is gone: the session tells)."""
        return {
            pid: (state, pgid, _command_line(pid))
            for pid, (state, _, pgid, sid) in _process_table().items()
            if pgid in groups and sid in sessions and state != "Z"
        }


def _kill_leftover_groups() -> None:
    """Last resort (pytest stopped before the finalisers ran): kill what is left, quietly."""
    for groups in list(ProcessGroups._live):
        with suppress(Exception):
            groups.kill(None, timeout_s=10)
        for folder in groups.folders:
            shutil.rmtree(folder, ignore_errors=True)
        with suppress(ValueError):
            ProcessGroups._live.remove(groups)


atexit.register(_kill_leftover_groups)
_sigterm_watched = False


def _watch_sigterm() -> None:
    """On SIGTERM kill our groups first, then let the signal do what it did before (by default,
    end pytest at once, with no finaliser and no atexit hook run)."""
    global _sigterm_watched
    if _sigterm_watched or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        _kill_leftover_groups()
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    _sigterm_watched = True


@contextmanager
def owned_processes() -> Iterator[ProcessGroups]:
    """ProcessGroups for a fixture of any scope: every group killed and checked on the way out."""
    groups = ProcessGroups()
    try:
        yield groups
    finally:
        groups.kill_all()


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    """Ray's own folder for one test (short: Ray's socket paths have a length limit); a search that
    leaves a Ray session in it started Ray, and a current-cluster file in it is this test's alone."""
    with tempfile.TemporaryDirectory(prefix="fbray-", dir="/tmp") as folder:
        yield Path(folder)


@pytest.fixture
def process_groups() -> Iterator[ProcessGroups]:
    """Start processes with `process_groups.spawn(cmd, ...)`: all killed, and checked, at teardown."""
    with owned_processes() as groups:
        yield groups


def start_mlflow_server(
    groups: ProcessGroups, folder: Path
) -> tuple[str, Callable[[], None], Callable[[], None]]:
    """A real `mlflow server` on loopback (SQLite backend, served artifacts) in `folder`, in its own
    process group; returns (uri, start, stop): stop kills it by group, start runs it again on its
    port. Its output goes to folder/mlflow-server.log."""
    import urllib.request

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
           "--artifacts-destination", str(folder / "artifacts")]  # fmt: skip
    servers: list[subprocess.Popen] = []

    def start() -> None:
        proc = groups.spawn(cmd, cwd=folder, log=folder / "mlflow-server.log")
        servers.append(proc)
        deadline = time.monotonic() + 300  # minutes, on a machine shared with others' test runs
        while time.monotonic() < deadline and groups.running(proc):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.5)
        log = (folder / "mlflow-server.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"mlflow server did not start (running: {groups.running(proc)}):\n{log}")

    def stop() -> None:
        while servers:
            groups.kill(servers.pop())

    start()
    return uri, start, stop


@pytest.fixture
def mlflow_server(tmp_path, process_groups):
    """A real `mlflow server` on loopback (SQLite backend, served artifacts); restartable."""
    yield start_mlflow_server(process_groups, tmp_path)


# ----------------------------------------------------------------------------- one real search
# Shared by tests/test_search_integration.py and tests/test_report.py: a search costs tens of seconds
# (Ray's start, workers' imports, the report), so the tests that only read a finished one share it.
SEARCHED_SPACE = """\
name: searched
samples: 6
epochs: 3
confirm_seeds: 2
fixed: {batch_size: 64}
variants:
  sgd: {lr: {loguniform: [0.02, 0.1]}}
  swa: {lr: {loguniform: [0.02, 0.1]}, swa_start_frac: 0.34}
  snapshot: {lr: {loguniform: [0.02, 0.1]}, cycles: {int: [2, 3]}}
"""


@dataclass(frozen=True)
class Searched:
    folder: Path  # the search's working directory: searched.yaml, mlflow.db, runs/, reports/
    uri: str
    returncode: int
    stdout: str
    stderr: str
    seed: int = 4


@pytest.fixture(scope="session")
def searched(tmp_path_factory) -> Iterator[Searched]:
    """A real tiny search through the CLI: 6 trials of sgd, swa and snapshot on digits (3 epochs),
    each variant's best confirmed with 2 fresh seeds; its own session and Ray folder, killed and
    removed afterwards. Tests read it; none may change it."""
    folder = tmp_path_factory.mktemp("searched")
    (folder / "searched.yaml").write_text(SEARCHED_SPACE)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with (
        owned_processes() as groups,
        tempfile.TemporaryDirectory(prefix="fbray-", dir="/tmp") as ray,
    ):
        proc = groups.spawn(
            [sys.executable, "-m", "flatbasin", "search", "searched.yaml", "--tracking-uri", uri,
             "--storage", str(folder / "runs"), "--seed", "4", "--concurrency", "2"],
            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray},
        )  # fmt: skip
        stdout, stderr = proc.communicate(timeout=840)
        yield Searched(folder, uri, proc.returncode, stdout, stderr)


# ----------------------------------------------------------------------------- small disks
# A full disk, or one that turns read-only, made for one test: a tmpfs of a given size mounted on a
# folder of the test's own (root only: the test is skipped, saying why, where it cannot mount one).


@contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` ('4m') mounted on `folder` (made), unmounted however the test ends."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a small file system needs root, to mount a tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        # Lazily: a process the test started may still hold a file there; it goes when they do.
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(disk: Path) -> Path:
    """Write a file on `disk` until no block is left; returns it (delete it to free the space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1):
            with suppress(OSError):
                while os.write(fd, b"\0" * chunk):
                    pass
    finally:
        os.close(fd)
    return filler


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` turns read-only for new opens, as a remount or an NFS server going read-only does,
    while files already open stay as they were (a read-only remount is refused while any file is
    open for writing, as a store's is): a read-only bind mount laid over it, removed afterwards."""
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount a folder read-only here: {mounted.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
