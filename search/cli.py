"""The `flatbasin` command line."""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console

from flatbasin.search.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    SearchFailed,
    Unwritten,
    UsageError,
    fail,
    short,
    stderr,
)
from flatbasin.search.output import CONSOLE
from flatbasin.trainables.memory import OutOfMemory

try:  # typer >= 0.22 carries its own copy of click
    from typer._click.core import ParameterSource
    from typer._click.exceptions import NoArgsIsHelpError
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover  # older typer: click's own classes, the same API
    from click.core import ParameterSource  # type: ignore[assignment]
    from click.exceptions import NoArgsIsHelpError  # type: ignore[assignment]
    from click.exceptions import UsageError as ClickUsageError  # type: ignore[assignment]


class Commands(typer.core.TyperGroup):
    """flatbasin's commands. An option refused while the command line is read (a number outside
    the range its --help states, a word where a number belongs) ends as every refusal does: one
    paragraph, exit status 2, before the command does anything."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            flags_untyped(command, ctx)
        return command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        flags_untyped(self, ctx)
        super().format_help(ctx, formatter)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except NoArgsIsHelpError:
            raise
        except ClickUsageError as err:
            fail(usage_problem(err))
        except OutOfMemory as err:  # any command that trains: what ran out and what to change
            fail(str(err), code=EXIT_FAILED)


def flags_untyped(command: Any, ctx: Any) -> None:
    """No `<bool>` beside a flag in --help (--resume, --help itself): a flag takes no value. Typer
    shows each option's type, flags too, unless the option has a metavar; an empty one shows none.
    For this command, and every command of a group under it (`data check`)."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        flags_untyped(sub, ctx)


def usage_problem(err: ClickUsageError) -> str:
    """A refused command line in one line: what was wrong, what was given, where the ranges are."""
    from pydantic import ValidationError as Invalid

    cause = err.__cause__
    given = ""
    if isinstance(cause, Invalid) and cause.errors():
        value = cause.errors()[0].get("input")
        given = f" (got {value if isinstance(value, str) and len(value) <= 80 else short(value)})"
    command = err.ctx.command_path if err.ctx is not None else "flatbasin"
    return f"{err.format_message().rstrip('.')}{given}; see {command} --help"


app = typer.Typer(
    cls=Commands, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)
console: Console = CONSOLE


# Ranges shared by several commands' options, the trial settings' own (trainables/config.py).
EPOCHS: dict[str, Any] = {"min": 1, "max": 10_000}
SEED: dict[str, Any] = {"min": 0, "max": 2**32 - 1}
LEARNING_RATE: dict[str, Any] = {"min": 1e-8, "max": 10.0}

# MLflow's tracking URI: explicit, else $MLFLOW_TRACKING_URI, else ./mlflow.db (made absolute).
TrackingUri = Annotated[
    str | None,
    typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"),
]


def tracking_uri_or_default(value: str | None) -> str:
    from flatbasin.search.api import tracking_uri_or_default as default

    return default(value)


def _print_version(value: bool) -> None:
    if value:
        import flatbasin

        print(f"flatbasin {flatbasin.__version__}")
        raise typer.Exit()


@app.callback()
def flatbasin(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    """Hyperparameter search for flat-minimum training methods on Ray Tune, Optuna and MLflow."""


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are read as YAML scalars (0.1, true, [0.5, 0.75], cosine)."""
    from flatbasin.spaces.loader import read_yaml, yaml_problem

    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {pair!r}: expected key=value")
        if key.strip() in settings:
            raise UsageError(f"--set {key.strip()} is given twice; give each setting once")
        try:
            settings[key.strip()] = read_yaml(value)
        except yaml.YAMLError as err:
            problem = yaml_problem(err).replace("at line 1, ", "at ")
            raise UsageError(f"--set {pair!r}: cannot read the value ({problem})") from err
    return settings


@app.command()
def train(
    variant: Annotated[
        str, typer.Option(help="sgd, swa, cyclic_average, snapshot, sgdr, fge, ema, prior_guided")
    ],
    dataset: Annotated[
        str | None,
        typer.Option(
            help="digits (bundled), mnist1d, cifar10, cifar100, mnist, fashion_mnist, svhn, "
            "image_folder, synthetic, or your own as module:callable (found in this folder first)"
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="epoch budget", **EPOCHS)] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="the trial's seed: model init, batch order, augmentation, dropout (default 0)",
            **SEED,
        ),
    ] = None,
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
    start_from: Annotated[
        str | None,
        typer.Option(
            "--from",
            metavar="SOURCE",
            help="continue a converged model: a checkpoint file or an MLflow run id "
            "(its checkpoint.pt)",
        ),
    ] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Train one trial locally, without Ray, printing a line per epoch and the final curve."""
    from flatbasin.search.api import run_train

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
        run_train(
            variant, settings, checkpoint=checkpoint, resume=resume, start_from=start_from,
            tracking_uri=tracking_uri, console=console, json_out=json_out,
        )  # fmt: skip
    except UsageError as err:
        fail(str(err))
    except Unwritten as err:  # trained to the end; an output could not be written (a full disk)
        fail(str(err), code=EXIT_FAILED)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: the checkpoint holds the last whole epoch
        if checkpoint is not None and checkpoint.is_file():
            with contextlib.suppress(OSError):
                stderr.print(
                    f"{checkpoint} holds the last finished epoch; continue with: {again(resume)}",
                    style="yellow",
                )
        raise


def again(resume: bool) -> str:
    """This command again, with --resume: what continues a run from its --checkpoint."""
    return shlex.join(["flatbasin", *sys.argv[1:], *([] if resume else ["--resume"])])


@app.command("lr-find")
def lr_find(
    variant: Annotated[
        str, typer.Option(help="the variant whose parameters --set may name (sgd, swa, ...)")
    ] = "sgd",
    dataset: Annotated[
        str | None, typer.Option(help="mnist1d, digits (default), cifar10, ... as for train")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="root of a torchvision set or an image folder")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value, repeatable")] = None,
    start: Annotated[
        float, typer.Option(help="learning rate of the first step (below --end)", **LEARNING_RATE)
    ] = 1e-6,
    end: Annotated[
        float, typer.Option(help="learning rate of the last step", **LEARNING_RATE)
    ] = 10.0,
    steps: Annotated[
        int,
        typer.Option(help="optimiser steps; batches repeat as needed", min=50, max=10_000),
    ] = 200,
    plot: Annotated[Path, typer.Option(help="where to draw the figure (PNG)")] = Path(
        "lr_find.png"
    ),
    write: Annotated[
        Path | None,
        typer.Option(metavar="SPACE.yaml", help="set every variant's learning-rate ranges here"),
    ] = None,
) -> None:
    """Learning-rate range test: raise the lr each step, plot the loss, suggest bounds for a search."""
    from flatbasin.search.api import build_config
    from flatbasin.search.lrfind import LrFindOptions, check_options, run_lr_find

    try:
        settings = parse_settings(set_ or [])
        for key, value in (("dataset", dataset), ("data_dir", data_dir)):
            if value is not None:
                settings[key] = value
        config = build_config(variant, settings)
        options = LrFindOptions(start=start, end=end, steps=steps, plot=plot, write=write)
        check_options(options, config)
        suggested = run_lr_find(config, options, console)
    except UsageError as err:
        fail(str(err))
    except Unwritten as err:
        fail(str(err), code=EXIT_FAILED)
    if not suggested:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def search(
    ctx: typer.Context,
    space_file: Annotated[
        str,
        typer.Argument(
            metavar="[SPACE]",
            help="a space file, or a bundled space by name (compare, sgd, swa, cyclic_average, snapshot, sgdr, fge, ema, prior_guided)",
        ),
    ] = "compare",
    samples: Annotated[
        int | None,
        typer.Option(help="trials (default: the space's samples)", min=1, max=100_000),
    ] = None,
    concurrency: Annotated[
        int, typer.Option(help="trials running at once", min=1, max=100_000)
    ] = 2,
    address: Annotated[
        str | None, typer.Option(help="join a running Ray cluster (default: local Ray)")
    ] = None,
    tracking_uri: TrackingUri = None,
    storage: Annotated[
        Path, typer.Option(help="Tune storage: checkpoints and result files")
    ] = Path("runs"),
    name: Annotated[
        str | None, typer.Option(help="search and experiment name (default: the space's name)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted search")] = False,
    scheduler: Annotated[
        str, typer.Option(help="asha (early stopping at cycle boundaries) or fifo")
    ] = "fifo",
    cpus_per_trial: Annotated[
        float,
        typer.Option(
            help="whole CPUs (torch threads), or 1/N of one for N trials per core (0.5, 0.25)",
            min=0.0001,
            max=10_000,
        ),
    ] = 1.0,
    gpus_per_trial: Annotated[
        float,
        typer.Option(
            help="whole GPUs, or 1/N of one for N trials per GPU (0.5, 0.25)", min=0, max=16
        ),
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="seeds the TPE sampler", **SEED)] = 0,
    time_budget: Annotated[
        float | None,
        typer.Option(help="stop starting trials after this many seconds", min=1, max=31_536_000),
    ] = None,
    max_failures: Annotated[
        int, typer.Option(help="retries of a trial whose worker or node died", min=0, max=100)
    ] = 2,
    checkpoint_every: Annotated[int, typer.Option(help="epochs between checkpoints", **EPOCHS)] = 1,
    checkpoint_interval: Annotated[
        float,
        typer.Option(
            help="at most one checkpoint per this many seconds (0: every time)", min=0, max=86_400
        ),
    ] = 20.0,
    confirm_seeds: Annotated[
        int | None,
        typer.Option(
            help="retrain each variant's best with N fresh seeds (default: the space's)",
            min=0,
            max=100,
        ),
    ] = None,
    start_from: Annotated[
        str | None,
        typer.Option(
            "--from",
            metavar="SOURCE",
            help="post-convergence: every trial continues one converged model and searches the "
            "tail only; SOURCE is base (train the base once), an MLflow run id or a checkpoint "
            "file",
        ),
    ] = None,
    soup: Annotated[
        bool | None,
        typer.Option(
            "--soup/--no-soup",
            help="after the search, weight soups and the greedy ensemble of its trials (flatbasin "
            "soup); default: on with --from, off otherwise",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run a hyperparameter search with Ray Tune and Optuna, recording every trial in MLflow."""
    import flatbasin.search.api as api
    import flatbasin.search.signals as signals

    # What was typed, as flatbasin.search's options; the rest keep its defaults (the same as these),
    # so that a --resume can tell an option given again from one left out.
    given = {
        key: value
        for key, value in ctx.params.items()
        if key != "space_file"
        and ctx.get_parameter_source(key) not in (None, ParameterSource.DEFAULT)
    }
    try:
        result = api.search(space_file, console=console, **given)
    except UsageError as err:
        fail(str(err))
    except SearchFailed as err:
        fail(str(err), code=EXIT_FAILED)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: 130, 143, 129
        _leave(signals.exit_status())
    if result.interrupted:
        raise typer.Exit(signals.exit_status())
    failure = api.search_failure(result)
    if failure:
        fail(failure, code=EXIT_FAILED)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    space_file: Annotated[
        str, typer.Argument(metavar="[SPACE]", help="a space file or a bundled space's name")
    ] = "compare",
    address: Annotated[
        str, typer.Option(help="the cluster's dashboard, e.g. http://HEAD:8265")
    ] = "http://127.0.0.1:8265",
    no_wait: Annotated[bool, typer.Option("--no-wait", help="print the job id and return")] = False,
) -> None:
    """Submit a search to a Ray cluster (Jobs API); every other option is passed to `flatbasin search`."""
    from flatbasin.search.submit import (
        check_dashboard,
        check_no_credentials,
        check_search,
    )
    from flatbasin.search.submit import submit as run_submit

    try:
        if space_file.startswith("-"):  # an option where SPACE goes: unknown to submit and search
            raise UsageError(f"no such option: {space_file} (see flatbasin submit --help)")
        check_dashboard(address)
        check_no_credentials(ctx.args)
        search_command = typer.main.get_command(app).commands["search"]  # type: ignore[attr-defined]
        parsed = typer.Context(search_command, info_name="flatbasin search")
        search_command.parse_args(parsed, [space_file, *ctx.args])  # the same options, checked here
        check_search(space_file, parsed.params.get("tracking_uri"), parsed.params.get("start_from"))
    except ClickUsageError as err:
        fail(
            f"{err.format_message()} (flatbasin submit passes its other options to flatbasin "
            "search; see flatbasin search --help)"
        )
    except UsageError as err:
        fail(str(err))
    from flatbasin.search.credentials import redact_uri

    try:
        code = run_submit(space_file, address, list(ctx.args), wait=not no_wait, console=console)
    except (ConnectionError, RuntimeError, ValueError) as err:
        fail(f"cannot submit to {redact_uri(address)}: {err}")
    raise typer.Exit(code)


@app.command()
def sync(
    experiment: Annotated[Path, typer.Argument(help="a search's Tune folder, e.g. runs/compare")],
    tracking_uri: TrackingUri = None,
) -> None:
    """Write a search's trials into MLflow from Tune's result files; runs already there are not duplicated."""
    from flatbasin.search.sync import sync_to_mlflow

    _quiet_mlflow_retries()
    try:
        sync_to_mlflow(experiment, tracking_uri_or_default(tracking_uri), console)
    except UsageError as err:
        fail(str(err))
    except SearchFailed as err:
        fail(str(err), code=EXIT_FAILED)


@app.command()
def reproduce(
    run_id: Annotated[str, typer.Argument(help="an MLflow trial run id (see the search summary)")],
    tracking_uri: TrackingUri = None,
    recorded_code: Annotated[
        bool,
        typer.Option(
            "--recorded-code",
            help="import the user's modules from the copy recorded with the run, not from here",
        ),
    ] = False,
    full: Annotated[
        bool, typer.Option("--full", help="list every epoch's and curve point's numbers")
    ] = False,
) -> None:
    """Retrain a logged trial locally without Ray and compare with what was recorded (exit 1 if it differs)."""
    from flatbasin.search.reproduce import reproduce as run_reproduce

    _quiet_mlflow_retries()
    try:
        exact = run_reproduce(
            run_id, tracking_uri_or_default(tracking_uri), console, recorded_code=recorded_code,
            full=full,
        )  # fmt: skip
    except UsageError as err:
        fail(str(err))
    raise typer.Exit(0 if exact else 1)


@app.command()
def report(
    search_name: Annotated[
        str, typer.Argument(metavar="SEARCH", help="a search's name or its MLflow run id")
    ],
    tracking_uri: TrackingUri = None,
    out: Annotated[
        Path | None, typer.Option(help="folder for the report (default: ./reports/SEARCH)")
    ] = None,
) -> None:
    """Write a search's report: best trial per variant, curves, parameter importances (PNG + HTML)."""
    from flatbasin.search.report import write_report

    _quiet_mlflow_retries()
    try:
        page = write_report(search_name, tracking_uri_or_default(tracking_uri), out)
    except UsageError as err:
        fail(str(err))
    except Unwritten as err:
        fail(str(err), code=EXIT_FAILED)
    console.print(f"Report:       {page}")


@app.command("soup")
def soup_command(
    search_name: Annotated[
        str,
        typer.Argument(
            metavar="SEARCH",
            help="a search's name, its MLflow run id, or its Tune folder (runs/NAME)",
        ),
    ],
    tracking_uri: TrackingUri = None,
    only: Annotated[
        str,
        typer.Option(
            help="all (uniform and greedy weight soups, greedy ensemble), soups, or ensemble (the "
            "one a search from scratch can have)"
        ),
    ] = "all",
    device: Annotated[str, typer.Option(help="auto (a GPU if there is one), cpu or cuda")] = "auto",
) -> None:
    """Weight soups and the greedy ensemble of a search's trials, chosen on validation.

    Each is recorded as an MLflow run under the search's (see docs/soups.md)."""
    import flatbasin.search.api as api

    try:
        api.soup(search_name, tracking_uri=tracking_uri, only=only, device=device, console=console)
    except UsageError as err:
        fail(str(err))
    except Unwritten as err:
        fail(str(err), code=EXIT_FAILED)


@app.command("focus-library")
def focus_library(
    out: Annotated[Path, typer.Argument(metavar="OUT.pt", help="the library file to write")],
    dataset: Annotated[
        str | None, typer.Option(help="the source data set: similar to the target, not the same")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="epochs of the harvesting run", **EPOCHS)
    ] = None,
    seed: Annotated[int | None, typer.Option(help="the harvesting run's seed", **SEED)] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="key=value of the sgd run, repeatable")
    ] = None,
    regression: Annotated[
        str, typer.Option(help="elementwise (a slope and intercept per weight) or layer")
    ] = "elementwise",
    ridge: Annotated[
        float,
        typer.Option(
            help="slope penalty, in units of the layer's mean variance of w", min=0, max=1e6
        ),
    ] = 0.1,
    overwrite: Annotated[bool, typer.Option(help="replace OUT.pt if it exists")] = False,
) -> None:
    """Fit a focus library for prior_guided from plain SGD on the source data.

    Every conv layer's weights, bias and gradients are recorded at every iteration, then one ridge
    regression is fitted per layer and kind."""
    from flatbasin.search.focus import make_library

    try:
        settings = parse_settings(set_ or [])
        for key, value in (("dataset", dataset), ("epochs", epochs), ("seed", seed)):
            if value is not None:
                settings[key] = value
        make_library(out, settings, regression, ridge, console, overwrite=overwrite)
    except UsageError as err:
        fail(str(err))
    except Unwritten as err:
        fail(str(err), code=EXIT_FAILED)


data_app = typer.Typer(no_args_is_help=True, help="Check data before training on it.")
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="an image folder: DIR/CLASS/IMAGE")],
    image_size: Annotated[
        int,
        typer.Option(
            help="the size images are decoded to, as a trial's image_size", min=8, max=512
        ),
    ] = 32,
) -> None:
    """Decode every image of an image folder; list unreadable files and empty classes (exit 2 if any)."""
    from flatbasin.search.datacheck import check_folder

    try:
        problems = check_folder(folder, image_size, console)
    except UsageError as err:
        fail(str(err))
    raise typer.Exit(2 if problems else 0)


def _quiet_mlflow_retries() -> None:
    from flatbasin.search.api import quiet_mlflow_retries

    quiet_mlflow_retries()


def _leave(code: int) -> NoReturn:
    """Exit now. After a Ctrl-C inside Ray's start-up, Ray's own exit handlers can crash the
    interpreter (a segfault, exit 139, was seen): its local processes die with this one anyway."""
    import os

    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def main() -> None:
    import flatbasin.search.signals as signals
    from flatbasin.search.credentials import hide_from_command_line
    from flatbasin.search.quiet import quiet_libraries

    hide_from_command_line(sys.argv)  # execs this command again without them, when there are any
    signals.install()  # SIGTERM and SIGHUP end every command as Ctrl-C does
    quiet_libraries()  # the libraries' progress bars and notices stay off the console (quiet.py)
    try:
        app()
    except SystemExit as done:
        code = done.code
        # Typer ends a command that a KeyboardInterrupt stopped with 130, silently: say what came,
        # and exit with its status (143 for SIGTERM, 129 for SIGHUP).
        if code == EXIT_INTERRUPTED and isinstance(
            getattr(done.__context__, "__cause__", None), KeyboardInterrupt
        ):
            with contextlib.suppress(OSError):
                stderr.print(f"interrupted ({signals.name()})", style="yellow")
            code = signals.exit_status()
        raise SystemExit(code) from None
