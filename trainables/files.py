"""Files written whole or not at all, and what a failed write says about its disk (full, read-only,
over quota): the two things an interrupted or starved run must get right to lose nothing."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

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


@contextlib.contextmanager
def whole(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same folder, so the same disk, and the same suffix, so
    savefig and torch.save see the format); once the body wrote it, it replaces `path` in one step.
    Interrupted (Ctrl-C, SIGTERM) or failed (a full disk), the temporary file is removed and `path`
    keeps what it held: a file is either the old one or the new one, never half of each."""
    path = Path(path)
    target = path.resolve() if path.is_symlink() else path  # replace what the link points to
    if target.exists() and not target.is_file():  # a device or a pipe: written into, never replaced
        yield target
        return
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if target.exists():  # keep the file's permissions, as an in-place write would
            with contextlib.suppress(OSError):
                os.chmod(tmp, target.stat().st_mode & 0o7777)
        else:
            with contextlib.suppress(OSError):
                os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        # torch.save says a full disk as "RuntimeError: ... unexpected pos": say it as the OS does
        state = disk_state(target.parent) if not isinstance(err, OSError) else None
        if isinstance(err, Exception) and state is not None:
            code = errno.EROFS if state in READ_ONLY.values() else errno.ENOSPC
            raise OSError(code, os.strerror(code), str(target)) from err
        raise


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` then replace `path` with it; see `whole`."""
    with whole(path) as tmp:
        write(tmp)


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


def _umask() -> int:
    """This process's umask, read without changing it (os.umask would, for a moment, in every
    thread)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022
