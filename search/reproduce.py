"""`flatbasin reproduce RUN_ID`: retrain a logged trial locally, without Ray, and compare.

Reads trial_config.json from the run, trains with the same config, seed and thread count, prints the
recorded and reproduced numbers side by side, and logs the reproduction as a new run tagged with the
original's id, with its final weights (checkpoint.pt, which `--from` can continue). A
post-convergence trial continues the same converged model, fetched from the run that kept it and
checked by SHA-256. A trial whose model or data was a Python callable handed to flatbasin.search
(`callable:NAME`) loads the pickled copy its search recorded (code/NAME.pkl). On the CPU the
numbers match exactly.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from rich.console import Console
from rich.table import Table
from rich.text import Text

from flatbasin.search.errors import UsageError
from flatbasin.search.run_record import converged_weights, fetch_record, load_passed
from flatbasin.search.search_run import base_tags, log_weights
from flatbasin.search.store import TrackingUnavailable, read_store
from flatbasin.search.tags import BASE_RUN, CHECKPOINT_ARTIFACT, CODE_ARTIFACTS, EPOCH_METRICS, ROLE
from flatbasin.trainables.config import TrialConfig, user_modules
from flatbasin.trainables.loop import train
from flatbasin.trainables.records import EpochMetrics
from flatbasin.trainables.usercode import code_files
from flatbasin.trainables.variants import phase_flags


def reproduce(
    run_id: str,
    tracking_uri: str,
    console: Console,
    *,
    recorded_code: bool = False,
    full: bool = False,
) -> bool:
    try:
        client = read_store(tracking_uri)
    except TrackingUnavailable as err:
        raise UsageError(str(err)) from err
    with contextlib.suppress(MlflowException):  # an unknown run: fetch_record says so
        run = client.get_run(run_id)
        if run.data.tags.get(ROLE) in ("soup", "ensemble"):  # rebuilt from its members
            from flatbasin.search.soup import reproduce_result

            return reproduce_result(client, run, tracking_uri, console)
    record = fetch_record(client, run_id)
    config = TrialConfig.model_validate({**record["config"], "threads": record["threads"]})
    code_folder = tempfile.TemporaryDirectory(prefix="flatbasin-code-")
    config = with_code(client, run_id, config, Path(code_folder.name), recorded_code, console)
    console.print(
        f"reproducing {config.variant} trial {record['trial_id']} ({config.epochs} epochs, seed {config.seed}, {record['threads']} thread(s))"
    )
    start_weights = converged_weights(client, config)
    for line in load_passed(client, run_id, config):
        console.print(line, style="yellow" if "differs" in line else None)
    folder = tempfile.TemporaryDirectory(prefix="flatbasin-reproduce-")
    last = Path(folder.name) / CHECKPOINT_ARTIFACT

    def keep_last(metrics: EpochMetrics, save: Any) -> None:
        if metrics.epoch == config.epochs:
            save(last)

    result = train(config, on_epoch=keep_last, start_weights=start_weights)
    if result.data_fingerprint != record["data_fingerprint"]:
        console.print(
            f"data differs from the original: fingerprint {result.data_fingerprint} vs {record['data_fingerprint']}",
            style="yellow",
        )

    recorded = record["recorded"]
    rows: list[tuple[str, Any, Any]] = [
        ("score", recorded["score"], result.score),
        ("test_acc", recorded["test_acc"], result.test_acc),
    ]
    for was, now in zip(recorded["history"], result.history, strict=False):
        rows += [
            (f"epoch {was['epoch']} {key}", was[key], getattr(now, key))
            for key in ("train_loss", "val_acc", "score")
        ]
        if was.get("phase") is not None:  # prior_guided: the same epochs must be focus epochs
            rows.append((f"epoch {was['epoch']} phase", was["phase"], now.phase))
    for was, point in zip(recorded["curve"], result.curve, strict=False):
        rows += [
            (f"curve {was['count']} val_acc", was["val_acc"], point.val_acc),
            (f"curve {was['count']} test_acc", was["test_acc"], point.test_acc),
        ]
    exact = (
        all(same(a, b) for _, a, b in rows)
        and len(recorded["curve"]) == len(result.curve)
        and len(recorded["history"]) == len(result.history)
    )

    print_comparison(run_id, rows, console, full=full)
    lengths = [(len(recorded[k]), len(getattr(result, k))) for k in ("history", "curve")]
    if any(was != now for was, now in lengths):  # early stopping at another epoch, say
        (epochs, epochs_now), (points, points_now) = lengths
        console.print(
            f"recorded {epochs} epochs and {points} curve points; reproduced {epochs_now} and "
            f"{points_now}",
            style="red",
        )

    original = client.get_run(run_id)
    reproduction = client.create_run(
        original.info.experiment_id,
        run_name=f"reproduce-{original.info.run_name}",
        tags={ROLE: "reproduction", "flatbasin.reproduces": run_id,
              # beside the trial it reproduces, under the same search run, in the MLflow UI
              **({MLFLOW_PARENT_RUN_ID: parent} if (parent := original.data.tags.get(MLFLOW_PARENT_RUN_ID)) else {}), "flatbasin.exact_match": str(exact).lower(),
              "flatbasin.variant": config.variant, **base_tags(),
              **({BASE_RUN: config.start.run_id} if config.start and config.start.run_id else {})},
    )  # fmt: skip
    new_run_id = reproduction.info.run_id
    try:
        _record(client, new_run_id, config, result, last)
    except BaseException:
        # Ctrl-C, SIGTERM, a store that failed: the reproduction's run must not say RUNNING forever.
        with contextlib.suppress(Exception):
            client.set_terminated(new_run_id, "KILLED")
        raise
    folder.cleanup()
    code_folder.cleanup()
    client.set_terminated(new_run_id)
    verdict = Text("exact match", style="green") if exact else Text("numbers differ", style="red")
    console.print(verdict + Text(f"; logged as run {new_run_id}"))
    return exact


SHOWN_DIFFERENCES = 10  # numbers that differ, listed one per row before the rest are counted


def print_comparison(
    run_id: str, rows: list[tuple[str, Any, Any]], console: Console, *, full: bool = False
) -> None:
    """Recorded against reproduced. Every number is compared; the table shows the final ones
    (score, test_acc) and one line per group (the epochs, the curve) saying whether all agree,
    then the first numbers that differ; `full` lists every row (a 40-epoch trial: 160)."""
    table = Table(title=f"run {run_id}: recorded vs reproduced")
    for column in ("metric", "recorded", "reproduced", ""):
        table.add_column(column, no_wrap=column != "metric")

    def verdict(a: Any, b: Any) -> Text:
        return Text("=") if same(a, b) else Text("differs", style="red")

    if full:
        for name, a, b in rows:
            table.add_row(name, _fmt(a), _fmt(b), verdict(a, b))
        console.print(table)
        return
    groups: dict[str, list[tuple[str, Any, Any]]] = {}
    for row in rows:
        group = row[0].split(" ", 1)[0]  # score, test_acc, epoch, curve
        if group in ("score", "test_acc"):
            table.add_row(row[0], _fmt(row[1]), _fmt(row[2]), verdict(row[1], row[2]))
        else:
            groups.setdefault(group, []).append(row)
    for group, members in groups.items():
        steps = sorted({int(name.split()[1]) for name, _, _ in members})
        keys = list(dict.fromkeys(name.split()[2] for name, _, _ in members))
        differing = sum(not same(a, b) for _, a, b in members)
        label = f"{group}s {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"{group} {steps[0]}"
        table.add_row(
            f"{label}: {', '.join(keys)}",
            f"{len(members)} numbers",
            "all equal" if not differing else f"{differing} differ",
            Text("=") if not differing else Text("differs", style="red"),
        )
    differences = [
        row for row in rows if not same(row[1], row[2]) and row[0] not in ("score", "test_acc")
    ]
    for name, a, b in differences[:SHOWN_DIFFERENCES]:
        table.add_row(f"  {name}", _fmt(a), _fmt(b), Text("differs", style="red"))
    if len(differences) > SHOWN_DIFFERENCES:
        table.add_row(f"  ({len(differences) - SHOWN_DIFFERENCES} more differ)", "", "", "")
    console.print(table)
    console.print(f"({len(rows)} numbers compared; --full lists each one)")


def _record(
    client: MlflowClient, new_run_id: str, config: TrialConfig, result: Any, last: Path
) -> None:
    """The reproduction's params, metrics, record and weights, into its run."""
    params = [Param(k, str(v)) for k, v in sorted(config.flat().items())]
    for start in range(0, len(params), 100):
        client.log_batch(new_run_id, params=params[start : start + 100])
    metrics = [
        Metric(k, float(v), 0, m.epoch)
        for m in result.history
        for k, v in asdict(m).items()
        if k in EPOCH_METRICS and v is not None
    ]
    metrics += [
        Metric(name, flag, 0, m.epoch)
        for m in result.history
        for name, flag in phase_flags(config.variant, m.phase).items()
    ]
    if "to_best" in result.seconds:
        metrics.append(Metric("seconds_to_best", result.seconds["to_best"], 0, 0))
    metrics += [Metric("curve/val_acc", p.val_acc, 0, p.count) for p in result.curve]
    metrics += [Metric("curve/test_acc", p.test_acc, 0, p.count) for p in result.curve]
    if result.test_acc is not None:
        metrics.append(Metric("test_acc", result.test_acc, 0, 0))
    client.log_batch(new_run_id, metrics=metrics)
    client.log_dict(new_run_id, result.to_json(), "reproduction.json")
    if last.is_file():
        log_weights(client, new_run_id, last)


def with_code(
    client: MlflowClient,
    run_id: str,
    config: TrialConfig,
    folder: Path,
    use_recorded: bool,
    console: Console,
) -> TrialConfig:
    """The config whose user modules (model:, dataset: module:callable) import what ran: the code
    found now (in the trial's folder if it is on this machine, else the current one) when it is
    the same as what the run recorded, or is all there is; the recorded copy when asked
    (--recorded-code) or when the code is not here at all. A difference is said plainly."""
    modules = user_modules(config.model, config.dataset)
    if not modules:
        return config
    recorded = _recorded_code(client, run_id, folder)
    here = (
        config.code_dir if config.code_dir and Path(config.code_dir).is_dir() else str(Path.cwd())
    )
    now = code_files(modules, here)
    if use_recorded or (not now and recorded):
        if not recorded:
            raise UsageError(
                f"run {run_id} recorded none of its code ({', '.join(modules)}); --recorded-code "
                "has nothing to use: run without it, beside the modules"
            )
        why = "as asked" if use_recorded else f"{', '.join(modules)} cannot be found here"
        console.print(
            f"using the code recorded with the run ({', '.join(sorted(recorded))}): {why}"
        )
        return config.model_copy(update={"code_dir": str(folder)})
    if not now:
        raise UsageError(
            f"this trial imports {', '.join(modules)}, found neither in {here} nor on the path, "
            f"and run {run_id} recorded no copy; run reproduce in the folder that holds them"
        )
    changed = sorted(
        name for name in set(recorded) | set(now)
        if name not in now or name not in recorded
        or now[name].read_text(encoding="utf-8", errors="replace") != recorded[name]
    )  # fmt: skip
    if recorded and changed:
        console.print(
            f"the code imported now differs from the code that ran: {', '.join(changed)} "
            f"(in {here}); the numbers may differ. --recorded-code reproduces with the copy "
            "recorded with the run",
            style="yellow",
        )
    return config.model_copy(update={"code_dir": here})


def _recorded_code(client: MlflowClient, run_id: str, folder: Path) -> dict[str, str]:
    """The run's code/ artifacts, downloaded into `folder` (kept: the trial may import them)."""
    if not client.list_artifacts(run_id, CODE_ARTIFACTS):
        return {}
    local = Path(client.download_artifacts(run_id, CODE_ARTIFACTS, str(folder)))
    files = {str(p.relative_to(local)): p for p in local.rglob("*") if p.is_file()}
    for name, path in files.items():  # the modules at the folder's top, as they were imported
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)
    return {name: (folder / name).read_text(encoding="utf-8") for name in files}


def same(recorded: Any, reproduced: Any) -> bool:
    """Equal, with NaN equal to NaN: a diverged trial's loss history is NaN in both runs."""
    if isinstance(recorded, float) and isinstance(reproduced, float):
        return recorded == reproduced or (math.isnan(recorded) and math.isnan(reproduced))
    return bool(recorded == reproduced)


def _fmt(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)
