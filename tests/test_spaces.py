"""Every shipped space through one contract, and every kind of bad space rejected with file and key."""

from __future__ import annotations

import inspect
import socket
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from flatbasin.search.cli import app
from flatbasin.spaces import SpaceError, load_space
from flatbasin.trainables.config import trial_config
from flatbasin.trainables.variants import REGISTRY

SHIPPED = sorted((Path(__file__).parent.parent / "spaces").glob("*.yaml"))


def test_there_is_a_space_per_variant_and_a_compare_space():
    assert {p.stem for p in SHIPPED} == {*REGISTRY, "compare"}
    # compare runs as shipped, with no file made first: a variant that reads one (prior_guided's
    # focus library) has its own space instead.
    runs_without_files = {name for name, v in REGISTRY.items() if not v.file_params}
    compare = load_space(Path(SHIPPED[0]).parent / "compare.yaml")
    assert "sgd" in compare.variants and set(compare.variants) <= runs_without_files


def test_the_bundled_comparison_can_tell_variants_apart():
    """Enough trials per variant for TPE to leave its random start-up, a validation split where one
    example is well under a quarter point, and a confirmation to say how sure the answer is."""
    from flatbasin.trainables.config import make_config
    from flatbasin.trainables.data import load_data

    compare = load_space(Path(SHIPPED[0]).parent / "compare.yaml")
    per_variant = compare.samples // len(compare.variants)
    assert per_variant >= 6 and compare.samples % len(compare.variants) == 0
    startup = inspect.signature(optuna.samplers.TPESampler).parameters["n_startup_trials"].default
    assert compare.samples > startup + len(compare.variants)  # each variant gets guided trials
    assert compare.confirm_seeds >= 3
    data = load_data(make_config("sgd", compare.settings).data_spec, "cpu")
    assert (
        len(data.y_val) >= 1000 and len(data.y_train) >= 3600
    )  # no less training data than before


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_space_samples_valid_trials_with_prefixed_names(path):
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    for _ in range(12):
        trial = study.ask()
        constants = space.define_by_run(trial)
        variant = constants["variant"]
        assert all(name == "variant" or name.startswith(f"{variant}/") for name in trial.params)
        nested = {
            variant: {k.split("/", 1)[1]: v for k, v in trial.params.items() if k != "variant"}
        }
        config = trial_config({**constants, **nested})  # what the trainable will build
        assert config.variant == variant and config.epochs == space.settings["epochs"]
        study.tell(trial, 0.5)


# Parameters that do nothing in some configurations (trainables/conditions.py), each with the
# parameters deciding it and when it acts: sampled only when it does, recorded only when it does.
CONDITIONAL = {
    "swa_lr_max with swa_mode": (
        "swa", "swa_mode: {choice: [constant, cyclic]}\n    swa_lr_max: {loguniform: [0.05, 0.2]}",
        "swa_lr_max", lambda p: p["swa_mode"] == "cyclic",
    ),
    "lr_min with schedule": (
        "sgd", "schedule: {choice: [constant, step, cosine, warmup_cosine]}\n    lr_min: {uniform: [0, 0.001]}",
        "lr_min", lambda p: p["schedule"] in ("cosine", "warmup_cosine"),
    ),
    "warmup_frac with schedule": (
        "ema", "schedule: {choice: [cosine, warmup_cosine]}\n    warmup_frac: {uniform: [0.01, 0.2]}",
        "warmup_frac", lambda p: p["schedule"] == "warmup_cosine",
    ),
    "step_gamma with schedule": (
        "sgd", "step_gamma: {uniform: [0.1, 0.5]}\n    schedule: {choice: [cosine, step]}",  # child first
        "step_gamma", lambda p: p["schedule"] == "step",
    ),
    "momentum with optimizer": (
        "sgd", "optimizer: {choice: [adagrad, sgd, adam]}\n    momentum: {uniform: [0.5, 0.95]}",
        "momentum", lambda p: p["optimizer"] != "adagrad",
    ),
    "t_mult with cycles": (
        "sgdr", "cycles: {int: [1, 3]}\n    t_mult: {choice: [1, 2]}",
        "t_mult", lambda p: p["cycles"] >= 2,
    ),
    "prox with cycles and average_converged": (
        "cyclic_average",
        "cycles: {int: [1, 3]}\n    average_converged: {choice: [false, true]}\n    prox: {loguniform: [0.0001, 0.01]}",
        "prox", lambda p: p["cycles"] >= 2 or p["average_converged"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CONDITIONAL))
def test_conditional_parameters_are_absent_where_they_do_nothing(tmp_path, case):
    variant, entries, key, acts = CONDITIONAL[case]
    path = tmp_path / "conditional.yaml"
    path.write_text(f"epochs: 12\nvariants:\n  {variant}:\n    {entries}\n")
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    seen = set()
    for _ in range(30):
        trial = study.ask()
        constants = space.define_by_run(trial)
        sampled = {k.split("/", 1)[1]: v for k, v in trial.params.items()}
        deciding = {**config_defaults(variant), **sampled}
        seen.add(acts(deciding))
        assert (key in sampled) == acts(deciding), sampled  # sampled only where it acts
        config = trial_config({**constants, variant: sampled})
        assert (key in config.flat()) == acts(deciding)  # and recorded (the run's params) so
        study.tell(trial, 0.5)
    assert seen == {True, False}  # both kinds of configuration were drawn
    # The corners the space is checked at are the configurations trials run, idle keys left out.
    assert {key in config.flat() for config in space.corner_configs()} == {True, False}


def config_defaults(variant):
    from flatbasin.trainables.config import defaults

    return defaults(variant)


GOOD = """
epochs: 10
variants:
  snapshot:
    lr: {loguniform: [0.01, 0.1]}
    cycles: {int: [2, 5]}
"""

BAD = {
    "unknown top-level key": ("epochs: 10\nvariants: {sgd: {}}\nbogus: 1\n", "bogus"),
    "unknown parameter": (
        "variants:\n  swa: {swa_lrr: {loguniform: [0.01, 0.1]}}\n",
        "variants.swa.swa_lrr",
    ),
    "low above high": (
        "variants:\n  swa: {swa_lr: {uniform: [0.1, 0.01]}}\n",
        "low (0.1) is above high (0.01)",
    ),
    "non-positive lr": (
        "variants:\n  sgd: {lr: {uniform: [0.0, 0.1]}}\n",
        "variants.sgd.lr: Input should be greater than 0",
    ),
    "zero cycles": (
        "variants:\n  snapshot: {cycles: {int: [0, 3]}}\n",
        "variants.snapshot.cycles: Input should be greater than or equal to 1",
    ),
    "budget shorter than cycles": (
        "epochs: 4\nvariants:\n  snapshot: {cycles: {int: [2, 6]}}\n",
        "cycles=6 does not fit the budget",
    ),
    "yaml syntax": ("variants: [sgd: {\n", "YAML syntax error"),
    "unknown variant": ("variants:\n  adam_magic: {}\n", "variants.adam_magic: unknown variant"),
    "unknown distribution": (
        "variants:\n  sgd: {lr: {normal: [0.1, 0.2]}}\n",
        "unknown distribution 'normal'",
    ),
    "searched, never acting": (
        "variants:\n  swa: {swa_lr_max: {loguniform: [0.05, 0.2]}}\n",
        "variants.swa.swa_lr_max: does nothing unless swa_mode is cyclic, and no trial of this "
        "space has that (swa_mode: 'constant')",
    ),
    "fixed, never acting": (
        "variants:\n  sgd: {schedule: constant, warmup_frac: 0.1}\n",
        "variants.sgd.warmup_frac: does nothing unless schedule is warmup_cosine",
    ),
    "never acting under a searched parent": (
        "variants:\n  sgdr: {cycles: {int: [1, 1]}, ensemble: true}\n",
        "variants.sgdr.ensemble: does nothing unless cycles is at least 2",
    ),
    "loguniform at zero": (
        "variants:\n  sgd: {weight_decay: {loguniform: [0, 0.1]}}\n",
        "loguniform needs low > 0",
    ),
}


def test_good_space_loads(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    space = load_space(path)
    assert space.name == "good" and space.samples == 16


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_space_names_file_and_key(tmp_path, case):
    text, needle = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    assert str(path) in str(err.value) and needle in str(err.value)


@pytest.mark.parametrize("case", ["budget shorter than cycles", "yaml syntax", "unknown variant"])
def test_bad_space_exits_2_before_ray_starts(tmp_path, case):
    import ray

    path = tmp_path / "bad.yaml"
    path.write_text(BAD[case][0])
    result = CliRunner().invoke(app, ["search", str(path), "--storage", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert (
        str(path) in " ".join(result.output.split()).replace(" ", "") or "bad.yaml" in result.output
    )
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists()


def test_tracking_server_down_exits_2_and_starts_nothing(tmp_path):
    with socket.socket() as s:  # a port on loopback that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    result = CliRunner().invoke(
        app, ["search", str(path), "--tracking-uri", f"http://127.0.0.1:{port}", "--storage", str(tmp_path / "runs")],
        env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"},
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "not reachable" in result.output
    assert not (tmp_path / "runs").exists()


def test_exponent_floats_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-3 as a string; space files read it as every user does: 0.001."""
    path = tmp_path / "exp.yaml"
    path.write_text(
        "epochs: 2\nvariants:\n  sgd: {lr: {loguniform: [1e-3, 1E-1]}, weight_decay: 5e-4}\n"
    )
    space = load_space(path)
    searched, fixed = space.variants["sgd"]
    assert searched["lr"].values == (0.001, 0.1) and fixed["weight_decay"] == 0.0005


@pytest.mark.parametrize(
    ("text", "value"),
    [("010", 10), ("0o17", 15), ("0x1f", 31), ("1_000", 1000), ("-.5", -0.5), ("1:30", "1:30"),
     ("0b11", "0b11"), ("+7", 7)],
)  # fmt: skip
def test_numbers_read_as_yaml_1_2(text, value):
    """YAML 1.1 reads 010 as octal 8 and 1:30 as 90 (base 60); a space file reads them as written."""
    from flatbasin.spaces.loader import read_yaml

    assert read_yaml(f"x: {text}") == {"x": value}
