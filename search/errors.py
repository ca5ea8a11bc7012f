"""Turning bad input into one clear paragraph and exit status 2 (failures are 1)."""

from __future__ import annotations

from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

stderr = Console(stderr=True, highlight=False)


class UsageError(Exception):
    """Bad input: the message names what is wrong; the CLI exits with status 2."""


def describe(err: ValidationError, where: str = "") -> str:
    """One line per problem, each naming the field (variant parameters without their 'params.' prefix)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p != "params") or "config"
        msg = e["msg"].removeprefix("Value error, ")
        given = e.get("input")
        shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
        lines.append(f"{where}{loc}: {msg}{shown}")
    return "\n".join(lines)


def fail(message: str, code: int = 2) -> NoReturn:
    stderr.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)
