"""`train`'s outputs at the end of a run: each written whole where it can be; what could not be
written is one line each for the closing paragraph, never a traceback that loses the run."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from flatbasin.search.errors import stderr
from flatbasin.trainables.files import write_bytes_whole


class CheckpointWrites:
    """`train --checkpoint`: each epoch's write tried, the first failure said at once (on stderr),
    the state at the end said in the closing paragraph."""

    def __init__(self) -> None:
        self.error: OSError | None = None  # of the latest epoch, if its checkpoint failed
        self.failed_at = 0  # the first epoch of the current run of failures
        self.written = 0  # the latest epoch whose checkpoint is on disk

    def attempt(self, save: Callable[[], None], epoch: int) -> None:
        try:
            save()
        except OSError as err:
            if self.error is None:
                self.failed_at = epoch
                stderr.print(f"warning: the checkpoint of epoch {epoch} could not be written "
                             f"({_why(err)}); training goes on", style="yellow")  # fmt: skip
            self.error = err
            return
        self.error, self.written = None, epoch

    def problems(self, path: Path) -> list[str]:
        if self.error is None:
            return []
        if self.written:
            kept = f"it holds epoch {self.written}"
        else:
            kept = "it holds what it held before this run" if path.is_file() else "none was written"
        return [f"--checkpoint {path} could not be written from epoch {self.failed_at} on "
                f"({_why(self.error)}; {kept})"]  # fmt: skip


def write_output(option: str, path: Path, data: bytes) -> list[str]:
    """Write an output file whole; [] when it was, else one line saying why not. A result that
    cannot go where it was asked goes to the temporary folder, when that can take it."""
    try:
        write_bytes_whole(path, data, f"{option} {path}")
        return []
    except OSError as err:
        problem = f"{option} {path} could not be written ({_why(err)})"
    fd, spare = tempfile.mkstemp(prefix="flatbasin-", suffix=path.suffix or ".out")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    except OSError:
        os.unlink(spare)
        return [problem]
    return [f"{problem}; it was written to {spare} instead"]


def _why(err: OSError) -> str:
    """'No space left on device', or the whole message of an error that has no strerror."""
    return err.strerror or str(err) or type(err).__name__
