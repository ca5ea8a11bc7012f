"""A search read back from MLflow: its run, by the search's name or the run's id, and its child
runs, a page at a time (report, soup)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from flatbasin.search.credentials import redact_uri
from flatbasin.search.errors import UsageError
from flatbasin.search.store import TrackingUnavailable, read_store
from flatbasin.search.tags import ROLE

RUN_ID = re.compile(r"[0-9a-f]{32}")


def read_client(uri: str) -> MlflowClient:
    try:
        return read_store(uri)
    except TrackingUnavailable as err:
        raise UsageError(str(err)) from err


def find_search(client: MlflowClient, search: str, uri: str) -> Run:
    """The search's parent run, from the search's name (its experiment) or the run's id."""
    experiment = client.get_experiment_by_name(search)
    if experiment is not None:
        parents = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{ROLE}` = 'search'",
            order_by=["attributes.start_time DESC"],
        )
        if not parents:
            raise UsageError(
                f"experiment '{search}' in {redact_uri(uri)} holds no flatbasin search"
            )
        return parents[0]  # the latest search of that name; an older one by its run id
    if RUN_ID.fullmatch(search):
        try:
            run = client.get_run(search)
        except MlflowException:
            run = None
        if run is not None:
            role = run.data.tags.get(ROLE)
            if role == "search":
                return run
            owner = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
            hint = f"; its search's run is {owner}" if owner else ""
            raise UsageError(f"run {search} is not a search's run (role: {role or 'none'}){hint}")
    names = sorted(
        e.name
        for e in client.search_experiments(max_results=200)
        if e.name != "Default" and e.lifecycle_stage == "active"
    )
    known = f"searches there: {', '.join(names[:20])}" if names else "there are no searches there"
    raise UsageError(f"no search named or with run id '{search}' in {redact_uri(uri)} ({known})")


def children(client: MlflowClient, parent: Run) -> Iterator[Run]:
    token = None
    while True:
        page = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'",
            max_results=1000,
            page_token=token,
        )
        yield from page
        token = page.token
        if not token:
            return


def error_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
