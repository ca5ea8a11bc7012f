"""The `flatbasin` command line."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from pydantic import ValidationError
from rich.table import Table

from flatbasin.search.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    UsageError,
    describe,
    fail,
    plain_console,
    stderr,
)

try:  # typer >= 0.22 carries its own copy of click
    from typer._click.core import ParameterSource
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover
    from click.core import ParameterSource
    from click.exceptions import UsageError as ClickUsageError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = plain_console()


# MLflow's tracking URI: explicit, else $MLFLOW_TRACKING_URI, else ./mlflow.db (made absolute).
TrackingUri = Annotated[
    str | None,
    typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"),
]


def tracking_uri_or_default(value: str | None) -> str:
    from flatbasin.search.tracking import absolute_uri, default_tracking_uri

    return absolute_uri(value) if value else default_tracking_uri()


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


def option_names(text: str) -> str:
    """SearchOptions' field names as the options a user typed (--time_budget_s -> --time-budget)."""
    renamed = {"--time_budget_s": "--time-budget", "--checkpoint_interval_s": "--checkpoint-interval"}
    for field, option in renamed.items():
        text = text.replace(field, option)
    return re.sub(r"--([a-z]+(?:_[a-z]+)+)", lambda m: "--" + m.group(1).replace("_", "-"), text)


def build_config(variant: str, settings: dict[str, Any]):
    from flatbasin.trainables.config import make_config

    try:
        return make_config(variant, settings)
    except ValidationError as err:
        raise UsageError(f"invalid settings for variant '{variant}':\n{describe(err)}") from err
    except ValueError as err:
        raise UsageError(str(err)) from err


def print_epoch(m: Any, epochs: int) -> None:
    lr = f"{m.lr:.5f}" if m.lr_low is None or m.lr_low == m.lr_high else f"{m.lr_low:.5f}-{m.lr_high:.5f}"
    gap = "" if m.gen_gap is None else f"  gap {m.gen_gap:+.4f}"
    # An epoch without a pass over the data (prior_guided's focus epochs) has no training loss.
    trained = (
        f"loss {m.train_loss:7.4f}  train acc {m.train_acc:.4f}"
        if m.train_loss is not None
        else f"{m.phase + ' epoch, no data pass':<31}"
    )
    console.print(
        f"epoch {m.epoch:>3}/{epochs}  {trained}  "
        f"val acc {m.val_acc:.4f}{gap}  deployed val acc {m.score:.4f}  lr {lr}  members {m.members}"
    )


def runtime_summary(runtime: dict[str, Any]) -> str:
    """'bf16, channels-last, compiled': how the trial ran (accel.Runtime.record)."""
    parts = [str(runtime.get("precision", "fp32"))]
    parts += ["channels-last"] if runtime.get("channels_last") else []
    parts += ["compiled"] if runtime.get("compile") else []
    return ", ".join(parts)


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
    if result.diversity:
        print_diversity(result.diversity)


def print_diversity(points: list[Any]) -> None:
    """Under the curve: members that err on the same examples add nothing to the ensemble."""
    table = Table(title="members' diversity on the test split (first k members, mean over pairs)")
    for column in ("count", "disagreement", "error corr"):
        table.add_column(column, justify="right")
    for p in points:
        corr = "n/a" if p.error_corr is None else f"{p.error_corr:.4f}"
        table.add_row(str(p.count), f"{p.disagreement:.4f}", corr)
    console.print(table)


@app.command()
def train(
    variant: Annotated[
        str, typer.Option(help="sgd, swa, cyclic_average, snapshot, sgdr, fge, ema, prior_guided")
    ],
    dataset: Annotated[
        str | None,
        typer.Option(
            help="digits (bundled), cifar10, cifar100, mnist, fashion_mnist, svhn, image_folder, synthetic"
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
        if resume and (checkpoint is None or not checkpoint.is_file()):
            raise UsageError(f"--resume needs an existing --checkpoint file (got {checkpoint})")
        if not resume and checkpoint is not None and checkpoint.is_file():
            # The first epoch would replace it: an interrupted run's only copy, if --resume was forgotten.
            raise UsageError(
                f"--checkpoint {checkpoint} exists; --resume continues the run it holds, or give "
                "a new file (or delete this one) to start afresh"
            )
        start_weights, continuing = None, ""
        if start_from is None:
            config = build_config(variant, settings)
        else:  # a converged start: the settings are a tail's (see search/post_convergence.py)
            from flatbasin.search.post_convergence import continue_config

            _quiet_mlflow_retries()
            config, start_weights, continuing = continue_config(
                variant, settings, start_from, tracking_uri_or_default(tracking_uri)
            )
        from flatbasin.search.preflight import writable_file

        for option, path in (("--json", json_out), ("--checkpoint", checkpoint)):
            if path is not None:
                writable_file(option, path)  # found now, not after the training
    except UsageError as err:
        fail(str(err))

    from flatbasin.trainables.data import DataError
    from flatbasin.trainables.files import disk_problem, keep_in_temp, write_whole
    from flatbasin.trainables.loop import train as run_trial

    legend = (
        "val acc: the weights being trained; gap: their accuracy on training examples minus val acc, "
        "both scored alike; deployed val acc: the model the variant ships now (the average or "
        "ensemble of its members; the search's score); lr: the epoch's range"
        + ("; every accuracy with test-time augmentation" if config.tta != "none" else "")
    )

    shown: list[bool] = []

    def on_epoch(metrics: Any, save: Any) -> None:
        if not shown:  # with the first epoch, not before: an input the trial refuses before its
            shown.append(True)  # first epoch (a library, a start) is then the only paragraph
            console.print(legend)
            if continuing:
                console.print(continuing)
        print_epoch(metrics, config.epochs)
        if checkpoint is not None:
            save(checkpoint)

    try:
        result = run_trial(
            config,
            resume=checkpoint if resume else None,
            on_epoch=on_epoch,
            start_weights=start_weights,
        )
    except (DataError, ValueError) as err:
        fail(str(err))
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: the checkpoint holds the last whole epoch
        if checkpoint is not None and checkpoint.is_file():
            with contextlib.suppress(OSError):
                stderr.print(
                    f"{checkpoint} holds the last finished epoch; continue with: {again(resume)}",
                    style="yellow",
                )
        raise
    except OSError as err:  # a checkpoint that cannot be written (a full disk): say so, and how on
        beside = checkpoint is not None and err.filename is not None and (
            Path(err.filename).parent == checkpoint.parent
        )
        if not beside and disk_problem(err) is None:
            raise
        kept = (
            f"; {checkpoint} holds the last epoch written: once there is room, continue with: "
            f"{again(resume)}"
            if checkpoint is not None and checkpoint.is_file()
            else ""
        )
        fail(f"training stopped: {err.filename or checkpoint}: {err.strerror or err}{kept}",
             code=EXIT_FAILED)  # fmt: skip
    last = result.history[-1].epoch if result.history else 0
    if result.diverged:
        console.print(f"diverged at epoch {last}: the loss is not finite", style="yellow")
    else:
        if last < config.epochs:
            console.print(f"stopped early after epoch {last} of {config.epochs} (patience)")
        print_curve(result)
        console.print(
            f"deployed model ({result.model}): val acc {result.score:.4f} (the score)   "
            f"test acc {result.test_acc:.4f}"
        )
    to_best = result.seconds.get("to_best")
    console.print(
        f"{result.seconds['total']:.1f} s on {result.device} ({runtime_summary(result.runtime)}), "
        f"{result.threads} thread(s)"
        + (f", {to_best:.1f} s of training to the best epoch" if to_best is not None else "")
        + f"; plan {result.plan}"
    )
    if json_out is not None:  # whole or not at all; a run's result is never lost to a failed write
        text = json.dumps(result.to_json(), indent=2)
        try:
            write_whole(json_out, lambda tmp: tmp.write_text(text))
        except OSError as err:
            kept = keep_in_temp(text)
            fail(f"--json {json_out}: cannot write it ({err.strerror or err}); "
                 + (f"the result was written to {kept} instead" if kept else
                    "the result is not saved anywhere else (the numbers are printed above)"),
                 code=EXIT_FAILED)  # fmt: skip


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
    start: Annotated[float, typer.Option(help="learning rate of the first step")] = 1e-6,
    end: Annotated[float, typer.Option(help="learning rate of the last step (at most 10)")] = 10.0,
    steps: Annotated[
        int, typer.Option(help="optimiser steps (at least 10); batches repeat as needed")
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
    if not suggested:
        raise typer.Exit(EXIT_FAILED)


# What Tune keeps of a search and restores on --resume (its search algorithm, schedule, run config and
# trial settings): given again, these would be silently ignored, so a resume refuses them.
FIXED_AT_START = ("samples", "concurrency", "scheduler", "seed", "time_budget", "max_failures",
                  "checkpoint_every", "checkpoint_interval")  # fmt: skip


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
        int | None, typer.Option(help="trials (default: the space's samples)")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="trials running at once")] = 2,
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
    cpus_per_trial: Annotated[float, typer.Option()] = 1.0,
    gpus_per_trial: Annotated[float, typer.Option(help="fractions allowed")] = 0.0,
    seed: Annotated[int, typer.Option(help="seeds the TPE sampler")] = 0,
    time_budget: Annotated[
        float | None, typer.Option(help="stop starting trials after this many seconds")
    ] = None,
    max_failures: Annotated[
        int, typer.Option(help="retries of a trial whose worker or node died")
    ] = 2,
    checkpoint_every: Annotated[int, typer.Option(help="epochs between checkpoints")] = 1,
    checkpoint_interval: Annotated[
        float, typer.Option(help="at most one checkpoint per this many seconds (0: every time)")
    ] = 20.0,
    confirm_seeds: Annotated[
        int | None,
        typer.Option(help="retrain each variant's best with N fresh seeds (default: the space's)"),
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
) -> None:
    """Run a hyperparameter search with Ray Tune and Optuna, recording every trial in MLflow."""
    import os

    from flatbasin.search import signals
    from flatbasin.search.cluster import ClusterError, local_ray_on_loopback
    from flatbasin.search.recovery import disk_failed, store_failed

    if address is None and not os.environ.get("RAY_ADDRESS"):
        local_ray_on_loopback()  # before anything imports Ray
    from flatbasin.search.post_convergence import BaseFailed
    from flatbasin.search.tracking import TrackingRefused, TrackingUnavailable
    from flatbasin.search.tuner import (
        DiskFailure,
        SearchOptions,
        experiment_folder,
        resumable,
        resume_command,
        run_search,
    )
    from flatbasin.spaces import SpaceError, load_space
    from flatbasin.spaces.loader import check_name

    try:
        given = [
            "--" + key.replace("_", "-")
            for key in FIXED_AT_START
            if ctx.get_parameter_source(key) not in (None, ParameterSource.DEFAULT)
        ]
        if resume and given:
            raise UsageError(
                f"--resume continues the search with the settings it started with, so "
                f"{', '.join(given)} would not apply; leave {'them' if len(given) > 1 else 'it'} "
                "out, or start a new search with --name NEW_NAME"
            )
        space = load_space(space_file, start_from=start_from)
        if name is not None:
            check_name(name, "--name")
        options = SearchOptions(
            samples=samples, concurrency=concurrency, address=address,
            tracking_uri=tracking_uri_or_default(tracking_uri), storage=storage, name=name, resume=resume,
            scheduler=scheduler,  # type: ignore[arg-type]  # validated by SearchOptions
            cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, seed=seed,
            time_budget_s=time_budget, max_failures=max_failures, checkpoint_every=checkpoint_every,
            checkpoint_interval_s=checkpoint_interval, confirm_seeds=confirm_seeds,
            start_from=start_from,
        )  # fmt: skip
    except (SpaceError, UsageError) as err:
        fail(str(err))
    except ValidationError as err:
        fail(f"invalid search options:\n{option_names(describe(err, '--'))}")
    _quiet_mlflow_retries()
    try:
        outcome = run_search(space, options, console)
    except TrackingRefused as err:
        fail(f"{err} Nothing was started.")
    except TrackingUnavailable as err:
        server = options.tracking_uri.startswith(("http://", "https://"))
        fail(f"{str(err).rstrip('.')}. " + ("Start the server or pass --tracking-uri; n" if server else "N")
             + "othing was started.")  # fmt: skip
    except (UsageError, ClusterError) as err:
        fail(str(err))
    except BaseFailed as err:
        fail(f"{err}. Nothing was kept.", code=EXIT_FAILED)
    except DiskFailure as err:
        fail(
            disk_failed(str(err), resume_command(space, options), experiment_folder(space, options)),
            code=EXIT_FAILED,
        )
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):  # a closed terminal (SIGHUP) takes no message
            if resumable(space, options):
                stderr.print(
                    f"interrupted ({signals.name()}); what Tune saved resumes with:\n  "
                    + resume_command(space, options),
                    style="yellow",
                )
            else:
                stderr.print(
                    f"interrupted ({signals.name()}) before any trial was saved; nothing to "
                    "resume: run the same command again to start the search",
                    style="yellow",
                )
        _leave(signals.exit_status())
    print_summary(outcome, options.tracking_uri)
    if outcome.best and not outcome.store[0]:
        write_search_report(outcome.parent_run_id, options.tracking_uri)
    if outcome.store[0]:  # before the rest: what is not in MLflow is the first thing to put right
        fail(store_failed(outcome, options.tracking_uri), code=EXIT_FAILED)
    if outcome.interrupted:
        console.print(
            f"The search was interrupted ({signals.name()}); finished trials are kept. "
            "Continue it with:",
            style="yellow",
        )
        console.print(f"  {outcome.resume_command}")
        raise typer.Exit(signals.exit_status())
    if outcome.disk:
        fail(
            disk_failed(outcome.disk, outcome.resume_command, outcome.experiment_path),
            code=EXIT_FAILED,
        )
    if outcome.out_of_time and not outcome.errors:
        if not outcome.best:
            fail(
                f"{outcome.out_of_time}: no trial finished, so nothing was compared; give a longer "
                f"budget, or continue (with another budget window) with: {outcome.resume_command}",
                code=EXIT_FAILED,
            )
        console.print(
            f"{outcome.out_of_time.capitalize()}; the table compares those that finished, without "
            f"confirmation runs. Continue it with:\n  {outcome.resume_command}",
            style="yellow",
        )
    if outcome.errors:
        more = f" ({len(outcome.errors) - 1} more in MLflow's flatbasin.error tags and Tune's error.txt files)"
        fail(
            f"the search failed: {len(outcome.errors)} trial(s) failed; first, {outcome.errors[0]}"
            + (more if len(outcome.errors) > 1 else ""),
            code=EXIT_FAILED,
        )


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
    from flatbasin.search.submit import submit as run_submit
    from flatbasin.spaces import SpaceError, load_space

    try:
        if space_file.startswith("-"):  # an option where SPACE goes: unknown to submit and search
            raise UsageError(f"no such option: {space_file} (see flatbasin submit --help)")
        check_dashboard(address)
        search_command = typer.main.get_command(app).commands["search"]  # type: ignore[attr-defined]
        parsed = typer.Context(search_command, info_name="flatbasin search")
        search_command.parse_args(parsed, [space_file, *ctx.args])  # the same options, checked here
        # A bad space fails here, not on the cluster (as a tail's with --from).
        load_space(space_file, start_from=parsed.params.get("start_from"))
    except SpaceError as err:
        fail(str(err))
    except ClickUsageError as err:
        fail(
            f"{err.format_message()} (flatbasin submit passes its other options to flatbasin "
            "search; see flatbasin search --help)"
        )
    except UsageError as err:
        fail(str(err))
    try:
        code = run_submit(space_file, address, list(ctx.args), wait=not no_wait, console=console)
    except (ConnectionError, RuntimeError, ValueError) as err:
        fail(f"cannot submit to {address}: {err}")
    raise typer.Exit(code)


def check_dashboard(address: str) -> None:
    """The Jobs API lives at the dashboard's http(s)://HOST:PORT; anything else is refused by name
    (Ray would read a bare HOST:PORT as a GCS address and try to join the cluster from here)."""
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise UsageError(
            f"--address {address}: expected the cluster's dashboard as http://HOST:PORT "
            "(Ray's default port is 8265), e.g. http://127.0.0.1:8265"
        )


@app.command()
def sync(
    experiment: Annotated[Path, typer.Argument(help="a search's Tune folder, e.g. runs/compare")],
    tracking_uri: TrackingUri = None,
) -> None:
    """Write a search's trials into MLflow from Tune's result files; runs already there are not duplicated."""
    from flatbasin.search.recovery import store_failed
    from flatbasin.search.tracking import TrackingUnavailable
    from flatbasin.search.tuner import sync as run_sync

    _quiet_mlflow_retries()
    uri = tracking_uri_or_default(tracking_uri)
    try:
        outcome = run_sync(experiment, uri, console)
    except (TrackingUnavailable, UsageError) as err:
        fail(str(err))
    print_summary(outcome, uri)
    if outcome.store[0]:
        fail(store_failed(outcome, uri), code=EXIT_FAILED)


@app.command()
def reproduce(
    run_id: Annotated[str, typer.Argument(help="an MLflow trial run id (see the search summary)")],
    tracking_uri: TrackingUri = None,
) -> None:
    """Retrain a logged trial locally without Ray and compare with what was recorded (exit 1 if it differs)."""
    from flatbasin.search.reproduce import reproduce as run_reproduce

    _quiet_mlflow_retries()
    try:
        exact = run_reproduce(run_id, tracking_uri_or_default(tracking_uri), console)
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
    console.print(f"Report:       {page}")


@app.command("focus-library")
def focus_library(
    out: Annotated[Path, typer.Argument(metavar="OUT.pt", help="the library file to write")],
    dataset: Annotated[
        str | None, typer.Option(help="the source data set: similar to the target, not the same")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="epochs of the harvesting run")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="key=value of the sgd run, repeatable")
    ] = None,
    regression: Annotated[
        str, typer.Option(help="elementwise (a slope and intercept per weight) or layer")
    ] = "elementwise",
    ridge: Annotated[
        float, typer.Option(help="slope penalty, in units of the layer's mean variance of w")
    ] = 0.1,
    overwrite: Annotated[bool, typer.Option(help="replace OUT.pt if it exists")] = False,
) -> None:
    """Fit a focus library for prior_guided: plain SGD on the source data, every conv layer's weights,
    bias and gradients recorded at every iteration, one ridge regression per layer and kind."""
    from flatbasin.search.focus import make_library

    try:
        settings = parse_settings(set_ or [])
        for key, value in (("dataset", dataset), ("epochs", epochs), ("seed", seed)):
            if value is not None:
                settings[key] = value
        make_library(out, settings, regression, ridge, console, overwrite=overwrite)
    except UsageError as err:
        fail(str(err))


data_app = typer.Typer(no_args_is_help=True, help="Check data before training on it.")
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="an image folder: DIR/CLASS/IMAGE")],
    image_size: Annotated[int, typer.Option(help="the size images are decoded to")] = 32,
) -> None:
    """Decode every image of an image folder; list unreadable files and empty classes (exit 2 if any)."""
    from flatbasin.search.datacheck import check_folder

    try:
        problems = check_folder(folder, image_size, console)
    except UsageError as err:
        fail(str(err))
    raise typer.Exit(2 if problems else 0)


def write_search_report(parent_run_id: str, tracking_uri: str) -> None:
    """The report at the end of a search; one that cannot be written is a warning, never a failure."""
    try:
        from flatbasin.search.report import write_report

        page = write_report(parent_run_id, tracking_uri)
    except Exception as err:  # the search's results are safe in MLflow whatever happens here
        stderr.print(
            f"warning: the report was not written ({type(err).__name__}: {err}); "
            f"try: flatbasin report {parent_run_id} --tracking-uri {tracking_uri}",
            style="yellow",
        )
        return
    console.print(f"Report:       {page}")


def _quiet_mlflow_retries() -> None:
    """A tracking server that is down should cost seconds, not minutes of retries, per attempt."""
    import os

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def print_confirmed(rows: list[dict[str, Any]]) -> None:
    """Each variant's best configuration over fresh seeds; the winner is the best mean val accuracy."""
    seeds = max(row["n"] for row in rows)
    spread = seeds > 1  # one seed has no spread: a ± 0 would claim a certainty it does not have
    title = "mean ± std; Welch's t vs the best" if spread else "one seed each: no spread, no test"
    table = Table(title=f"confirmed over {seeds} fresh seed{'s' * spread} ({title})")
    for column in ("variant", "val acc", "test acc", "p vs best", "verdict"):
        table.add_column(column)
    for row in rows:
        p = "" if row["p_vs_best"] is None else f"{row['p_vs_best']:.3f}"
        verdict = row["verdict"] + (f", {row['diverged']} diverged" if row["diverged"] else "")
        table.add_row(
            row["variant"],
            f"{row['val_mean']:.4f}" + (f" ± {row['val_std']:.4f}" if spread else ""),
            f"{row['test_mean']:.4f}" + (f" ± {row['test_std']:.4f}" if spread else ""),
            p,
            verdict,
        )
    console.print(table)
    level = [row["variant"] for row in rows if row["val_mean"] == rows[0]["val_mean"]]
    if len(level) > 1:
        console.print(f"Winner:       none: {', '.join(level)} tie on mean validation accuracy")
        return
    tied = [row["variant"] for row in rows[1:] if row["verdict"] in ("within noise", "tied")]
    console.print(
        f"Winner:       {rows[0]['variant']} (best mean validation accuracy over {seeds} "
        f"seed{'s' * spread})"
        + (f"; within noise of it: {', '.join(tied)}" if tied else "")
    )


def print_summary(outcome: Any, tracking_uri: str) -> None:
    from flatbasin.search.tracking import browse_hint
    from flatbasin.search.tuner import learned_nothing

    if not outcome.best:
        console.print(f"search '{outcome.name}': no trial finished, so there is no best trial yet")
    table = Table(title=f"search '{outcome.name}': best trial per variant")
    for column in ("variant", "trials", "score (val)", "test_acc", "params", "MLflow run"):
        table.add_column(column, overflow="fold")
    for row in outcome.best:
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items()
        )
        table.add_row(
            row["variant"],
            str(outcome.trials_per_variant.get(row["variant"], "")),
            f"{row['score']:.4f}",
            f"{row['test_acc']:.4f}",
            params,
            row.get("run_id") or "-",
        )
    if outcome.best:
        console.print(table)
    if warning := learned_nothing(outcome.best):
        console.print(f"warning: {warning}", style="yellow", markup=False)
    if outcome.untried:
        why = (
            "the time budget ran out before they got one"
            if outcome.out_of_time
            else "--samples below the number of variants gives some none"
        )
        console.print(
            f"No trial for: {', '.join(outcome.untried)} ({why}); they are not part of this "
            "comparison",
            style="yellow",
        )
    if outcome.confirmed:
        print_confirmed(outcome.confirmed)
    if outcome.unwritten and not outcome.store[0]:  # else a paragraph of its own says it
        console.print(
            f"{outcome.unwritten} trial(s) could not be written to MLflow; once it is back run:",
            style="yellow",
        )
        console.print(
            f"  flatbasin sync {shlex.quote(str(outcome.experiment_path))} --tracking-uri {shlex.quote(tracking_uri)}"
        )
    if outcome.seconds:
        console.print(
            "Time:         " + ", ".join(f"{k} {v:.1f} s" for k, v in outcome.seconds.items())
        )
    console.print(f"Tune results: {outcome.experiment_path}")
    console.print(f"Browse:       {browse_hint(tracking_uri)}")
    # The trial to reproduce: the winner's best after confirmation, else the best search score.
    winner = outcome.confirmed[0]["variant"] if outcome.confirmed else None
    rows = [r for r in outcome.best if r["variant"] == winner] or outcome.best
    if rows and rows[0].get("run_id"):
        console.print(
            f"Reproduce:    flatbasin reproduce {rows[0]['run_id']} --tracking-uri {shlex.quote(tracking_uri)}"
        )


def _leave(code: int) -> NoReturn:
    """Exit now. After a Ctrl-C inside Ray's start-up, Ray's own exit handlers can crash the
    interpreter (a segfault, exit 139, was seen): its local processes die with this one anyway."""
    import os

    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def main() -> None:
    from flatbasin.search import signals

    signals.install()  # SIGTERM and SIGHUP end every command as Ctrl-C does
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
