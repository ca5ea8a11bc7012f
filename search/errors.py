"""Output that treats text as data, and bad input turned into one paragraph with exit status 2.

Every console here has Rich markup and emoji codes switched off: paths, names and messages may hold
`[/...]` or `:name:` and must print exactly as given. Colour comes from `style=`, never from markup.
"""

from __future__ import annotations

import reprlib
import sys
from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def plain_console(*, stderr: bool = False) -> Console:
    """A console that prints text as given: no markup, no emoji codes, no highlighting."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(
        stderr=stderr, markup=False, emoji=False, highlight=False, soft_wrap=True,
        width=None if stream.isatty() else 160,  # wide enough for tables in a log file
    )  # fmt: skip


stderr = plain_console(stderr=True)


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 80, 80


def short(value: object) -> str:
    """A value as a message shows it: repr, cut short (a space file of a few hundred bytes can
    expand, through YAML aliases, into a value whose repr is hundreds of megabytes)."""
    return _REPR.repr(value)


class UsageError(Exception):
    """Bad input: the message names what is wrong; the CLI exits with status 2."""


class SearchFailed(RuntimeError):
    """A search that started could not go on (its base phase failed or diverged), and kept nothing;
    the CLI exits with status 1."""


class Unwritten(Exception):
    """The work ran, but an output could not be written (a full disk): the message names each one
    and why; the CLI exits with status 1."""


def describe(err: ValidationError, where: str = "") -> str:
    """One line per problem, each naming the field (variant parameters without their 'params.' prefix)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p != "params") or "config"
        msg = e["msg"].removeprefix("Value error, ")
        given = e.get("input")
        shown = "" if isinstance(given, dict) or given is None else f" (got {short(given)})"
        lines.append(f"{where}{loc}: {msg}{shown}")
    return "\n".join(lines)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    from flatbasin.search.credentials import scrub  # no message shows a tracking URI's password

    stderr.print(Text("error: ", style="bold red") + Text(scrub(message)))
    raise typer.Exit(code)
