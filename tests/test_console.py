"""What a user reads on the console: help without noise, tables that fit 80 columns with run ids
whole, a reproduction summarised, and the libraries' chatter in the logs, not in front of them."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from flatbasin.search.cli import app

runner = CliRunner()


def command_paths(command=None, path=()):
    """Every command and group of the CLI, as the words that name it (() is `flatbasin` itself)."""
    command = command or typer.main.get_command(app)
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from command_paths(sub, (*path, name))


PATHS = list(command_paths())


def test_every_command_is_covered():
    names = {" ".join(p) for p in PATHS}
    assert {"", "train", "search", "reproduce", "report", "data", "data check", "sync"} <= names


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "flatbasin")
def test_help_shows_no_type_beside_a_flag(path):
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "--help" in result.output and "<bool>" not in result.output


def test_train_help_names_mnist1d_and_says_what_seed_is():
    text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"}).output
    assert "mnist1d" in text
    seed = next(line for line in text.splitlines() if "--seed" in line)
    assert "the trial's seed: model init, batch order, augmentation, dropout" in seed
