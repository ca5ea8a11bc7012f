"""Prior-guided training (seed 004): the focus library's regression against numpy's least squares, a
library fitted on one tiny run and used in another, the refusals (other conv layers, another format
version, not a library), the switch rule, early stopping, and resume bit for bit across focus epochs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from flatbasin.search.cli import app
from flatbasin.search.errors import UsageError
from flatbasin.search.preflight import check_trials
from flatbasin.spaces import load_space
from flatbasin.trainables.config import make_config
from flatbasin.trainables.data import Data, load_data
from flatbasin.trainables.data_spec import DataSpec
from flatbasin.trainables.focus import (
    FORMAT,
    FocusLibrary,
    Harvest,
    LibraryError,
    ridge_fit,
)
from flatbasin.trainables.focus_harvest import fit_focus_library
from flatbasin.trainables.history import patience_exhausted, seconds_to_best
from flatbasin.trainables.loop import train
from flatbasin.trainables.sanity import TrialError
from flatbasin.trainables.variants.prior_guided import next_phase

runner = CliRunner()


def small(data: Data, n: int = 640) -> Data:
    return dataclasses.replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n])


@pytest.fixture(scope="module")
def target() -> Data:
    """The default draw of MNIST-1D (640 training signals): what prior_guided trains on."""
    return small(load_data(DataSpec(dataset="mnist1d"), "cpu"))


@pytest.fixture(scope="module")
def library_path(tmp_path_factory) -> Path:
    """A focus library fitted on one tiny run on another draw of MNIST-1D (data_seed 7, 2 epochs)."""
    source = make_config(
        "sgd", {"dataset": "mnist1d", "data_seed": 7, "epochs": 2, "batch_size": 32, "threads": 1}
    )
    data = small(load_data(source.data_spec, "cpu"))
    library, result = fit_focus_library(source, data=data)
    assert not result.diverged and library.meta["iterations"] == 2 * 20
    path = tmp_path_factory.mktemp("focus") / "mnist1d_seed7.pt"
    library.save(path)
    return path


def guided(library: Path, **settings):
    return make_config(
        "prior_guided",
        {"dataset": "mnist1d", "batch_size": 32, "threads": 1, "library": str(library), **settings},
    )


# ----------------------------------------------------------------------------- the regression


def reference(w: np.ndarray, g: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Per element, numpy's least squares on [w 1] with the ridge row [sqrt(λ) 0] appended: the
    penalty on the slope alone, λ = ridge × the layer's mean sum of squared deviations of w."""
    n, elements = w.shape
    lam = ridge * np.mean(((w - w.mean(0)) ** 2).sum(0))
    slopes, intercepts = np.empty(elements), np.empty(elements)
    for j in range(elements):
        design = np.vstack([np.column_stack([w[:, j], np.ones(n)]), [np.sqrt(lam), 0.0]])
        target = np.append(g[:, j], 0.0)
        (slopes[j], intercepts[j]), *_ = np.linalg.lstsq(design, target, rcond=None)
    return slopes, intercepts


@pytest.mark.parametrize("ridge", [0.0, 0.1, 2.0])
def test_elementwise_ridge_matches_numpy_least_squares(ridge):
    rng = np.random.default_rng(0)
    n, shape = 60, (2, 3)
    w = rng.normal(size=(n, 6)) * rng.uniform(0.1, 2.0, size=6)  # elements of different scales
    g = rng.normal(size=6) * w + rng.normal(size=6) + 0.3 * rng.normal(size=(n, 6))
    wt, gt = torch.tensor(w).reshape(n, *shape), torch.tensor(g).reshape(n, *shape)
    sums = torch.stack([wt.sum(0), gt.sum(0), (wt * wt).sum(0), (wt * gt).sum(0), (gt * gt).sum(0)])

    slope, intercept, r2 = ridge_fit(sums, n, "elementwise", ridge)

    want_a, want_c = reference(w, g, ridge)
    np.testing.assert_allclose(slope.reshape(-1).numpy(), want_a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(intercept.reshape(-1).numpy(), want_c, rtol=1e-9, atol=1e-12)
    residual = g - (want_a * w + want_c)
    want_r2 = 1 - (residual**2).sum() / ((g - g.mean(0)) ** 2).sum()
    assert r2 == pytest.approx(want_r2, rel=1e-9)


def test_layer_ridge_is_one_pooled_regression():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(40, 5))
    g = 0.7 * w - 0.2 + 0.1 * rng.normal(size=(40, 5))
    wt, gt = torch.tensor(w), torch.tensor(g)
    sums = torch.stack([wt.sum(0), gt.sum(0), (wt * wt).sum(0), (wt * gt).sum(0), (gt * gt).sum(0)])
    slope, intercept, _ = ridge_fit(sums, 40, "layer", 0.5)
    flat_w, flat_g = w.reshape(-1), g.reshape(-1)
    lam = 0.5 * ((flat_w - flat_w.mean()) ** 2).sum()
    design = np.vstack([np.column_stack([flat_w, np.ones_like(flat_w)]), [np.sqrt(lam), 0.0]])
    (a, c), *_ = np.linalg.lstsq(design, np.append(flat_g, 0.0), rcond=None)
    torch.testing.assert_close(slope, torch.full((5,), a, dtype=torch.float64))
    torch.testing.assert_close(intercept, torch.full((5,), c, dtype=torch.float64))


def test_harvest_streams_the_statistics_of_every_conv_parameter():
    """Recorded one iteration at a time (no iteration kept), the fit equals the batch reference."""
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Conv1d(2, 1, 1, bias=False))
    harvest = Harvest(model)
    assert list(harvest.parameters) == ["0.weight", "0.bias", "2.weight"]
    rng = np.random.default_rng(2)
    seen: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {k: [] for k in harvest.parameters}
    for _ in range(30):
        with torch.no_grad():
            for key, p in harvest.parameters.items():
                p.copy_(torch.tensor(rng.normal(size=p.shape)))
                p.grad = 0.5 * p.detach() + torch.tensor(rng.normal(size=p.shape), dtype=p.dtype)
                seen[key].append(
                    (p.detach().double().numpy().copy(), p.grad.double().numpy().copy())
                )
        harvest.record()
    library = harvest.fit("elementwise", 0.1, {})
    for key, pairs in seen.items():
        w = np.stack([a.reshape(-1) for a, _ in pairs])
        g = np.stack([b.reshape(-1) for _, b in pairs])
        want_a, want_c = reference(w, g, 0.1)
        np.testing.assert_allclose(
            library.slopes[key].reshape(-1).numpy(), want_a, rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose(
            library.intercepts[key].reshape(-1).numpy(), want_c, rtol=1e-4, atol=1e-6
        )
    assert library.layers == {
        "0": {"weight": [2, 1, 3], "bias": [2]},
        "2": {"weight": [1, 2, 1], "bias": None},
    }


# ----------------------------------------------------------------------------- fitted, then used


def test_library_from_one_run_guides_another(library_path, target):
    library = FocusLibrary.load(library_path)
    assert library.meta["source"]["data_seed"] == 7 and library.meta["model"] == "cnn1d"
    assert library.meta["source"]["fingerprint"] != target.fingerprint  # a different data set
    assert set(library.slopes) == {"features.0.weight", "features.3.weight", "features.6.weight"}

    # threshold 1: every gain is a stall, so the method switches after every epoch from the second on.
    config = guided(library_path, epochs=5, threshold=1.0, patience=None)
    result = train(config, data=target)
    assert [m.phase for m in result.history] == ["data", "data", "focus", "data", "focus"]
    focus = result.history[2]
    assert focus.train_loss is None and focus.train_acc is None
    assert focus.step == result.history[1].step  # no optimizer step, no batch
    assert not result.diverged and result.test_acc is not None
    elapsed = [m.elapsed_s for m in result.history]
    assert elapsed == sorted(elapsed) and result.seconds["to_best"] == seconds_to_best(
        result.history
    )


def test_focus_epoch_updates_only_the_selected_conv_layers(library_path, target):
    config = guided(library_path, epochs=3, focus_steps=7, strength=2.0, layers="features.3")
    variant = config.build_variant()
    model = load_model(config, target)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    variant.epoch_without_data("focus", model, lr=0.05, steps_per_epoch=20)

    library = FocusLibrary.load(library_path)
    w = before["features.3.weight"]
    for _ in range(7):  # the paper's update, step by step: w <- w - lr * strength * (a*w + c)
        w = w - 0.05 * 2.0 * (
            library.slopes["features.3.weight"] * w + library.intercepts["features.3.weight"]
        )
    after = model.state_dict()
    torch.testing.assert_close(after["features.3.weight"], w)
    for key, value in before.items():  # other conv layers, batch norm, its statistics, the head
        if key != "features.3.weight":
            assert torch.equal(after[key], value), key


def load_model(config, data: Data) -> nn.Module:
    from flatbasin.trainables.sanity import build

    torch.manual_seed(config.seed)
    return build(config, data)


def test_first_epochs_match_plain_sgd_until_the_first_focus(library_path, target):
    """Same seed, same model, same batches: prior_guided is plain SGD until it first switches."""
    sgd = train(make_config("sgd", {"dataset": "mnist1d", "batch_size": 32, "threads": 1,
                                    "epochs": 3, "schedule": "constant"}), data=target)  # fmt: skip
    ours = train(guided(library_path, epochs=3, threshold=1.0), data=target)
    assert ours.history[:2] == sgd.history[:2]
    assert ours.history[2].phase == "focus" and ours.history[2] != sgd.history[2]


def test_a_focus_epoch_that_blows_up_is_a_diverged_result(library_path, target, tmp_path):
    """Slopes of -1: each focus step multiplies the weights by 1 + lr*strength until they overflow."""
    library = FocusLibrary.load(library_path)
    growing = {k: -torch.ones_like(v) for k, v in library.slopes.items()}
    zeros = {k: torch.zeros_like(v) for k, v in library.intercepts.items()}
    FocusLibrary(library.layers, growing, zeros, library.meta).save(tmp_path / "growing.pt")
    config = guided(
        tmp_path / "growing.pt", epochs=5, threshold=1.0, strength=100.0, focus_steps=100
    )
    result = train(config, data=target)
    assert result.diverged and [m.phase for m in result.history] == ["data", "data", "focus"]
    assert result.score == result.history[-1].score == 0.0 and result.test_acc is None


# ----------------------------------------------------------------------------- refusals


def test_library_for_other_conv_layers_is_refused_naming_the_layer(
    library_path, tmp_path, digits, target
):
    # The digits model (small_cnn: 2-D convolutions of other shapes) before its first step.
    config = make_config("prior_guided", {"library": str(library_path), "threads": 1, "epochs": 2})
    with pytest.raises(
        TrialError,
        match=r"conv layer 'features.0' has a weight of shape \(32, 1, 3, 3\) in the model",
    ):
        train(config, data=small(digits, 64))

    model = load_model(guided(library_path), target)  # cnn1d, as the library was fitted on
    library = FocusLibrary.load(library_path)
    extra = {**library.layers, "features.9": {"weight": [4, 4, 3], "bias": None}}
    zeros = {"features.9.weight": torch.zeros(4, 4, 3)}
    FocusLibrary(extra, {**library.slopes, **zeros}, {**library.intercepts, **zeros},
                 library.meta).save(tmp_path / "extra.pt")  # fmt: skip
    with pytest.raises(LibraryError, match=r"conv layer 'features\.9' is missing from the model"):
        guided(tmp_path / "extra.pt").build_variant().check(model)

    fewer = {k: v for k, v in library.layers.items() if k != "features.6"}
    FocusLibrary(fewer, library.slopes, library.intercepts, library.meta).save(
        tmp_path / "fewer.pt"
    )
    with pytest.raises(
        LibraryError, match=r"the model's conv layer 'features\.6' is not in the library"
    ):
        FocusLibrary.load(tmp_path / "fewer.pt").check(model)

    zeros = {"features.3.weight": torch.zeros(25, 25, 5)}
    reshaped = {**library.layers, "features.3": {"weight": [25, 25, 5], "bias": None}}
    FocusLibrary(reshaped, {**library.slopes, **zeros}, {**library.intercepts, **zeros},
                 library.meta).save(tmp_path / "reshaped.pt")  # fmt: skip
    with pytest.raises(
        LibraryError,
        match=r"conv layer 'features.3' has a weight of shape \(25, 25, 3\) in the model and \(25, 25, 5\)",
    ):
        FocusLibrary.load(tmp_path / "reshaped.pt").check(model)
    with pytest.raises(LibraryError, match=r"layers: 'features\.4' is not a conv layer"):
        guided(library_path, layers="features.0,features.4").build_variant().check(model)


def test_another_format_version_or_not_a_library_is_refused(library_path, tmp_path):
    state = torch.load(library_path, weights_only=True)
    torch.save({**state, "version": 99}, tmp_path / "v99.pt")
    with pytest.raises(LibraryError, match="format version 99; this flatbasin reads version 1"):
        FocusLibrary.load(tmp_path / "v99.pt")
    torch.save({"format": 1, "model": {}}, tmp_path / "checkpoint.pt")  # a training checkpoint
    with pytest.raises(LibraryError, match=f"is not a flatbasin focus library .*{FORMAT}"):
        FocusLibrary.load(tmp_path / "checkpoint.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(LibraryError, match="cannot be read"):
        FocusLibrary.load(tmp_path / "text.pt")
    with pytest.raises(LibraryError, match="does not exist; fit one with `flatbasin focus-library"):
        FocusLibrary.load(tmp_path / "nothing.pt")


def test_focus_library_command_writes_a_library(tmp_path):
    out = tmp_path / "lib.pt"
    result = runner.invoke(app, ["focus-library", str(out), "--dataset", "mnist1d", "--epochs", "1",
                                 "--set", "data_seed=3", "--set", "batch_size=512",
                                 "--set", "threads=1", "--ridge", "0.5"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "features.6.weight" in result.output and f"library={out}" in result.output
    library = FocusLibrary.load(out)
    assert library.meta["source"]["data_seed"] == 3 and library.meta["ridge"] == 0.5
    assert library.meta["iterations"] == 3600 // 512 and library.meta["regression"] == "elementwise"


def test_cli_refusals_exit_2_in_one_paragraph(library_path, tmp_path):
    state = torch.load(library_path, weights_only=True)
    torch.save({**state, "version": 2}, tmp_path / "v2.pt")
    for library, needle in (
        (tmp_path / "v2.pt", "format version 2"),
        (library_path, "conv layer 'features.0' has a weight of shape (32, 1, 3, 3)"),
    ):
        result = runner.invoke(app, ["train", "--variant", "prior_guided", "--epochs", "2",
                                     "--set", f"library={library}", "--set", "threads=1"])  # fmt: skip
        assert result.exit_code == 2, result.output
        assert needle in " ".join(result.output.split()) and "Traceback" not in result.output
    result = runner.invoke(app, ["focus-library", str(tmp_path), "--dataset", "mnist1d"])
    assert result.exit_code == 2 and "is a folder" in result.output
    result = runner.invoke(app, ["focus-library", str(tmp_path / "x.pt"), "--regression", "mlp"])
    assert result.exit_code == 2 and "choose elementwise or layer" in result.output
    result = runner.invoke(app, ["focus-library", str(tmp_path / "x.pt"), "--set", "swa_lr=0.1"])
    assert result.exit_code == 2 and "unknown setting(s) swa_lr" in " ".join(result.output.split())
    before = library_path.read_bytes()
    result = runner.invoke(app, ["focus-library", str(library_path), "--dataset", "mnist1d"])
    assert result.exit_code == 2 and "pass --overwrite" in " ".join(result.output.split())
    assert library_path.read_bytes() == before  # an existing library is never replaced silently
    result = runner.invoke(app, ["focus-library", str(tmp_path / "v2.pt" / "x.pt")])
    assert result.exit_code == 2 and "v2.pt is a file, not a folder" in " ".join(
        result.output.split()
    )


def test_preflight_refuses_a_library_that_does_not_fit_before_ray(library_path, tmp_path):
    space = tmp_path / "guided.yaml"
    space.write_text(f"epochs: 4\ndataset: digits\nvariants:\n  prior_guided:\n    library: {library_path}\n"
                     "    threshold: {uniform: [0.0, 0.02]}\n")  # fmt: skip
    with pytest.raises(
        UsageError, match=r"variants.prior_guided: focus library .* conv layer 'features.0'"
    ):
        check_trials(load_space(space), local=True)
    space.write_text(
        "epochs: 4\ndataset: mnist1d\nvariants:\n  prior_guided:\n    library: missing.pt\n"
    )
    loaded = load_space(space)
    assert loaded.variants["prior_guided"][1]["library"] == str(Path("missing.pt").resolve())
    with pytest.raises(UsageError, match=r"missing\.pt does not exist"):
        check_trials(loaded, local=True)
    space.write_text(
        f"epochs: 4\ndataset: mnist1d\nvariants:\n  prior_guided:\n    library: {library_path}\n"
    )
    check_trials(load_space(space), local=True)  # fits: no error


def test_search_with_a_library_that_does_not_fit_exits_2_before_ray_starts(library_path, tmp_path):
    import ray

    space = tmp_path / "guided.yaml"
    space.write_text(f"epochs: 4\nvariants:\n  prior_guided:\n    library: {library_path}\n")
    result = runner.invoke(app, ["search", str(space), "--storage", str(tmp_path / "runs"),
                                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])  # fmt: skip
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "variants.prior_guided: focus library" in text and "conv layer 'features.0'" in text
    assert "Traceback" not in result.output and not ray.is_initialized()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


# ----------------------------------------------------------------------------- decisions


def epochs(*rows: tuple[str, float]) -> list[SimpleNamespace]:
    return [SimpleNamespace(epoch=i + 1, phase=p, val_acc=a, score=a, elapsed_s=float(i))
            for i, (p, a) in enumerate(rows)]  # fmt: skip


def test_switch_rule_on_a_hand_made_history():
    assert next_phase([], 0.01) == "data"
    assert next_phase(epochs(("data", 0.5)), 0.01) == "data"  # nothing to compare with yet
    assert next_phase(epochs(("data", 0.5), ("data", 0.6)), 0.01) == "data"  # improving: go on
    assert next_phase(epochs(("data", 0.5), ("data", 0.505)), 0.01) == "focus"  # stall
    assert next_phase(epochs(("data", 0.5), ("data", 0.45)), 0.01) == "focus"  # a drop is a stall
    assert next_phase(epochs(("data", 0.5), ("focus", 0.53)), 0.01) == "focus"  # focus works: go on
    assert next_phase(epochs(("data", 0.5), ("focus", 0.5)), 0.01) == "data"  # stall: switch back
    # A gain of exactly the threshold (4 of 400 examples) is not a stall, whatever the rounding.
    assert next_phase(epochs(("data", 361 / 400), ("data", 365 / 400)), 0.01) == "data"
    assert (
        next_phase(epochs(("data", 0.5), ("data", 0.5)), 0.0) == "data"
    )  # threshold 0: only drops


def test_early_stopping_rule_and_time_to_best():
    history = epochs(("data", 0.5), ("data", 0.7), ("data", 0.6), ("data", 0.7), ("data", 0.65))
    assert not patience_exhausted(history[:4], 3)  # a tie is no improvement, but 2 < 3 epochs
    assert patience_exhausted(history, 3)  # best at epoch 2, three epochs without beating it
    assert not patience_exhausted(history, None)
    assert seconds_to_best(history) == 1.0  # the first epoch that reached the best


def test_early_stopping_ends_the_trial_and_resumes_to_the_same_end(target, tmp_path):
    """sgd with patience: the trial ends before its budget exactly when the rule says, and a
    checkpoint written at its last epoch resumes to the same end without another epoch."""
    config = make_config("sgd", {"dataset": "mnist1d", "batch_size": 32, "threads": 1, "epochs": 30,
                                 "schedule": "constant", "lr": 0.2, "patience": 1})  # fmt: skip
    checkpoint = tmp_path / "last.pt"
    result = train(config, data=target, on_epoch=lambda m, save: save(checkpoint))
    ran = len(result.history)
    assert ran < 30, "patience 1 at a large constant lr stops early"
    assert patience_exhausted(result.history, 1)
    assert not any(patience_exhausted(result.history[:k], 1) for k in range(1, ran))
    again = train(config, data=target, resume=checkpoint)
    assert again.history == result.history and again.test_acc == result.test_acc


@pytest.mark.parametrize("killed_after", [2, 3])
def test_resume_bit_for_bit_across_focus_epochs(library_path, target, tmp_path, killed_after):
    """Killed after a data epoch (2) or a focus epoch (3): the phases, the focus updates and the
    early stop come out exactly as in the uninterrupted trial."""
    config = guided(library_path, epochs=8, threshold=0.02, patience=3, focus_steps=5)
    full = train(config, data=target)
    assert "focus" in [m.phase for m in full.history]
    checkpoint = tmp_path / "ckpt.pt"

    class Killed(Exception):
        pass

    def die(metrics, save):
        if metrics.epoch == killed_after:
            save(checkpoint)
            raise Killed

    with pytest.raises(Killed):
        train(config, data=target, on_epoch=die)
    resumed = train(config, data=target, resume=checkpoint)
    assert resumed.history == full.history  # phases included; elapsed_s is not compared
    assert (resumed.score, resumed.test_acc, resumed.curve) == (
        full.score,
        full.test_acc,
        full.curve,
    )
    assert resumed.history[killed_after].elapsed_s >= resumed.history[killed_after - 1].elapsed_s


# ----------------------------------------------------------------------------- downstream


@pytest.mark.slow  # about 10 s: MLflow's first SQLite store, and the trial trained twice
def test_tune_results_mlflow_and_reproduce_cope_with_focus_epochs_and_early_stops(
    library_path, tmp_path, monkeypatch
):
    """What Ray reports for an early-stopped trial with focus epochs, written to MLflow as the
    search's writer does (the focus metric, no training loss in focus epochs, seconds_to_best), then
    `flatbasin reproduce` on that run: the same phases, the same end, exactly."""
    from mlflow import MlflowClient

    from flatbasin.search.callbacks import KEPT
    from flatbasin.search.errors import plain_console
    from flatbasin.search.reproduce import reproduce
    from flatbasin.search.tracking import Tracker, TrialRecord
    from flatbasin.trainables.ray_entry import epoch_metrics, final_metrics

    # The whole training split, as reproduce loads it; large batches keep it quick.
    config = guided(library_path, epochs=8, threshold=1.0, patience=1, batch_size=256)
    result = train(config)
    assert len(result.history) < 8 and "focus" in [m.phase for m in result.history]
    rows = [epoch_metrics(m, []) for m in result.history[:-1]] + [final_metrics(result, [])]
    settings = {k: v for k, v in config.flat().items() if k != "variant"}
    record = TrialRecord("t1", {"variant": "prior_guided", "settings": settings}, status="FINISHED")
    for row in rows:
        record.add({k: v for k, v in row.items() if k in KEPT})
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "guided", search_key=str(tmp_path))
    tracker.write(record)

    client = MlflowClient(uri)
    run_id = tracker.run_id("t1")
    run = client.get_run(run_id)
    by_step = lambda key: {m.step: m.value for m in client.get_metric_history(run_id, key)}  # noqa: E731
    assert by_step("focus") == {m.epoch: float(m.phase == "focus") for m in result.history}
    assert set(by_step("train_loss")) == {m.epoch for m in result.history if m.phase == "data"}
    assert run.data.metrics["seconds_to_best"] == pytest.approx(result.seconds["to_best"])
    assert run.data.metrics["epochs_run"] == len(result.history)
    saved = json.loads(
        Path(client.download_artifacts(run_id, "trial_config.json", str(tmp_path))).read_text()
    )
    assert [r["phase"] for r in saved["recorded"]["history"]] == [m.phase for m in result.history]

    assert reproduce(run_id, uri, plain_console())
