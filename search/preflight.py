"""What the driver checks before Ray starts: where results go, which Ray to use, what a trial asks of
the machine, and that every trial the space can produce can run on its data and model.

Each check raises UsageError with the option, file or setting named, so a bad input costs seconds and
leaves nothing behind: no Ray, no MLflow run, no folder.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from flatbasin.search.errors import UsageError
from flatbasin.spaces import Space

PROBE_TIMEOUT_S = 3.0


def check_storage(storage: Path) -> None:
    """--storage must be a folder we can create or write into (not a file, not read-only)."""
    check_folder(storage, f"--storage {storage}", "give a folder for Tune's results")


def check_folder(folder: Path, what: str, advice: str) -> None:
    """`folder` exists as a folder we can write into, or can be made. `what` starts the message."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe == folder and not folder.is_dir():
        raise UsageError(f"{what}: is a file, not a folder; {advice}")
    if probe != folder and not probe.is_dir():
        raise UsageError(f"{what}: {probe} is a file, so the folder cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{what}: {probe} is not writable")
    try:  # root passes os.access everywhere, and /proc or a read-only mount still refuse: try it
        tempfile.TemporaryDirectory(dir=probe, prefix=".flatbasin-probe-").cleanup()
    except OSError as err:
        raise UsageError(
            f"{what}: cannot create a folder in {probe} ({err.strerror or err})"
        ) from err


def writable_file(option: str, path: Path) -> None:
    """A file a command will write: its folder must exist and take files; it may not be a folder."""
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name")
    folder = path.expanduser().absolute().parent
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UsageError(f"{option} {path}: {folder} {what}")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{option} {path}: cannot write there (permission denied)")


# Ray's longest socket path: {temp}/session_{date and time, 26 characters}_{pid}/sockets/plasma_store
SOCKET_PATH_MAX = 107  # bytes, what AF_UNIX allows on Linux


def check_local_ray() -> None:
    """What a new local Ray writes before it can start: its temporary folder (whose socket paths
    must be short) and, unless token authentication is off or given, ~/.ray for its token."""
    from ray._common.utils import get_default_ray_temp_dir

    source = next((f"${v}" for v in ("RAY_TMPDIR", "TMPDIR") if os.environ.get(v)), "/tmp")
    temp = Path(get_default_ray_temp_dir())
    socket_path = f"{temp}/session_{'0' * 26}_{os.getpid()}/sockets/plasma_store"
    if len(os.fsencode(socket_path)) > SOCKET_PATH_MAX:
        raise UsageError(
            f"Ray's temporary folder {temp} (under {source}) is too long: its socket paths would "
            f"take {len(os.fsencode(socket_path))} bytes, over the {SOCKET_PATH_MAX} a Unix socket "
            "allows; set RAY_TMPDIR to a short folder, e.g. /tmp/ray-$USER"
        )
    check_folder(temp, f"Ray's temporary folder {temp} (under {source})", "set RAY_TMPDIR")
    token_given = any(os.environ.get(v) for v in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"))
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or token_given:
        return
    try:
        token = Path.home() / ".ray" / "auth_token"
    except RuntimeError as err:  # no $HOME and no home in the password database
        raise UsageError(
            f"Ray keeps its authentication token in ~/.ray, but there is no home folder ({err}); "
            "set HOME to a writable folder"
        ) from err
    if not token.exists():
        check_folder(
            token.parent,
            f"Ray keeps its authentication token in {token.parent} (from HOME)",
            "set HOME to a writable folder",
        )


def check_local_resources(cpus_per_trial: float, gpus_per_trial: float) -> None:
    """A local search runs on this machine: a trial may not ask for more than it has."""
    cpus = os.cpu_count() or 1
    if cpus_per_trial > cpus:
        raise UsageError(
            f"--cpus-per-trial {cpus_per_trial:g}: this machine has {cpus} CPU(s); "
            "a trial asking for more would wait forever"
        )
    if gpus_per_trial > 0:
        import torch

        gpus = torch.cuda.device_count()
        if gpus_per_trial > gpus:
            raise UsageError(
                f"--gpus-per-trial {gpus_per_trial:g}: this machine has {gpus} CUDA GPU(s)"
                + ("; run without --gpus-per-trial to train on the CPU" if gpus == 0 else "")
            )


@dataclass(frozen=True)
class RayTarget:
    """Which Ray the search runs on: a new local one (address None) or a cluster, and who said so."""

    address: str | None
    source: str  # "--address", "$RAY_ADDRESS" or "local"


def ray_target(address: str | None) -> RayTarget:
    """--address wins; else $RAY_ADDRESS, as Ray users expect; else a new local Ray, never a cluster
    that Ray's current-cluster file happens to name. A cluster address must answer within seconds."""
    if address:
        target = RayTarget(address, "--address")
    elif os.environ.get("RAY_ADDRESS"):
        target = RayTarget(os.environ["RAY_ADDRESS"], "$RAY_ADDRESS")
    else:
        return RayTarget(None, "local")
    if target.address == "local":
        return RayTarget(None, target.source)
    bootstrap = target.address
    if bootstrap == "auto":
        # As Ray reads it: $RAY_ADDRESS (set inside a Ray job), else the last `ray start` here.
        bootstrap = os.environ.get("RAY_ADDRESS") or _current_cluster()
        if bootstrap is None:
            raise UsageError(
                f"{target.source} auto: no Ray cluster was started on this machine (no current-cluster "
                "file); start one with `ray start --head`, or leave out the address for a local search"
            )
    if bootstrap.startswith(("http://", "https://")):
        raise UsageError(
            f"{target.source} {target.address}: that is a dashboard (Jobs API) address, which "
            "`flatbasin submit` takes; a search joins a cluster at its GCS address HOST:6379 or auto"
        )
    host, port = _host_port(bootstrap, target)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as err:
        came_from = f" (found through auto: {bootstrap})" if target.address == "auto" else ""
        raise UsageError(
            f"{target.source} {target.address}{came_from}: no Ray cluster answers at {host}:{port} "
            f"({err.strerror or type(err).__name__}); start the cluster, correct the address, "
            "or unset it for a local search"
        ) from err
    return RayTarget(bootstrap if target.address == "auto" else target.address, target.source)


def _current_cluster() -> str | None:
    """The address `ray start` last wrote on this machine (what `auto` means to Ray)."""
    try:
        from ray._private.utils import read_ray_address

        return read_ray_address() or None
    except (ImportError, OSError):
        return None


def _host_port(address: str, target: RayTarget) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise UsageError(
            f"{target.source} {target.address}: expected HOST:PORT (the GCS address, e.g. "
            "127.0.0.1:6379), ray://HOST:PORT or auto"
        )
    return parts.hostname, port


def check_trials(space: Space, *, local: bool) -> list[str]:
    """Load the data and build the model of every distinct trial setting at the corners of the space,
    check each trial can run on them (classes, batch size, input shape, and whatever the variant
    needs of the model: prior_guided's focus library must have been fitted on its conv layers), and
    that each distinct data and model can learn at all: a sensible loss at initialisation and one
    small batch memorised (sanity.check_learns, about a second each). Returns warnings for what is
    only suspicious.

    On a cluster a data_dir or a variant's file (a focus library) this machine does not have is left
    to the nodes: the trial checks it where it runs and reports a permanent error, not retried.
    """
    from flatbasin.trainables.data import DataError, load_data
    from flatbasin.trainables.sanity import TrialError, check_learns, check_trial
    from flatbasin.trainables.variants import REGISTRY

    seen: set[tuple[object, ...]] = set()
    learned: set[tuple[object, ...]] = set()  # the learning check ignores batch size and dropout
    warnings: list[str] = []
    try:
        for config in space.corner_configs():
            spec = config.data_spec
            # What decides whether the variant can train the model (prior_guided: its focus
            # library and the layers it updates) is part of the key: a library that does not fit
            # the model is refused here, before Ray starts.
            fits = tuple(
                (k, str(getattr(config.params, k))) for k in REGISTRY[config.variant].model_params
            )
            key = (spec, config.model, config.batch_size, config.dropout, config.init, fits)
            if key in seen:
                continue
            seen.add(key)
            if config.device == "cuda" and local:
                import torch

                if not torch.cuda.is_available():
                    raise UsageError(
                        f"{space.path}: device: cuda, but this machine has no CUDA device"
                    )
            if not local and spec.data_dir is not None and not spec.data_dir.expanduser().exists():
                continue
            files = [Path(getattr(config.params, k)) for k in REGISTRY[config.variant].file_params]
            if not local and not all(f.expanduser().exists() for f in files):
                continue
            try:
                data = load_data(spec, "cpu")
                check_trial(config, data)
                if (spec, config.model, config.init) not in learned:
                    learned.add((spec, config.model, config.init))
                    found = check_learns(config, data)
                    warnings += [f"{space.path}: variants.{config.variant}: {w}" for w in found]
            except (DataError, TrialError) as err:
                raise UsageError(f"{space.path}: variants.{config.variant}: {err}") from err
    finally:
        load_data.cache_clear()  # the workers load their own copy; the driver keeps none
    return warnings
