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


def summary_text(width: int) -> tuple[str, list[str]]:
    """A search's printed summary on a console `width` columns wide, and the run ids in it."""
    import io
    import uuid
    from pathlib import Path
    from types import SimpleNamespace

    from rich.console import Console

    from flatbasin.search.output import print_summary

    ids = [uuid.uuid4().hex for _ in range(3)]
    params = [{"lr": 0.0812345, "cycles": 3, "lr_large": 0.123456, "lr_small": 0.00456},
              {"lr": 0.05, "swa_lr": 0.0123, "swa_start_frac": 0.61, "swa_mode": "cyclic", "swa_lr_max": 0.15},
              {"lr": 0.1}]  # fmt: skip
    best = [
        {
            "variant": v,
            "score": 0.96 - i / 100,
            "test_acc": 0.95,
            "params": p,
            "run_id": r,
            "trial_id": str(i),
            "final": {},
        }
        for i, (v, p, r) in enumerate(
            zip(("cyclic_average", "swa", "sgd"), params, ids, strict=True)
        )
    ]
    from flatbasin.search.confirm import confirmation_stats

    finals = {
        "swa": [{"score": s, "test_acc": 0.9533, "pair": k} for k, s in enumerate((0.9580, 0.9612, 0.9644))],
        "cyclic_average": [{"score": s, "test_acc": 0.9513, "pair": k, "diverged": k == 2}
                           for k, s in enumerate((0.9539, 0.9580, 0.9621))],
    }  # fmt: skip
    confirmed = confirmation_stats(finals, val_size=1200)
    outcome = SimpleNamespace(
        name="compare", best=best, trials_per_variant={"cyclic_average": 30, "swa": 2, "sgd": 2},
        untried=[], out_of_time="", confirmed=confirmed, unwritten=0, store=(None,), seconds={},
        experiment_path=Path("/home/u/runs/compare"),
    )  # fmt: skip
    out = io.StringIO()
    console = Console(
        file=out, width=width, markup=False, emoji=False, highlight=False, soft_wrap=True
    )  # fmt: skip  (as errors.plain_console makes it)
    print_summary(outcome, "sqlite:////home/user/project/mlflow.db", console)
    return out.getvalue(), ids


@pytest.mark.parametrize("width", [80, 160])
def test_summary_tables_fit_the_terminal_with_run_ids_whole(width):
    text, ids = summary_text(width)
    lines = text.splitlines()
    table = lines[: next(i for i, line in enumerate(lines) if line.startswith("Verdict:"))]
    assert all(len(line) <= width for line in table), "\n".join(table)
    for run_id in ids:  # each id on one line of the table, not cut or folded
        assert any(run_id in line for line in table), run_id
    assert "96.12 ± 0.32" in text and "swa_lr_max=0.15" in text  # numbers whole; params listed


def comparison_text(rows, full=False):
    import io

    from rich.console import Console

    from flatbasin.search.reproduce import print_comparison

    out = io.StringIO()
    console = Console(
        file=out, width=80, markup=False, emoji=False, highlight=False, soft_wrap=True
    )
    print_comparison("r" * 32, rows, console, full=full)
    return out.getvalue()


def comparison_rows(epochs=40, members=5, changed=()):
    rows = [("score", 0.95, 0.95), ("test_acc", 0.94, 0.94)]
    for e in range(1, epochs + 1):
        for key in ("train_loss", "val_acc", "score"):
            rows.append(
                (f"epoch {e} {key}", e / 100, e / 100 + (0.01 if (e, key) in changed else 0))
            )
        rows.append((f"epoch {e} phase", "data", "data"))
    for k in range(1, members + 1):
        rows += [(f"curve {k} val_acc", 0.9, 0.9), (f"curve {k} test_acc", 0.9, 0.9)]
    return rows


def test_reproduce_summarises_every_epoch_in_a_line():
    # A 40-epoch trial: 170 numbers compared. One line per group, not one per number.
    text = comparison_text(comparison_rows())
    assert "epochs 1-40: train_loss, val_acc, score," in text and "160 numbers" in text
    assert "curves 1-5: val_acc, test_acc" in text and text.count("all equal") == 2
    assert "epoch 1 " not in text and len(text.splitlines()) < 15
    full = comparison_text(comparison_rows(), full=True)
    assert "epoch 40 phase" in full and len(full.splitlines()) > 170


def test_reproduce_lists_the_first_numbers_that_differ():
    changed = {(e, "val_acc") for e in range(3, 15)}  # 12 numbers differ
    text = comparison_text(comparison_rows(changed=changed))
    assert "12 differ" in text and "epoch 3 val_acc" in text and "epoch 12 val_acc" in text
    assert "epoch 13 val_acc" not in text and "(2 more differ)" in text


@pytest.fixture
def small_folder(tmp_path):
    """An image folder of 2 classes of 20 odd-sized images: 4 of them validate (val_frac 0.1)."""
    from PIL import Image

    root = tmp_path / "images"
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (30 + i, 12), (12 * i, 200 * c, 40)).save(
                root / f"class{c}" / f"{i}.png"
            )
    return root


def test_train_notes_resized_images_and_a_coarse_validation_split(small_folder):
    result = runner.invoke(app, ["train", "--variant", "sgd", "--epochs", "1", "--dataset",
                                 "image_folder", "--data-dir", str(small_folder), "--set",
                                 "image_size=8", "--set", "batch_size=8"])  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"note: image folder {small_folder}: every image is resized to 8x8 pixels" in text
    assert "note: data set 'image_folder': the validation split holds 3 examples" in text


def test_a_search_notes_them_before_it_starts(small_folder):
    from flatbasin.search import preflight
    from flatbasin.spaces.loader import space_from_dict

    space = space_from_dict({"name": "s", "epochs": 1, "dataset": "image_folder",
                             "fixed": {"data_dir": str(small_folder), "batch_size": 8},
                             "variants": {"sgd": {"lr": {"loguniform": [0.01, 0.1]}}}})  # fmt: skip
    notes: list[str] = []
    preflight.check_trials(space, local=True, notes=notes)
    assert len(notes) == 2  # once per data set, though two corners load it
    assert "resized to 32x32" in notes[0] and "holds 3 examples" in notes[1]


def test_ray_notices_are_dropped_and_its_other_warnings_kept():
    # The search's own run shows the whole effect (test_search_integration: no chatter); here,
    # that the filters drop those notices alone.
    import logging

    from flatbasin.search.quiet import quiet_ray

    quiet_ray()
    quiet_ray()  # once per logger, however often a process starts Ray
    token = logging.getLogger("ray._private.authentication.authentication_token_setup")
    tune = logging.getLogger("ray.tune.utils.util")
    assert len(token.filters) == len(tune.filters) == 1

    class Kept(logging.Handler):
        records: list[logging.LogRecord] = []

        def emit(self, record):
            self.records.append(record)

    kept = Kept(logging.WARNING)  # on the loggers themselves: Ray's may not propagate to the root
    for logger in (token, tune):
        logger.addHandler(kept)
    try:
        token.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=...")
        token.warning("Token authentication is disabled for this Ray cluster. Anyone with ...")
        tune.warning("The `process_trial_save` operation took 0.571 s, which may be a performance bottleneck.")  # fmt: skip
        tune.warning("Install psutil to monitor system performance.")
    finally:
        for logger in (token, tune):
            logger.removeHandler(kept)
    assert [r.getMessage().split(".")[0] for r in kept.records] == [
        "Token authentication is disabled for this Ray cluster",
        "Install psutil to monitor system performance",
    ]
