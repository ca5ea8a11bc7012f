"""`flatbasin report SEARCH`: a search's results read back from MLflow, written as PNG figures and one
self-contained HTML page, and logged to the search's run under report/.

Everything comes from MLflow (the parent run, its trial and confirmation runs, the space file it logged),
so a report can be written anywhere the tracking store is reachable, long after the search ended.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

import flatbasin.search.figures as figures
from flatbasin.search.credentials import redact_uri
from flatbasin.search.errors import Unwritten, UsageError
from flatbasin.search.report_data import Report
from flatbasin.search.report_html import render_html
from flatbasin.search.report_read import read_report
from flatbasin.search.report_stats import FEW_TRIALS, confirmed, drawn_importances
from flatbasin.search.search_lookup import error_line, find_search, read_client
from flatbasin.spaces.loader import NAME
from flatbasin.trainables.files import not_a_file, write_bytes_whole


def write_report(search: str, uri: str, out: Path | None = None, log: bool = True) -> Path:
    """Read the search from MLflow, write its figures and HTML page into `out` (default
    ./reports/NAME), log them to the search's run under report/; returns the HTML page's path.

    Raises UsageError for anything the user can fix: an unknown search, a store that is down, a search
    without a finished trial.
    """
    if out is not None:
        check_report_folder(out)  # before anything is read
    client = read_client(uri)
    try:
        parent = find_search(client, search, uri)
        report = read_report(client, parent, uri)
    except MlflowException as err:  # the store went away, or refuses one of the reads
        raise UsageError(
            f"cannot read search '{search}' from {redact_uri(uri)}: {error_line(err)}"
        ) from err
    folder = out if out is not None else Path("reports") / _folder_name(report)
    check_report_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        files = write_files(report, folder)
    except OSError as err:  # a full disk, a quota: not the user's input
        raise Unwritten(f"cannot write the report into {folder}: {err.strerror or err}") from err
    if log:
        try:
            for path in files:
                client.log_artifact(parent.info.run_id, str(path), "report")
        except MlflowException as err:
            raise UsageError(
                f"the report is in {folder}, but logging it to run {parent.info.run_id} failed: "
                f"{error_line(err)}"
            ) from err
    return files[-1].resolve()


REPORT_FILES = ("curves.png", "importances.png", "report.html")


def check_report_folder(folder: Path, writable: bool = True, what: str = "--out") -> None:
    """The report's folder is a folder (or none yet) and each file it writes there is a regular
    file or none yet: each is renamed into place, never over a device, a pipe or a folder. With
    `writable`, the folder must also take files (a search's own report only warns when it cannot)."""
    from flatbasin.search.preflight import check_folder

    if folder.exists() and not folder.is_dir():
        kind = not_a_file(folder) or "a file"
        raise UsageError(f"{what} {folder}: is {kind}, not a folder; give a folder for the report")
    if writable:
        check_folder(folder, f"{what} {folder}", "give a folder for the report")
    for name in REPORT_FILES:
        node = not_a_file(folder / name)
        if node is not None:
            raise UsageError(
                f"{what} {folder}: {name} there is {node}, not a regular file; remove it or give "
                "another folder"
            )


def write_files(report: Report, folder: Path) -> list[Path]:
    """curves.png, importances.png (when there are any) and report.html, the page last."""
    images: dict[str, bytes] = {}
    bars = {c.variant: (c.val_mean, c.val_std, c.seeds) for c in confirmed(report)}
    title = "validation accuracy of each variant's best search trial" + (
        ", and of its confirmation runs" if bars else ""
    )
    curves = figures.comparison_figure(report.curves, report.val_size, title, confirmed=bars)
    images["curves.png"] = _png(curves)
    panels = {
        f"{i.title} ({i.trials} trials" + (": too few to trust, a rough guide only)" if i.trials < FEW_TRIALS else ")"): i.values
        for i in drawn_importances(report)
    }  # fmt: skip
    if panels:
        images["importances.png"] = _png(figures.importance_figure(panels))
    files = []
    for name, data in images.items():
        path = folder / name
        write_bytes_whole(path, data)
        files.append(path)
    page = folder / "report.html"
    write_bytes_whole(page, render_html(report, images).encode("utf-8"))
    files.append(page)
    return files


def _png(fig: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _folder_name(report: Report) -> str:
    return report.name if NAME.fullmatch(report.name) else report.parent.info.run_id
