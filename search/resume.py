"""A search's identity on disk and in MLflow: new or resumable (of the same space), its Tune folders,
and the exact command (or Python call) that resumes it."""

from __future__ import annotations

import shlex
from pathlib import Path

import flatbasin.search.saved_state as saved_state
from flatbasin.search.credentials import redact_uri
from flatbasin.search.errors import UsageError
from flatbasin.search.options import SearchOptions
from flatbasin.search.post_convergence import parse_source
from flatbasin.search.tracking import Tracker
from flatbasin.spaces import Space


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
        args += ["--from", parse_source(options.start_from).text]
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
        args.append(f"start_from={parse_source(options.start_from).text!r}")
    if options.soup is not None:
        args.append(f"soup={options.soup}")
    for option, key in (("model", "model"), ("data", "dataset")):
        if key in space.overridden:
            value = str(space.settings[key])
            shown = value.partition(":")[2] if value in options.passed else repr(value)
            args.append(f"{option}={shown}")
    return f"flatbasin.search({', '.join(args)}, resume=True)"


def experiment_folder(space: Space, options: SearchOptions) -> Path:
    """Tune's folder of this search."""
    return options.storage.expanduser().resolve() / (options.name or space.name)


def resumable(space: Space, options: SearchOptions) -> bool:
    """Whether Tune saved enough of this search for --resume to continue it."""
    return saved_state.saved(experiment_folder(space, options))


def confirm_path(experiment_path: Path) -> Path:
    """The confirmation runs' Tune experiment, beside the search's."""
    return experiment_path.with_name(f"{experiment_path.name}.confirm")
