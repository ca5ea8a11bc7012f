"""`flatbasin report`: the figures on their own (no Ray), the report from runs written straight into
MLflow (no Ray), and the report of a real search end to end (Ray, MLflow, the CLI)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from typer.testing import CliRunner

from flatbasin.search import figures
from flatbasin.search.cli import app
from flatbasin.search.errors import UsageError
from flatbasin.search.report import write_files, write_report
from flatbasin.search.report_read import read_report
from flatbasin.search.report_stats import MIN_IMPORTANCE_TRIALS
from flatbasin.search.search_lookup import find_search

VAL = 144  # examples in the digits validation split


def acc(correct: int, of: int = VAL) -> float:
    """An accuracy as the loop records it: correct/N in float32."""
    return float(np.float32(correct) / np.float32(of))


def points(corrects: list[int]) -> list[dict[str, float]]:
    return [
        {"count": i, "val_acc": acc(k), "test_acc": acc(k + 3, 359)}
        for i, k in enumerate(corrects, 1)
    ]


# ----------------------------------------------------------------------------- figures, no Ray


def drawn(fig):
    """The renderer of the figure drawn as savefig draws it (Agg), to measure what lands where."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def test_figures_are_legible_and_cheap():
    snapshot = {"curve": points([140, 138, 138]), "extra_curves": {"weight_avg": points([120, 131, 137])}}  # fmt: skip
    ema = {"curve": points([136])}
    started = time.perf_counter()
    trial = figures.curve_figure({"snapshot": snapshot}, trial_id="ab12")
    trial.savefig(os.devnull, format="png")
    assert time.perf_counter() - started < 5  # tens of ms on an idle core; generous on a busy one

    (ax,) = trial.axes
    title = trial.texts[0].get_text() if trial.texts else ""
    assert "snapshot" in trial.get_suptitle() and "ab12" in trial.get_suptitle()
    assert title  # the note on the y-axis span
    low, high = ax.get_ylim()
    assert high - low >= figures.MIN_SPAN  # three examples apart never fill the axis
    legend = ax.get_legend()
    renderer = drawn(trial)
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # outside
    assert [t.get_text() for t in legend.get_texts()] == ["validation", "test", "weight_avg validation"]  # fmt: skip
    label = ax.xaxis.label.get_window_extent(renderer)
    assert label.y0 >= 0 and label.x1 <= trial.bbox.width  # the axis label is not clipped

    final_only = figures.curve_figure({"ema": ema}, trial_id="cd34")
    (ax,) = final_only.axes
    assert list(ax.get_xticks()) == []  # no meaningless count axis for one model
    assert "final model" in final_only.get_suptitle()
    assert any("validation 94.4%" in t.get_text() for t in ax.texts)

    several = figures.curve_figure({"swa": {"curve": points([135, 137])}, "snapshot": snapshot,
                                    "ema": ema})  # fmt: skip
    (ax,) = several.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("snapshot") and "final model" in labels[-1]  # best first
    renderer = drawn(several)
    legend_box = ax.get_legend().get_window_extent(renderer)
    assert legend_box.x0 >= ax.get_window_extent(renderer).x1  # the legend covers no data
    xs = [line.get_xdata()[0] for line in ax.lines if len(line.get_xdata()) > 1]
    assert len(set(xs)) == len(xs)  # curves are nudged apart, not drawn on top of each other

    only_finals = figures.comparison_figure({"sgd": {"curve": points([141])}, "ema": ema})
    (ax,) = only_finals.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["ema (final model)", "sgd (final model)"]  # fmt: skip

    bars = figures.importance_figure({"swa (6 trials)": {"swa/lr": 0.8, "swa/swa_lr": 0.2}})
    assert [t.get_text() for t in bars.axes[0].get_yticklabels()] == ["swa_lr", "lr"]


def test_confirmed_numbers_stand_beside_the_search_trials_curves():
    """A search trial's score is one lucky seed: the confirmation's mean ± sd is drawn and named too,
    in a panel of its own (on the "models averaged" axis a bar would read as more models)."""
    swa = {"curve": points([130, 135, 140])}
    fig = figures.comparison_figure(
        {"swa": swa, "sgd": {"curve": points([138])}},
        confirmed={"swa": (0.9, 0.02, 3), "sgd": (0.93, 0.01, 3)},
    )
    ax, panel = fig.axes
    labels = [t.get_text() for t in panel.get_legend().get_texts()]
    assert "confirmed: 90.0% ± 2.0%, 3 seeds" in labels[0] and "93.0% ± 1.0%" in labels[1], labels
    renderer = drawn(fig)
    assert panel.get_legend().get_window_extent(renderer).x1 <= fig.bbox.width  # nothing cut off
    assert not [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    bars = [c for c in panel.containers if c.__class__.__name__ == "ErrorbarContainer"]
    assert [bar.lines[0].get_data()[1][0] for bar in bars] == [0.93, 0.9]  # best mean first
    assert [t.get_text() for t in panel.get_xticklabels()] == ["sgd", "swa"]
    main, side = ax.get_window_extent(renderer), panel.get_window_extent(renderer)
    assert side.x0 > main.x1 and panel.get_ylim() == ax.get_ylim()  # apart, on the same scale
    assert ax.get_ylim()[0] <= 0.88 and ax.get_xlim()[1] < 4  # sd in view; no room made for bars
    for label in panel.get_xticklabels():  # the variants' names are not cut off at the bottom
        assert label.get_window_extent(renderer).y0 >= 0
    finals = figures.comparison_figure(
        {"sgd": {"curve": points([138])}}, confirmed={"sgd": (0.9, 0.02, 3)}
    )
    assert any("confirmed 90.0% ± 2.0% (3 seeds)" in t.get_text() for t in finals.axes[0].texts)


def test_validation_size_is_inferred_only_from_enough_values():
    many = [acc(k) for k in (68, 100, 120, 131, 136, 137, 139, 141, 143)]
    assert figures.infer_val_size(many) == VAL
    assert figures.infer_val_size(many[:4]) is None  # a divisor of N could explain four values
    assert figures.infer_val_size([acc(k, 400) for k in range(300, 390, 7)]) == 400
    low, high = figures.accuracy_limits([acc(138), acc(139)], VAL)
    assert high - low >= figures.MIN_EXAMPLES / VAL and high <= 1.01


# ----------------------------------------------------------------------------- runs written directly

SPACE = """\
name: synth
samples: 12
epochs: 4
variants:
  swa: {lr: {loguniform: [0.01, 0.2]}, swa_lr: {loguniform: [0.001, 0.05]}}
  snapshot: {lr: {loguniform: [0.05, 0.5]}, cycles: {int: [2, 4]}}
  ema: {lr: {loguniform: [0.02, 0.4]}}
"""
ERROR_TEXT = "<script>alert('x')</script> & DataError: corrupt"


def add_run(client, experiment, parent, role, variant, trial_id, params, *, score=None,
            curve=(), diverged=False, error=None, ensemble=False):  # fmt: skip
    """A run as tracking.py writes it: tags, params, per-epoch metrics, final metrics and curve
    (with its members' diversity for an ensemble)."""
    tags = {"mlflow.parentRunId": parent, "flatbasin.role": role, "flatbasin.variant": variant,
            "flatbasin.trial_id": trial_id}  # fmt: skip
    run = client.create_run(experiment, tags=tags).info.run_id
    now = int(time.time() * 1000)
    flat = {"variant": variant, "dataset": "digits", "epochs": "4", **params}
    metrics = []
    if score is not None:
        metrics += [Metric("score", score, now, 4), Metric("val_acc", score, now, 4),
                    Metric("val_loss", 1 - score, now, 4), Metric("final_score", score, now, 0),
                    *([] if diverged else [Metric("test_acc", score - 0.01, now, 0)])]  # fmt: skip
        for p in curve:
            metrics += [Metric("curve/val_acc", p["val_acc"], now, p["count"]),
                        Metric("curve/test_acc", p["test_acc"], now, p["count"])]  # fmt: skip
            if ensemble and p["count"] > 1:
                metrics.append(Metric("diversity/disagreement", 0.05, now, p["count"]))
    run_tags = []
    if score is not None:
        run_tags += [RunTag("flatbasin.final_logged", "true"),
                     RunTag("flatbasin.diverged", str(diverged).lower())]  # fmt: skip
    if error:
        run_tags.append(RunTag("flatbasin.error", error))
    client.log_batch(run, metrics=metrics, params=[Param(k, str(v)) for k, v in flat.items()],
                     tags=run_tags)  # fmt: skip
    client.set_terminated(run, "FAILED" if error else "FINISHED")
    return run


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A search written straight into MLflow: swa's score follows lr alone; snapshot has a diverged
    and a failed trial; ema has one trial; confirmation runs for every variant."""
    tmp = tmp_path_factory.mktemp("synthetic")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    space = tmp / "synth.yaml"
    space.write_text(SPACE)
    experiment = client.create_experiment("synth", artifact_location=str(tmp / "artifacts"))
    parent = client.create_run(experiment, tags={"flatbasin.role": "search", "flatbasin.state": "finished"})  # fmt: skip
    parent_id = parent.info.run_id
    client.log_batch(parent_id, params=[Param("space", str(space)), Param("seed", "0"),
                                        Param("sampler", "TPE")])  # fmt: skip
    client.log_artifact(parent_id, str(space))
    rng = np.random.default_rng(0)
    for i, lr in enumerate(np.geomspace(0.01, 0.2, 6)):
        correct = 120 + 4 * i  # better with a larger lr, whatever swa_lr is
        add_run(client, experiment, parent_id, "trial", "swa", f"swa{i}",
                {"lr": lr, "swa_lr": float(rng.uniform(0.001, 0.05))}, score=acc(correct),
                curve=points([correct - 3, correct - 1, correct]))  # fmt: skip
    add_run(client, experiment, parent_id, "trial", "snapshot", "snap0", {"lr": 0.1, "cycles": 3},
            score=acc(133), curve=points([136, 134, 133]))  # fmt: skip
    add_run(client, experiment, parent_id, "trial", "snapshot", "snap1", {"lr": 0.5, "cycles": 2},
            score=0.0, diverged=True)  # fmt: skip
    add_run(client, experiment, parent_id, "trial", "snapshot", "snap2", {"lr": 0.2, "cycles": 4},
            error=ERROR_TEXT)  # fmt: skip
    add_run(client, experiment, parent_id, "trial", "ema", "ema0", {"lr": 0.05}, score=acc(139),
            curve=points([139]))  # fmt: skip
    for variant, corrects in {"swa": [140, 141, 140], "ema": [139, 141, 140], "snapshot": [128, 129, 128]}.items():  # fmt: skip
        for seed, correct in enumerate(corrects):
            add_run(client, experiment, parent_id, "confirm", variant, f"c-{variant}{seed}", {},
                    score=acc(correct))  # fmt: skip
    client.set_terminated(parent_id, "FINISHED")
    return uri, parent_id, tmp


def test_report_from_mlflow_runs(synthetic):
    uri, parent_id, tmp = synthetic
    page = write_report("synth", uri, out=tmp / "out")
    assert page == (tmp / "out" / "report.html").resolve()
    assert {p.name for p in (tmp / "out").iterdir()} == {"curves.png", "importances.png", "report.html"}  # fmt: skip
    text = page.read_text()
    assert f"{100 * acc(140):.2f}%" in text and f"{100 * acc(139):.2f}%" in text  # swa, ema best
    assert "<script>" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp;" in text  # fmt: skip
    assert "Confirmed over 3 seeds" in text and "within noise" in text and "worse" in text
    assert "not enough trials (1" in text  # ema: one trial
    assert 'src="data:image/png;base64,' in text and '<img src="curves.png"' not in text
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert logged == {"report/curves.png", "report/importances.png", "report/report.html"}

    report = read_report(client, find_search(client, parent_id, uri), uri)  # by run id as well
    assert list(report.best) == ["swa", "ema", "snapshot"]
    assert report.val_size == VAL
    by_title = {i.title: i for i in report.importances}
    swa = by_title["swa"].values
    assert swa["swa/lr"] > swa["swa/swa_lr"]  # the score follows lr alone
    assert by_title["variant (all trials)"].values  # several variants: the variant's importance
    assert not by_title["ema"].values and "not enough trials" in by_title["ema"].reason
    statuses = {t.trial_id: t.status for t in report.trials}
    assert statuses["snap1"] == "diverged" and statuses["snap2"] == "failed"


FEW_SPACE = """\
name: few
samples: 5
epochs: 4
variants:
  swa: {lr: {loguniform: [0.01, 0.2]}, swa_lr: {loguniform: [0.001, 0.05]}}
  snapshot: {lr: {loguniform: [0.05, 0.5]}, cycles: {int: [2, 4]}}
"""


@pytest.fixture(scope="module")
def few(tmp_path_factory):
    """A search of 3 swa and 2 snapshot trials, confirmed over 3 runs that each had a fresh seed
    and a fresh validation split (their seed and val_seed params), as the search records them."""
    tmp = tmp_path_factory.mktemp("few")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    space = tmp / "few.yaml"
    space.write_text(FEW_SPACE)
    experiment = client.create_experiment("few", artifact_location=str(tmp / "artifacts"))
    parent = client.create_run(experiment, tags={"flatbasin.role": "search"}).info.run_id
    client.log_batch(parent, params=[Param("space", str(space)), Param("seed", "0")])
    client.log_artifact(parent, str(space))
    for i, lr in enumerate((0.02, 0.05, 0.1)):
        add_run(client, experiment, parent, "trial", "swa", f"swa{i}", {"lr": lr, "swa_lr": 0.01},
                score=acc(130 + i), curve=points([128, 129 + i, 130 + i]))  # fmt: skip
    for i, cycles in enumerate((2, 4)):
        add_run(client, experiment, parent, "trial", "snapshot", f"snap{i}", {"lr": 0.1, "cycles": cycles},
                score=acc(131 + i), curve=points([125, 131 + i]), ensemble=True)  # fmt: skip
    for variant, corrects in {"swa": [139, 141, 137], "snapshot": [140, 141, 138]}.items():
        for k, correct in enumerate(corrects):
            add_run(client, experiment, parent, "confirm", variant, f"c-{variant}{k}",
                    {"seed": k + 1, "val_seed": k + 2}, score=acc(correct),
                    curve=points([correct - 2, correct]) if variant == "snapshot" else points([correct]),
                    ensemble=variant == "snapshot")  # fmt: skip
    client.set_terminated(parent, "FINISHED")
    return uri, tmp


def test_the_report_opens_with_the_verdict(few):
    uri, tmp = few
    page = write_report("few", uri, out=tmp / "out", log=False)
    text = page.read_text()
    verdict = text.index('<p class="verdict">')
    assert verdict < text.index("<table") and verdict < text.index("<dl>")  # before every table
    assert text.index("Confirmed over 3 seeds and validation splits") < text.index("Best trial per variant")  # fmt: skip
    said = re.search(r'<p class="verdict">(.*?)</p>', text).group(1)
    assert said.startswith("No winner beyond noise: snapshot leads") and "swa" in said
    assert "over 3 runs, each with a fresh seed and a fresh validation split" in said
    assert "swa costs least (one model per prediction)" in said  # snapshot runs 2 models
    # Numbers never wrap: every cell of numbers with spaces inside (where a line could break, as in
    # "96.99 ± 0.51") is a numeric cell, kept on one line.
    assert re.search(r"td\.num \{[^}]*white-space: nowrap", text)
    cells = re.findall(r"<td>([^<]*)</td>", text)
    breakable = re.compile(r"[\d.,%±+\-–()/]*\d[\d.,%±+\-–()/]* [\d.,%±+\-–() /to]*")
    assert not [c for c in cells if breakable.fullmatch(c)], cells
    assert re.search(r'<td class="num">\d+\.\d\d ± \d+\.\d\d</td>', text)
    # 3 and 2 trials: no importance panel, and one line says why.
    assert not (tmp / "out" / "importances.png").exists() and "importances.png" not in text
    (line,) = re.findall(r"No importance panels: [^<]*", text)
    assert "swa: not enough trials (3; importances need at least 4)" in line
    assert "snapshot: not enough trials (2" in line and "variant (all trials): the only searched parameter" in line  # fmt: skip


def test_a_search_without_confirmation_says_so_first(synthetic, tmp_path):
    uri, parent_id, _ = synthetic
    client = MlflowClient(uri)
    report = read_report(client, find_search(client, parent_id, uri), uri)
    report.confirmations = []
    page = write_files(report, tmp_path)[-1].read_text()
    said = re.search(r'<p class="verdict unconfirmed">(.*?)</p>', page).group(1)
    assert (
        said.startswith("Not confirmed: the best search trial is swa&#x27;s")
        and "--confirm-seeds" in said
    )
    assert page.index("verdict unconfirmed") < page.index("<table")


def test_report_bad_input_is_one_message(synthetic, tmp_path):
    uri, parent_id, _ = synthetic
    client = MlflowClient(uri)
    trial = next(r for r in client.search_runs([client.get_experiment_by_name("synth").experiment_id])
                 if r.data.tags.get("flatbasin.role") == "trial")  # fmt: skip
    with pytest.raises(UsageError, match=f"not a search's run.*{parent_id}"):
        write_report(trial.info.run_id, uri, out=tmp_path)
    with pytest.raises(UsageError, match=r"no search named or with run id 'nope'.*synth"):
        write_report("nope", uri, out=tmp_path)
    missing = tmp_path / "missing.db"
    with pytest.raises(UsageError, match="no MLflow store"):
        write_report("synth", f"sqlite:///{missing}", out=tmp_path)
    assert not missing.exists()  # a report never creates a tracking store

    empty = client.create_experiment("empty", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(empty, tags={"flatbasin.role": "search"}).info.run_id
    add_run(client, empty, parent, "trial", "swa", "t0", {"lr": 0.1})  # never finished
    runner = CliRunner()
    result = runner.invoke(app, ["report", "empty", "--tracking-uri", uri, "--out", str(tmp_path)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "no finished trials" in result.output
    assert not (tmp_path / "report.html").exists()


# ----------------------------------------------------------------------------- a real search


def cli(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flatbasin", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip


def summary_scores(stdout: str) -> dict[str, str]:
    """variant -> the best score as the search's summary table printed it: columns variant,
    trials, val acc, test acc, MLflow run under a header and its rule; the params follow indented."""
    lines = stdout[stdout.index("best trial per variant") :].splitlines()[1:]
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["variant"])
    assert lines[header].split() == [
        "variant",
        "trials",
        "val",
        "acc",
        "test",
        "acc",
        "MLflow",
        "run",
    ]
    scores = {}
    for line in lines[header + 2 :]:  # past the header's rule
        if not line.strip() or line.startswith(" "):
            break
        variant, _, score, _, _ = line.split()
        scores[variant] = score
    return scores


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.xdist_group("searched")  # shares conftest.searched
@pytest.mark.timeout(900)  # the module's search runs in the first test's setup
def test_search_ends_with_its_report(searched):
    tmp, code, stdout, stderr = (
        searched.folder,
        searched.returncode,
        searched.stdout,
        searched.stderr,
    )
    assert code == 0, stdout + stderr
    assert "warning: the report was not written" not in stderr
    page = tmp / "reports" / "searched" / "report.html"
    assert f"Report:       {page}" in stdout and page.is_file()
    text = page.read_text()
    scores = summary_scores(stdout)
    assert {"sgd", "swa", "snapshot"} <= set(scores)
    for variant, score in scores.items():
        assert f"{100 * float(score):.2f}%" in text, (variant, score)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.xdist_group("searched")  # shares conftest.searched
@pytest.mark.timeout(900)
def test_report_command_writes_and_logs(searched, tmp_path):
    tmp, uri, code, stdout = searched.folder, searched.uri, searched.returncode, searched.stdout
    assert code == 0
    out = tmp_path / "again"
    done = cli("report", "searched", "--tracking-uri", uri, "--out", str(out), cwd=tmp, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Report:       {out / 'report.html'}" in done.stdout
    assert (out / "curves.png").stat().st_size > 10_000 and (out / "report.html").is_file()
    text = (out / "report.html").read_text()
    for variant, score in summary_scores(stdout).items():
        assert f"{100 * float(score):.2f}%" in text, (variant, score)
    assert "Parameter importances" in text and "All trials (6)" in text

    client = MlflowClient(uri)
    parent = find_search(client, "searched", uri)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/curves.png"} <= logged


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.xdist_group("searched")  # shares conftest.searched
@pytest.mark.timeout(900)
def test_importances_of_a_real_search(searched):
    uri = searched.uri
    assert searched.returncode == 0
    client = MlflowClient(uri)
    report = read_report(client, find_search(client, "searched", uri), uri)
    assert report.space is not None and report.val_size == VAL
    assert len(report.trials) == 6
    for study in report.importances:
        if study.trials >= MIN_IMPORTANCE_TRIALS:  # computed, or the one reason fANOVA cannot
            assert study.values or "scored the same" in study.reason, study
        else:
            assert "not enough trials" in study.reason, study
    assert any(study.values for study in report.importances)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.xdist_group("searched")  # shares conftest.searched
@pytest.mark.timeout(900)
def test_unknown_search_exits_2_without_traceback(searched):
    done = cli(
        "report", "no-such-search", "--tracking-uri", searched.uri, cwd=searched.folder, timeout=300
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "no-such-search" in done.stderr
    assert "searched" in done.stderr  # names the searches that are there


def test_importances_count_trials_whose_idle_parameters_were_not_sampled():
    # swa_lr_max is sampled in cyclic mode only (trainables/conditions.py): a constant-mode trial
    # lacks it and still counts; a trial lacking a parameter that would have acted does not.
    from flatbasin.search.report_data import Trial
    from flatbasin.search.report_stats import importances
    from flatbasin.spaces.loader import space_from_dict

    space = space_from_dict({"name": "c", "epochs": 4, "variants": {"swa": {
        "lr": {"loguniform": [0.01, 0.2]}, "swa_mode": {"choice": ["constant", "cyclic"]},
        "swa_lr_max": {"loguniform": [0.05, 0.2]}}}})  # fmt: skip
    trials = []
    for i, lr in enumerate(np.geomspace(0.01, 0.2, 8)):
        params = {"lr": str(lr), "swa_mode": ("constant", "cyclic")[i % 2]}
        if i % 2:
            params["swa_lr_max"] = "0.1"
        trials.append(Trial(f"r{i}", f"t{i}", "swa", "finished", 0.5 + i / 100, 0.5, 0.5, params))
    lacking = Trial(
        "r9", "t9", "swa", "finished", 0.9, 0.9, 0.1, {"lr": "0.05", "swa_mode": "cyclic"}
    )
    (study,) = importances([*trials, lacking], space, "")
    assert study.trials == 8 and "1 trial(s) outside the logged space" in study.reason
    assert set(study.values) == {"swa/lr", "swa/swa_mode"}  # the keys every trial has
    assert study.values["swa/lr"] > study.values["swa/swa_mode"]  # the score follows lr
