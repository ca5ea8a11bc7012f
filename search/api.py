"""flatbasin from Python, as Ray Tune's and Optuna's users expect it: `flatbasin.search(space,
**options)` runs a search and returns a `SearchResult`; `flatbasin.train(variant, **settings)`
trains one trial and returns its `TrialResult`. The command line is a thin layer over these
functions: the same checks and the same messages (a `UsageError` here is exit status 2 there).

A model or a data set may be a Python callable (`model=build`, `data=load`). One that the workers
can import by name (from the space's folder, the current one for a dict, or an installed package)
is named `module:qualname`, as a space file names it. Any other (a notebook's, a script's, a
module the workers cannot import) is named `callable:NAME` in the trial config, pickled by value
once and handed to every trial beside its config (Ray's object store), recorded with its source
in each trial's config, and its pickled copy with the search's run, where `flatbasin reproduce`
finds it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import re
import site
import sys
import sysconfig
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flatbasin.search.errors import SearchFailed, Unwritten, UsageError, describe, stderr

if TYPE_CHECKING:
    from rich.console import Console

    from flatbasin.search.options import Outcome, SearchOptions
    from flatbasin.spaces import Space
    from flatbasin.trainables.config import TrialConfig
    from flatbasin.trainables.loop import TrialResult

__all__ = ["BestTrial", "ConfirmedVariant", "SearchFailed", "SearchResult", "UsageError", "search",
           "soup", "train"]  # fmt: skip

# What Tune keeps of a search and restores on --resume (its search algorithm, schedule, run config and
# trial settings): given again, these would be silently ignored, so a resume refuses them.
FIXED_AT_START = ("samples", "concurrency", "scheduler", "seed", "time_budget", "max_failures",
                  "checkpoint_every", "checkpoint_interval")  # fmt: skip


# ----------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class BestTrial:
    """A variant's best trial of the search (ties: lower validation loss, then smaller trial id)."""

    variant: str
    trial_id: str
    score: float  # validation accuracy of the model the variant deploys: what the search maximised
    test_acc: float
    params: dict[str, Any]  # the variant's own parameters, as the search chose them
    run_id: str | None  # its MLflow run; None when MLflow could not be written (flatbasin sync)
    trials: int  # the variant's trials in the search
    config: dict[str, Any] = field(repr=False)  # the whole trial config (its trial_config.json)


@dataclass(frozen=True)
class ConfirmedVariant:
    """A variant's best configuration retrained with fresh seeds (--confirm-seeds)."""

    variant: str
    seeds: int
    val_mean: float
    val_std: float
    test_mean: float
    test_std: float
    p_vs_best: float | None  # the paired test of the leader's lead over it (confirm.py)
    verdict: str  # best, within noise, worse, tied, too few seeds to test, no spread to test
    diverged: int  # confirmation trials that diverged (counted with a score of 0)
    val: tuple[float, ...]
    test: tuple[float, ...]
    lead: tuple[float, float, float] | None = None  # the leader's mean lead over it, 95% interval
    models: int = 1  # models its deployed model runs per prediction


@dataclass(frozen=True)
class SearchResult:
    """What a search found: the best trial per variant, the confirmed table and the winner, with
    the MLflow runs that hold them. The same numbers the printed summary shows."""

    name: str
    state: str  # finished, interrupted or failed: what the search's MLflow run records
    best: tuple[BestTrial, ...]  # best score first
    confirmed: tuple[ConfirmedVariant, ...]  # best mean validation accuracy first; () without
    winner: str | None  # better than every other variant beyond noise; None without a confirmation,
    # or when the leading variants tie
    within_noise: tuple[str, ...]  # variants the confirmation cannot tell from the leader
    parent_run_id: str  # the search's MLflow run; every trial's run is its child
    tracking_uri: str
    report: Path | None  # the HTML report, when it was written
    experiment_path: Path  # Tune's folder for the search
    interrupted: bool = False  # Ctrl-C: finished trials are kept; `resume` continues it
    out_of_time: str = ""  # what --time-budget cut short, when it did
    errors: tuple[str, ...] = ()  # one line per failed trial, first first
    untried: tuple[str, ...] = ()  # variants of the space that got no trial
    resume: str = ""  # what continues the search (a command, or a flatbasin.search call)
    seconds: dict[str, float] = field(
        default_factory=dict
    )  # start-up, trials, confirmation, finish
    verdict: str = ""  # the confirmation's conclusion in words (confirm.verdict)
    recommended: str | None = None  # the winner, else the cheapest of the variants that tie
    soups: tuple[
        Any, ...
    ] = ()  # soup.SoupResult: uniform and greedy soups, greedy ensemble (--soup)

    @property
    def best_trial(self) -> BestTrial | None:
        """The trial to reproduce: the recommended variant's best trial, else the best score."""
        from flatbasin.search.confirm import to_reproduce

        rows = [{"variant": b.variant, "trial": b} for b in self.best]
        row = to_reproduce(rows, self.recommended)
        return row["trial"] if row else None

    @property
    def run_ids(self) -> dict[str, str | None]:
        """Each variant's best trial's MLflow run id."""
        return {b.variant: b.run_id for b in self.best}


def _result(outcome: Outcome, tracking_uri: str, report: Path | None) -> SearchResult:
    import flatbasin.search.confirm as confirm

    best = tuple(
        BestTrial(
            variant=row["variant"], trial_id=row["trial_id"], score=row["score"],
            test_acc=row["test_acc"], params=dict(row["params"]), run_id=row.get("run_id"),
            trials=outcome.trials_per_variant.get(row["variant"], 0),
            config=row["final"]["trial_config"],
        )
        for row in outcome.best
    )  # fmt: skip
    confirmed = tuple(
        ConfirmedVariant(
            variant=row["variant"], seeds=row["n"], val_mean=row["val_mean"],
            val_std=row["val_std"], test_mean=row["test_mean"], test_std=row["test_std"],
            p_vs_best=row["p_vs_best"], verdict=row["verdict"], diverged=row["diverged"],
            val=tuple(row["val"]), test=tuple(row["test"]), models=row.get("models", 1),
            lead=(row["diff_mean"], row["diff_low"], row["diff_high"])
            if row.get("diff_low") is not None else None,
        )
        for row in outcome.confirmed
    )  # fmt: skip
    return SearchResult(
        name=outcome.name, state=outcome.state, best=best, confirmed=confirmed,
        winner=confirm.winner(outcome.confirmed),
        within_noise=tuple(confirm.within_noise(outcome.confirmed)) if outcome.confirmed else (),
        parent_run_id=outcome.parent_run_id, tracking_uri=tracking_uri, report=report,
        experiment_path=outcome.experiment_path, interrupted=outcome.interrupted,
        out_of_time=outcome.out_of_time, errors=tuple(outcome.errors),
        untried=tuple(outcome.untried), resume=outcome.resume_command, seconds=dict(outcome.seconds),
        verdict=confirm.verdict(outcome.confirmed).text if outcome.confirmed else "",
        recommended=confirm.recommended(outcome.confirmed),
    )  # fmt: skip


# ----------------------------------------------------------------------------- callables


@dataclass(frozen=True)
class _Handed:
    """A callable given as model= or data=, as the trials name it and receive it."""

    name: str  # module:qualname (imported by name) or callable:NAME (handed over)
    blob: bytes | None = None  # pickled by value: callable:NAME in a search only
    record: Any = None  # usercode.PassedCode: callable:NAME only


def _target(fn: Any) -> Any:
    """What defines a callable: a partial's function, an instance's class, else itself."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn if inspect.isfunction(fn) or inspect.isclass(fn) or inspect.ismethod(fn) else type(fn)


def _installed(path: Path) -> bool:
    """Whether a module file is an installed package's (or the standard library's): every worker
    imports it by name as the driver does."""
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")}
    roots |= set(site.getsitepackages()) | {site.getusersitepackages()}
    path = path.resolve()
    return any(path.is_relative_to(Path(root).resolve()) for root in roots if root)


def _by_name(fn: Any, folder: Path) -> str | None:
    """`module:qualname` when the workers (and `flatbasin reproduce`) import exactly `fn` by that
    name: from `folder` (where the trial's code_dir points) or an installed package."""
    from flatbasin.trainables import usercode

    module_name, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module_name or module_name == "__main__" or not qualname or "<" in qualname:
        return None
    target: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    top = sys.modules.get(module_name.split(".")[0])
    origin = getattr(top, "__file__", None)
    if (
        target is not fn
        or origin is None
        or usercode.parse_ref(f"{module_name}:{qualname}") is None
    ):
        return None
    found = usercode.find_in(folder, module_name.split(".")[0])
    if (found is not None and found.resolve() == Path(origin).resolve()) or _installed(
        Path(origin)
    ):
        return f"{module_name}:{qualname}"
    return None


def _pickled(fn: Any) -> bytes:
    """`fn` pickled by value, with everything its own module (package) defines: a worker that
    cannot import that module by name still gets the code."""
    import cloudpickle

    target = _target(fn)
    top_name = (getattr(target, "__module__", None) or "").split(".")[0]
    top = sys.modules.get(top_name)
    origin = getattr(top, "__file__", None)
    by_value = (
        top is not None and top_name != "__main__" and origin is not None
        and not _installed(Path(origin))
        and top_name not in cloudpickle.list_registry_pickle_by_value()
    )  # fmt: skip
    if by_value:
        cloudpickle.register_pickle_by_value(top)
    try:
        return cloudpickle.dumps(fn)
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(top)


def _hand(fn: Any, option: str, folder: Path, taken: dict[str, Any], ship: bool) -> _Handed:
    """Name a callable for the trials' config and, when it cannot be imported by name, register
    it in this process under `callable:NAME` and pickle it (`ship`: for Ray's workers; without,
    the pickle only identifies it, and may fail)."""
    from flatbasin.trainables import usercode

    name = _by_name(fn, folder)
    if name is not None:
        return _Handed(name)
    target = _target(fn)
    qualname = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or "fn"
    raw_name = str(qualname).rpartition("<locals>.")[2]  # `make.<locals>.build`: build
    parts = [re.sub(r"\W", "_", p).strip("_") or "fn" for p in raw_name.split(".")]
    base = ".".join(f"_{p}" if p[0].isdigit() else p for p in parts)
    name, n = f"{usercode.PASSED}:{base}", 1
    while name in taken and taken[name] is not fn:  # model= and data= of the same name
        n += 1
        name = f"{usercode.PASSED}:{base}_{n}"
    taken[name] = fn
    try:
        blob = _pickled(fn)
    except Exception as err:
        if ship:
            raise UsageError(
                f"{option}=: {raw_name} cannot be sent to the Ray workers: cloudpickle cannot "
                f"pickle it ({type(err).__name__}: {err}); define it at the top level of a module "
                "or a notebook cell, without references to open files, locks or connections"
            ) from None
        blob = None
    try:
        source = inspect.getsource(target)
    except (OSError, TypeError):
        source = None
    sha = hashlib.sha256(blob).hexdigest() if blob is not None else uuid.uuid4().hex
    usercode.register(name, fn)  # this process: the checks before Ray, a local base phase
    return _Handed(name, blob if ship else None, usercode.PassedCode(sha256=sha, source=source))


def _named(
    option: str, value: Any, folder: Path, taken: dict[str, Any], ship: bool
) -> _Handed | None:
    """model= or data=: a name as a space file gives it, or a callable."""
    if value is None:
        return None
    if isinstance(value, str):
        return _Handed(value)
    if callable(value):
        return _hand(value, option, folder, taken, ship)
    wanted = (
        "a callable build(input_shape, num_classes, **model_args) returning a torch.nn.Module, or a "
        "model's name (a built-in one, torchvision:NAME, timm:NAME or module:callable)"
        if option == "model"
        else "a callable load(**data_args) returning (x_train, y_train, x_test, y_test) or "
        "(train_set, test_set), or a data set's name (a built-in one or module:callable)"
    )
    raise UsageError(f"{option}=: expected {wanted}; got a {type(value).__name__}")


# ----------------------------------------------------------------------------- search


def search(
    space: str | Path | Mapping[str, Any] = "compare",
    *,
    model: str | Callable[..., Any] | None = None,
    data: str | Callable[..., Any] | None = None,
    samples: int | None = None,
    concurrency: int | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    storage: str | Path | None = None,
    name: str | None = None,
    resume: bool = False,
    scheduler: str | None = None,
    cpus_per_trial: float | None = None,
    gpus_per_trial: float | None = None,
    seed: int | None = None,
    time_budget: float | None = None,
    max_failures: int | None = None,
    checkpoint_every: int | None = None,
    checkpoint_interval: float | None = None,
    confirm_seeds: int | None = None,
    start_from: str | None = None,
    soup: bool | None = None,
    console: Console | None = None,
) -> SearchResult:
    """Run a search: `space` is a space file, a bundled space's name ("compare", "swa", ...) or
    a dict with the same keys; every other option is `flatbasin search`'s (None: its default).

    `model` and `data` replace the space's `model` and `dataset`: a name, or a Python callable
    (`build(input_shape, num_classes, **model_args)` returning a torch.nn.Module; `load(**data_args)`
    returning four arrays or two torch Datasets), which the trials get wherever they run.

    `soup`: after the search, the uniform and greedy weight soups and the greedy ensemble of its
    trials (`flatbasin soup`); None: on for a search that continues a converged model (`start_from`
    or the space's `from:`), off otherwise. True for a search from scratch is refused.

    Bad input raises UsageError, before Ray starts, with the message the command line prints; a
    base phase that fails raises SearchFailed. A search whose trials failed returns, with
    `state == "failed"` and `errors`. Progress and the summary go to `console` (a rich Console;
    Console(quiet=True) for none).
    """
    import flatbasin.search.output as output
    from flatbasin.search.cluster import ClusterError, local_ray_on_loopback

    if address is None and not os.environ.get("RAY_ADDRESS"):
        local_ray_on_loopback()  # before anything imports Ray
    import flatbasin.search.signals as signals
    from flatbasin.search.post_convergence import BaseFailed
    from flatbasin.search.recovery import DiskFailure, disk_failed, store_failed
    from flatbasin.search.resume import experiment_folder, resumable, resume_command
    from flatbasin.search.running import run_search
    from flatbasin.search.store import TrackingRefused, TrackingUnavailable

    console = console or output.CONSOLE
    given = {
        "samples": samples, "concurrency": concurrency, "scheduler": scheduler, "seed": seed,
        "time_budget": time_budget, "max_failures": max_failures,
        "checkpoint_every": checkpoint_every, "checkpoint_interval": checkpoint_interval,
    }  # fmt: skip
    fixed = ["--" + key.replace("_", "-") for key in FIXED_AT_START if given[key] is not None]
    if resume and fixed:
        raise UsageError(
            f"--resume continues the search with the settings it started with, so "
            f"{', '.join(fixed)} would not apply; leave {'them' if len(fixed) > 1 else 'it'} "
            "out, or start a new search with --name NEW_NAME"
        )
    found, passed = _search_space(space, model, data, name, start_from)
    options = _search_options(
        {**given, "address": address, "tracking_uri": tracking_uri, "storage": storage,
         "name": name, "resume": resume, "cpus_per_trial": cpus_per_trial,
         "gpus_per_trial": gpus_per_trial, "confirm_seeds": confirm_seeds,
         "start_from": start_from, "soup": soup},
        passed,
    )  # fmt: skip
    # Its report goes to ./reports/NAME at the end: nothing there may be a device or a pipe.
    from flatbasin.search.report import check_report_folder

    check_report_folder(
        Path("reports") / (options.name or found.name), writable=False,
        what="the search's report folder",
    )  # fmt: skip
    souped = _soup_wanted(options.soup, options.start_from or found.start_from)
    quiet_mlflow_retries()
    ray_before = _ray_running()
    here = Path.cwd()  # a search on a cluster works from its storage folder (run_search)
    try:
        outcome = run_search(found, options, console)
    except TrackingRefused as err:
        raise UsageError(f"{err} Nothing was started.") from err
    except TrackingUnavailable as err:
        server = options.tracking_uri.startswith(("http://", "https://"))
        raise UsageError(
            f"{str(err).rstrip('.')}. " + ("Start the server or pass --tracking-uri; n" if server else "N")
            + "othing was started."
        ) from err  # fmt: skip
    except ClusterError as err:
        raise UsageError(str(err)) from err
    except BaseFailed as err:
        raise SearchFailed(f"{err}. Nothing was kept.") from err
    except DiskFailure as err:
        raise SearchFailed(
            disk_failed(str(err), resume_command(found, options), experiment_folder(found, options))
        ) from None
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP (search/signals.py)
        ray_before = True  # Ray's exit handlers after a Ctrl-C can crash: leave it to the exit
        with contextlib.suppress(OSError):  # a closed terminal (SIGHUP) takes no message
            if resumable(found, options):
                stderr.print(
                    f"interrupted ({signals.name()}); what Tune saved resumes with:\n  "
                    + resume_command(found, options),
                    style="yellow",
                )
            else:
                stderr.print(
                    f"interrupted ({signals.name()}) before any trial was saved; nothing to "
                    "resume: run the same command again to start the search",
                    style="yellow",
                )
        raise
    finally:
        os.chdir(here)
        if not ray_before:  # the Ray this search started goes with it
            _stop_ray()
    soups = None
    if souped and outcome.state == "finished" and outcome.best and not outcome.unwritten:
        soups = _soup_after(outcome.parent_run_id, options.tracking_uri, console)
    output.print_summary(outcome, options.tracking_uri, console, soups=soups)
    store_down = outcome.store[0]
    report = (
        output.write_search_report(outcome.parent_run_id, options.tracking_uri, console)
        if outcome.best and not store_down
        else None
    )
    if store_down:  # before the rest: what is not in MLflow is the first thing to put right
        raise SearchFailed(store_failed(outcome, options.tracking_uri))
    output.print_search_end(outcome, console)
    if outcome.disk and not outcome.interrupted:
        raise SearchFailed(
            disk_failed(outcome.disk, outcome.resume_command, outcome.experiment_path)
        )
    return dataclasses.replace(
        _result(outcome, options.tracking_uri, report),
        soups=tuple(soups.results) if soups is not None else (),
    )


def search_failure(result: SearchResult) -> str:
    """Why a search that returned failed, as one paragraph (the CLI exits with status 1); "" when
    it did not: no trial finished within --time-budget, or trials failed."""
    if result.out_of_time and not result.errors and not result.best:
        return (
            f"{result.out_of_time}: no trial finished, so nothing was compared; give a longer "
            f"budget, or continue (with another budget window) with: {result.resume}"
        )
    if result.errors:
        more = f" ({len(result.errors) - 1} more in MLflow's flatbasin.error tags and Tune's error.txt files)"
        return (
            f"the search failed: {len(result.errors)} trial(s) failed; first, {result.errors[0]}"
            + (more if len(result.errors) > 1 else "")
        )
    return ""


def _soup_wanted(soup: bool | None, start_from: str | None) -> bool:
    """--soup: on by default with --from; asked for a search from scratch, refused (before Ray)."""
    if soup is None:
        return start_from is not None
    if soup and start_from is None:
        from flatbasin.search.soup import from_scratch_refusal

        raise UsageError(from_scratch_refusal("--soup"))
    return soup


def _soup_after(parent_run_id: str, tracking_uri: str, console: Console) -> Any:
    """The search's soups and ensemble; any failure is a warning with the command that retries:
    the search's own results are safe in MLflow whatever happens here."""
    import shlex

    import flatbasin.search.soup as soup
    from flatbasin.search.credentials import redact_uri, scrub

    try:
        return soup.make(parent_run_id, tracking_uri, "all", "auto", console)
    except Exception as err:
        stderr.print(
            f"warning: no soup was made ({type(err).__name__}: {scrub(str(err))}); try: flatbasin "
            f"soup {parent_run_id} --tracking-uri {shlex.quote(redact_uri(tracking_uri))}",
            style="yellow",
        )
        return None


def soup(
    search: str,
    *,
    tracking_uri: str | None = None,
    only: str = "all",
    device: str = "auto",
    console: Console | None = None,
) -> Any:
    """`flatbasin soup SEARCH`: the uniform and greedy weight soups (trials that continue one
    converged model) and the greedy ensemble (any search) of a finished search's trials, each
    recorded as an MLflow run under the search's run; returns a `flatbasin.search.soup.SoupReport`
    (its `results`: kind, val_acc, test_acc, members, inference_cost, run_id). `search` is the
    search's name or its run id; `only`: "all", "soups" or "ensemble"; `device`: "auto", "cpu" or
    "cuda". Bad input (no such search, no finished trial, a store that is down, soups of a search
    from scratch) raises UsageError before any model is loaded."""
    import flatbasin.search.output as output
    import flatbasin.search.soup as soups

    if only not in ("all", "soups", "ensemble"):
        raise UsageError(f"--only {only}: expected all, soups or ensemble")
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {device}: expected auto, cpu or cuda")
    console = console or output.CONSOLE
    quiet_mlflow_retries()
    report = soups.make(search, tracking_uri_or_default(tracking_uri), only, device, console)  # type: ignore[arg-type]
    soups.print_table(report, console)
    return report


def _search_space(
    space: Any, model: Any, data: Any, name: str | None, start_from: str | None
) -> tuple[Space, dict[str, bytes]]:
    """The space, validated as a file is, with model= and data= in place of its own; and the
    callables the workers need pickled, by name."""
    from flatbasin.spaces import SpaceError
    from flatbasin.spaces.loader import DICT, check_name, code_folder, make_space, read_space

    try:
        if isinstance(space, Mapping):
            path, raw = None, copy.deepcopy(dict(space))
            if name is not None and not raw.get("name"):
                raw["name"] = name  # a dict has no file name to default to
        elif isinstance(space, str | Path):
            path, raw = read_space(space)
        else:
            raise UsageError(
                f"space: expected a space file's path, a bundled space's name or a dict; got a "
                f"{type(space).__name__}"
            )
        folder = code_folder(path)
        taken: dict[str, Any] = {}
        handed = {
            key: named
            for option, key, value in (("model", "model", model), ("data", "dataset", data))
            if (named := _named(option, value, folder, taken, ship=True)) is not None
        }
        if handed and isinstance(raw, dict):
            _check_not_set_below(raw, handed, str(path) if path is not None else DICT)
            raw = {**raw, **{key: h.name for key, h in handed.items()}}
        found = make_space(raw, path, start_from=start_from)
        if name is not None:
            check_name(name, "--name")
    except SpaceError as err:
        raise UsageError(str(err)) from err
    records = {h.name: h.record.model_dump() for h in handed.values() if h.record is not None}
    if records:
        found = found.with_settings(passed=records)
    found = dataclasses.replace(found, overridden=tuple(handed))
    return found, {h.name: h.blob for h in handed.values() if h.blob is not None}


def _check_not_set_below(raw: dict[str, Any], handed: Mapping[str, _Handed], where: str) -> None:
    """model= (data=) replaces the space's model (data set) for every trial: a space that sets its
    own under fixed: or in a variant would make one of them silently lose."""
    option = {"model": "model", "dataset": "data"}
    fixed = raw.get("fixed")
    for key in handed:
        if isinstance(fixed, dict) and key in fixed:
            raise UsageError(
                f"{where}: fixed.{key}: {option[key]}= gives every trial its {key}, so the space "
                f"may not set one too; remove one of them"
            )
        variants = raw.get("variants")
        for variant, entries in (variants or {}).items() if isinstance(variants, dict) else ():
            if isinstance(entries, dict) and key in entries:
                raise UsageError(
                    f"{where}: variants.{variant}.{key}: {option[key]}= gives every trial its "
                    f"{key}, so a variant may not set its own; remove one of them"
                )


def option_names(text: str) -> str:
    """SearchOptions' field names as the options a user typed (--time_budget_s -> --time-budget)."""
    renamed = {
        "--time_budget_s": "--time-budget",
        "--checkpoint_interval_s": "--checkpoint-interval",
    }
    for key, option in renamed.items():
        text = text.replace(key, option)
    return re.sub(r"--([a-z]+(?:_[a-z]+)+)", lambda m: "--" + m.group(1).replace("_", "-"), text)


def _search_options(given: dict[str, Any], passed: dict[str, bytes]) -> SearchOptions:
    """SearchOptions from what was given (None: the default), with the command line's message."""
    from pydantic import ValidationError

    from flatbasin.search.options import SearchOptions

    renamed = {"time_budget": "time_budget_s", "checkpoint_interval": "checkpoint_interval_s"}
    values = {renamed.get(k, k): v for k, v in given.items() if v is not None}
    values["tracking_uri"] = tracking_uri_or_default(given.get("tracking_uri"))
    values["storage"] = Path(given.get("storage") or "runs")
    try:
        return SearchOptions(**values, passed=passed)
    except ValidationError as err:
        raise UsageError(f"invalid search options:\n{option_names(describe(err, '--'))}") from err


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def tracking_uri_or_default(value: str | None) -> str:
    """MLflow's tracking URI: explicit, else $MLFLOW_TRACKING_URI, else ./mlflow.db (absolute);
    a malformed one is refused (UsageError) before anything starts, and a server's credentials
    move into the environment (search/credentials.py): nothing after this point holds them."""
    from flatbasin.search.credentials import adopt
    from flatbasin.search.tracking_uri import chosen_uri

    return adopt(chosen_uri(value), "--tracking-uri" if value else "$MLFLOW_TRACKING_URI")


def quiet_mlflow_retries() -> None:
    """A tracking server that is down should cost seconds, not minutes of retries, per attempt."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


# ----------------------------------------------------------------------------- one trial


def build_config(variant: str, settings: dict[str, Any]) -> TrialConfig:
    """A trial's config from flat settings; the user's modules are found in the current folder
    first (`train` and `lr-find` have no space file to stand beside)."""
    from pydantic import ValidationError

    from flatbasin.trainables.config import code_in, make_config

    try:
        return make_config(variant, code_in(settings, Path.cwd()))
    except ValidationError as err:
        raise UsageError(f"invalid settings for variant '{variant}':\n{describe(err)}") from err
    except ValueError as err:
        raise UsageError(str(err)) from err


def train(
    variant: str = "sgd",
    *,
    model: str | Callable[..., Any] | None = None,
    data: str | Callable[..., Any] | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    start_from: str | None = None,
    tracking_uri: str | None = None,
    console: Console | None = None,
    **settings: Any,
) -> TrialResult:
    """Train one trial here, without Ray, as `flatbasin train` does: `settings` are its --set
    keys (epochs=20, lr=0.05, model_args={"width": 64}, any parameter of the variant); `model` and
    `data` a name or a callable, as for `search`. `checkpoint` is written every epoch and
    `resume` continues it; `start_from` continues a converged model (a checkpoint file, or an
    MLflow run id at `tracking_uri`). Bad input raises UsageError; a diverged trial returns with
    `diverged` set."""
    return run_train(
        variant, settings, model=model, data=data, checkpoint=checkpoint, resume=resume,
        start_from=start_from, tracking_uri=tracking_uri, console=console,
    )  # fmt: skip


TRAIN_THREADS = 1  # torch threads of `train` unless --set threads=N says otherwise


def run_train(
    variant: str,
    settings: Mapping[str, Any],
    *,
    model: Any = None,
    data: Any = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    start_from: str | None = None,
    tracking_uri: str | None = None,
    console: Console | None = None,
    json_out: Path | None = None,
) -> TrialResult:
    """`train` with its settings as one mapping (as `flatbasin train` parses its --set), and the
    command line's --json file checked before the trial starts."""
    import flatbasin.search.output as output
    from flatbasin.search.preflight import writable_file

    console = console or output.CONSOLE
    # One thread unless asked, as a search's trial has by default (--cpus-per-trial 1): the same
    # numbers as that trial, and on a busy 2-core machine MNIST-1D's sgd took 32 s with one thread
    # against 233 s with two (docs/reproducibility.md).
    settings = {"threads": TRAIN_THREADS, **settings}
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    taken: dict[str, Any] = {}
    records = {}
    for option, key, value in (("model", "model", model), ("data", "dataset", data)):
        handed = _named(option, value, Path.cwd(), taken, ship=False)
        if handed is not None:
            if key in settings:
                raise UsageError(f"{option}= and {key}= name the same setting; give one of them")
            settings[key] = handed.name
            if handed.record is not None:
                records[handed.name] = handed.record.model_dump()
    if records:
        settings["passed"] = records
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

        quiet_mlflow_retries()
        config, start_weights, continuing = continue_config(
            variant, settings, start_from, tracking_uri_or_default(tracking_uri)
        )
    for option, path in (("--json", json_out), ("--checkpoint", checkpoint)):
        if path is not None:
            writable_file(option, path)  # found now, not after the training

    from flatbasin.trainables.data_spec import DataError
    from flatbasin.trainables.loop import train as run_trial

    legend = (
        "val acc: the weights being trained; gap: their accuracy on training examples minus val acc, "
        "both scored alike; deployed val acc: the model the variant ships now (the average or "
        "ensemble of its members; the search's score); lr: the epoch's range"
        + ("; every accuracy with test-time augmentation" if config.tta != "none" else "")
    )
    shown: list[bool] = []
    # A checkpoint that cannot be written (a full disk) costs the resume, not the run: training goes
    # on, and the end says so. The latest failure, cleared by a later checkpoint that is written.
    from flatbasin.search.outputs import CheckpointWrites, write_output

    saved = CheckpointWrites()

    def on_epoch(metrics: Any, save: Any) -> None:
        if not shown:  # with the first epoch, not before: an input the trial refuses before its
            shown.append(True)  # first epoch (a library, a start) is then the only paragraph
            console.print(legend)
            if continuing:
                console.print(continuing)
        output.print_epoch(metrics, config.epochs, console)
        if checkpoint is not None:
            saved.attempt(lambda: save(checkpoint), metrics.epoch)

    from flatbasin.trainables.accel import resolve_device
    from flatbasin.trainables.data import load_data
    from flatbasin.trainables.data_notes import data_notes

    try:
        data = load_data(config.data_spec, str(resolve_device(config.device)))
        for note in data_notes(config.data_spec, data):  # resized images, a tiny validation split
            console.print(f"note: {note}", style="yellow")
        result = run_trial(
            config,
            data=data,
            resume=checkpoint if resume else None,
            on_epoch=on_epoch,
            start_weights=start_weights,
        )
    except (DataError, ValueError) as err:
        raise UsageError(str(err)) from err
    output.print_trial_end(result, console)
    unwritten = [] if checkpoint is None else saved.problems(checkpoint)
    if json_out is not None:
        unwritten += write_output(
            "--json", json_out, json.dumps(result.to_json(), indent=2).encode()
        )
    if unwritten:  # everything writable is written; the rest named in one paragraph
        raise Unwritten(
            f"the training ran to its end (its results are above), but {'; '.join(unwritten)}"
        )
    return result
