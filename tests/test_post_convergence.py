"""Post-convergence search (`--from`): trials continue one converged model and search only the tail.

Unit tests run in seconds without Ray: trials start from bit-identical weights, the tail's budget
and curve, `train --from`, a resumed and a reproduced post-convergence trial ending exactly where
the first one did, and every bad SOURCE ending in exit status 2 before Ray starts. One end-to-end
search through Ray and MLflow (marked integration and slow) checks that the base is trained once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from torch.optim.swa_utils import AveragedModel, update_bn
from typer.testing import CliRunner

from flatbasin.search import post_convergence
from flatbasin.search.cli import app
from flatbasin.search.errors import UsageError, plain_console
from flatbasin.search.reproduce import reproduce
from flatbasin.search.tracking import Tracker, TrialRecord
from flatbasin.spaces import SpaceError, load_space
from flatbasin.trainables import loop
from flatbasin.trainables.checkpoint import CheckpointError
from flatbasin.trainables.config import TrialConfig, make_config
from flatbasin.trainables.curve import accuracy
from flatbasin.trainables.loop import predict, train
from flatbasin.trainables.sanity import build
from flatbasin.trainables.start import (
    Converged,
    StartPoint,
    apply_start,
    read_converged,
    weights_sha256,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    """A real converged model: `flatbasin train --variant sgd --epochs 2 --checkpoint` on digits."""
    path = tmp_path_factory.mktemp("base") / "base.pt"
    args = ["train", "--variant", "sgd", "--epochs", "2", "--set", "threads=1"]
    result = runner.invoke(app, [*args, "--checkpoint", str(path)])
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def base(base_file) -> Converged:
    return read_converged(base_file)


def continuing(variant: str, converged: Converged, run_id: str | None = None, **settings):
    start = StartPoint(
        source="test", sha256=converged.sha256, run_id=run_id, epochs=converged.epochs
    )
    defaults = {"epochs": 2, "batch_size": 32, "threads": 1}
    return make_config(variant, {**defaults, **settings}, start=start)


# ----------------------------------------------------------------------------- the trials


def test_trials_from_one_base_start_from_bit_identical_weights(base, small, monkeypatch):
    """Whatever their tail, seed or variant, trials load exactly the base's weights, then part."""
    loaded: list[dict[str, torch.Tensor]] = []

    def spy(model, start, weights):
        apply_start(model, start, weights)
        loaded.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    monkeypatch.setattr(loop, "apply_start", spy)
    configs = [
        continuing("cyclic_average", base, cycles=2, lr_large=0.05, seed=0),
        continuing("cyclic_average", base, cycles=1, lr_large=0.2, seed=7),
        continuing("swa", base, swa_lr=0.02, seed=3),
        continuing("sgd", base, lr=0.01),
    ]
    results = [train(c, data=small, start_weights=base.weights) for c in configs]
    assert len(loaded) == len(configs)
    for state in loaded:
        assert state.keys() == base.weights.keys()
        assert all(torch.equal(state[k], base.weights[k]) for k in state)
    assert results[0].history != results[1].history  # and from there they go their own ways


def test_the_curve_starts_at_the_converged_model(base, small):
    """Seed 000's figure: w_1 is the converged model, so count 1 is m(w_1) after its BN pass."""
    config = continuing("cyclic_average", base, cycles=2)
    result = train(config, data=small, start_weights=base.weights)
    model = build(config, small)
    model.load_state_dict(base.weights)
    alone = AveragedModel(model)
    alone.update_parameters(model)
    update_bn(small.inputs("train"), alone)
    assert [p.count for p in result.curve] == [1, 2, 3]  # w_1, then one per cycle
    assert result.curve[0].val_acc == accuracy(predict(alone, small.inputs("val")), small.y_val)
    assert [m.epoch for m in result.history] == [1, 2]  # the budget is the tail's


def test_the_tail_alone_spends_the_budget(base):
    cyclic = continuing("cyclic_average", base, epochs=5, cycles=2, lr_large=0.1, lr_small=0.01)
    variant = cyclic.build_variant()
    assert variant.converged and variant.plan()["lead_epochs"] == 1  # 5 = 1 + 2 cycles of 2
    assert variant.join_steps(10) == [0, 30, 50]  # w_1 at step 0, then each cycle's end
    lr = variant.schedule(10)
    assert [lr(0), lr(10), lr(20), lr(30)] == [0.01, 0.1, 0.01, 0.1]
    swa = continuing("swa", base, epochs=3, swa_lr=0.02).build_variant()
    assert swa.join_steps(10) == [10, 20, 30] and swa.schedule(10)(0) == 0.02
    fge = continuing("fge", base, epochs=3, cycles=2, lr_1=0.1, lr_2=0.001).build_variant()
    assert fge.join_steps(10) == [15, 25] and fge.schedule(10)(0) == 0.001
    sgd = continuing("sgd", base, lr=0.03).build_variant()  # no base phase: its own schedule
    assert not sgd.converged and sgd.schedule(10)(0) == 0.03
    with pytest.raises(ValueError, match="cycles=3 does not fit the budget: 2 epoch"):
        continuing("cyclic_average", base, cycles=3)


def test_a_resumed_post_convergence_trial_ends_bit_for_bit(base, small, tmp_path):
    config = continuing("cyclic_average", base, cycles=2)
    full = train(config, data=small, start_weights=base.weights)
    ckpt = tmp_path / "c.pt"

    class Killed(Exception):
        pass

    def die(metrics, save):
        save(ckpt)
        raise Killed

    with pytest.raises(Killed):
        train(config, data=small, on_epoch=die, start_weights=base.weights)
    resumed = train(config, data=small, resume=ckpt)  # the checkpoint holds the weights now
    assert (resumed.history, resumed.curve) == (full.history, full.curve)


def test_only_the_named_weights_are_accepted(base, small):
    config = continuing("sgd", base)
    other = {k: v + 1 if v.is_floating_point() else v for k, v in base.weights.items()}
    with pytest.raises(CheckpointError, match="not the ones this trial names"):
        train(config, data=small, start_weights=other)
    with pytest.raises(CheckpointError, match="its weights were not given"):
        train(config, data=small)
    assert (
        weights_sha256(base.weights)
        == base.sha256
        == weights_sha256({k: base.weights[k] for k in reversed(list(base.weights))})
    )


# ----------------------------------------------------------------------------- flatbasin train


def test_train_from_a_checkpoint(base_file, base, tmp_path):
    out = tmp_path / "r.json"
    args = ["train", "--variant", "cyclic_average", "--epochs", "2", "--set", "cycles=2",
            "--set", "threads=1", "--from", str(base_file), "--json", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"continuing checkpoint {base_file}" in result.output
    assert "the 2 epochs are the tail's" in result.output
    record = json.loads(out.read_text())
    assert record["config"]["start"]["sha256"] == base.sha256
    assert record["config"]["start"]["path"] == str(base_file)
    assert [m["epoch"] for m in record["history"]] == [1, 2]
    assert [p["count"] for p in record["curve"]] == [1, 2, 3]


# ----------------------------------------------------------------------------- reproduce


def test_reproduce_of_a_post_convergence_trial_fetches_the_base_and_matches(
    base_file, tmp_path, monkeypatch
):
    """A trial recorded as a search records it (its base run holding checkpoint.pt), reproduced
    without Ray: the base comes back from MLflow, is checked by hash, and every number matches."""
    from flatbasin.trainables.ray_entry import epoch_metrics, final_metrics

    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts in ./mlruns

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "pc-unit", search_key=str(tmp_path / "runs" / "pc-unit"))
    tracker.parent()
    base_run = tracker.record_base(base_file, str(base_file), result=None)
    converged = read_converged(base_file)
    start = StartPoint(source=str(base_file), sha256=converged.sha256, run_id=base_run,
                       path=str(base_file), epochs=converged.epochs)  # fmt: skip
    sampled = {"variant": "cyclic_average", "settings": {"epochs": 2, "threads": 1},
               "cyclic_average": {"cycles": 2}, "start": start.model_dump(mode="json")}  # fmt: skip
    config = TrialConfig.model_validate(
        {
            "variant": "cyclic_average",
            "epochs": 2,
            "threads": 1,
            "params": {"cycles": 2},
            "start": start.model_dump(mode="json"),
        }
    )
    result = train(config, start_weights=converged.weights)
    record = TrialRecord("t0001", sampled)
    for m in result.history:
        record.add(epoch_metrics(m, []))
    record.add(final_metrics(result, []))
    record.status = "FINISHED"
    tracker.write(record)
    run_id = tracker.run_id("t0001")
    assert MlflowClient(uri).get_run(run_id).data.tags["flatbasin.base_run"] == base_run

    assert reproduce(run_id, uri, plain_console())
    again = [r for r in MlflowClient(uri).search_runs([tracker.experiment_id])
             if r.data.tags.get("flatbasin.role") == "reproduction"]  # fmt: skip
    assert len(again) == 1 and again[0].data.tags["flatbasin.base_run"] == base_run
    files = {a.path for a in MlflowClient(uri).list_artifacts(again[0].info.run_id)}
    assert "checkpoint.pt" in files  # a reproduction keeps its weights: --from can continue it


# ----------------------------------------------------------------------------- bad SOURCEs

SPACE = """
name: pc-bad
samples: 2
epochs: 2
dataset: {dataset}
variants:
  cyclic_average: {{cycles: {{int: [1, 2]}}, lr_large: {{loguniform: [0.02, 0.1]}}}}
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, str]:
    """An MLflow store holding one run that kept no weights: (uri, run id)."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    here = Path.cwd()
    os.chdir(folder)  # MLflow puts a SQLite store's artifacts in ./mlruns
    try:
        run = Tracker(uri, "other", search_key=str(folder / "other")).parent()
    finally:
        os.chdir(here)
    return uri, run


def count_runs(uri: str) -> int:
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids))


def other_model(base_file: Path, folder: Path) -> Path:
    """A checkpoint that says digits but holds a narrower network's weights."""
    from flatbasin.trainables.models import SmallCNN

    state = torch.load(base_file, weights_only=True)
    state["model"] = SmallCNN(1, 10, width=8).state_dict()
    path = folder / "narrow.pt"
    torch.save(state, path)
    return path


BAD_SOURCES = {
    "run id in a store that does not exist": ("digits", "{absent}", "holds no runs yet"),
    "run id that does not exist": (
        "digits",
        "0123456789abcdef0123456789abcdef",
        "no such MLflow run",
    ),
    "run that kept no weights": ("digits", "{weightless}", "kept no weights (checkpoint.pt)"),
    "checkpoint file that does not exist": ("digits", "{tmp}/nope.pt", "does not exist"),
    "corrupt checkpoint": ("digits", "{tmp}/corrupt.pt", "cannot be read"),
    "truncated checkpoint": ("digits", "{tmp}/truncated.pt", "cannot be read"),
    "checkpoint of other data": (
        "mnist1d",
        "{base}",
        "dataset (trained on 'digits', now 'mnist1d')",
    ),
    "checkpoint of another model": ("digits", "{narrow}", "its model does not fit"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES), ids=str)
def test_a_bad_source_exits_2_before_ray(case, base_file, store, tmp_path, ray_tmpdir, monkeypatch):
    import ray

    dataset, source, needle = BAD_SOURCES[case]
    monkeypatch.chdir(tmp_path)
    uri, weightless = store
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "truncated.pt").write_bytes(base_file.read_bytes()[:500])
    values = {"absent": "fedcba9876543210fedcba9876543210", "weightless": weightless,
              "tmp": tmp_path, "base": base_file,
              "narrow": other_model(base_file, tmp_path)}  # fmt: skip
    source = source.format(**values)
    if case == "run id in a store that does not exist":
        uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(dataset=dataset))
    before = count_runs(store[0])
    result = runner.invoke(
        app,
        ["search", str(space), "--from", source, "--tracking-uri", uri,
         "--storage", str(tmp_path / "runs")],
        env={"RAY_TMPDIR": str(ray_tmpdir)},
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert needle in " ".join(result.output.split()), result.output
    assert sum(line.startswith("error:") for line in result.output.splitlines()) == 1
    assert not ray.is_initialized() and not list(ray_tmpdir.rglob("session_*"))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "fresh.db").exists()
    assert count_runs(store[0]) == before  # no run was made


BAD_SPACES = {
    "base without from": ("from_none", "base: {epochs: 2}\n", "base: sets the base phase"),
    "base on other data": (
        "base",
        "base: {dataset: mnist1d}\n",
        "base.dataset: the base phase trains",
    ),
    "base of another model": ("base", "base: {model: resnet18}\n", "base.model"),
    "unknown base key": ("base", "base: {cycles: 2}\n", "base.cycles: unknown key"),
    "bad base value": ("base", "base: {lr: -1}\n", "base.lr: Input should be greater than 0"),
    "tail too short": (
        "base",
        "",
        "cycles=3 does not fit the budget: 2 epoch(s) after convergence",
    ),
    "empty from": ("''", "", "from: give base"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES), ids=str)
def test_a_bad_post_convergence_space_is_refused(case, tmp_path):
    start, extra, needle = BAD_SPACES[case]
    head = "" if start == "from_none" else f"from: {start}\n"
    cycles = "{int: [1, 3]}" if case == "tail too short" else "2"
    space = tmp_path / "space.yaml"
    space.write_text(f"{head}{extra}epochs: 2\nvariants:\n  cyclic_average: {{cycles: {cycles}}}\n")
    with pytest.raises(SpaceError) as err:
        load_space(space)
    assert needle in str(err.value)


def test_a_post_convergence_space_records_the_mode_and_searches_the_tail(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        "from: base\nbase: {epochs: 6, lr: 0.1}\nepochs: 4\nvariants:\n"
        "  cyclic_average: {lr: {loguniform: [0.01, 0.1]}, base_frac: 0.4, cycles: {int: [1, 4]}}\n"
        "  sgd: {lr: {loguniform: [0.01, 0.1]}}\n"
    )
    space = load_space(space_file)
    assert space.start_from == "base"
    base = space.base_config()
    assert (base.variant, base.epochs, base.lr) == ("sgd", 6, 0.1)
    tail, left_out = space.continuing({"source": "base", "sha256": "a" * 64})
    assert left_out == {"cyclic_average": ["base_frac", "lr"]}  # the base phase's, not searched
    assert set(tail.variants["cyclic_average"][0]) == {"cycles"}
    assert set(tail.variants["sgd"][0]) == {"lr"}  # sgd continues with its own schedule
    assert all(c.start is not None and c.epochs == 4 for c in tail.corner_configs())


def test_resume_with_another_source_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    key = str(tmp_path / "runs" / "pc")
    Tracker(uri, "pc", search_key=key).parent(params={"from": "base"})
    space_file = tmp_path / "pc.yaml"
    space_file.write_text("epochs: 2\nvariants: {sgd: {}}\n")
    space = load_space(space_file)
    tracker = Tracker(uri, "pc", search_key=key)
    with pytest.raises(
        UsageError, match="continues the converged model base; resume it with --from base"
    ):
        post_convergence.plan(space, None, tracker, resume=True)
    with pytest.raises(UsageError, match="resume it with --from base"):
        post_convergence.plan(space, str(tmp_path / "other.pt"), tracker, resume=True)


def test_the_resume_command_names_the_source(tmp_path, monkeypatch):
    from flatbasin.search.options import SearchOptions
    from flatbasin.search.resume import resume_command

    monkeypatch.chdir(tmp_path)
    space_file = tmp_path / "pc.yaml"
    space_file.write_text("epochs: 2\nvariants: {sgd: {}}\n")
    options = SearchOptions(tracking_uri="sqlite:///x.db", storage=tmp_path, start_from="b.pt")
    command = resume_command(load_space(space_file), options)
    assert command.endswith(f"--from {tmp_path / 'b.pt'} --resume")


def test_a_resumed_search_reuses_its_base_run(base_file, base, tmp_path, monkeypatch):
    """--resume finds the base run the search recorded and continues it: never a second base."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    key = str(tmp_path / "runs" / "pc")
    first = Tracker(uri, "pc", search_key=key)
    first.parent(params={"from": "base"})
    recorded = first.record_base(base_file, "base", result=None)
    space_file = tmp_path / "pc.yaml"
    space_file.write_text("from: base\nepochs: 2\nvariants: {cyclic_average: {cycles: 2}}\n")
    plan = post_convergence.plan(
        load_space(space_file), None, Tracker(uri, "pc", search_key=key), resume=True
    )
    assert plan is not None and plan.run_id == recorded
    assert plan.converged is not None and plan.converged.sha256 == base.sha256  # nothing to train


def test_train_from_a_bad_source_exits_2(base_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corrupt.pt").write_bytes(b"")
    for source, needle, dataset in (
        ("base", "`base` is a search's", "digits"),
        (str(tmp_path / "corrupt.pt"), "cannot be read", "digits"),
        (str(base_file), "dataset (trained on 'digits', now 'mnist1d')", "mnist1d"),
    ):
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        args = ["train", "--variant", "swa", "--dataset", dataset, "--epochs", "2",
                "--from", source, "--tracking-uri", uri]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert needle in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- end to end

E2E_SPACE = """
name: from-base
samples: 3
epochs: 2
confirm_seeds: 2
fixed: {batch_size: 64}
from: base
base: {epochs: 2}
variants:
  cyclic_average: {lr_large: {loguniform: [0.02, 0.1]}, cycles: {int: [1, 2]}}
"""


@pytest.mark.integration
@pytest.mark.slow
def test_a_search_from_base_trains_the_base_once(tmp_path, ray_tmpdir, process_groups):
    """`from: base` through the real CLI, local Ray and MLflow: one base run, trained once, before
    three trials that each continue exactly its weights for their 2-epoch tail; their record links
    to it; the weights reach the trials through the object store, not their configs; the best trial
    reproduces exactly, and `train --from` continues it from the run's checkpoint.pt."""
    space = tmp_path / "from-base.yaml"
    space.write_text(E2E_SPACE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmpdir)}
    proc = process_groups.spawn(
        [sys.executable, "-m", "flatbasin", "search", str(space), "--tracking-uri", uri,
         "--storage", str(tmp_path / "runs"), "--seed", "2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert out.count("Training the base once") == 1 and "searches the tail only" in out
    # Its confirmation keeps the search's validation split (the base trained on the rest) and says so.
    assert "over 2 fresh seeds, on the search's own validation split (its trials continue" in out
    assert "with fresh seeds, on the search's own validation split of 144 examples" in out

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("from-base").experiment_id
    runs = client.search_runs([exp])
    by_role: dict[str, list] = {}
    for run in runs:
        by_role.setdefault(run.data.tags.get("flatbasin.role"), []).append(run)
    (parent,) = by_role["search"]
    (base_run,) = by_role["base"]  # trained once
    trials = by_role["trial"]
    assert len(trials) == 3
    base_id = base_run.info.run_id
    assert base_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert [m.step for m in client.get_metric_history(base_id, "score")] == [1, 2]
    with_weights = Path(client.download_artifacts(base_id, "checkpoint.pt", str(tmp_path)))
    sha = read_converged(with_weights).sha256
    assert parent.data.tags["flatbasin.from_sha256"] == sha
    assert parent.data.params["from"] == "base"
    confirms = by_role["confirm"]
    assert len(confirms) == 2 and {r.data.params["seed"] for r in confirms} == {"1", "2"}
    assert (
        {r.data.params["val_seed"] for r in confirms}
        == {t.data.params["val_seed"] for t in trials}
        == {"None"}
    )
    assert {r.data.params["from_sha256"] for r in confirms} == {sha}  # the same base, no retraining
    for run in trials:
        assert run.data.tags["flatbasin.base_run"] == base_id
        assert run.data.params["from_sha256"] == sha
        assert [m.step for m in client.get_metric_history(run.info.run_id, "score")] == [1, 2]
        curve = client.get_metric_history(run.info.run_id, "curve/val_acc")
        assert min(m.step for m in curve) == 1
    curves = {
        r.info.run_id: client.get_metric_history(r.info.run_id, "curve/val_acc") for r in trials
    }
    first = {min(c, key=lambda m: m.step).value for c in curves.values()}
    assert len(first) == 1  # every curve starts at the same converged model
    for folder in (tmp_path / "runs" / "from-base").iterdir():
        params = folder / "params.json"
        if params.is_file():  # each trial's config names the weights; it does not carry them
            assert params.stat().st_size < 4096 and sha in params.read_text()

    best = parent.data.tags["flatbasin.best_search_run"]
    again = subprocess.run(
        [sys.executable, "-m", "flatbasin", "reproduce", best, "--tracking-uri", uri],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0 and "exact match" in again.stdout, again.stdout + again.stderr

    tail = subprocess.run(
        [sys.executable, "-m", "flatbasin", "train", "--variant", "swa", "--epochs", "1",
         "--set", "threads=1", "--from", best, "--tracking-uri", uri],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert tail.returncode == 0 and f"continuing run {best}" in tail.stdout, (
        tail.stdout + tail.stderr
    )
