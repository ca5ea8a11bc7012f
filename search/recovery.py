"""What to tell the user when a disk or a store stops a search: which disk, and the command that
recovers it (a resume, after putting back Tune's state if a full disk cut it short; or a sync)."""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path
from typing import Any

import flatbasin.search.saved_state as saved_state
from flatbasin.trainables.files import disk_state


def store_failed(outcome: Any, tracking_uri: str) -> str:
    """One paragraph for trials left unwritten by a store that waiting will not bring back."""
    failure, kind = outcome.store
    sync = (
        f"flatbasin sync {shlex.quote(str(outcome.experiment_path))} --tracking-uri "
        f"{shlex.quote(tracking_uri)}"
    )
    remedy = {
        "full": "Free space there, then write them with",
        "read-only": "Make it writable again, then write them with",
        "deleted": "Put the file back if it was moved, or let sync make a new store there with "
        "the whole search; either way run",
    }[kind]
    return (
        f"{failure}: {outcome.unwritten} trial(s) are not in MLflow, nor is the end of the "
        f"search's run; Tune's result files hold them all. {remedy}: {sync}"
    )


def disk_failed(disk: str, resume: str, experiment_path: Path) -> str:
    """One paragraph for a search that a full or read-only disk stopped: which disk, and how to go on
    (Tune's state itself may have been cut short on its way to that disk: then how to put it back)."""
    state = saved_state.inspect(experiment_path)
    if state.kind == "saved":
        then = f"then continue it with: {resume}"
    elif (copied := saved_state.complete_copy(experiment_path)) is not None:
        copy, cut = (shlex.quote(str(p)) for p in copied)
        then = (
            "then put back Tune's state, which was cut short there, and continue: "
            f"cp {copy} {cut} && {resume}"
        )
    elif state.kind == "damaged":
        then = (
            f"then see what --resume says of Tune's state ({state.file} {state.problem}): {resume}"
        )
    else:
        then = "then run the same command again (Tune had saved nothing to resume)"
    return (
        f"the search stopped: {disk}. Every unfinished trial keeps its last checkpoint, and the "
        f"search's run says failed. Free space there (or make it writable again), {then}"
    )


class DiskFailure(Exception):
    """The driver's own write (Tune's state or result files, the search's records) found its disk
    full or read-only; the message names the disk and the error."""


def disk_paragraph(problem: str, error: str | None, experiment_path: Path) -> str:
    """What filled up (or went read-only), named by its path: Tune's storage or the temporary folder
    the trials write their checkpoints through, as they are now; else the error as it came."""
    where = f"a disk the trials write to is {problem}"
    for what, path in (
        ("Tune's storage", experiment_path.parent),
        ("the temporary folder", Path(tempfile.gettempdir())),
    ):
        if (now := disk_state(path)) is not None:
            where = f"{what} {path} is {now}"
            break
    return f"{where}: {error}" if error else where
