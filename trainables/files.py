"""Output files written whole, and only where a regular file is or may be; and what a failed write
says about its disk (full, read-only, over quota): an interrupted or starved run loses nothing.

A temporary file beside the target is written and then renamed over it: the target is the old file or
the new one, never half of each (a full disk leaves the old one). The rename would put a file where a
device, a named pipe, a socket or a folder was (as root, `/dev/null` itself), so anything at the path
that is not a regular file, directly or through a link, is refused before and again just before it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# A write that failed for one of these will fail again until someone frees space or makes the disk
# writable: retrying it (Tune's max_failures) only repeats it.
DISK_FULL = {errno.ENOSPC: "full (no space left on device)", errno.EDQUOT: "over its quota"}
READ_ONLY = {errno.EROFS: "read-only"}
_TEXTS = {  # the same errors when only a message came through (pyarrow, SQLite, a remote traceback)
    "no space left on device": DISK_FULL[errno.ENOSPC],
    "database or disk is full": DISK_FULL[errno.ENOSPC],
    "disk quota exceeded": DISK_FULL[errno.EDQUOT],
    "read-only file system": READ_ONLY[errno.EROFS],
    "attempt to write a readonly database": READ_ONLY[errno.EROFS],
}


def disk_problem(err: BaseException | str) -> str | None:
    """'full (no space left on device)', 'over its quota' or 'read-only' when `err` (or what caused
    it) is a write refused by its disk; None for anything else."""
    seen: set[int] = set()
    stack: list[BaseException | str] = [err]
    while stack:
        item = stack.pop()
        if isinstance(item, BaseException):
            if id(item) in seen:
                continue
            seen.add(id(item))
            code = item.errno if isinstance(item, OSError) else None
            if code in DISK_FULL or code in READ_ONLY:
                return {**DISK_FULL, **READ_ONLY}[code]
            stack += [c for c in (item.__cause__, item.__context__, getattr(item, "cause", None))
                      if isinstance(c, BaseException)]  # fmt: skip
            item = str(item)
        text = item.lower()
        for needle, problem in _TEXTS.items():
            if needle in text:
                return problem
    return None


def disk_state(path: Path) -> str | None:
    """'full (no space left on device)' or 'read-only' when the file system holding `path` (or its
    nearest existing folder) is so now; None when it takes writes, or cannot be asked."""
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return READ_ONLY[errno.EROFS]
    if stats.f_bavail * stats.f_frsize < 1 << 20:  # under a MiB: a checkpoint or a commit fails
        return DISK_FULL[errno.ENOSPC]
    return None


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


class NotAFileError(OSError):
    """Something other than a regular file is where an output file goes."""


def not_a_file(path: Path | str) -> str | None:
    """What is at `path` if it is not a regular file ('a character device', 'a folder', ... 'through
    the link X'); None when a regular file or nothing is there (a link to nothing: its target is
    written)."""
    try:
        mode = os.stat(path).st_mode  # follows links: what a write would reach
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    if os.path.islink(path):
        kind += f" (through the link {path} -> {os.path.realpath(path)})"
    return kind


def refuse_unless_file(path: Path | str, what: str) -> None:
    """NotAFileError when `path` holds something other than a regular file. `what` starts the
    message ('--json out.json')."""
    kind = not_a_file(path)
    if kind is not None:
        raise NotAFileError(f"{what}: is {kind}, not a regular file; give a file name")


def write_whole(path: Path | str, write: Callable[[BinaryIO], object], what: str = "") -> None:
    """Call `write(handle)` to write a temporary file beside `path` through a Python file handle
    (so that a full disk is an OSError, whoever writes: torch's own file writer raises a bare
    RuntimeError), then rename it over `path`. A link is written through (its target is
    replaced). The temporary file is gone whatever happens; a failing write leaves `path` as it
    was."""
    what = what or str(path)
    target = Path(os.path.realpath(Path(path).expanduser()))
    refuse_unless_file(target, what)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    mode = 0o666  # as open() would make it (less the umask), or the old file's own mode
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(os.stat(target).st_mode)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        refuse_unless_file(target, what)  # made meanwhile: still not replaced
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None and err.errno is not None:
            # Said as the OS says it, naming the file (a write through a handle names none).
            raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(target)) from err
        raise


def write_bytes_whole(path: Path | str, data: bytes, what: str = "") -> None:
    write_whole(path, lambda handle: handle.write(data), what)


def keep_in_temp(text: str) -> Path | None:
    """`text` in a new file of the temporary folder (a result that could not be written where it
    was asked for); None when that cannot be written either."""
    try:
        fd, name = tempfile.mkstemp(prefix="flatbasin-result-", suffix=".json")
        with os.fdopen(fd, "w") as out:
            out.write(text)
    except OSError:
        return None
    return Path(name)
