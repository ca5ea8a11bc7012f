"""Running a search: every check the driver can make before Ray starts, the search's run in MLflow,
the trials through Tune, the confirmation, and what it all ended with (an Outcome)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from rich.console import Console

import flatbasin.search.post_convergence as post_convergence
import flatbasin.search.preflight as preflight
import flatbasin.search.saved_state as saved_state
from flatbasin.search.callbacks import MlflowWriter, Progress, StopOnPermanentError, make_live
from flatbasin.search.cluster import check_cluster
from flatbasin.search.confirm_run import run_confirmation
from flatbasin.search.errors import stderr
from flatbasin.search.finish import finish_parent
from flatbasin.search.options import Outcome, SearchOptions, search_state
from flatbasin.search.quiet import quiet_libraries
from flatbasin.search.ray_start import init_ray
from flatbasin.search.recovery import DiskFailure, disk_paragraph
from flatbasin.search.resume import check_new_or_resumable, resume_command
from flatbasin.search.signals import interrupt_watch
from flatbasin.search.store import TrackingUnavailable
from flatbasin.search.tracking import Tracker
from flatbasin.search.tune_logs import filter_tune_logs
from flatbasin.search.tune_results import (
    best_per_variant,
    count_variants,
    fill_from_grid,
    lasting_failure,
    ran_out_of_time,
    trial_errors,
    tune_trial_ids,
)
from flatbasin.search.tuner import make_trainable, runtime_settings, search_tuner
from flatbasin.spaces import Space
from flatbasin.trainables.files import disk_problem


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
    filter_tune_logs()
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
    for warning in preflight.check_trials(
        start.space if start else space, local=local, notes=notes
    ):
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
                    init_ray(None)
                    parent = made.result()
            else:  # nothing is recorded until the cluster is known to reach the store and storage
                init_ray(target.address, space.settings.get("code_dir"))
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
    name = experiment_path.name
    trainable = make_trainable(options, start_weights)
    writer = MlflowWriter(tracker, console)
    progress = Progress(samples, console)
    stopper = StopOnPermanentError()
    make_live(writer, progress, stopper)  # a restored Tuner gets these objects back, not copies
    tuner = search_tuner(
        space, options, experiment_path, samples, trainable, writer, progress, stopper
    )
    fit_started = time.perf_counter()
    with interrupt_watch() as interrupt:
        grid = tuner.fit()
    fit_ended = time.perf_counter()

    fill_from_grid(writer, grid, stopped_by=stopper.error)
    best = best_per_variant(writer)
    errors = trial_errors(writer, grid)
    disk = disk_paragraph(stopper.disk, stopper.disk_error, experiment_path) if stopper.disk else ""
    interrupted = interrupt.caught and not errors and not disk
    out_of_time = ran_out_of_time(options, writer, samples, fit_ended - fit_started)
    written = writer.drain()
    confirmed: list[dict[str, Any]] = []
    seeds = options.confirm_seeds if options.confirm_seeds is not None else space.confirm_seeds
    confirm_started = time.perf_counter()
    if seeds and best and not interrupted and not errors and not disk and not out_of_time:
        confirmed, interrupted, errors, disk = run_confirmation(
            tracker, console, options, experiment_path, best, seeds, trainable
        )
    confirm_ended = time.perf_counter()
    state = search_state(bool(errors or disk), interrupted, bool(out_of_time))
    if written and (lost := tracker.settle_lost(tune_trial_ids(grid))):
        console.print(
            f"note: {lost} trial run(s) of an earlier driver that was killed outright were never "
            "saved by Tune (their places ran again); they are marked lost in MLflow",
            style="yellow",
        )
    if written:
        finish_parent(tracker, parent, best, grid, confirmed, count_variants(writer))
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
        trials_per_variant=(counts := count_variants(writer)),
        untried=[] if interrupted else [v for v in space.variants if v not in counts],
        out_of_time=out_of_time, disk=disk, store=lasting_failure(writer),
    )  # fmt: skip
