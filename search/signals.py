"""SIGTERM (what Kubernetes, SLURM and `docker stop` send) and SIGHUP (a closed terminal) end a command
the way Ctrl-C does: each is handed to whatever handles SIGINT at that moment (Tune's own handler while a
search runs, which saves its state and stops the trials; else Python's, a KeyboardInterrupt), and the
exit status then names the signal that came: 128 + its number (143, 129; 130 for Ctrl-C).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []  # the stop signals that came, first first
_state = {"installed": False}


def _as_ctrl_c(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    if signum == signal.SIGHUP:
        _leave_hung_up_terminal()
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    elif handler == signal.SIG_DFL:
        raise KeyboardInterrupt
    # SIG_IGN: ignored, as Ctrl-C would be


def _leave_hung_up_terminal() -> None:
    """A SIGHUP means the terminal is gone: writing to it would fail (EIO) in the middle of saving
    the search, so what would have gone there goes nowhere. Files and pipes stay as they are."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            if os.isatty(fd):
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def install() -> None:
    """Hand SIGTERM and SIGHUP to the SIGINT path. Call it at start, and again after anything that
    installs handlers of its own (ray.init puts in one that dumps a stack and aborts, exit 134)."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals reach the main thread only
    for signum in STOP_SIGNALS:
        signal.signal(signum, _as_ctrl_c)
    _state["installed"] = True


@contextlib.contextmanager
def spared_children() -> Iterator[None]:
    """Processes started inside (a local Ray's GCS, raylet and, through it, its workers) keep SIGHUP
    blocked, as Ray keeps SIGINT blocked in them: a closed terminal sends SIGHUP to the whole process
    group, and it must reach only the driver, which then stops the search as on Ctrl-C with its Ray
    still there to stop the trials. SIGTERM cannot be kept from them the same way: Ray stops its own
    processes with SIGTERM (blocked, each would hold up Ray's shutdown by a second). Only where
    install() ran (the CLI)."""
    if not _state["installed"] or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def received() -> int | None:
    """The first stop signal that came, if one did."""
    return _received[0] if _received else None


def exit_status() -> int:
    """128 + the first stop signal's number; 130 (SIGINT) when none came: it was Ctrl-C."""
    return 128 + (received() or signal.SIGINT)


def name() -> str:
    """'SIGTERM', 'SIGHUP' or 'Ctrl-C': what ended the command."""
    first = received()
    return signal.Signals(first).name if first else "Ctrl-C"


def _second_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@dataclass
class Interrupt:
    caught: bool = False


@contextlib.contextmanager
def interrupt_watch() -> Iterator[Interrupt]:
    """Tell whether Tune's fit ended on Ctrl-C. Tune catches the first SIGINT itself, saves its state,
    stops the trials (they end TERMINATED, like finished ones) and returns normally; when it catches
    one, it puts back the handler it found. So: install ours, and see afterwards whether it is back.
    Ours makes a second Ctrl-C a KeyboardInterrupt, as Tune's message promises."""
    interrupt = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt  # signals go to the main thread only; nothing to watch
        return
    previous = signal.signal(signal.SIGINT, _second_interrupt)
    try:
        yield interrupt
        interrupt.caught = signal.getsignal(signal.SIGINT) is _second_interrupt
    finally:
        signal.signal(signal.SIGINT, previous)
