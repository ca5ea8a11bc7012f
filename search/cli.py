"""The `flatbasin` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from search.errors import UsageError, describe, fail

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(highlight=False, soft_wrap=True)


@app.callback()
def flatbasin() -> None:
    """Hyperparameter search for flat-minimum training methods on Ray Tune, Optuna and MLflow."""


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are read as YAML scalars (0.1, true, [0.5, 0.75], cosine)."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {pair!r}: expected key=value")
        try:
            settings[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise UsageError(f"--set {pair!r}: cannot read the value: {err}") from err
    return settings


def build_config(variant: str, settings: dict[str, Any]):
    from trainables.config import make_config

    try:
        return make_config(variant, settings)
    except ValidationError as err:
        raise UsageError(f"invalid settings for variant '{variant}':\n{describe(err)}") from err
    except ValueError as err:
        raise UsageError(str(err)) from err


def print_epoch(m: Any, epochs: int) -> None:
    console.print(
        f"epoch {m.epoch:>3}/{epochs}  loss {m.train_loss:7.4f}  train {m.train_acc:.4f}  "
        f"val {m.val_acc:.4f}  score {m.score:.4f}  lr {m.lr:.5f}  members {m.members}"
    )


def print_curve(result: Any) -> None:
    table = Table(title=f"{result.config.variant}: accuracy vs. models averaged / ensembled")
    table.add_column("count", justify="right")
    table.add_column("val_acc", justify="right")
    table.add_column("test_acc", justify="right")
    extras = result.extra_curves
    for name in extras:
        table.add_column(f"{name} val", justify="right")
    for i, p in enumerate(result.curve):
        cells = [str(p.count), f"{p.val_acc:.4f}", f"{p.test_acc:.4f}"]
        cells += [f"{extras[n][i].val_acc:.4f}" if i < len(extras[n]) else "" for n in extras]
        table.add_row(*cells)
    console.print(table)


@app.command()
def train(
    variant: Annotated[
        str, typer.Option(help="sgd, swa, cyclic_average, snapshot, sgdr, fge, ema")
    ],
    dataset: Annotated[
        str | None,
        typer.Option(
            help="digits (bundled), cifar10, cifar100, mnist, fashion_mnist, svhn, image_folder"
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="epoch budget")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="root of a torchvision set or an image folder")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value, repeatable")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="write final metrics, curve and config here")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="checkpoint file, written every epoch")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue from --checkpoint")] = False,
) -> None:
    """Train one trial locally, without Ray, printing a line per epoch and the final curve."""
    try:
        settings = parse_settings(set_ or [])
        for key, value in (
            ("dataset", dataset),
            ("epochs", epochs),
            ("seed", seed),
            ("data_dir", data_dir),
        ):
            if value is not None:
                settings[key] = value
        config = build_config(variant, settings)
        if resume and (checkpoint is None or not checkpoint.is_file()):
            raise UsageError(f"--resume needs an existing --checkpoint file (got {checkpoint})")
    except UsageError as err:
        fail(str(err))

    from trainables.data import DataError
    from trainables.loop import train as run_trial

    def on_epoch(metrics: Any, save: Any) -> None:
        print_epoch(metrics, config.epochs)
        if checkpoint is not None:
            save(checkpoint)

    try:
        result = run_trial(config, resume=checkpoint if resume else None, on_epoch=on_epoch)
    except (DataError, ValueError) as err:
        fail(str(err))
    if result.diverged:
        console.print(
            f"[yellow]diverged[/] at epoch {result.history[-1].epoch}: the loss is not finite"
        )
    else:
        print_curve(result)
        console.print(
            f"score (val acc of the deployed model) {result.score:.4f}   test_acc {result.test_acc:.4f}"
        )
    console.print(
        f"{result.seconds['total']:.1f} s on {result.device}, {result.threads} thread(s); plan {result.plan}"
    )
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_json(), indent=2))


def main() -> None:
    app()
