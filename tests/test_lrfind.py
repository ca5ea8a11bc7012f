"""`flatbasin lr-find`: the smoothing against a hand computation, divergence cutting the sweep short,
the suggestion on curves whose answer is known, the space file it writes, and bad input (exit 2)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from flatbasin.search.cli import app
from flatbasin.search.errors import UsageError
from flatbasin.search.lrfind import LR_PARAMETERS, NOT_MEASURED, differences, write_space
from flatbasin.spaces.loader import Dist, load_space
from flatbasin.trainables.config import make_config
from flatbasin.trainables.lr_range import forever, geometric_lrs, range_test, smooth, suggest
from flatbasin.trainables.variants import REGISTRY

runner = CliRunner()
FAST = ["--dataset", "mnist1d", "--set", "threads=1"]  # cnn1d: a step takes milliseconds


# ----------------------------------------------------------------------------- the numerics


def test_smooth_is_the_bias_corrected_moving_average_computed_by_hand():
    # beta 0.5 on 1, 2, 3: avg = 0.5, 1.25, 2.125; divided by 1 - 0.5^(i+1) = 0.5, 0.75, 0.875
    assert smooth([1.0, 2.0, 3.0], beta=0.5) == pytest.approx([1.0, 1.25 / 0.75, 2.125 / 0.875])
    # beta 0.98 on 2, 1: avg = 0.04, 0.98 * 0.04 + 0.02 = 0.0592; / 0.02 and / (1 - 0.98^2)
    assert smooth([2.0, 1.0]) == pytest.approx([2.0, 0.0592 / 0.0396])
    assert smooth(np.full(50, 3.0)) == pytest.approx(np.full(50, 3.0))  # no pull towards 0
    assert np.isnan(smooth([1.0, float("nan"), 1.0])[1:]).all()  # divergence shows and stays


def _tiny_problem(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, list]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.123, momentum=0.9)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    return model, optimizer, [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]


def test_divergence_stops_the_sweep_and_the_model_is_put_back():
    model, optimizer, batches = _tiny_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sweep = range_test(model, optimizer, forever(lambda: batches), geometric_lrs(1e-3, 1e6, 100))
    assert sweep.diverged and len(sweep.lrs) < 100, sweep.stop
    assert sweep.stop.startswith("diverged at lr")
    assert len(sweep.losses) == len(sweep.smoothed) == len(sweep.lrs)
    # weights, batch-norm statistics, momentum and the learning rate: all as they were
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert optimizer.state_dict()["state"] == {}
    assert optimizer.param_groups[0]["lr"] == 0.123


def test_a_non_finite_loss_stops_the_sweep_at_once():
    model, optimizer, batches = _tiny_problem()
    calls = []

    def loss_nan_from_step_20(logits, y):
        calls.append(1)
        loss = nn.functional.cross_entropy(logits, y)
        return loss * float("nan") if len(calls) >= 20 else loss

    sweep = range_test(model, optimizer, forever(lambda: batches), geometric_lrs(1e-6, 1e-5, 100),
                       loss_fn=loss_nan_from_step_20)  # fmt: skip
    assert len(sweep.lrs) == 20
    assert "not finite" in sweep.stop


def _dip(lrs: np.ndarray, centre: float, width: float = 0.3, depth: float = 2.0) -> np.ndarray:
    """A fall of `depth` shaped like a logistic in log10(lr), steepest at `centre`."""
    return depth / (1 + np.exp(-(np.log10(lrs) - np.log10(centre)) / width))


def test_suggestion_on_a_synthetic_curve_is_where_it_falls_fastest():
    lrs = geometric_lrs(1e-6, 10, 200)
    # flat at 2.5, falls fastest at lr 0.01, then explodes past lr 0.5
    loss = 2.5 - _dip(lrs, 1e-2) + 5 * np.clip(np.log10(lrs / 0.5), 0, None) ** 2
    s = suggest(lrs, loss)
    step = np.log10(lrs[1] / lrs[0])
    assert abs(np.log10(s.large) - np.log10(1e-2)) <= step  # within one step of the truth
    assert s.small == pytest.approx(s.large / 10)
    assert lrs[s.lowest] < 0.5


def test_suggestion_never_looks_past_the_minimum():
    lrs = geometric_lrs(1e-6, 10, 200)
    # a gentle fall around 1e-3 to the lowest loss, then up, then a much steeper fall near lr 1
    # that never gets as low: the steep part lies past the minimum and must be ignored
    loss = 3.0 - _dip(lrs, 1e-3, width=0.5, depth=2.0)
    loss += 1.5 * np.clip(np.log10(lrs / 1e-2), 0, None) - _dip(lrs, 1.0, width=0.05, depth=1.0)
    s = suggest(lrs, loss)
    assert lrs[s.lowest] < 1e-1
    assert abs(np.log10(s.large) - np.log10(1e-3)) <= np.log10(lrs[1] / lrs[0])


def test_no_suggestion_when_the_loss_never_falls():
    lrs = geometric_lrs(1e-6, 10, 200)
    s = suggest(lrs, 2.3 + 0.001 * np.sin(np.arange(200)))
    assert s.large is None and s.small is None
    assert "never fell" in s.problem


def test_every_learning_rate_parameter_of_every_variant_has_a_mapping():
    """A new variant with a learning-rate parameter must say how --write sets it."""
    for name, variant in REGISTRY.items():
        lr_like = {k for k in variant.Params.model_fields if k.startswith("lr") or "_lr" in k}
        assert lr_like - NOT_MEASURED <= set(LR_PARAMETERS.get(name, {})), name


# ----------------------------------------------------------------------------- --write


SPACE = """\
# a space with comments, which --write keeps
epochs: 12
dataset: mnist1d
fixed: {batch_size: 64}
variants:
  sgd:
    lr:                      # block style
      loguniform: [0.01, 0.2]
  swa:
    lr: {loguniform: [0.01, 0.2]}   # an inline comment
    swa_lr: 0.01
    swa_mode: {choice: [constant, cyclic]}
  fge: {cycles: 2}
  cyclic_average:
  ema: {decay: 0.99}
"""


def _expected(small: float, large: float) -> dict[str, dict[str, Dist]]:
    high, low = Dist("loguniform", (small, large)), Dist("loguniform", (small / 10, small))
    return {
        "sgd": {"lr": high},
        "swa": {"lr": high, "swa_lr": low, "swa_lr_max": high},
        "fge": {"lr": high, "lr_1": high, "lr_2": low},
        "cyclic_average": {"lr": high, "lr_large": high, "lr_small": low},
        "ema": {"lr": high},
    }


def _searched(path) -> dict[str, dict[str, Dist]]:
    space = load_space(path)
    return {
        variant: {
            k: Dist(d.kind, tuple(pytest.approx(v) for v in d.values))
            for k, d in searched.items()
            if k != "swa_mode"
        }
        for variant, (searched, _) in space.variants.items()
    }


def test_write_sets_every_variant_and_keeps_comments(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    lines, kept = write_space(path, 0.0123, 0.123)
    assert kept
    assert _searched(path) == _expected(0.012, 0.12)  # rounded to two digits, as printed
    text = path.read_text()
    for comment in ("# a space with comments", "# an inline comment", "# block style"):
        assert comment in text
    assert "variants.swa.swa_lr: 0.01 -> {loguniform: [0.0012, 0.012]}" in lines
    assert "variants.fge.lr_2: 0.0005 (the default) -> {loguniform: [0.0012, 0.012]}" in lines


def test_write_without_cyclic_swa_leaves_swa_lr_max_alone(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("variants:\n  swa: {swa_start_frac: 0.5}\n")
    write_space(path, 0.01, 0.1)
    assert set(load_space(path).variants["swa"][0]) == {"lr", "swa_lr"}


def test_write_re_dumps_what_it_cannot_edit_in_place_and_says_so(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "# gone\nvariants:\n  sgd: {lr: &x {loguniform: [0.01, 0.1]}}\n  ema: {lr: *x}\n"
    )
    _, kept = write_space(path, 0.01, 0.1)
    assert not kept and "# gone" not in path.read_text()
    assert load_space(path).variants["ema"][0]["lr"] == Dist("loguniform", (0.01, 0.1))


def test_write_puts_the_file_back_when_the_new_ranges_do_not_load(tmp_path):
    path = tmp_path / "space.yaml"
    original = "# floor above the suggested range\nvariants:\n  sgd: {lr_min: 0.05}\n"
    path.write_text(original)
    with pytest.raises(UsageError, match=r"put back as it was: .*lr_min \(0.05\) is above lr"):
        write_space(path, 0.01, 0.1)
    assert path.read_text() == original


def test_a_space_trained_otherwise_than_the_test_is_named(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE.replace("{batch_size: 64}", "{batch_size: 128}"))
    notes = differences(path, make_config("sgd", {"dataset": "mnist1d"}))
    assert len(notes) == 1 and "batch_size: 128, the test 64" in notes[0]
    assert "--set batch_size=128" in notes[0]
    assert differences(path, make_config("sgd", {"dataset": "mnist1d", "batch_size": 128})) == []


# ----------------------------------------------------------------------------- the command


def test_cli_draws_the_figure_and_writes_a_space_that_loads(tmp_path):
    png, space = tmp_path / "lr.png", tmp_path / "space.yaml"
    space.write_text(SPACE)
    result = runner.invoke(app, ["lr-find", "--variant", "swa", *FAST, "--start", "1e-4",
                                 "--end", "3", "--steps", "80", "--plot", str(png),
                                 "--write", str(space)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    found = re.search(r"suggested lr range: loguniform \[([0-9.]+), ([0-9.]+)\]", result.output)
    assert found, result.output
    small, large = float(found[1]), float(found[2])
    assert 1e-4 <= small < large <= 3
    assert _searched(space) == _expected(small, large)
    assert "comments and layout kept" in result.output
    assert f"variants.sgd.lr: {{loguniform: [0.01, 0.2]}} -> {{loguniform: [{found[1]}, {found[2]}]}}" in result.output  # fmt: skip


def test_cli_without_write_changes_nothing_but_the_figure(tmp_path):
    png, space = tmp_path / "lr.png", tmp_path / "space.yaml"
    space.write_text(SPACE)
    result = runner.invoke(app, ["lr-find", *FAST, "--start", "1e-3", "--end", "3", "--steps", "70",
                                 "--plot", str(png)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr.png", "space.yaml"]
    assert space.read_text() == SPACE


def test_cli_without_a_suggestion_exits_1_and_writes_no_space(tmp_path):
    png, space = tmp_path / "lr.png", tmp_path / "space.yaml"
    space.write_text(SPACE)
    # already too high at the start: the loss only rises
    result = runner.invoke(app, ["lr-find", *FAST, "--start", "2", "--end", "10", "--steps", "60",
                                 "--plot", str(png), "--write", str(space)])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "no suggestion: the smoothed loss never fell" in result.output
    assert f"{space} was not changed" in result.output
    assert space.read_text() == SPACE
    assert png.is_file()  # the figure shows why


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--variant", "nope"], "unknown variant 'nope'"),
        (["--set", "lrr=0.1"], "unknown setting(s) lrr"),
        (["--set", "batch_size=1"], "batch_size: Input should be greater than or equal to 2"),
        (["--start", "1", "--end", "0.1"], "--start (1) must be below --end (0.1)"),
        (["--start", "0.1", "--end", "0.1"], "--start (0.1) must be below --end (0.1)"),
        (
            ["--start", "0"],
            "'--start': Input should be greater than or equal to 0.00000001 (got 0)",
        ),
        (["--end", "100"], "'--end': Input should be less than or equal to 10 (got 100)"),
        (["--steps", "5"], "'--steps': Input should be greater than or equal to 50 (got 5)"),
        (["--steps", "49"], "'--steps': Input should be greater than or equal to 50"),
        (["--steps", "100000000"], "'--steps': Input should be less than or equal to 10000"),
        (
            ["--write", "{tmp}/other.yaml"],
            "trains otherwise than this test would: it sets batch_size: 128",
        ),
        (["--write", "{tmp}/missing.yaml"], "missing.yaml: does not exist"),
        (["--write", "{tmp}/bad.yaml"], "unknown variant"),
        (["--plot", "{tmp}/no/such/folder/x.png"], "does not exist"),
        (["--plot", "{tmp}/folder.png"], "folder.png: is a folder"),
        (["--plot", "{tmp}/x.jpg"], "the figure is a PNG"),
        (["--plot", "{tmp}/notes.txt/x.png"], "notes.txt is a file, not a folder"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent/x"], "does not exist"),
        (["--dataset", "mnist1d", "--set", "batch_size=5000"], "larger than the training split"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(tmp_path, args, needle):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "bad.yaml").write_text("variants: {nope: {}}\n")
    (tmp_path / "other.yaml").write_text("fixed: {batch_size: 128}\nvariants: {sgd: {}}\n")
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = runner.invoke(app, ["lr-find", "--set", "threads=1", "--plot", str(tmp_path / "f.png"), *args])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "f.png").exists()  # refused before anything was trained or drawn
