"""What the driver checks before Ray starts: where results go, which Ray to use, what a trial asks of
the machine, and that every trial the space can produce can run on its data and model.

Each check raises UsageError with the option, file or setting named, so a bad input costs seconds and
leaves nothing behind: no Ray, no MLflow run, no folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from flatbasin.search.errors import UsageError
from flatbasin.spaces import Space
from flatbasin.trainables.files import not_a_file

if TYPE_CHECKING:
    from flatbasin.trainables.config import TrialConfig
    from flatbasin.trainables.footprint import Footprint

PROBE_TIMEOUT_S = 3.0


def check_storage(storage: Path) -> None:
    """--storage must be a folder we can create or write into (not a file, not read-only)."""
    check_folder(storage, f"--storage {storage}", "give a folder for Tune's results")


@contextlib.contextmanager
def only_search(storage: Path, name: str) -> Iterator[None]:
    """Hold the search's lock (storage/.NAME.lock, an flock, let go when the process ends however it
    ends) while it runs; a second driver of the same search is refused, naming the first."""
    storage.mkdir(parents=True, exist_ok=True)
    with open(storage / f".{name}.lock", "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UsageError(
                f"a search named '{name}' is running in {storage} right now ({holder}); wait for "
                "it to end (then --resume continues it if it stops early), or start this one with "
                "--name NEW_NAME"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield


def check_folder(folder: Path, what: str, advice: str) -> None:
    """`folder` exists as a folder we can write into, or can be made. `what` starts the message."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe == folder and not folder.is_dir():
        raise UsageError(f"{what}: is {not_a_file(folder) or 'a file'}, not a folder; {advice}")
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
    """A file a command will write: its folder must exist and take files; what is there already must
    be a regular file (the write renames a new file over it: a device, a pipe, a socket or a
    folder, or a link to one, is refused)."""
    kind = not_a_file(path)
    if kind is not None:
        raise UsageError(f"{option} {path}: is {kind}, not a regular file; give a file name")
    folder = path.expanduser().absolute().parent
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UsageError(f"{option} {path}: {folder} {what}")
    if not takes_files(folder) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{option} {path}: cannot write there (permission denied)")


def takes_files(folder: Path) -> bool:
    """Whether a file can be made in `folder`, found by making (and removing) one: os.access says
    yes to root for folders that take no file, such as /proc, and knows nothing of read-only mounts."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".flatbasin-probe-"):
            return True
    except OSError:
        return False


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


# Ray counts a fractional resource in steps of 1/10,000 of a unit.
RAY_RESOURCE_STEP = 10_000
# A share of a GPU may leave at most this much of it unused by the trials it packs.
MAX_UNUSED_SHARE = 0.01


def check_gpu_share(gpus_per_trial: float) -> float:
    """--gpus-per-trial must pack whole trials onto GPUs, or name whole GPUs.

    A share below 1 says how many trials share a GPU: 1/share of them, which must be a whole
    number. Ray accepts any share and places trials while their shares add up to at most 1, so 0.3
    runs three trials per GPU and leaves a tenth of it to nobody, while 0.34 runs only two; what was
    meant is 1/3 (0.3333) or 0.25, and it is better said. Values whose trials leave less than 1% of
    a GPU unused pass (0.333 for a third), as long as Ray, counting in steps of 1/10,000, still fits
    them all (0.3334 does not: three of them are more than one GPU). Above 1, only whole GPUs: a
    trial trains on one device, so a share of a second GPU would sit idle.
    """
    if gpus_per_trial == 0:
        return gpus_per_trial
    return check_share(
        gpus_per_trial,
        "GPU",
        "a trial trains on one device: give a share of one GPU (0.5, 0.25, ...) or whole GPUs",
    )


def check_cpu_share(cpus_per_trial: float) -> float:
    """--cpus-per-trial: the same rule as a GPU's share. A trial's torch threads are whole (the
    CPUs it holds, at least one): below one CPU, 1/N of a CPU lets N trials share a core, each with
    one thread, and Ray, counting in steps of 1/10,000, refuses anything finer than 0.0001 only once
    it has started; above one, a fraction (1.5) would run one thread and hold half a CPU idle."""
    return check_share(
        cpus_per_trial,
        "CPU",
        "a trial runs whole torch threads (1.5 CPUs would run 1 and hold half a CPU idle): give "
        "whole CPUs, or 1/N of one (0.5, 0.25, ...) for N trials sharing a core",
    )


def check_share(share: float, unit: str, above_one: str) -> float:
    """A positive amount of a resource per trial: whole units, or 1/N of one unit (see
    check_gpu_share). `above_one` says why a fraction above one unit is refused."""
    if not math.isfinite(share) or share <= 0:
        raise ValueError(f"{share:g} is not a positive number of {unit}s")
    if share >= 1 and float(share).is_integer():
        return share
    if share > 1:
        raise ValueError(f"{share:g} is more than one {unit} but not a whole number; {above_one}")
    if round(share * RAY_RESOURCE_STEP) == 0:
        raise ValueError(f"{share:g} is below the smallest share Ray counts (0.0001)")
    fitted = _ray_fits(share)
    unused = 1 - fitted * share
    if unused > MAX_UNUSED_SHARE:
        near = " or ".join(f"{1 / k:.4g} ({k} per {unit})" for k in sorted({fitted, fitted + 1}))
        raise ValueError(
            f"{share:g} does not divide a {unit} into whole trials: Ray would fit {fitted} "
            f"trial(s) on a {unit} and leave {unused:.0%} of it unused; give 1/N of a {unit}, "
            f"such as {near}"
        )
    return share


def _ray_fits(share: float) -> int:
    """Trials of this share Ray places on one unit (a GPU, a CPU)."""
    return RAY_RESOURCE_STEP // round(share * RAY_RESOURCE_STEP)


def trials_per_gpu(gpus_per_trial: float, concurrency: int) -> int:
    """How many trials may share one GPU at once: as many as Ray fits (1/share, see
    check_gpu_share), and never more than run at once in the whole search."""
    if gpus_per_trial == 0 or gpus_per_trial >= 1:
        return int(gpus_per_trial > 0)
    return min(_ray_fits(gpus_per_trial), concurrency)


@dataclass(frozen=True)
class Gpu:
    """What the packing check needs to know about the GPU the trials share."""

    name: str
    total_bytes: int
    bf16: bool  # runs bf16 natively (compute capability 8.0 or later)


def local_gpu() -> Gpu | None:
    """The smallest CUDA GPU on this machine (a trial may land on any), or None without one. Read
    from the device properties, which create no CUDA context: torch.cuda.mem_get_info would, and the
    driver would hold half a gigabyte of the GPU the trials need for the whole search."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return None
    smallest = min(
        (torch.cuda.get_device_properties(i) for i in range(count)), key=lambda p: p.total_memory
    )
    return Gpu(smallest.name, smallest.total_memory, smallest.major >= 8)


def check_gpu_packing(space: Space, gpus_per_trial: float, concurrency: int, gpu: Gpu) -> None:
    """Refuse, before Ray starts, a packing of trials per GPU whose memory cannot fit on `gpu`.

    Every corner of the space is estimated (trainables/footprint.py: weights, gradients, optimiser
    state, the averager's copies, the resident data set, one training or evaluation batch, the
    CUDA context); the largest, times the trials that may share one GPU at once, must fit in the
    GPU's memory. The model is probed once per data set, model, optimiser and precision (about a
    second each on a CPU); batch size and variant parameters are arithmetic on the probe.
    """
    import torch

    from flatbasin.trainables.accel import EVAL_BATCH_CUDA, autocast_dtype
    from flatbasin.trainables.data import load_data
    from flatbasin.trainables.footprint import footprint, probe
    from flatbasin.trainables.memory import memory_advice, size

    sharing = trials_per_gpu(gpus_per_trial, concurrency)
    cuda = torch.device("cuda")
    probes: dict[tuple[object, ...], Any] = {}
    worst: tuple[int, TrialConfig, Footprint] | None = None
    try:
        for config in space.corner_configs():
            try:
                dtype = autocast_dtype(config.precision, cuda, gpu.bf16)
            except ValueError as err:
                raise UsageError(f"{space.where}: variants.{config.variant}: {err}") from err
            data = load_data(config.data_spec, "cpu")
            key = (config.data_spec, config.model, config.dropout > 0, config.optimizer,
                   config.momentum > 0, dtype)  # fmt: skip
            if key not in probes:
                probes[key] = probe(config, data, dtype)
            found = footprint(config, probes[key], data, EVAL_BATCH_CUDA)
            if worst is None or found.total > worst[0]:
                worst = (found.total, config, found)
    finally:
        load_data.cache_clear()
    if worst is None or sharing * worst[0] <= gpu.total_bytes:
        return
    need, config, parts = worst
    fits = gpu.total_bytes // need
    advice = (
        f"give each trial a larger share (--gpus-per-trial {1 / fits:.4g}: {fits} per GPU) or run "
        f"fewer at once (--concurrency {fits}), or lower batch_size"
        if fits >= 1
        else f"not even one such trial fits: {memory_advice(config)}"
    )
    raise UsageError(
        f"--gpus-per-trial {gpus_per_trial:g} with --concurrency {concurrency} puts {sharing} "
        f"trial(s) on one GPU at once, but a {config.variant} trial of {space.file_name} "
        f"(model {config.model}, batch_size {config.batch_size}, precision {config.precision}) "
        f"needs about {size(need)} of GPU memory ({parts.parts()}), and {sharing} x {size(need)} = "
        f"{size(sharing * need)} is more than the {size(gpu.total_bytes)} of {gpu.name}; {advice}. "
        "The estimate is described in trainables/footprint.py"
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
        given, source = address, "--address"
    elif os.environ.get("RAY_ADDRESS"):
        given, source = os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"
    else:
        return RayTarget(None, "local")
    if given == "local":
        return RayTarget(None, source)
    target = RayTarget(given, source)
    bootstrap = given
    if bootstrap == "auto":
        # As Ray reads it: $RAY_ADDRESS (set inside a Ray job), else the last `ray start` here.
        current = os.environ.get("RAY_ADDRESS") or _current_cluster()
        if current is None:
            raise UsageError(
                f"{target.source} auto: no Ray cluster was started on this machine (no current-cluster "
                "file); start one with `ray start --head`, or leave out the address for a local search"
            )
        bootstrap = current
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


def check_trials(space: Space, *, local: bool, notes: list[str] | None = None) -> list[str]:
    """Load the data and build the model of every distinct trial setting at the corners of the space,
    check each trial can run on them (classes, batch size, input shape, and whatever the variant
    needs of the model: prior_guided's focus library must have been fitted on its conv layers), and
    that each distinct data and model can learn at all: a sensible loss at initialisation and one
    small batch memorised (sanity.check_learns, about a second each). Returns warnings for what is
    only suspicious.

    On a cluster a data_dir or a variant's file (a focus library) this machine does not have is left
    to the nodes: the trial checks it where it runs and reports a permanent error, not retried.
    `notes` collects what the data does to the numbers (data_notes), once per data set.
    """
    from flatbasin.trainables.data import load_data
    from flatbasin.trainables.data_notes import data_notes
    from flatbasin.trainables.data_spec import DataError
    from flatbasin.trainables.memory import OutOfMemory, named_out_of_memory
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
                        f"{space.where}: device: cuda, but this machine has no CUDA device"
                    )
            if not local and spec.data_dir is not None and not spec.data_dir.expanduser().exists():
                continue
            files = [Path(getattr(config.params, k)) for k in REGISTRY[config.variant].file_params]
            if not local and not all(f.expanduser().exists() for f in files):
                continue
            try:
                with named_out_of_memory(config, "loading the data and checking the model"):
                    data = load_data(spec, "cpu")
                    check_trial(config, data)
                if notes is not None:
                    notes += [n for n in data_notes(spec, data) if n not in notes]
                if (spec, config.model, config.init) not in learned:
                    learned.add((spec, config.model, config.init))
                    found = check_learns(config, data)
                    warnings += [f"{space.where}: variants.{config.variant}: {w}" for w in found]
            except (DataError, TrialError, OutOfMemory) as err:
                raise UsageError(f"{space.where}: variants.{config.variant}: {err}") from err
    finally:
        load_data.cache_clear()  # the workers load their own copy; the driver keeps none
    return warnings
