"""Post-convergence search (`--from SOURCE`): every trial continues one converged model, searching
only the tail. Why: for the question a user asks of cyclic_average, swa or fge (which tail, which
learning rates, how many cycles) the base phase is the same in every trial; training it once saves
half or more of a search.

SOURCE is `base` (train the base phase once, recorded as the search's base run), an MLflow run
that kept its weights (checkpoint.pt: each variant's best trial, base runs, reproductions) or a
checkpoint file written by `flatbasin train --checkpoint`. Every source is checked before Ray starts
(it exists, reads, was trained on the same data split, fits the model); the weights go into Ray's
object store once, and each trial's config names them by their SHA-256.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import ValidationError
from rich.console import Console

from flatbasin.search.credentials import redact_uri
from flatbasin.search.errors import UsageError, describe
from flatbasin.search.store import TrackingUnavailable, read_store
from flatbasin.search.tags import BASE_RUN, CHECKPOINT_ARTIFACT, FROM_SHA, ROLE
from flatbasin.search.tracking import Tracker
from flatbasin.search.tracking_uri import sqlite_file
from flatbasin.spaces import Space, SpaceError
from flatbasin.spaces.loader import BASE, CHECKING, RUN_ID
from flatbasin.trainables.checkpoint import CheckpointError
from flatbasin.trainables.config import TrialConfig, code_in, make_config
from flatbasin.trainables.memory import OutOfMemory
from flatbasin.trainables.start import (
    Converged,
    StartPoint,
    Weights,
    data_differences,
    read_converged,
)

if TYPE_CHECKING:
    from flatbasin.search.options import SearchOptions


class BaseFailed(RuntimeError):
    """Training the base phase failed (an error on its node, or a loss that turned non-finite)."""


@dataclass(frozen=True)
class Source:
    text: str  # as the user gave it; a checkpoint file made absolute
    kind: Literal["base", "run", "file"]

    @property
    def path(self) -> Path | None:
        return Path(self.text) if self.kind == "file" else None


def parse_source(text: str) -> Source:
    """`base`, an existing file, a 32-hex MLflow run id, or else a file (that may not exist)."""
    text = text.strip()
    if text == BASE:
        return Source(text, "base")
    path = Path(text).expanduser()
    if not path.exists() and RUN_ID.fullmatch(text):
        return Source(text, "run")
    return Source(str(path.resolve()), "file")


@dataclass(frozen=True)
class Plan:
    """What the driver settles before Ray starts; `begin` finishes it once the search's run is."""

    source: Source
    space: Space  # tail only, its corners checked
    left_out: dict[str, list[str]]  # per variant: settings of the base phase, not searched
    converged: Converged | None  # None: the base is yet to be trained
    run_id: str | None  # the MLflow run that holds the weights (source run, or an earlier base run)
    base: TrialConfig | None  # from base: the base phase to train


def plan(space: Space, text: str | None, tracker: Tracker, resume: bool) -> Plan | None:
    """Resolve and check SOURCE (--from wins over the space's `from:`); None for a plain search."""
    text = text or space.start_from
    earlier = _earlier_source(tracker) if resume else None
    if resume and earlier is not None and earlier[0] != (text and parse_source(text).text):
        was = earlier[0]
        raise UsageError(
            "--resume: this search "
            + (
                f"continues the converged model {was}; resume it with --from {was}"
                if was
                else "trains every trial from scratch; resume it without --from"
            )
        )
    if text is None:
        return None
    source = parse_source(text)
    where = f"--from {text}" if text != space.start_from else f"{space.where}: from: {text}"
    try:
        tail, left_out = space.continuing(CHECKING)
    except SpaceError as err:
        raise UsageError(str(err)) from err
    run_id = None
    converged = None
    base = None
    if source.kind == "base":
        base = space.base_config()
        _check_base(base, space)
        run_id = tracker.base_run() if resume else None
        if run_id is not None:
            converged = _from_run(tracker.client, tracker.uri, run_id, where)
    elif source.kind == "run":
        _check_store(tracker.uri, where)
        run_id = source.text
        converged = _from_run(tracker.client, tracker.uri, run_id, where)
    else:
        converged = _from_file(source.text, where)
        run_id = tracker.base_run() if resume else None  # the copy this search recorded
    if converged is not None:
        # The client only when there is a run to read: making one creates a SQLite store.
        recorded = _fingerprint(tracker.client, run_id) if run_id else None
        check_fits(converged, tail.corner_configs(), where, recorded)
        if earlier is not None and earlier[1] and earlier[1] != converged.sha256:
            raise UsageError(
                f"--resume: {where} holds other weights than the ones this search continues "
                f"(sha256 {converged.sha256[:12]}, the search's {earlier[1][:12]})"
            )
    return Plan(source, tail, left_out, converged, run_id, base)


def begin(
    plan: Plan, tracker: Tracker, options: SearchOptions, console: Console
) -> tuple[Space, Weights]:
    """Inside the search (Ray up, its run made): train the base once, or record the file it came
    from, as the search's base run. Returns the space whose trials continue it, and its weights."""
    converged, run_id = plan.converged, plan.run_id
    if plan.source.kind == "base" and converged is None:
        assert plan.base is not None
        converged, run_id = _train_base(plan.base, tracker, options, console)
    elif plan.source.kind == "file" and run_id is None:
        assert plan.source.path is not None
        run_id = tracker.record_base(plan.source.path, plan.source.text, result=None)
    assert converged is not None and run_id is not None
    start = StartPoint(
        source=plan.source.text, sha256=converged.sha256, run_id=run_id,
        path=plan.source.text if plan.source.kind == "file" else None, epochs=converged.epochs,
    )  # fmt: skip
    tracker.client.set_tag(tracker.parent(), BASE_RUN, run_id)
    tracker.client.set_tag(tracker.parent(), FROM_SHA, converged.sha256)
    console.print(
        f"Post-convergence: every trial continues {_what(plan.source)} (MLflow run {run_id}, "
        f"{converged.epochs} epochs, sha256 {converged.sha256[:12]}) and searches the tail only"
        + (
            "; not searched, as they shape only the base phase: "
            + "; ".join(f"{variant} {', '.join(keys)}" for variant, keys in plan.left_out.items())
            if plan.left_out
            else ""
        )
    )
    return dataclasses.replace(plan.space, start=start.model_dump(mode="json")), converged.weights


def continue_config(
    variant: str, settings: dict[str, Any], text: str, tracking_uri: str
) -> tuple[TrialConfig, Weights, str]:
    """`flatbasin train --from SOURCE`: the one trial continuing SOURCE (its settings checked as a
    tail: a converged start has no base phase), its weights, and a line saying what it continues."""
    source = parse_source(text)
    where = f"--from {text}"
    if source.kind == "base":
        raise UsageError(
            "--from base: `base` is a search's (the base phase is trained once for all its "
            "trials); for one trial, train the base first, e.g. `flatbasin train --variant sgd "
            "--checkpoint base.pt`, then continue it with --from base.pt (or an MLflow run id)"
        )
    draft = _config(variant, settings, StartPoint.model_validate(CHECKING))
    run_id = source.text if source.kind == "run" else None
    if run_id is not None:
        try:
            client = read_store(tracking_uri)
        except TrackingUnavailable as err:
            raise UsageError(f"{where}: {err}") from err
        converged = _from_run(client, tracking_uri, run_id, where)
        fingerprint = _fingerprint(client, run_id)
    else:
        converged, fingerprint = _from_file(source.text, where), None
    check_fits(converged, [draft], where, fingerprint)
    start = StartPoint(
        source=source.text, sha256=converged.sha256, run_id=run_id,
        path=source.text if run_id is None else None, epochs=converged.epochs,
    )  # fmt: skip
    config = _config(variant, settings, start)
    unused = sorted(config.build_variant().base_only)
    line = (
        f"continuing {_what(source)} ({converged.epochs} epochs trained, sha256 "
        f"{converged.sha256[:12]}): the {config.epochs} epochs are the "
        + (
            f"tail's ({', '.join(unused)}: unused, they shape the base phase)"
            if unused
            else f"{config.variant} schedule's, from those weights"
        )
    )
    return config, converged.weights, line


def _config(variant: str, settings: dict[str, Any], start: StartPoint) -> TrialConfig:
    try:
        return make_config(variant, code_in(settings, Path.cwd()), start=start)
    except ValidationError as err:
        raise UsageError(f"invalid settings for variant '{variant}':\n{describe(err)}") from err
    except ValueError as err:
        raise UsageError(str(err)) from err


def check_fits(
    converged: Converged,
    configs: Iterable[TrialConfig],
    where: str,
    fingerprint: str | None = None,
) -> None:
    """The converged model was trained on this data split and loads into every model the trials
    build.

    A model trained on another split has seen validation examples the trials are scored on; one of
    another architecture cannot be continued at all.
    """
    from flatbasin.trainables.data import load_data
    from flatbasin.trainables.data_spec import DataError
    from flatbasin.trainables.sanity import TrialError, build

    seen: set[tuple[object, ...]] = set()
    try:
        for config in configs:
            key = (config.data_spec, config.model, config.dropout)
            if key in seen:
                continue
            seen.add(key)
            differing = data_differences(converged.config, config.model_dump(mode="json"))
            if differing:
                raise UsageError(
                    f"{where}: trained on other data than these trials: {', '.join(differing)}; "
                    "a model continued on another split would be scored on examples it trained on"
                )
            try:
                data = load_data(config.data_spec, "cpu")
                model = build(config, data)
            except (DataError, TrialError) as err:
                raise UsageError(f"{where}: {err}") from err
            if fingerprint is not None and fingerprint != data.fingerprint:
                raise UsageError(
                    f"{where}: trained on other data than these trials (data fingerprint "
                    f"{fingerprint}, now {data.fingerprint}): the files under data_dir changed"
                )
            try:
                model.load_state_dict(converged.weights)
            except RuntimeError as err:
                trained = converged.config.get("model", "?")
                first = str(err).strip().splitlines()[0]
                raise UsageError(
                    f"{where}: its model does not fit these trials' (trained as model "
                    f"{trained!r}, now {config.model!r}): {first}"
                ) from err
    finally:
        load_data.cache_clear()  # the workers load their own copy; the driver keeps none


def _what(source: Source) -> str:
    return {"base": "the base trained once", "run": f"run {source.text}",
            "file": f"checkpoint {source.text}"}[source.kind]  # fmt: skip


def _earlier_source(tracker: Tracker) -> tuple[str | None, str | None] | None:
    """(the `from` an earlier search of this name recorded, the SHA-256 it continued), or None."""
    parent = tracker.find_parent()
    if parent is None:
        return None
    run = tracker.client.get_run(parent)
    return run.data.params.get("from"), run.data.tags.get(FROM_SHA)


def _check_base(base: TrialConfig, space: Space) -> None:
    """The base phase can run on the space's data and model (before Ray, like every trial)."""
    from flatbasin.trainables.data import load_data
    from flatbasin.trainables.data_spec import DataError
    from flatbasin.trainables.sanity import TrialError, check_trial

    try:
        check_trial(base, load_data(base.data_spec, "cpu"))
    except (DataError, TrialError) as err:
        raise UsageError(f"{space.where}: base: {err}") from err
    finally:
        load_data.cache_clear()


def _check_store(uri: str, where: str) -> None:
    """A SQLite store that does not exist holds no run; asking it would make the file."""
    path = sqlite_file(uri)
    if path is not None and not path.is_file():
        raise UsageError(
            f"{where}: no such MLflow run: {redact_uri(uri)} holds no runs yet (no {path})"
        )


def _from_run(client: MlflowClient, uri: str, run_id: str, where: str) -> Converged:
    """The weights a run kept (checkpoint.pt), read through a temporary folder."""
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise UsageError(f"{where}: no such MLflow run at {redact_uri(uri)}") from err
    names = {a.path for a in client.list_artifacts(run_id)}
    if CHECKPOINT_ARTIFACT not in names:
        role = run.data.tags.get(ROLE, "no flatbasin role")
        raise UsageError(
            f"{where}: the run ({role}) kept no weights ({CHECKPOINT_ARTIFACT}); MLflow keeps them "
            "for each variant's best trial, base runs and reproductions: make one with `flatbasin "
            f"reproduce {run_id}` and continue the reproduction's run, or pass a checkpoint file"
        )
    with tempfile.TemporaryDirectory(prefix="flatbasin-from-") as folder:
        path = Path(client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, folder))
        try:
            return read_converged(path)
        except CheckpointError as err:
            raise UsageError(
                f"{where}: {str(err).replace(str(path), CHECKPOINT_ARTIFACT)}"
            ) from err


def _from_file(text: str, where: str) -> Converged:
    try:
        return read_converged(Path(text))
    except CheckpointError as err:
        raise UsageError(f"{where}: {err}") from err


def _joined() -> bool:
    """Whether this driver joined a cluster rather than starting a Ray of its own (ray_start.init_ray
    sets $RAY_ADDRESS exactly then: from --address, or as Ray sets it inside a job)."""
    import os

    return bool(os.environ.get("RAY_ADDRESS"))


def _fingerprint(client: MlflowClient, run_id: str | None) -> str | None:
    """The data fingerprint a run recorded (trials and trained bases do), to compare with ours."""
    if run_id is None:
        return None
    return client.get_run(run_id).data.tags.get("flatbasin.data_fingerprint")


def _train_base(
    config: TrialConfig, tracker: Tracker, options: SearchOptions, console: Console
) -> tuple[Converged, str]:
    """The base phase, once. On a cluster (or a GPU) it is a Ray task with a trial's resources,
    which a lost node retries; a local CPU search trains it here, in the driver, which has torch and
    the data at hand already (a fresh Ray worker first spends seconds importing them: 11.1 s against
    4.6 s for a 2-epoch digits base, measured), while no trial runs yet to compete for the CPUs."""
    import ray

    from flatbasin.trainables.ray_entry import train_base

    console.print(
        f"Training the base once: {config.variant}, {config.epochs} epochs, lr {config.lr:g}, "
        f"{config.params.model_dump().get('schedule', '')} schedule, seed {config.seed}"
    )
    here = options.gpus_per_trial == 0 and not _joined()
    try:
        if here:
            result, blob = train_base(config.model_dump(mode="json"))
        else:
            task = ray.remote(
                num_cpus=options.cpus_per_trial, num_gpus=options.gpus_per_trial,
                max_retries=options.max_failures,
            )(train_base)  # fmt: skip
            result, blob = ray.get(task.remote(config.model_dump(mode="json"), options.passed))
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if err.cause is not None else err
        raise BaseFailed(f"the base phase failed: {type(cause).__name__}: {cause}") from err
    except (ValueError, OutOfMemory) as err:  # DataError, TrialError: as the task would raise
        raise BaseFailed(f"the base phase failed: {type(err).__name__}: {err}") from err
    if result["diverged"] or not blob:
        raise BaseFailed(
            f"the base phase diverged at epoch {len(result['history'])} (its loss is not finite); "
            f"lower base: lr (now {config.lr:g})"
        )
    with tempfile.TemporaryDirectory(prefix="flatbasin-base-") as folder:
        path = Path(folder) / CHECKPOINT_ARTIFACT
        path.write_bytes(blob)
        converged = read_converged(path)
        run_id = tracker.record_base(path, BASE, result)
    console.print(
        f"Base: val acc {result['score']:.4f}, test acc {result['test_acc']:.4f} in "
        f"{result['seconds']['total']:.1f} s; MLflow run {run_id}"
    )
    return converged, run_id
