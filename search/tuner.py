"""Assembling and running a search: OptunaSearch (seeded TPE) under a concurrency limit, ASHA or FIFO,
resources per trial, reused actors, checkpoints and retries, MLflow through the driver's callback."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shlex
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.console import Console

from flatbasin.search import confirm, post_convergence, preflight, saved_state, signals
from flatbasin.search.callbacks import (
    KEPT,
    CsvRows,
    JsonRows,
    MlflowWriter,
    Progress,
    StopOnPermanentError,
    append_rows,
    epoch_rows,
    make_live,
    mend_results,
    read_results,
)
from flatbasin.search.cluster import check_cluster
from flatbasin.search.credentials import redact_uri
from flatbasin.search.errors import UsageError, stderr
from flatbasin.search.figures import curve_figure
from flatbasin.search.quiet import RAY_LOGGING_LEVEL, quiet_libraries, quiet_ray
from flatbasin.search.schedulers import PerVariantASHA
from flatbasin.search.tracking import (
    ANSWER_TAGS,
    BEST_SEARCH_RUN,
    OLD_BEST_RUN,
    RECOMMENDED,
    REPRODUCE_RUN,
    VERDICT,
    WINNER,
    Tracker,
    TrackingUnavailable,
    TrialRecord,
)
from flatbasin.spaces import Space
from flatbasin.spaces.loader import NAME
from flatbasin.trainables.config import sampled
from flatbasin.trainables.files import disk_problem, disk_state

MODEL_LOGGED = "flatbasin.model_logged"
# Checkpoints kept per trial. Tune snapshots its whole state (every trial's, the searcher's: a cost
# that grows with the trials) whenever a trial has checkpointed this many times since the last
# snapshot, so that the state never names a checkpoint already deleted. At 1 that was at every
# checkpoint, each trial's final one included: 1,000 short trials made 1,000 snapshots of up to
# 1,000 trials. At 2 a trial's state lags at most one checkpoint behind, which is still on disk: a
# driver killed outright resumes each trial from its latest or the one before (a trial that had
# just finished may train its last checkpoint's epochs again); other snapshots come every 10 s or
# more (Tune's auto period, which keeps them under 5% of the time).
KEEP_CHECKPOINTS = 2
# A trial reports its epochs at most once a second, several to a report when they are shorter
# (trainables/ray_entry.EpochReporter): each report held the trial for a round trip to the driver.
REPORT_INTERVAL_S = 1.0


class SearchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Every number has a range, the one `flatbasin search --help` states (tests/test_bad_inputs.py
    # reads the help and holds both to each other).
    samples: int | None = Field(None, ge=1, le=100_000)  # None: the space file's `samples`
    concurrency: int = Field(2, ge=1, le=100_000)
    address: str | None = None  # None: $RAY_ADDRESS, else a new local Ray on this machine
    tracking_uri: str
    storage: Path
    name: str | None = Field(None, pattern=NAME.pattern)  # None: the space's name
    resume: bool = False
    scheduler: Literal["asha", "fifo"] = "fifo"
    cpus_per_trial: float = Field(1.0, ge=0.0001, le=10_000)  # whole CPUs, or 1/N of one
    gpus_per_trial: float = Field(0.0, ge=0, le=16)  # whole GPUs, or 1/N of one
    seed: int = Field(0, ge=0, le=2**32 - 1)  # what Optuna's sampler (numpy) takes
    time_budget_s: float | None = Field(None, ge=1, le=31_536_000)  # a second to a year
    max_failures: int = Field(2, ge=0, le=100)  # retries of a trial whose worker died
    checkpoint_every: int = Field(1, ge=1, le=10_000)  # epochs (a trial's budget is at most 10,000)
    checkpoint_interval_s: float = Field(20.0, ge=0, le=86_400)  # at most one checkpoint per this many seconds
    confirm_seeds: int | None = Field(None, ge=0, le=100)  # None: the space's confirm_seeds
    start_from: str | None = None  # --from: base, an MLflow run id or a checkpoint file (see
    # search/post_convergence.py); None: the space's `from:`, if it has one
    soup: bool | None = None  # --soup/--no-soup (search/soup.py); None: on with a start, else off
    # Callables handed to flatbasin.search from Python, pickled by value, by their `callable:NAME`:
    # every trial (and a base phase trained as a Ray task) gets them from Ray's object store.
    passed: dict[str, bytes] = Field(default_factory=dict, repr=False)

    @field_validator("gpus_per_trial")
    @classmethod
    def _whole_trials_per_gpu(cls, gpus: float) -> float:
        return preflight.check_gpu_share(gpus)

    @field_validator("cpus_per_trial")
    @classmethod
    def _whole_trials_per_cpu(cls, cpus: float) -> float:
        return preflight.check_cpu_share(cpus)


@dataclass(frozen=True)
class Outcome:
    name: str
    experiment_path: Path
    best: list[dict[str, Any]]  # best trial per variant, best first
    parent_run_id: str
    unwritten: int  # trials whose MLflow writes are still pending (server away at the end)
    seconds: dict[str, float] = field(default_factory=dict)  # start-up, trials, finish
    interrupted: bool = False  # Ctrl-C: trials left unfinished, resumable
    disk: str = ""  # a full or read-only disk stopped the search (resumable once there is room)
    # Why trials are left unwritten, when it lasts, and its kind (full, read-only, deleted).
    store: tuple[str, str] = ("", "")
    errors: list[str] = field(default_factory=list)  # one line per failed trial, first first
    resume_command: str = ""
    confirmed: list[dict[str, Any]] = field(default_factory=list)  # per variant over fresh seeds
    trials_per_variant: dict[str, int] = field(default_factory=dict)
    untried: list[str] = field(default_factory=list)  # variants of the space that got no trial
    out_of_time: str = ""  # "the --time-budget of 60 s ran out after 3 of 16 trials", when it did

    @property
    def state(self) -> str:
        return search_state(bool(self.errors or self.disk), self.interrupted, bool(self.out_of_time))


def search_state(failed: bool, interrupted: bool, out_of_time: bool) -> str:
    """What the search's run records: a failure first, then a search left to resume, else finished."""
    if failed:
        return "failed"
    return "interrupted" if interrupted or out_of_time else "finished"


# What a user's folder never needs to send to a cluster with its modules: flatbasin's own outputs.
CODE_EXCLUDES = ["runs/", "mlruns/", "reports/", "*.db", "*.pt", "__pycache__/", ".git/"]


def code_runtime_env(code_dir: str | None) -> dict[str, Any] | None:
    """The job runtime env that carries the user's folder (their model and data modules) to every
    worker of a cluster: Ray's working_dir, which it puts first on each worker's PYTHONPATH. None
    when there is no user code, or when this driver is itself a job that brought the folder (flatbasin
    submit): Ray refuses a second working_dir there."""
    if code_dir is None:
        return None
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job and (json.loads(job).get("runtime_env") or {}).get("working_dir"):
        return None
    return {"working_dir": code_dir, "excludes": CODE_EXCLUDES}


def _init_ray(address: str | None, code_dir: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    quiet_ray()  # Ray's notice that it turned token authentication on (search/quiet.py)
    # Tune snapshots its state at every other checkpoint of a trial (KEEP_CHECKPOINTS); that is intended.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Our own progress line replaces Tune's tables; its JSON and CSV result files stay (see run_search).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # A trial stopped on a full disk (StopOnPermanentError) raises after Tune stopped waiting for it;
    # Ray would print that error again, traceback and all: the search's paragraph names it.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    os.environ.setdefault(
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true"
    )  # our summary names the runs
    if address:
        os.environ["RAY_ADDRESS"] = address  # Ray lets $RAY_ADDRESS override the argument: agree
        ray.init(
            address=address, log_to_driver=False, runtime_env=code_runtime_env(code_dir),
            logging_level=RAY_LOGGING_LEVEL,
        )  # fmt: skip
    else:
        # A new Ray on this machine, always: never one that $RAY_ADDRESS or Ray's current-cluster
        # file names (a stale file made a search hang for minutes). Loopback: local_ray_on_loopback.
        os.environ.pop("RAY_ADDRESS", None)
        # No job runtime_env (an earlier worker set-up hook that imported torch was one): Ray only
        # hands a prestarted worker to an actor whose runtime_env is empty, so with one every trial
        # actor was a new process and the warmed workers sat idle (checked by their pids).
        with signals.spared_children():
            ray.init(
                address="local", include_dashboard=False, log_to_driver=False,
                logging_level=RAY_LOGGING_LEVEL,
            )  # fmt: skip
    signals.install()  # ray.init's own SIGTERM handler aborts the driver (exit 134, nothing saved)


def trial_name(trial: Any) -> str:
    """'swa_3f2a1b00' rather than Tune's default of every parameter in the folder name."""
    return f"{sampled(trial.config)['variant']}_{trial.trial_id}"


def runtime_settings(space: Space, options: SearchOptions) -> Space:
    """Threads match the CPUs a trial holds; the device follows --gpus-per-trial unless the space names
    one, and a space that asks for CUDA without GPUs per trial is refused rather than run on the CPU."""
    threads = max(1, int(options.cpus_per_trial))
    asked = {space.settings.get("device", "auto")}  # the top level, then each variant's own
    for searched, fixed in space.variants.values():
        asked |= {fixed["device"]} if "device" in fixed else set()
        asked |= set(searched["device"].values) if "device" in searched else set()
    if "cuda" in asked and options.gpus_per_trial == 0:
        raise UsageError(f"{space.where}: device: cuda needs --gpus-per-trial above 0")
    if "cpu" in asked and options.gpus_per_trial > 0:
        raise UsageError(
            f"{space.where}: device: cpu, but --gpus-per-trial {options.gpus_per_trial:g}"
        )
    device = "cuda" if options.gpus_per_trial > 0 else "cpu"
    return space.with_settings(threads=threads, device=device)


def check_new_or_resumable(
    tracker: Tracker, experiment_path: Path, resume: bool, space: Space | None = None
) -> None:
    """--resume needs a search to resume, of the same space; without it, a search of the same name
    is never merged into."""
    earlier = tracker.find_parent()
    # A damaged state is refused with or without --resume (without, the advice would be --resume);
    # so is the confirmation runs' own experiment, which a resumed search continues too.
    restorable = saved_state.check(experiment_path, earlier)
    if resume:
        saved_state.check(confirm_path(experiment_path), earlier)
    if resume and not restorable:
        hint = (
            f" (MLflow has its run {earlier}, but Tune's folder is gone or holds nothing to "
            "resume: put it back if it was moved, or start a new search with --name NEW_NAME; "
            "what was recorded stays in MLflow)"
            if earlier
            else "; run without --resume to start it"
        )
        raise UsageError(f"--resume: no search to resume at {experiment_path}{hint}")
    other = None if earlier else tracker.other_search()
    if other is not None:
        raise UsageError(
            f"MLflow already holds a search named '{experiment_path.name}' whose Tune folder is "
            f"{other}, not {experiment_path}; continue it with --storage {Path(other).parent} "
            "--resume, or start a new one with --name NEW_NAME"
        )
    if resume and earlier and space is not None:
        check_same_space(tracker, earlier, space)
    if not resume and (restorable or earlier):
        where = f"{experiment_path}" + (f", MLflow run {earlier}" if earlier else "")
        raise UsageError(
            f"a search named '{experiment_path.name}' already exists ({where}); continue it with "
            f"--resume, or start a new one with --name NEW_NAME"
        )


def check_same_space(tracker: Tracker, parent: str, space: Space) -> None:
    """Tune resumes the space it pickled when the search started: an edited space file would be
    silently ignored, so it is refused, naming what changed."""
    from flatbasin.spaces.loader import changed_keys

    digest, recorded = tracker.recorded_space(parent, space.file_name)
    if digest is None or not space.digest or digest == space.digest:
        return
    changed = ""
    if recorded is not None:
        keys = changed_keys(recorded, space.raw)
        changed = f" ({', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''})"
    raise UsageError(
        f"--resume: {space.where} has changed since the search '{tracker.experiment}' started"
        f"{changed}; a resumed search continues the space it started with, so undo the change, or "
        "start a new search with --name NEW_NAME"
    )


def resume_command(space: Space, options: SearchOptions) -> str:
    """The exact command that continues this search: the CLI's, or, for a search that only Python
    can describe (a space given as a dict, a model or data set given to flatbasin.search), the
    call."""
    storage = options.storage.expanduser().resolve()
    if space.path is None or space.overridden:
        return _resume_call(space, options, storage)
    args = ["flatbasin", "search", str(space.path), "--name", options.name or space.name,
            "--storage", str(storage), "--tracking-uri", redact_uri(options.tracking_uri)]  # fmt: skip
    if options.address:
        args += ["--address", options.address]
    if options.confirm_seeds is not None:  # not in Tune's state: the confirmation comes after it
        args += ["--confirm-seeds", str(options.confirm_seeds)]
    if options.start_from:  # a file made absolute, as the search recorded it
        args += ["--from", post_convergence.parse_source(options.start_from).text]
    if options.soup is not None:  # not in Tune's state: the soups come after it
        args += ["--soup" if options.soup else "--no-soup"]
    return shlex.join([*args, "--resume"])


def _resume_call(space: Space, options: SearchOptions, storage: Path) -> str:
    """`flatbasin.search(...)` with what continues the search; a callable is named as the
    Python name it was given under."""
    given = repr(str(space.path)) if space.path is not None else "space"
    args = [given, f"name={options.name or space.name!r}", f"storage={str(storage)!r}",
            f"tracking_uri={options.tracking_uri!r}"]  # fmt: skip
    if options.address:
        args.append(f"address={options.address!r}")
    if options.confirm_seeds is not None:
        args.append(f"confirm_seeds={options.confirm_seeds}")
    if options.start_from:
        args.append(f"start_from={post_convergence.parse_source(options.start_from).text!r}")
    if options.soup is not None:
        args.append(f"soup={options.soup}")
    for option, key in (("model", "model"), ("data", "dataset")):
        if key in space.overridden:
            value = str(space.settings[key])
            shown = value.partition(":")[2] if value in options.passed else repr(value)
            args.append(f"{option}={shown}")
    return f"flatbasin.search({', '.join(args)}, resume=True)"


@contextlib.contextmanager
def _space_record(space: Space) -> Iterator[Path]:
    """The file the search's run records: the space file itself, or, for a space given as a dict
    or with a model or data set given apart (flatbasin.search), what was searched, as YAML."""
    import json
    import tempfile

    import yaml

    if space.path is not None and not space.overridden:
        yield space.path
        return
    with tempfile.TemporaryDirectory(prefix="flatbasin-space-") as folder:
        path = Path(folder) / space.file_name
        plain = json.loads(json.dumps(space.raw, default=str))  # tuples, paths: as YAML can say
        path.write_text(yaml.safe_dump(plain, sort_keys=False), encoding="utf-8")
        yield path


def _record_code(tracker: Tracker, parent: str, space: Space, passed: dict[str, bytes]) -> None:
    """The callables handed in from Python, with the search's run: each pickled copy (what
    `flatbasin reproduce` loads) and its source, when Python had it, under code/NAME."""
    import tempfile

    records = space.settings.get("passed", {})
    with tempfile.TemporaryDirectory(prefix="flatbasin-code-") as folder:
        for name, blob in passed.items():
            stem = name.partition(":")[2]
            (Path(folder) / f"{stem}.pkl").write_bytes(blob)
            source = (records.get(name) or {}).get("source")
            if source:
                (Path(folder) / f"{stem}.py").write_text(source, encoding="utf-8")
        tracker.client.log_artifacts(parent, folder, "code")


def run_search(space: Space, options: SearchOptions, console: Console) -> Outcome:
    """Check everything the driver can know, then run the search; Ray starts only once all is well."""
    import optuna

    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_libraries()  # MLflow's download bars, Optuna's "already reported" (search/quiet.py)
    # Ours to report: a store that fails is named by the writer, not by SQLAlchemy's tracebacks.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    for logger, own in (
        ("ray.tune.tune", _OwnMessages),
        ("ray.tune.analysis.experiment_analysis", _OwnMessages),
        ("ray.tune.execution.tune_controller", _TrialFailures),
        ("ray.tune.execution.experiment_state", _SavingFailures),
        ("ray.train._internal.syncer", _SavingFailures),
    ):
        log = logging.getLogger(logger)
        if not any(isinstance(f, own) for f in log.filters):
            log.addFilter(own())
    name = options.name or space.name
    storage = options.storage.expanduser().resolve()
    experiment_path = storage / name

    preflight.check_storage(storage)
    target = preflight.ray_target(options.address)
    local = target.address is None
    if local:
        preflight.check_local_resources(options.cpus_per_trial, options.gpus_per_trial)
        preflight.check_local_ray()
    space = runtime_settings(space, options)
    tracker = Tracker(options.tracking_uri, name, search_key=str(experiment_path))
    tracker.check()
    check_new_or_resumable(tracker, experiment_path, options.resume, space)
    # Post-convergence (--from or the space's `from:`): the source is resolved and checked here,
    # before Ray; the trials then run the tail only, so that is the space checked below.
    start = post_convergence.plan(space, options.start_from, tracker, options.resume)
    notes: list[str] = []  # what the data does to the numbers (trainables/data_notes.py)
    for warning in preflight.check_trials(start.space if start else space, local=local, notes=notes):
        stderr.print(f"warning: {warning}", style="yellow")
    for note in notes:
        console.print(f"note: {note}", style="yellow")
    if options.gpus_per_trial > 1:
        stderr.print(
            f"warning: --gpus-per-trial {options.gpus_per_trial:g}: a trial trains on one device, "
            "so all but one of its GPUs will sit idle",
            style="yellow",
        )
    gpu = preflight.local_gpu() if local and options.gpus_per_trial > 0 else None
    if gpu is not None:  # trials per GPU x each one's memory must fit
        preflight.check_gpu_packing(
            start.space if start else space, options.gpus_per_trial, options.concurrency, gpu
        )
    elif options.gpus_per_trial > 0:
        stderr.print(
            "note: the memory of the cluster's GPUs is not known here, so whether "
            f"{preflight.trials_per_gpu(options.gpus_per_trial, options.concurrency)} trial(s) "
            "fit on one GPU was not checked",
            style="yellow",
        )

    # One driver per search: a second command of the same name, started while this one runs, passed
    # every check above (nothing was recorded yet) and would merge into it; under the lock, check again.
    with preflight.only_search(storage, name):
        check_new_or_resumable(tracker, experiment_path, options.resume, space)
        if not local:
            # A job's working directory is Ray's to clean up (it can vanish under a long search); every
            # path is absolute by now, so work from the storage folder, which outlives the search.
            storage.mkdir(parents=True, exist_ok=True)
            os.chdir(storage)
        samples = options.samples or space.samples
        params = {"space": space.where, "samples": samples, "seed": options.seed, "sampler": "TPE",
                  "scheduler": options.scheduler, "concurrency": options.concurrency,
                  "cpus_per_trial": options.cpus_per_trial, "gpus_per_trial": options.gpus_per_trial,
                  **({"from": start.source.text} if start else {})}  # fmt: skip
        try:
            if local:
                # Ray's start-up and the search's MLflow run at the same time (a new SQLite store is
                # copied from a cached one, or built once per MLflow schema: 1.6 s, see seed_sqlite);
                # both are needed before the first trial.
                with (
                    _space_record(space) as recorded,
                    ThreadPoolExecutor(1, thread_name_prefix="flatbasin-parent") as pool,
                ):
                    made = pool.submit(tracker.parent, params, recorded, space.digest)
                    _init_ray(None)
                    parent = made.result()
            else:  # nothing is recorded until the cluster is known to reach the store and storage
                _init_ray(target.address, space.settings.get("code_dir"))
                check_cluster(
                    options.tracking_uri, storage, options.cpus_per_trial, options.gpus_per_trial
                )
                with _space_record(space) as recorded:
                    parent = tracker.parent(params, recorded, space.digest)
            if options.passed:
                _record_code(tracker, parent, space, options.passed)
            if samples < len(space.variants) and not options.resume:
                console.print(
                    f"note: {samples} trial(s) for {len(space.variants)} variants: "
                    f"{', '.join(list(space.variants)[samples:])} will get none (the variants take turns)",
                    style="yellow",
                )
            weights = None
            if start is not None:  # the base trained (or recorded) once, before any trial
                space, weights = post_convergence.begin(start, tracker, options, console)
            return _run(
                space, options, console, tracker, parent, experiment_path, samples, started, weights
            )
        except BaseException as err:
            # Ctrl-C pressed twice, or a failure of the driver itself: the search is not finished, and
            # its run must not say RUNNING forever. What Tune saved stays resumable; a search stopped
            # before Tune saved anything leaves no run behind (it holds nothing, and would only block
            # running the same command again), its base run included. A store that is down keeps what
            # it has: the error that brought us here is the one to report. A disk that filled up (or
            # went read-only) under the driver's own writes is a failure, named by its path.
            problem = disk_problem(err) if isinstance(err, Exception) else None
            with contextlib.suppress(MlflowException, TrackingUnavailable, OSError):
                restorable = saved_state.saved(experiment_path)
                if not restorable:
                    tracker.discard_base()
                if restorable or not tracker.discard_parent():
                    tracker.end_parent("failed" if problem else "interrupted")
            if problem is not None:
                first = next((line for line in str(err).splitlines() if line.strip()), "")
                raise DiskFailure(
                    disk_paragraph(problem, f"{type(err).__name__}: {first}", experiment_path)
                ) from err
            raise


class DiskFailure(Exception):
    """The driver's own write (Tune's state or result files, the search's records) found its disk
    full or read-only; the message names the disk and the error."""


class _OwnMessages(logging.Filter):
    """Drop Tune's messages that flatbasin says better itself: its `Tuner.restore(...)` hint (our
    summary prints the `flatbasin search ... --resume` command), its list of unfinished trials, and
    its list of trials without results (cut short before their first epoch: the summary counts them)."""

    DROPPED = ("Resume experiment with", "Trials did not complete", "Failed to fetch metrics for")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(dropped in text for dropped in self.DROPPED)


class _TrialFailures(logging.Filter):
    """Tune logs a failed trial with the worker's whole traceback; the user gets one line (the
    exception), and the traceback stays in the trial's error.txt, which the summary names."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith("Trial task failed for trial") or not record.exc_info:
            return True
        error = record.exc_info[1]
        cause = getattr(error, "cause", None) or error  # a RayTaskError wraps the worker's exception
        first = next((line for line in str(cause).splitlines() if line.strip()), "")
        line = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(cause).__name__}: {first}").strip()
        record.msg, record.args, record.exc_info, record.exc_text = (
            f"{text}: {line if len(line) <= 300 else line[:299] + '…'}", (), None, None,
        )  # fmt: skip
        return True


class _SavingFailures(logging.Filter):
    """While a disk is full, Tune logs every failed save of its state and every failed sync with a
    whole traceback, every few seconds: one line, once; the search's paragraph says the rest."""

    said = False  # per process: one search at a time

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        if _SavingFailures.said:
            return False
        _SavingFailures.said = True
        error = record.exc_info[1] if record.exc_info else None
        lines = [line.strip() for line in str(error or record.getMessage()).splitlines()]
        last = next((line for line in reversed(lines) if line), "")
        record.msg, record.args, record.exc_info, record.exc_text = (
            f"Tune could not save its state to its storage: {last[:300]}", (), None, None,
        )  # fmt: skip
        return True


def experiment_folder(space: Space, options: SearchOptions) -> Path:
    """Tune's folder of this search."""
    return options.storage.expanduser().resolve() / (options.name or space.name)


def resumable(space: Space, options: SearchOptions) -> bool:
    """Whether Tune saved enough of this search for --resume to continue it."""
    return saved_state.saved(experiment_folder(space, options))


def confirm_path(experiment_path: Path) -> Path:
    """The confirmation runs' Tune experiment, beside the search's."""
    return experiment_path.with_name(f"{experiment_path.name}.confirm")


def _run(
    space: Space,
    options: SearchOptions,
    console: Console,
    tracker: Tracker,
    parent: str,
    experiment_path: Path,
    samples: int,
    started: float,
    start_weights: dict[str, Any] | None = None,
) -> Outcome:
    import optuna
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    name, storage = experiment_path.name, experiment_path.parent
    trainable = _trainable(options, start_weights)
    writer = MlflowWriter(tracker, console)
    progress = Progress(samples, console)
    stopper = StopOnPermanentError()
    make_live(writer, progress, stopper)  # a restored Tuner gets these objects back, not copies
    run_config = tune.RunConfig(
        name=name,
        storage_path=str(storage),
        # result.json and progress.csv are what `flatbasin sync` and a restored search read back;
        # TensorBoard files are left out (curves are lists, which TensorBoard cannot take).
        callbacks=[writer, progress, JsonRows(), CsvRows()],
        failure_config=tune.FailureConfig(max_failures=options.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        stop=stopper,
        verbose=0,
    )
    if options.resume:
        # Tune restores its own pickled run config; its callbacks come back as `writer` and `progress`.
        mend_results(experiment_path)
        tuner = tune.Tuner.restore(str(experiment_path), trainable, resume_errored=True)
    else:
        epochs = int(space.settings["epochs"])
        scheduler = (
            PerVariantASHA(
                time_attr="rung_epoch",
                metric="score",
                mode="max",
                max_t=epochs,
                grace_period=max(1, epochs // 4),
                reduction_factor=2,
            )
            if options.scheduler == "asha"
            else FIFOScheduler()
        )
        searcher = OptunaSearch(
            space.define_by_run,
            metric="score",
            mode="max",
            sampler=optuna.samplers.TPESampler(seed=options.seed),
        )
        tuner = tune.Tuner(
            trainable,
            param_space={
                "checkpoint_every": options.checkpoint_every,
                "checkpoint_interval_s": options.checkpoint_interval_s,
                "report_interval_s": REPORT_INTERVAL_S,
                "report_at": (
                    scheduler.milestones() if isinstance(scheduler, PerVariantASHA) else []
                ),
            },
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=options.concurrency),
                scheduler=scheduler,
                num_samples=samples,
                reuse_actors=True,
                time_budget_s=options.time_budget_s,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
            ),
            run_config=run_config,
        )
    fit_started = time.perf_counter()
    with _interrupt_watch() as interrupt:
        grid = tuner.fit()
    fit_ended = time.perf_counter()

    _fill_from_grid(writer, grid, stopped_by=stopper.error)
    best = _best_per_variant(writer)
    errors = _errors(writer, grid)
    disk = disk_paragraph(stopper.disk, stopper.disk_error, experiment_path) if stopper.disk else ""
    interrupted = interrupt.caught and not errors and not disk
    out_of_time = _out_of_time(options, writer, samples, fit_ended - fit_started)
    written = writer.drain()
    confirmed: list[dict[str, Any]] = []
    seeds = options.confirm_seeds if options.confirm_seeds is not None else space.confirm_seeds
    confirm_started = time.perf_counter()
    if seeds and best and not interrupted and not errors and not disk and not out_of_time:
        confirmed, interrupted, errors, disk = _confirm(
            tracker, console, options, experiment_path, best, seeds, trainable
        )
    confirm_ended = time.perf_counter()
    state = search_state(bool(errors or disk), interrupted, bool(out_of_time))
    if written and (lost := tracker.settle_lost(_tune_trial_ids(grid))):
        console.print(
            f"note: {lost} trial run(s) of an earlier driver that was killed outright were never "
            "saved by Tune (their places ran again); they are marked lost in MLflow",
            style="yellow",
        )
    if written:
        _finish_parent(tracker, parent, best, grid, confirmed, _count_variants(writer))
        tracker.end_parent(state)
    seconds = {
        "start-up": fit_started - started,
        "trials": fit_ended - fit_started,
        **({"confirmation": confirm_ended - confirm_started} if confirmed else {}),
        "finish": time.perf_counter() - confirm_ended + (confirm_started - fit_ended),
    }
    return Outcome(
        name, experiment_path, best, parent, len(writer.unwritten), seconds,
        interrupted=interrupted, errors=errors,
        resume_command=resume_command(space, options), confirmed=confirmed,
        trials_per_variant=(counts := _count_variants(writer)),
        untried=[] if interrupted else [v for v in space.variants if v not in counts],
        out_of_time=out_of_time, disk=disk, store=_lasting_failure(writer),
    )  # fmt: skip


def _lasting_failure(writer: MlflowWriter) -> tuple[str, str]:
    """The store's failure and its kind when trials are left unwritten and waiting will not write
    them (see store_failure); ('', '') otherwise."""
    if writer.unwritten and writer.lasting and writer.failure:
        return writer.failure, writer.lasting
    return "", ""


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


def _out_of_time(
    options: SearchOptions, writer: MlflowWriter, samples: int, fit_seconds: float
) -> str:
    """What --time-budget cut short, if it did: Tune ends the trial phase at the budget, silently."""
    finished = sum(record.final is not None for record in writer.records.values())
    budget = options.time_budget_s
    if budget is None or finished >= samples or fit_seconds < budget:
        return ""
    return f"the --time-budget of {budget:g} s ran out after {finished} of {samples} trial(s)"


def _trainable(options: SearchOptions, start_weights: dict[str, Any] | None) -> Any:
    """The trial function with its resources. A post-convergence search hands every trial the
    converged weights through Ray's object store: with_parameters puts them there once (not into
    each trial's pickled config), and a trial on any node, or moved to another, fetches them from
    there."""
    from ray import tune

    from flatbasin.trainables import ray_entry

    function = ray_entry.trainable
    handed = {
        **({"start_weights": start_weights} if start_weights is not None else {}),
        **({"passed": options.passed} if options.passed else {}),
    }  # the callables handed in from Python travel the same way (see SearchOptions.passed)
    if handed:
        function = tune.with_parameters(ray_entry.trainable, **handed)
    return tune.with_resources(
        function, {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial}
    )


def _fill_from_grid(writer: MlflowWriter, grid: Any, stopped_by: str | None = None) -> None:
    """Make the records exactly what Tune's result files hold, every epoch of every trial once.

    A restored search never sees, through its callbacks, the trials that finished before the
    interruption, nor an epoch reported just before the driver died: the files have them all.
    """
    for result in grid:
        trial_id = result.metrics.get("trial_id") if result.metrics else None
        if trial_id is None:
            continue
        seen = writer.records.get(trial_id)
        if result.config:
            config = sampled(dict(result.config))
        elif seen is not None:  # cut off before its first result: Tune kept no config for it
            config = seen.config
        else:
            continue
        record = TrialRecord(trial_id, config)
        # What the events brought first, then the files over it, epoch by epoch: a file that lags
        # behind the events (Tune syncs the driver's copy to the storage now and then) loses nothing.
        for row in seen.results if seen is not None else []:
            record.add(row)
        rows = read_results(Path(result.path)) if result.path else []
        if not rows and result.metrics_dataframe is not None:
            rows = result.metrics_dataframe.to_dict("records")
        for row in rows:
            record.add({k: v for k, v in row.items() if k in KEPT})
        if result.metrics.get("final") or result.metrics.get("permanent_error"):
            for row in epoch_rows(result.metrics):
                record.add({k: v for k, v in row.items() if k in KEPT})
            if result.path:  # Tune's copy of the file missed its last report (a full disk)
                have = {row.get("epoch") for row in rows}
                missing = [r for r in epoch_rows(result.metrics) if r.get("epoch") not in have]
                append_rows(Path(result.path), missing)
        record.status = "FAILED" if result.error else seen.status if seen else "FINISHED"
        if record.status == "RUNNING":  # the experiment ended with this trial unfinished
            record.status = "INTERRUPTED"
        if stopped_by and record.final is None and record.error is None:
            record.status = "STOPPED"  # cut off when another trial failed for good
        writer.add(record)


def _second_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@dataclass
class _Interrupt:
    caught: bool = False


@contextlib.contextmanager
def _interrupt_watch() -> Iterator[_Interrupt]:
    """Tell whether Tune's fit ended on Ctrl-C. Tune catches the first SIGINT itself, saves its state,
    stops the trials (they end TERMINATED, like finished ones) and returns normally; when it catches
    one, it puts back the handler it found. So: install ours, and see afterwards whether it is back.
    Ours makes a second Ctrl-C a KeyboardInterrupt, as Tune's message promises."""
    interrupt = _Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt  # signals go to the main thread only; nothing to watch
        return
    previous = signal.signal(signal.SIGINT, _second_interrupt)
    try:
        yield interrupt
        interrupt.caught = signal.getsignal(signal.SIGINT) is _second_interrupt
    finally:
        signal.signal(signal.SIGINT, previous)


def _unfinished(grid: Any) -> list[str]:
    """Trials still pending or running when the experiment ended: Ctrl-C, or a driver that died.

    Trials stopped by ASHA or a time budget count as finished (Tune marks them TERMINATED).
    """
    trials = grid._experiment_analysis.trials  # Result has no status; the analysis' trials do
    return [t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")]


def _tune_trial_ids(grid: Any) -> set[str]:
    """Every trial Tune's experiment holds, whatever its state."""
    return {t.trial_id for t in grid._experiment_analysis.trials}


def _errors(writer: MlflowWriter, grid: Any) -> list[str]:
    """One line per failed trial: permanent errors (data, model) first, then trials that raised."""
    lines = [
        f"trial {r.trial_id}: {r.error}"
        for r in sorted(writer.records.values(), key=lambda r: r.trial_id)
        if r.error is not None
    ]
    for result in grid:
        if result.error is not None:
            trial_id = result.metrics.get("trial_id", "?") if result.metrics else "?"
            where = f" (log: {Path(result.path) / 'error.txt'})" if result.path else ""
            lines.append(f"trial {trial_id}: {_last_line(result.error)}{where}")
    return lines


def _last_line(error: BaseException) -> str:
    """'ValueError: ...' from a remote traceback: its last non-empty line says what went wrong."""
    text = [line.strip() for line in str(error).splitlines() if line.strip()]
    return text[-1] if text else type(error).__name__


def _best_per_variant(writer: MlflowWriter) -> list[dict[str, Any]]:
    """Each variant's best finished, non-diverged trial, best first. Ties go to the lower validation
    loss, then to the smaller trial id, so the answer is the same on every resume and every sync."""
    best: dict[str, tuple[tuple[float, float, str], dict[str, Any]]] = {}
    for record in writer.records.values():
        final = record.final
        if final is None or final["diverged"]:
            continue
        variant = record.config["variant"]
        val_loss = final.get("val_loss")
        rank = (-final["score"], val_loss if val_loss is not None else math.inf, record.trial_id)
        if variant not in best or rank < best[variant][0]:
            best[variant] = (
                rank,
                {
                    "variant": variant,
                    "trial_id": record.trial_id,
                    "score": final["score"],
                    "test_acc": final["test_acc"],
                    "params": dict(record.config.get(variant, {})),
                    "final": final,
                    "config": record.config,
                },
            )
    return [row for _, row in sorted(best.values(), key=lambda item: item[0])]


def learned_nothing(best: list[dict[str, Any]], margin: float = 0.02) -> str:
    """A warning when even the best trial scored within `margin` of chance (always answering the most
    common validation class): every setting tried failed to learn, and 'the best' means nothing."""
    if not best or best[0]["final"].get("chance") is None:
        return ""
    top, chance = best[0]["score"], best[0]["final"]["chance"]
    if top >= chance + margin:
        return ""
    return (
        f"the best score, {top:.4f}, is no better than chance ({chance:.4f}: always answering the most "
        "common class), so no trial learned anything; look at the learning rates (flatbasin "
        "lr-find suggests a range), the number of epochs and the data before trusting this search"
    )


def _count_variants(writer: MlflowWriter) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in writer.records.values():
        counts[record.config["variant"]] = counts.get(record.config["variant"], 0) + 1
    return counts


def _confirm(
    tracker: Tracker,
    console: Console,
    options: SearchOptions,
    experiment_path: Path,
    best: list[dict[str, Any]],
    seeds: int,
    trainable: Any,
) -> tuple[list[dict[str, Any]], bool, list[str], str]:
    """Retrain each variant's best configuration with `seeds` fresh seeds, as Ray trials in parallel
    (a Tune experiment of its own beside the search's, resumable the same way); their runs are tagged
    flatbasin.role=confirm and never touch the search's own runs. `trainable` is the search's own:
    confirmations of a post-convergence search continue the same converged model."""
    from ray import tune

    path = confirm_path(experiment_path)
    configs = confirm.plan(best, seeds)
    splits = (
        "each on a fresh validation split"
        if confirm.fresh_splits(best)
        else "on the search's own validation split (its trials continue a model trained on the rest)"
    )
    console.print(
        f"Confirming the best configuration of {len(best)} variant(s) over {seeds} fresh seeds, "
        f"{splits}: {len(configs)} trials"
    )
    writer = MlflowWriter(tracker, console)
    progress = Progress(len(configs), console)
    stopper = StopOnPermanentError()
    make_live(writer, progress, stopper)
    if saved_state.saved(path):
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={
                "checkpoint_every": options.checkpoint_every,
                "checkpoint_interval_s": options.checkpoint_interval_s,
                "report_interval_s": REPORT_INTERVAL_S,
                "confirm": tune.grid_search(configs),
            },
            tune_config=tune.TuneConfig(
                max_concurrent_trials=options.concurrency,
                reuse_actors=True,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
            ),
            run_config=tune.RunConfig(
                name=path.name,
                storage_path=str(path.parent),
                callbacks=[writer, progress, JsonRows(), CsvRows()],
                failure_config=tune.FailureConfig(max_failures=options.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                stop=stopper,
                verbose=0,
            ),
        )
    with _interrupt_watch() as interrupt:
        grid = tuner.fit()
    _fill_from_grid(writer, grid)
    errors = _errors(writer, grid)
    disk = disk_paragraph(stopper.disk, stopper.disk_error, path) if stopper.disk else ""
    if writer.drain():
        tracker.settle_lost(_tune_trial_ids(grid), role="confirm")
    finals: dict[str, list[dict[str, Any]]] = {}
    val_sizes = set()
    for record in writer.records.values():
        if (final := record.final) is not None:
            finals.setdefault(record.config["variant"], []).append({
                "score": final["score"], "test_acc": final.get("test_acc"),
                "diverged": final.get("diverged"), "pair": confirm.pair_key(final["trial_config"]),
                "models": confirm.models_per_prediction(final),
            })  # fmt: skip
            val_sizes.add(final.get("val_size"))
    val_size = val_sizes.pop() if len(val_sizes) == 1 else None  # one size, else none to trust
    rows = [
        {**row, "val_size": val_size, "fresh_splits": confirm.fresh_splits(best)}
        for row in confirm.confirmation_stats(finals, val_size)
    ]
    return rows, interrupt.caught and not errors and not disk, errors, disk


def best_run_tags(best: list[dict[str, Any]], confirmed: list[dict[str, Any]]) -> dict[str, str]:
    """The search run's tags naming its answers, each with one meaning (tracking.py): the best
    search trial, the confirmed winner (only when it is better than the rest beyond noise), the
    recommended variant and the verdict in words, and the run the printed `Reproduce:` names."""
    from flatbasin.search import output

    tags = {}
    if best and best[0].get("run_id"):
        tags[BEST_SEARCH_RUN] = tags[OLD_BEST_RUN] = best[0]["run_id"]
    if confirmed:
        verdict = confirm.verdict(confirmed)
        if verdict.winner:  # better than every other variant beyond noise
            tags[WINNER] = verdict.winner
        tags[RECOMMENDED] = verdict.recommended or ""
        tags[VERDICT] = verdict.text[:5000]
    chosen = output.to_reproduce(best, output.recommended(confirmed))
    if chosen is not None and chosen.get("run_id"):
        tags[REPRODUCE_RUN] = chosen["run_id"]
    return tags


def _finish_parent(
    tracker: Tracker,
    parent: str,
    best: list[dict[str, Any]],
    grid: Any,
    confirmed: list[dict[str, Any]] | None = None,
    counts: dict[str, int] | None = None,
) -> None:
    """Summary, comparison figure and the deployed model of each variant's best trial."""
    import mlflow
    import mlflow.pytorch
    import torch

    import flatbasin.trainables
    from flatbasin.trainables.config import TrialConfig
    from flatbasin.trainables.loop import load_deployed
    from flatbasin.trainables.ray_entry import CHECKPOINT_FILE

    for row in best:
        row["run_id"] = tracker.run_id(row["trial_id"])
    summary = [{k: v for k, v in row.items() if k not in ("final", "config")} for row in best]
    # From the writer's records: reading every trial's run back from MLflow took seconds at 1,000
    counts = dict(sorted((counts or {}).items()))
    confirmed = confirmed or []
    tracker.client.log_dict(
        parent,
        {"best_per_variant": summary, "trials_per_variant": counts, "confirmed": confirmed},
        "summary.json",
    )
    answers = best_run_tags(best, confirmed)
    tracker.client.log_batch(parent, tags=[RunTag(k, v) for k, v in answers.items()])
    held = tracker.client.get_run(parent).data.tags  # a resumed search may answer otherwise now
    for stale in set(ANSWER_TAGS) & set(held) - set(answers):
        tracker.client.delete_tag(parent, stale)
    if confirmed:
        now = int(time.time() * 1000)
        tracker.client.log_batch(parent, metrics=[
            Metric(f"confirmed/{row['variant']}/{key}", float(row[key]), now, 0)
            for row in confirmed for key in ("val_mean", "val_std", "test_mean", "test_std")
        ] + [  # the validation split's size: the resolution the test assumed (the report reads it)
            Metric("confirmed/val_size", float(size), now, 0)
            for size in {row.get("val_size") for row in confirmed} if size
        ])  # fmt: skip
    if best:
        tracker.client.log_figure(
            parent, curve_figure({r["variant"]: r["final"] for r in best}), "comparison.png"
        )
        tracker.client.log_metric(parent, "best_score", best[0]["score"])
    checkpoints = {
        r.metrics.get("trial_id"): r.checkpoint for r in grid if r.checkpoint is not None
    }
    mlflow.set_tracking_uri(tracker.uri)
    # Pickle format on purpose: the ensembles' forward is not traceable to pt2 without example inputs.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    for row in best:
        if row["run_id"] is None:
            continue
        run = tracker.client.get_run(row["run_id"])
        if run.data.tags.get(MODEL_LOGGED) == "true":
            continue  # a restored search or a second sync: the model is there already
        if row["final"]["curve"]:  # drawn for the best trials only: 70 ms of CPU a figure
            figure = curve_figure({row["variant"]: row["final"]}, trial_id=row["trial_id"])
            tracker.client.log_figure(row["run_id"], figure, "curve.png")
        ckpt = checkpoints.get(row["trial_id"])
        if ckpt is None:
            continue
        config = TrialConfig.model_validate(row["final"]["trial_config"])
        with ckpt.as_directory() as folder:
            model = load_deployed(
                config.model_copy(update={"device": "cpu"}), Path(folder) / CHECKPOINT_FILE
            )
            # Its final weights too, so that a later search can continue this trial (--from RUN_ID).
            tracker.log_checkpoint(row["run_id"], Path(folder) / CHECKPOINT_FILE)
        with mlflow.start_run(run_id=row["run_id"]):
            # Explicit requirements: inferring them re-imports the model in a subprocess (seconds each).
            mlflow.pytorch.log_model(
                model, name="model", serialization_format="pickle",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"flatbasin=={flatbasin.__version__}"],
            )  # fmt: skip
        tracker.client.set_tag(row["run_id"], MODEL_LOGGED, "true")
        # start_run reopened the trial's run and closed it now: give it back its own end, so its
        # duration in the UI is the trial's, not the time until the search ended.
        tracker.client.set_terminated(row["run_id"], run.info.status, end_time=run.info.end_time)


def sync(experiment_path: Path, tracking_uri: str, console: Console) -> Outcome:
    """Write a search's results into MLflow from Tune's result files (after the server was away).

    Idempotent like every write here: runs already complete are left alone, missing epochs are added.
    """
    from ray import tune

    from flatbasin.trainables import ray_entry

    experiment_path = experiment_path.expanduser().resolve()
    if not saved_state.check(experiment_path, command="sync"):  # before MLflow is touched
        raise UsageError(f"no search at {experiment_path} (a Tune folder such as runs/NAME)")
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)  # the writer says it
    tracker = Tracker(tracking_uri, experiment_path.name, search_key=str(experiment_path))
    tracker.check()
    parent = tracker.parent()
    mend_results(experiment_path)
    grid = tune.Tuner.restore(str(experiment_path), ray_entry.trainable).get_results()
    writer = MlflowWriter(tracker, console)
    _fill_from_grid(writer, grid)
    best = _best_per_variant(writer)
    errors = _errors(writer, grid)
    outcome = Outcome(
        experiment_path.name, experiment_path, best, parent, 0,
        interrupted=bool(_unfinished(grid)) and not errors, errors=errors,
    )  # fmt: skip
    if writer.drain():
        tracker.settle_lost(_tune_trial_ids(grid))
        _finish_parent(tracker, parent, best, grid, counts=_count_variants(writer))
        tracker.end_parent(outcome.state)
    return dataclasses.replace(
        outcome, unwritten=len(writer.unwritten), trials_per_variant=_count_variants(writer),
        store=_lasting_failure(writer),
    )  # fmt: skip
