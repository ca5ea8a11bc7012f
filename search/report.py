"""`flatbasin report SEARCH`: a search's results read back from MLflow, written as PNG figures and one
self-contained HTML page, and logged to the search's run under report/.

Everything comes from MLflow (the parent run, its trial and confirmation runs, the space file it logged),
so a report can be written anywhere the tracking store is reachable, long after the search ended.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

import flatbasin
from flatbasin.search import confirm, figures, soup
from flatbasin.search.confirm import ALPHA, confirmation_stats
from flatbasin.search.credentials import redact_uri
from flatbasin.search.errors import Unwritten, UsageError
from flatbasin.search.tracking import (
    ERROR,
    FINAL,
    ROLE,
    STATE,
    STOPPED,
    TRIAL_ID,
    VARIANT,
    TrackingUnavailable,
    read_store,
)
from flatbasin.spaces.loader import NAME, Dist, Space, SpaceError, load_space
from flatbasin.trainables.files import not_a_file, write_bytes_whole

RUN_ID = re.compile(r"[0-9a-f]{32}")
CONFIRM = "confirm"  # role of a confirmation run: a fresh seed of a variant's best config
MIN_IMPORTANCE_TRIALS = 4  # fANOVA of 2 or 3 trials says nothing: no panel, a line says why
FEW_TRIALS = 10  # fANOVA over fewer trials than this is drawn, with a warning in its title
ONLY_ONE = "the only searched parameter: its importance is 1 by definition"


@dataclass
class Trial:
    run_id: str
    trial_id: str
    variant: str
    status: str  # finished, diverged, stopped early, failed, unfinished
    score: float | None  # validation accuracy of the deployed model
    test_acc: float | None
    val_loss: float | None
    params: dict[str, str]
    val_acc: float | None = None  # of the live weights, last epoch
    error: str | None = None

    @property
    def done(self) -> bool:
        """Finished with a final result, the diverged ones included (they score 0 on purpose)."""
        return self.status in ("finished", "diverged")


@dataclass
class Confirmation:
    variant: str
    score: float  # a diverged seed counts with its score of 0: a setting that diverges is no winner
    test_acc: float | None
    diverged: bool = False
    pair: str = ""  # its seed and validation split: what pairs it with the other variants' runs
    models: int = 1  # models its deployed model runs per prediction
    val_seed: str = "None"  # the param as logged ("None": the split of split_seed)


@dataclass
class Importances:
    """One study's parameter importances, or why there are none."""

    title: str
    trials: int
    values: dict[str, float] = field(default_factory=dict)
    reason: str = ""  # set when values is empty


@dataclass
class Report:
    name: str
    uri: str
    parent: Run
    trials: list[Trial]
    confirmations: list[Confirmation]
    space: Space | None
    space_problem: str
    best: dict[str, Trial]  # variant -> best finished, non-diverged trial, best first
    curves: dict[str, dict[str, Any]]  # variant -> {"curve": [...], "extra_curves": {...}}
    val_size: int | None
    importances: list[Importances]
    fresh_splits: bool | None = None  # whether each confirmation run had a fresh validation split
    soups: list[dict[str, Any]] = field(default_factory=list)  # search/soup.py's runs, newest each


# ----------------------------------------------------------------------------- reading MLflow


def write_report(search: str, uri: str, out: Path | None = None, log: bool = True) -> Path:
    """Read the search from MLflow, write its figures and HTML page into `out` (default
    ./reports/NAME), log them to the search's run under report/; returns the HTML page's path.

    Raises UsageError for anything the user can fix: an unknown search, a store that is down, a search
    without a finished trial.
    """
    if out is not None:
        check_report_folder(out)  # before anything is read
    client = _client(uri)
    try:
        parent = find_search(client, search, uri)
        report = read_report(client, parent, uri)
    except MlflowException as err:  # the store went away, or refuses one of the reads
        raise UsageError(
            f"cannot read search '{search}' from {redact_uri(uri)}: {_first_line(err)}"
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
                f"{_first_line(err)}"
            ) from err
    return files[-1].resolve()


def _client(uri: str) -> MlflowClient:
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


def _children(client: MlflowClient, parent: Run) -> Iterator[Run]:
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


def _trial(run: Run) -> Trial:
    tags, metrics = run.data.tags, run.data.metrics
    if tags.get(ERROR):
        status = "failed"
    elif tags.get(FINAL) == "true" or "final_score" in metrics:
        status = "diverged" if tags.get("flatbasin.diverged") == "true" else "finished"
    elif tags.get(STOPPED, "").startswith("early stopping"):
        status = "stopped early"
    elif tags.get(STOPPED):
        status = "unfinished"
    elif run.info.status == "FAILED":
        status = "failed"
    else:
        status = "unfinished"
    score = metrics.get("final_score", metrics.get("score"))
    return Trial(
        run_id=run.info.run_id,
        trial_id=tags.get(TRIAL_ID, run.info.run_id[:8]),
        variant=tags.get(VARIANT) or run.data.params.get("variant", "?"),
        status=status,
        score=score,
        test_acc=metrics.get("test_acc"),
        val_loss=metrics.get("val_loss"),
        val_acc=metrics.get("val_acc"),
        params=dict(run.data.params),
        error=tags.get(ERROR),
    )


def best_per_variant(trials: list[Trial]) -> dict[str, Trial]:
    """Each variant's best finished, non-diverged trial, best first; ties as the search breaks them
    (lower validation loss, then the smaller trial id)."""
    best: dict[str, tuple[tuple[float, float, str], Trial]] = {}
    for t in trials:
        if t.status != "finished" or t.score is None:
            continue
        rank = (-t.score, t.val_loss if t.val_loss is not None else math.inf, t.trial_id)
        if t.variant not in best or rank < best[t.variant][0]:
            best[t.variant] = (rank, t)
    return {v: t for v, (_, t) in sorted(best.items(), key=lambda item: item[1][0])}


def _curve(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> dict[str, Any]:
    """A trial's curves as its final result held them, from the metric histories (step = count)."""

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    def points(prefix: str) -> list[dict[str, float]]:
        val, test = history(f"{prefix}/val_acc"), history(f"{prefix}/test_acc")
        return [
            {"count": n, "val_acc": val[n], "test_acc": test.get(n, math.nan)} for n in sorted(val)
        ]

    extras = sorted(
        k.removeprefix("curve/").removesuffix("/val_acc")
        for k in metrics
        if k.startswith("curve/") and k.endswith("/val_acc") and k != "curve/val_acc"
    )
    return {"curve": points("curve"), "extra_curves": {n: points(f"curve/{n}") for n in extras}}


def _space(client: MlflowClient, parent: Run) -> tuple[Space | None, str]:
    """The space file the search logged (its distributions rebuild the Optuna study), or why not."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file
    logged = parent.data.params.get("space")
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id) if not a.is_dir]
    name = Path(logged).name if logged else None
    candidates = [name] if name in artifacts else [a for a in artifacts if a.endswith(".yaml")]
    if not candidates:
        return None, "the search's run holds no space file, so its distributions are unknown"
    with tempfile.TemporaryDirectory(prefix="flatbasin-report-") as folder:
        try:
            path = client.download_artifacts(parent.info.run_id, candidates[0], folder)
            start_from = parent.data.params.get("from")
            space = load_space(path, start_from=start_from)
            # A post-convergence search (--from) searched the tail only: so does its study.
            return (space.tail_only()[0] if start_from else space), ""
        except SpaceError as err:
            return None, f"the logged space file cannot be read: {err}"
        except MlflowException as err:
            return None, f"the logged space file cannot be downloaded: {_first_line(err)}"


def read_report(client: MlflowClient, parent: Run, uri: str) -> Report:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = client.get_experiment(parent.info.experiment_id).name
    trials, confirmations = [], []
    for run in _children(client, parent):
        role = run.data.tags.get(ROLE)
        if role == "trial":
            trials.append(_trial(run))
        elif role == CONFIRM:
            metrics = run.data.metrics
            score = metrics.get("final_score", metrics.get("score"))
            if score is not None and (
                run.data.tags.get(FINAL) == "true" or "final_score" in metrics
            ):
                params = run.data.params
                confirmations.append(
                    Confirmation(
                        run.data.tags.get(VARIANT, "?"),
                        score,
                        metrics.get("test_acc"),
                        run.data.tags.get("flatbasin.diverged") == "true",
                        pair=confirm.pair_key(
                            {"seed": params.get("seed"), "val_seed": params.get("val_seed")}
                        ),
                        models=_members(client, run),
                        val_seed=str(params.get("val_seed")),
                    )
                )
    if not any(t.done for t in trials):
        counts = _counts(trials)
        held = f" ({counts})" if counts else ""
        raise UsageError(
            f"search '{name}' (run {parent.info.run_id}) has no finished trials yet: "
            f"{len(trials)} trial run(s){held}; a report needs at least one"
        )
    best = best_per_variant(trials)
    order = {variant: i for i, variant in enumerate(best)}  # variants without a best go last
    trials.sort(key=lambda t: (order.get(t.variant, len(order)), t.variant, -(t.score or 0.0), t.trial_id))  # fmt: skip
    curves = {}
    # Every accuracy measured on the validation set is correct/N: enough of them name N.
    measured = [t.score for t in trials if t.score] + [t.val_acc for t in trials if t.val_acc]
    for variant, trial in best.items():
        metrics = client.get_run(trial.run_id).data.metrics
        curves[variant] = _curve(client, trial.run_id, metrics)
        measured += [p["val_acc"] for p in curves[variant]["curve"]]
        for key in ("val_acc", "score"):
            measured += [m.value for m in client.get_metric_history(trial.run_id, key)]
    space, problem = _space(client, parent)
    searched_splits = {t.params.get("val_seed", "None") for t in trials}
    return Report(
        name=name,
        uri=uri,
        parent=parent,
        trials=trials,
        confirmations=confirmations,
        space=space,
        space_problem=problem,
        best=best,
        curves=curves,
        # As the search measured it, when it logged it (confirmed searches do); else inferred.
        val_size=int(parent.data.metrics.get("confirmed/val_size", 0)) or figures.infer_val_size(measured),
        importances=importances(trials, space, problem),
        fresh_splits=bool(confirmations)
        and all(c.val_seed != "None" and c.val_seed not in searched_splits for c in confirmations),
        soups=soup.recorded(client, parent),
    )


def _members(client: MlflowClient, run: Run) -> int:
    """Models a run's deployed model runs per prediction: an ensemble records its members'
    diversity, and its curve's last step is their count; anything else deploys one model."""
    if not any(key.startswith("diversity/") for key in run.data.metrics):
        return 1
    return max((m.step for m in client.get_metric_history(run.info.run_id, "curve/val_acc")), default=1)


def _counts(trials: list[Trial]) -> str:
    order = ("finished", "diverged", "stopped early", "failed", "unfinished")
    counts = {s: sum(t.status == s for t in trials) for s in order}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n)


# ----------------------------------------------------------------------------- importances


def _distribution(dist: Dist) -> Any:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if dist.kind == "loguniform":
        return FloatDistribution(float(dist.values[0]), float(dist.values[1]), log=True)
    if dist.kind == "uniform":
        return FloatDistribution(float(dist.values[0]), float(dist.values[1]))
    if dist.kind == "int":
        return IntDistribution(int(dist.values[0]), int(dist.values[1]))
    return CategoricalDistribution(list(dist.values))


def _value(dist: Dist, text: str) -> Any:
    """A param as MLflow holds it (a string) back in its distribution's type."""
    if dist.kind in ("loguniform", "uniform"):
        return float(text)
    if dist.kind == "int":
        return int(float(text))
    for choice in dist.values:
        if str(choice) == text:
            return choice
    raise ValueError(f"{text!r} is not one of {list(dist.values)}")


def _inside(dist: Dist, value: Any) -> bool:
    return dist.kind == "choice" or dist.values[0] <= value <= dist.values[1]


def _study_importances(
    title: str, rows: list[tuple[dict[str, Any], dict[str, Any], float]]
) -> Importances:
    import optuna

    result = Importances(title, len(rows))
    if len(rows) < MIN_IMPORTANCE_TRIALS:
        result.reason = f"not enough trials ({len(rows)}; importances need at least {MIN_IMPORTANCE_TRIALS})"  # fmt: skip
        return result
    if len({value for _, _, value in rows}) == 1:  # fANOVA would fail, or call one parameter 1
        result.reason = "every trial scored the same: nothing to attribute"
        return result
    study = optuna.create_study(direction="maximize")
    for params, distributions, value in rows:
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=distributions, value=value)
        )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # seeded: the same page twice
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except RuntimeError as err:  # fANOVA: every trial scored the same
        result.reason = (
            "every trial scored the same: nothing to attribute"
            if "variance" in str(err)
            else f"not computed: {err}"
        )
        return result
    result.values = {k: float(v) for k, v in values.items() if math.isfinite(v)}
    if not result.values:
        result.reason = "not enough trials: no parameter varied"
    return result


def importances(trials: list[Trial], space: Space | None, problem: str) -> list[Importances]:
    """fANOVA importances of the study rebuilt from the recorded trials: overall ('variant') when
    the space has several variants, and per variant over its '<variant>/<key>' parameters.

    Diverged trials count with the score they reported (0), as the sampler saw them."""
    from optuna.distributions import CategoricalDistribution

    if space is None:
        return [Importances("all trials", 0, reason=problem)]
    done = [t for t in trials if t.done and t.score is not None and t.variant in space.variants]
    out = []
    if len(space.variants) > 1:
        choice = {"variant": CategoricalDistribution(list(space.variants))}
        rows = [({"variant": t.variant}, choice, float(t.score or 0.0)) for t in done]
        if len({t.variant for t in done}) < 2:
            out.append(Importances("variant (all trials)", len(rows), reason="not enough trials: only one variant finished"))  # fmt: skip
        else:
            out.append(_study_importances("variant (all trials)", rows))
    for variant, (searched, fixed) in space.variants.items():
        mine = [t for t in done if t.variant == variant]
        if not mine:
            continue
        if not searched:
            out.append(Importances(variant, len(mine), reason="no searched parameters"))
            continue
        distributions = {f"{variant}/{k}": _distribution(d) for k, d in searched.items()}
        rows, skipped = [], 0
        for t in mine:
            try:
                values = {k: _value(d, t.params[k]) for k, d in searched.items() if k in t.params}
                if not all(_inside(searched[k], v) for k, v in values.items()):
                    raise ValueError("outside the space's range")
                _absent_as_idle(variant, set(searched) - set(values), {**space.settings, **fixed, **values})
            except (KeyError, ValueError):
                skipped += 1  # a trial of another version of the space: not part of this study
                continue
            params = {f"{variant}/{k}": v for k, v in values.items()}
            given = {name: distributions[name] for name in params}  # the study of what acted
            rows.append((params, given, float(t.score or 0.0)))
        result = _study_importances(variant, rows)
        if skipped:
            result.reason += f" ({skipped} trial(s) outside the logged space left out)"
        out.append(result)
    return out


def _absent_as_idle(variant: str, absent: set[str], values: dict[str, Any]) -> None:
    """KeyError unless every searched key a trial lacks did nothing in it (swa_lr_max with
    swa_mode constant is not sampled: trainables/conditions.py); fANOVA then rates the keys
    every trial has."""
    from flatbasin.trainables.config import idle_settings

    if not absent:
        return
    try:
        idle = idle_settings(variant, {**values, **dict.fromkeys(absent)})
    except TypeError:  # a key it depends on is absent too
        idle = {}
    if not absent <= set(idle):
        raise KeyError(sorted(absent - set(idle)))


# ----------------------------------------------------------------------------- confirmations


@dataclass
class Confirmed:
    variant: str
    seeds: int
    diverged: int
    val_mean: float
    val_std: float
    test_mean: float | None
    test_std: float | None
    p_value: float | None  # the paired test of the leader's lead over it; None for the leader
    verdict: str
    lead: tuple[float, float, float] | None = None  # the leader's mean lead, 95% interval
    models: int = 1  # models per prediction


def confirmation_rows(report: Report) -> list[dict[str, Any]]:
    """The search's own statistics (flatbasin.search.confirm) over the confirmation runs read back
    from MLflow: mean ± std over the runs, best first, and the paired test against the leader."""
    finals: dict[str, list[dict[str, Any]]] = {}
    for c in report.confirmations:
        finals.setdefault(c.variant, []).append(
            {"score": c.score, "test_acc": c.test_acc, "diverged": c.diverged, "pair": c.pair,
             "models": c.models}
        )  # fmt: skip
    return [
        {**row, "val_size": report.val_size, "fresh_splits": report.fresh_splits}
        for row in confirmation_stats(finals, report.val_size)
    ]


def confirmed(report: Report) -> list[Confirmed]:
    tests = {
        c.variant for c in report.confirmations if c.test_acc is not None
    }  # variants with a test accuracy in at least one run
    return [
        Confirmed(
            row["variant"],
            row["n"],
            row["diverged"],
            row["val_mean"],
            row["val_std"],
            row["test_mean"] if row["variant"] in tests else None,
            row["test_std"] if row["variant"] in tests else None,
            row["p_vs_best"],
            row["verdict"],
            (row["diff_mean"], row["diff_low"], row["diff_high"])
            if row["diff_low"] is not None
            else None,
            row["models"],
        )
        for row in confirmation_rows(report)
    ]


# ----------------------------------------------------------------------------- writing

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
        kind = not_a_file(folder / name)
        if kind is not None:
            raise UsageError(
                f"{what} {folder}: {name} there is {kind}, not a regular file; remove it or give "
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


def drawn_importances(report: Report) -> list[Importances]:
    """The studies whose importances carry information: computed (enough trials, scores that
    differ) over more than one parameter (the only parameter of a study is important by definition)."""
    return [i for i in report.importances if len(i.values) > 1]


def _png(fig: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _folder_name(report: Report) -> str:
    return report.name if NAME.fullmatch(report.name) else report.parent.info.run_id


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ----------------------------------------------------------------------------- HTML

esc = html.escape  # every string that comes from a run is data, never markup

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 70em; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { padding: 0.3em 0.7em; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
p.verdict { font-size: 1.15em; padding: 0.6em 0.9em; background: #eef6ee; border-left: 4px solid #4a8;
            margin: 0.8em 0 0.4em; }
p.verdict.unconfirmed { background: #fdf6e3; border-left-color: #c93; }
tr.best td { background: #eef6ee; } .muted { color: #666; } .bad { color: #a33; }
code { font-size: 0.92em; } img { max-width: 100%; border: 1px solid #eee; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.15em 1em; }
dt { color: #666; } dd { margin: 0; }
"""


def _pct(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"


def _param(text: str) -> str:
    try:
        number = float(text)
    except ValueError:
        return text
    return text if re.fullmatch(r"-?\d+", text) else f"{number:.4g}"


def _searched(report: Report, variant: str) -> list[str]:
    if report.space is not None and variant in report.space.variants:
        return list(report.space.variants[variant][0])
    # No space file: the settings that differ between the variant's trials are the searched ones.
    mine = [t.params for t in report.trials if t.variant == variant]
    keys = sorted({k for p in mine for k in p})
    return [k for k in keys if len({p.get(k) for p in mine}) > 1]


def _params_text(report: Report, trial: Trial) -> str:
    keys = _searched(report, trial.variant)
    return ", ".join(f"{k}={_param(trial.params[k])}" for k in keys if k in trial.params) or "–"


def _table(header: list[str], rows: list[list[str]], numeric: set[int], classes: list[str] | None = None) -> str:  # fmt: skip
    """Cells arrive escaped."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(
            f'<td class="num">{c}</td>' if j in numeric else f"<td>{c}</td>"
            for j, c in enumerate(row)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _image(images: dict[str, bytes], name: str, alt: str) -> str:
    data = base64.b64encode(images[name]).decode("ascii")
    return f'<p><img src="data:image/png;base64,{data}" alt="{esc(alt)}"></p>'


def _best_section(report: Report) -> str:
    variants = list(report.best) + sorted({t.variant for t in report.trials} - set(report.best))
    rows = []
    for variant in variants:
        mine = [t for t in report.trials if t.variant == variant]
        scores = sorted(t.score for t in mine if t.status == "finished" and t.score is not None)
        best = report.best.get(variant)
        curve = report.curves.get(variant, {}).get("curve", [])
        path = " → ".join(f"{100 * p['val_acc']:.1f}" for p in curve) if len(curve) > 1 else "final model"  # fmt: skip
        other = ", ".join(
            f"{n} {s}"
            for s in ("diverged", "stopped early", "failed", "unfinished")
            if (n := sum(t.status == s for t in mine))
        )
        rows.append(
            [
                esc(variant),
                esc(_pct(best.score)) if best else "–",
                esc(_pct(best.test_acc)) if best else "–",
                esc(_params_text(report, best)) if best else "no finished trial",
                esc(path),
                str(len(scores)),
                esc(" / ".join(_pct(v) for v in (scores[0], statistics.median(scores), scores[-1])))
                if scores
                else "–",
                esc(other) or "0",
                f"<code>{esc(best.run_id)}</code>" if best else "–",
            ]
        )
    header = ["variant", "best val score", "its test acc", "its searched params",
              "its curve (val %, 1..K models)", "finished trials", "val score min / median / max",
              "not counted", "MLflow run"]  # fmt: skip
    classes = ["best" if i == 0 and report.best else "" for i in range(len(rows))]
    return (
        "<h2>Best trial per variant</h2>"
        '<p class="muted">Variants ordered by their best validation score (the accuracy of the model '
        "each deploys); the spread is over the variant's finished trials; diverged, stopped and "
        "failed trials are counted apart. The test accuracy is reported, never used to choose.</p>"
        + _table(header, rows, {1, 2, 5, 6}, classes)
    )


def _verdict_section(report: Report) -> str:
    """The answer first: the confirmation's verdict and how sure it is, or, without one, the best
    search trial and why it is not yet an answer."""
    if report.confirmations:
        verdict = confirm.verdict(confirmation_rows(report))
        how = (
            "Each variant's best configuration was retrained on fresh seeds"
            + (", each run on a fresh validation split, " if report.fresh_splits else ", ")
            + "the same seeds and splits for every variant, and compared run by run with the leader "
            f"(a t-test of the paired differences against the noise pooled over variants, p < {ALPHA}: "
            "beyond noise). Chosen on validation accuracy only; the test accuracy is reported."
        )
        return (
            f'<h2>Verdict</h2><p class="verdict">{esc(verdict.text)}</p>'
            f'<p class="muted">{esc(how)}</p>'
        )
    if not report.best:
        return (
            '<h2>Verdict</h2><p class="verdict unconfirmed">No answer: no variant has a finished, '
            "non-diverged trial.</p>"
        )
    variant, trial = next(iter(report.best.items()))
    finished = sum(t.status == "finished" for t in report.trials)
    text = (
        f"Not confirmed: the best search trial is {variant}'s, {_pct(trial.score)} validation "
        f"accuracy, one seed on one validation split, the best of {finished} finished trials (so it "
        "flatters). How sure that is, is unknown: run the search with --confirm-seeds 3 (or "
        "confirm_seeds: 3 in the space) to retrain each variant's best on fresh seeds and splits."
    )
    return f'<h2>Verdict</h2><p class="verdict unconfirmed">{esc(text)}</p>'


def _confirmed_section(report: Report) -> str:
    if not report.confirmations:
        return ""
    rows = confirmed(report)
    seeds = max(r.seeds for r in rows)
    body = [
        [
            esc(r.variant),
            esc(f"{r.seeds} ({r.diverged} diverged)" if r.diverged else str(r.seeds)),
            esc(f"{100 * r.val_mean:.2f} ± {100 * r.val_std:.2f}"),
            esc(f"{100 * r.test_mean:.2f} ± {100 * (r.test_std or 0.0):.2f}")
            if r.test_mean is not None
            else "–",
            esc(f"{100 * r.lead[0]:+.2f} ({100 * r.lead[1]:+.2f} to {100 * r.lead[2]:+.2f})")
            if r.lead is not None
            else "–",
            "–" if r.p_value is None else esc(f"{r.p_value:.3g}"),
            str(r.models),
            esc(r.verdict),
        ]
        for r in rows
    ]
    splits = " and validation splits" if report.fresh_splits else ""
    header = ["variant", "runs", "val acc (%)", "test acc (%)", "leader's lead (points)", "p",
              "models", "verdict"]  # fmt: skip
    return (
        f"<h2>Confirmed over {seeds} seeds{splits}</h2>"
        '<p class="muted">Each variant\'s best configuration retrained; mean ± standard deviation '
        "in accuracy points over its runs (a diverged run counts with score 0). Lead: how far the "
        "leader's validation accuracy is above the variant's, the mean of their paired differences "
        f"with its 95% interval; p ≥ {ALPHA}: within noise of the leader. Models: how many models "
        "the deployed model runs per prediction.</p>"
        + _table(header, body, {1, 2, 3, 4, 5, 6}, ["best" if r.verdict == "best" else "" for r in rows])
    )


def _importance_section(report: Report, images: dict[str, bytes]) -> str:
    parts = ["<h2>Parameter importances</h2>"]
    drawn = drawn_importances(report)
    if drawn:
        parts.append(
            '<p class="muted">fANOVA (Optuna) on the study rebuilt from the recorded trials and the '
            "space file's distributions: the share of the validation score's variance each "
            "searched parameter explains. Few trials make these rough; diverged trials count with "
            "score 0.</p>"
        )
        parts.append(_image(images, "importances.png", "parameter importances"))
    absent = [i for i in report.importances if i not in drawn]
    if absent:
        why = "; ".join(f"{i.title}: {_absent(i)}" for i in absent)
        lead = "No panel for" if drawn else "No importance panels"
        parts.append(f'<p class="muted">{esc(f"{lead}: {why}.")}</p>')
    return "".join(parts)


def _absent(study: Importances) -> str:
    """Why a study has no panel, in a few words."""
    if len(study.values) == 1:
        return ONLY_ONE
    return study.reason.strip() or "nothing to show"


def _trials_section(report: Report) -> str:
    rows, classes = [], []
    for t in report.trials:
        note = esc(t.error) if t.error else ""
        rows.append(
            [esc(t.variant), f"<code>{esc(t.trial_id)}</code>", esc(t.status), esc(_pct(t.score)),
             esc(_pct(t.test_acc)), esc(_params_text(report, t)), note]
        )  # fmt: skip
        classes.append("bad" if t.status in ("failed", "diverged") else "")
    return f"<h2>All trials ({len(report.trials)})</h2>" + _table(
        ["variant", "trial", "status", "val score", "test acc", "searched params", "error"],
        rows,
        {3, 4},
        classes,
    )


def _soup_section(report: Report) -> str:
    """Soups and the greedy ensemble beside the best single trial and the confirmed choice: the
    winner, else the variant recommended among those that tie."""
    tags = report.parent.data.tags
    choice = tags.get("flatbasin.winner") or tags.get("flatbasin.recommended")
    row = next((c for c in confirmed(report) if c.variant == choice), None)
    label = "confirmed winner" if choice and choice == tags.get("flatbasin.winner") else "confirmed choice, a tie"
    return soup.html_section(report.soups, next(iter(report.best.values()), None), row, label)


def render_html(report: Report, images: dict[str, bytes]) -> str:
    tags, params = report.parent.data.tags, report.parent.data.params
    datasets = sorted({t.params.get("dataset", "?") for t in report.trials})
    epochs = sorted({t.params.get("epochs", "?") for t in report.trials})
    facts: list[tuple[str, str]] = [
        ("search run", f"<code>{esc(report.parent.info.run_id)}</code>"),
        ("tracking URI", f"<code>{esc(redact_uri(report.uri))}</code>"),
        ("state", esc(tags.get(STATE, report.parent.info.status.lower()))),
        ("data", esc(", ".join(datasets))
         + (esc(f" (validation set: {report.val_size} examples)") if report.val_size else "")),
        ("budget", esc(f"{', '.join(epochs)} epochs per trial")),
        ("trials", esc(_counts(report.trials))),
        ("sampler", esc(f"{params.get('sampler', '?')}, seed {params.get('seed', '?')}, "
                        f"scheduler {params.get('scheduler', '?')}")),
        ("space", esc(params.get("space", "?"))),
    ]  # fmt: skip
    if report.space_problem:
        facts.append(("space file", f'<span class="bad">{esc(report.space_problem)}</span>'))
    facts_html = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    # The answer first (the verdict, how sure it is, the confirmed table), then the details.
    sections = [
        _verdict_section(report),
        _confirmed_section(report),
        f"<h2>The search</h2><dl>{facts_html}</dl>",
        _best_section(report),
        "<h2>Accuracy against models averaged</h2>"
        + _image(images, "curves.png", "validation accuracy of each variant's best trial")
        + '<p class="muted">Each variant\'s best search trial: one seed, chosen as the best of '
        "several, so its score flatters; where the search confirmed them, the panel on the right "
        "gives each variant's mean ± sd over its confirmation runs, the numbers to compare. Curves "
        "are nudged sideways slightly so none hides another. Variants that deploy one final model "
        "(sgd, ema) are horizontal lines.</p>",
        _soup_section(report),
        _importance_section(report, images),
        _trials_section(report),
    ]
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(f'flatbasin report: {report.name}')}</title><style>{STYLE}</style></head>"
        f"<body><h1>{esc(f'Search {report.name}')}</h1>"
        + "".join(sections)
        + f'<p class="muted">Written by flatbasin {esc(flatbasin.__version__)} at {esc(when)}.</p>'
        + "</body></html>\n"
    )
