"""Preconditions of a search on a Ray cluster, checked before any trial starts.

Only the driver writes to MLflow, but on a cluster the driver itself runs on the head node (a job), so
a tracking store in a local file lives and dies with that node; checkpoints must be on storage every
node can reach, or a trial moved to another node cannot resume; and a trial that asks for more GPUs or
CPUs than any node has would wait forever.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

from flatbasin.search.credentials import redact_uri


def local_ray_on_loopback() -> None:
    """Make a local Ray listen on, and advertise, 127.0.0.1 only. Call before Ray is imported.

    Ray reads this switch once, at import. At 0 (its default on Windows and macOS) a single-node Ray
    binds every port to the loopback address; otherwise it advertises the machine's network address
    and listens on all interfaces, even for a laptop search. Joining a cluster needs it unset.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


class ClusterError(ValueError):
    """The cluster cannot run this search as configured; the message says what to change."""


def is_local_store(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme in ("", "file", "sqlite")


def _sees_file(path: str) -> bool:
    return Path(path).is_file()


def check_cluster(
    tracking_uri: str, storage: Path, cpus_per_trial: float, gpus_per_trial: float
) -> None:
    """Raise ClusterError naming every problem; call after ray.init."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    here = ray.get_runtime_context().get_node_id()
    remote = [n for n in nodes if n["NodeID"] != here]
    problems = []

    most_gpus = max((n["Resources"].get("GPU", 0.0) for n in nodes), default=0.0)
    if gpus_per_trial > most_gpus:
        problems.append(
            f"--gpus-per-trial {gpus_per_trial} but the largest node has {most_gpus:g} GPU(s); trials would wait forever"
        )
    most_cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
    if cpus_per_trial > most_cpus:
        problems.append(
            f"--cpus-per-trial {cpus_per_trial} but the largest node has {most_cpus:g} CPU(s)"
        )

    if remote and is_local_store(tracking_uri):
        problems.append(
            f"the tracking URI {redact_uri(tracking_uri)} is a local file, but the cluster has {len(remote)} other node(s) and "
            "the search driver may run on any of them; use an MLflow server every node reaches "
            "(--tracking-uri http://HOST:5000)"
        )

    if remote and urlparse(str(storage)).scheme in ("", "file"):
        # Shared means every node sees the same files at the same path: write one, ask each node.
        storage.mkdir(parents=True, exist_ok=True)
        marker = storage / f".flatbasin-shared-{uuid.uuid4().hex}"
        marker.write_text("flatbasin storage check\n")
        try:
            probe = ray.remote(num_cpus=0)(_sees_file)
            seen = ray.get([
                probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
                for n in remote
            ])  # fmt: skip
        finally:
            marker.unlink(missing_ok=True)
        blind = [n["NodeManagerAddress"] for n, ok in zip(remote, seen, strict=True) if not ok]
        if blind:
            problems.append(
                f"the storage path {storage} is not shared: node(s) {', '.join(blind)} cannot see it; "
                "use a shared file system (NFS) mounted at the same path on every node, or object storage (s3://...)"
            )
    if problems:
        raise ClusterError("the cluster cannot run this search:\n  - " + "\n  - ".join(problems))
