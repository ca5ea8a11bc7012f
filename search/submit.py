"""`flatbasin submit`: send a search to a Ray cluster through the Jobs API and follow its logs.

The job runs `flatbasin search SPACE --address auto [options]` on the cluster (flatbasin is installed in
the cluster's image); the space file travels as the job's working directory, with its whole folder when
the space names the user's own modules (model: or dataset: module:callable). Tracking URI and storage
path go as options, never secrets: credentials for MLflow belong in the cluster's environment (the
command refuses a --tracking-uri with user-info: Ray shows every job's entrypoint on its dashboard).
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import shutil
import tempfile
from pathlib import Path

from rich.console import Console

from flatbasin.search.credentials import redact_uri, tracking_uri_args, user_info, value_at
from flatbasin.search.errors import UsageError
from flatbasin.search.ray_start import CODE_EXCLUDES
from flatbasin.spaces.loader import BUNDLED, load_space, resolve


def submit(
    space: str, address: str, search_args: list[str], *, wait: bool, console: Console
) -> int:
    """Submit; return the job's exit status when waiting (0 when not)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    path = resolve(space)
    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="flatbasin-job-") as folder:
        runtime_env: dict[str, object] = {"working_dir": folder}
        if path.parent == BUNDLED and Path(space).suffix == "":
            target = path.stem  # a bundled space: the cluster's install has it
        elif "code_dir" in load_space(path).settings:
            # The space names the user's modules: their folder is the job's working directory,
            # which Ray gives every worker of the job (first on its PYTHONPATH).
            runtime_env = {"working_dir": str(path.parent), "excludes": CODE_EXCLUDES}
            target = path.name
        else:
            shutil.copy(path, Path(folder) / path.name)
            target = path.name
        entrypoint = shlex.join(["flatbasin", "search", target, "--address", "auto", *search_args])
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    shown = redact_uri(address)
    console.print(f"submitted job {job_id} to {shown}: {entrypoint}")
    if not wait:
        console.print(f"follow it with: ray job logs --address {shown} --follow {job_id}")
        return 0

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            console.out(lines, end="", highlight=False)

    try:
        asyncio.run(follow())
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP stop the following, not the job
        with contextlib.suppress(OSError):
            console.print(
                f"stopped following job {job_id}; it keeps running on the cluster. Follow it "
                f"again with: ray job logs --address {address} --follow {job_id}; stop it with: "
                f"ray job stop --address {address} {job_id}",
                style="yellow",
            )
        raise
    info = client.get_job_info(job_id)
    console.print(f"job {job_id}: {info.status}")
    if info.status == JobStatus.SUCCEEDED:
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


def check_no_credentials(args: list[str]) -> None:
    """A job's command line is kept by Ray and shown on its dashboard and by `ray job list` to
    everyone who reaches the cluster (and a job's runtime environment with it): credentials in
    --tracking-uri are refused, never sent. The driver runs on the head node, whose environment
    holds them."""
    for i in tracking_uri_args(args):
        uri = value_at(args, i)
        if user_info(uri) != (None, None):
            raise UsageError(
                f"--tracking-uri {redact_uri(uri)}: the URI carries credentials (user-info), and "
                "a job's command line is shown on the cluster's dashboard and by `ray job list`, so "
                "they are not sent; give the cluster's nodes MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD in their environment (docs/cluster.md) and pass the URI "
                "without them"
            )


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
            f"--address {redact_uri(address)}: expected the cluster's dashboard as http://HOST:PORT "
            "(Ray's default port is 8265), e.g. http://127.0.0.1:8265"
        )


def check_search(space_file: str, tracking_uri: str | None, start_from: str | None) -> None:
    """What the cluster's search would refuse, refused here: a malformed --tracking-uri (its form;
    only the cluster can tell whether the store answers) and a bad space (a tail's too, with
    --from)."""
    from flatbasin.search.api import tracking_uri_or_default
    from flatbasin.spaces import SpaceError

    try:
        if tracking_uri:
            tracking_uri_or_default(tracking_uri)
        load_space(space_file, start_from=start_from)
    except SpaceError as err:
        raise UsageError(str(err)) from err
