"""Hostile conditions without Ray: signals that stop a command, files written whole, full, read-only
and deleted disks under a store. Real processes, real SQLite stores, real (small) file systems made
by the test; the searches that meet the same conditions are in test_hostile_search.py."""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import fill, read_only, small_disk
from rich.console import Console

from flatbasin.search.callbacks import MlflowWriter, store_failure
from flatbasin.search.tracking import Tracker
from flatbasin.trainables.files import NotAFileError, disk_problem, disk_state, write_whole

# ----------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("error", "problem"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "full (no space left on device)"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "over its quota"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only"),
        # pyarrow (Tune's checkpoint upload) and SQLite say it in words only
        (
            OSError("Error writing bytes to file. Detail: [errno 28] No space left on device"),
            "full (no space left on device)",
        ),
        (
            RuntimeError("(sqlite3.OperationalError) database or disk is full"),
            "full (no space left on device)",
        ),
        (
            RuntimeError("(sqlite3.OperationalError) attempt to write a readonly database"),
            "read-only",
        ),
        (OSError(errno.ENOENT, "No such file or directory"), None),
        (OSError(errno.EACCES, "Permission denied"), None),
        (ValueError("disk"), None),
    ],
)
def test_a_disk_that_refuses_writes_is_told_from_other_errors(error, problem):
    assert disk_problem(error) == problem


def test_a_disk_problem_is_found_behind_the_error_that_wraps_it():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("checkpoint upload failed") from inner
    except RuntimeError as outer:
        assert disk_problem(outer) == "full (no space left on device)"


# ----------------------------------------------------------------------------- files written whole


def test_an_interrupted_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "result.json"
    path.write_text('{"old": true}')

    def half(handle) -> None:
        handle.write(b'{"new": tr')
        raise KeyboardInterrupt  # what SIGTERM becomes, between two writes

    with pytest.raises(KeyboardInterrupt):
        write_whole(path, half)
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]

    write_whole(path, lambda handle: handle.write(b'{"new": true}'))
    assert json.loads(path.read_text()) == {"new": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_device_is_refused_never_replaced(tmp_path):
    """A device where a file goes is refused (tests/test_bad_inputs.py checks every output option);
    here, the writer itself, on a private node like /dev/null: untouched."""
    node = tmp_path / "null"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    before = os.stat(node)
    with pytest.raises(NotAFileError, match="character device"):
        write_whole(node, lambda handle: handle.write(b"x"))
    after = os.stat(node)
    assert (after.st_ino, after.st_rdev, after.st_mode) == (
        before.st_ino,
        before.st_rdev,
        before.st_mode,
    )


def test_a_full_disk_keeps_the_old_file_and_says_so_as_the_os_does(tmp_path):
    """torch.save on a full disk raises RuntimeError('... unexpected pos ...'); it becomes ENOSPC,
    naming the file, and the checkpoint already there stays whole."""
    with small_disk(tmp_path / "disk", "4m") as disk:
        path = disk / "checkpoint.pt"
        torch.save({"w": torch.ones(10)}, path)
        fill(disk)
        assert disk_state(path) == "full (no space left on device)"
        with pytest.raises(OSError) as caught:
            write_whole(path, lambda handle: torch.save({"w": torch.zeros(100_000)}, handle))
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
        assert torch.load(path)["w"].sum() == 10
        assert sorted(p.name for p in disk.iterdir()) == ["checkpoint.pt", "filler"]


# ----------------------------------------------------------------------------- train under signals

TRAIN = [sys.executable, "-m", "flatbasin", "train", "--variant", "sgd", "--dataset", "mnist1d",
         "--epochs", "30", "--set", "threads=1"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stopped_training_run_exits_as_interrupted_and_resumes(tmp_path, process_groups, signum):
    """SIGTERM (a scheduler) and SIGHUP (a closed terminal), sent to the whole process group once
    an epoch is checkpointed: exit 128 + the signal, one line naming it, the exact command that
    continues; the checkpoint is whole and no temporary file is left; that command then finishes
    the run."""
    checkpoint = tmp_path / "run.pt"
    args = [*TRAIN, "--checkpoint", str(checkpoint), "--json", str(tmp_path / "result.json")]
    proc = process_groups.spawn(
        args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("epoch   2/30"):  # epoch 1 is checkpointed: its save came before this
            break
    else:
        pytest.fail(f"no epoch line: {proc.communicate()}")
    process_groups.send(proc, signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert f"interrupted ({signal.Signals(signum).name})" in err
    assert "Traceback" not in err + out
    resume = err.split("continue with: ")[1].splitlines()[0]
    assert resume.endswith("--resume") and f"--checkpoint {checkpoint}" in resume
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]  # whole, no .tmp, no half JSON
    saved = torch.load(checkpoint, weights_only=False)
    assert 1 <= saved["epoch"] < 30  # epoch 1 was saved before epoch 2 was printed

    done = subprocess.run(
        [sys.executable, "-m", "flatbasin", *shlex.split(resume)[1:]], cwd=tmp_path,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "epoch   1/30" not in done.stdout and "epoch  30/30" in done.stdout
    assert json.loads((tmp_path / "result.json").read_text())["history"][-1]["epoch"] == 30


@pytest.mark.slow
def test_a_stopped_focus_library_run_writes_no_library(tmp_path, process_groups):
    """SIGTERM while the harvest trains: exit 143, one line, and no library, whole or half."""
    out = tmp_path / "focus.pt"
    proc = process_groups.spawn(
        [sys.executable, "-m", "flatbasin", "focus-library", str(out), "--dataset", "mnist1d",
         "--epochs", "200", "--set", "threads=1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("harvesting:"), first
    process_groups.send(proc, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip() == "interrupted (SIGTERM)"
    assert list(tmp_path.iterdir()) == []


def test_train_on_a_full_disk_ends_in_one_paragraph_and_keeps_its_checkpoint(tmp_path):
    """The checkpoint of epoch 2 does not fit: one paragraph naming the file and the disk, the
    checkpoint of epoch 1 whole, and the command that continues once there is room."""
    with small_disk(tmp_path / "disk", "4m") as disk:
        checkpoint = disk / "run.pt"
        args = [*TRAIN[:8], "--epochs", "3", "--set", "threads=1", "--checkpoint", str(checkpoint)]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("epoch   1/3"):  # saved right after this line: wait for it whole
                while not checkpoint.is_file():
                    time.sleep(0.05)
                fill(disk)
                break
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err
        assert "Traceback" not in err
        # Training went on to its end (the result is printed); the paragraph names the file and
        # which epoch it holds, whole.
        assert (
            "could not be written from epoch 2 on (No space left on device; it holds epoch 1)"
            in " ".join(err.split())
        )
        assert torch.load(checkpoint, weights_only=False)["epoch"] == 1
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "run.pt"]


def test_a_result_that_cannot_be_written_is_kept_elsewhere(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as disk:
        fill(disk)
        out = disk / "result.json"
        done = subprocess.run([*TRAIN[:8], "--epochs", "1", "--json", str(out)],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        assert f"--json {out} could not be written (No space left on device)" in " ".join(
            done.stderr.split()
        )
        kept = Path(done.stderr.split("written to ")[1].split(" instead")[0])
        try:
            assert json.loads(kept.read_text())["history"][-1]["epoch"] == 1
        finally:
            kept.unlink()
        assert not out.exists()


# ----------------------------------------------------------------------------- a store that fails


def _writer_with_a_trial(uri: str) -> tuple[Tracker, MlflowWriter, SimpleNamespace]:
    """A writer that has written one epoch of trial t1 into the store at `uri`."""
    tracker = Tracker(uri, "exp", search_key="k")
    tracker.parent()
    writer = MlflowWriter(tracker, Console(quiet=True))
    writer.retry_s = writer.flush_s = 0.05
    trial = SimpleNamespace(trial_id="t1", config={"variant": "sgd"}, local_path=None, path=None)
    writer.on_trial_result(0, [], trial, {"epoch": 1, "score": 0.5})
    assert writer.drain()
    return tracker, writer, trial


def _epochs(uri: str) -> list[int]:
    tracker = Tracker(uri, "exp", search_key="k")
    run = tracker.client.search_runs([tracker.experiment_id], "tags.`flatbasin.trial_id` = 't1'")
    return sorted(m.step for m in tracker.client.get_metric_history(run[0].info.run_id, "score"))


def test_a_store_whose_disk_fills_up_is_named_and_catches_up_once_there_is_room(tmp_path):
    with small_disk(tmp_path / "disk", "8m") as disk:
        uri = f"sqlite:///{disk / 'mlflow.db'}"
        _, writer, trial = _writer_with_a_trial(uri)
        filler = fill(disk)
        for epoch in range(2, 60):  # enough rows that SQLite needs a new page
            writer.on_trial_result(0, [], trial, {"epoch": epoch, "score": 0.5, "val_acc": 0.5,
                                                  "train_loss": 1.0 / epoch})  # fmt: skip
        assert not writer.drain(attempts=1)
        assert writer.unwritten == {"t1"} and writer.lasting == "full"
        assert writer.failure == (
            f"MLflow's store {disk / 'mlflow.db'} cannot be written: its disk is full (no space "
            "left on device)"
        )
        filler.unlink()
        assert writer.drain(attempts=1)
        assert _epochs(uri) == list(range(1, 60))  # every epoch, once


def test_a_store_made_read_only_is_named_as_such(tmp_path):
    with small_disk(tmp_path / "disk", "8m") as disk:
        (disk / "store").mkdir()
        uri = f"sqlite:///{disk / 'store' / 'mlflow.db'}"
        _, writer, trial = _writer_with_a_trial(uri)
        with read_only(disk / "store"):
            writer.on_trial_result(0, [], trial, {"epoch": 2, "score": 0.6})
            assert not writer.drain(attempts=1)
            assert writer.lasting == "read-only"
            assert writer.failure == (
                f"MLflow's store {disk / 'store' / 'mlflow.db'} cannot be written: its disk is "
                "read-only"
            )
        assert writer.drain(attempts=1)
        assert _epochs(uri) == [1, 2]


def test_a_store_deleted_under_the_writer_is_named_as_such(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, writer, trial = _writer_with_a_trial(uri)
    (tmp_path / "mlflow.db").unlink()
    writer.on_trial_result(0, [], trial, {"epoch": 2, "score": 0.6})
    assert not writer.drain(attempts=1)
    assert writer.lasting == "deleted"
    assert writer.failure is not None
    assert writer.failure.startswith(f"MLflow's store {tmp_path / 'mlflow.db'} was deleted")
    assert "Traceback" not in writer.failure and "\n" not in writer.failure


def test_a_server_that_is_away_is_not_a_lasting_failure():
    text, kind = store_failure("http://127.0.0.1:1", ConnectionError("connection refused"))
    assert kind == "" and text == "MLflow unavailable (ConnectionError)"
