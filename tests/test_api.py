"""flatbasin from Python: `flatbasin.search(space, **options)` and `flatbasin.train(...)`, with spaces
as dicts and models and data as callables, and the command line as a thin layer over the same
functions (the same checks, the same messages).

Bad input runs in this process (it fails before Ray starts); the search runs as a notebook would
run it, in a driver process of its own with its own Ray folder, killed by process group however
the test ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

import flatbasin
from flatbasin.search.cli import app
from flatbasin.search.errors import UsageError
from flatbasin.trainables import sanity

runner = CliRunner()
TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- the user's code
# Defined in this test module, which no worker can import by name (tests/ is not a package on any
# path they have): flatbasin must pickle them by value.


def build_mlp(input_shape, num_classes, width=16):
    """A small MLP on flattened inputs, as a notebook would define it."""
    features = int(np.prod(input_shape))
    return nn.Sequential(
        nn.Flatten(), nn.Linear(features, width), nn.ReLU(), nn.Linear(width, num_classes)
    )


def blobs(n=400, classes=3, seed=0):
    """Gaussian blobs: four arrays, a quarter held out for test."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 8)) * 2.0
    y = rng.integers(0, classes, n)
    x = (centres[y] + rng.normal(size=(n, 8))).astype(np.float32)
    cut = n * 3 // 4
    return x[:cut], y[:cut], x[cut:], y[cut:]


def not_a_module(input_shape, num_classes):
    return 42


LOCK = threading.Lock()  # what a callable cannot take to another process


# A temporary module: in the folder the search starts from, the workers import it by name.
USERDATA = """
import numpy as np


def load(n=400, classes=3, seed=1):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 8)) * 2.0
    y = rng.integers(0, classes, n)
    x = (centres[y] + rng.normal(size=(n, 8))).astype(np.float32)
    return x[: n * 3 // 4], y[: n * 3 // 4], x[n * 3 // 4 :], y[n * 3 // 4 :]


def build(input_shape, num_classes, width=8):
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), width), nn.ReLU(),
                         nn.Linear(width, num_classes))
"""

SPACE = {
    "name": "fromdict",
    "samples": 2,
    "epochs": 2,
    "fixed": {"batch_size": 32},
    "variants": {"sgd": {"lr": {"loguniform": [0.02, 0.1]}}, "swa": {"swa_start_frac": 0.5}},
}


def test_importing_flatbasin_imports_neither_torch_nor_ray():
    code = (
        "import sys, flatbasin; assert callable(flatbasin.search) and flatbasin.train; "
        "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def here(tmp_path, ray_tmpdir, monkeypatch):
    """A folder to search from, with its own Ray folder; nothing may be started in either."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmpdir))
    monkeypatch.setattr(sanity, "LEARN_BUDGET_S", 600.0)  # a loaded machine must not skip the check
    (tmp_path / "userdata.py").write_text(USERDATA)
    yield tmp_path
    import ray

    assert not ray.is_initialized()
    assert not list(ray_tmpdir.rglob("session_*")), "a Ray session was started"
    assert not (tmp_path / "runs").exists(), "the storage folder was made"
    assert not (tmp_path / "mlflow.db").exists(), "the MLflow database was made"


def options(folder: Path) -> dict[str, str]:
    return {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", "storage": str(folder / "runs")}


def cli_message(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: "), result.output
    return " ".join(result.output.removeprefix("error: ").split())


def api_message(*args, **kwargs) -> str:
    with pytest.raises(UsageError) as caught:
        # flatbasin.search is a module made callable at run time (search/__init__.py): mypy sees a module.
        flatbasin.search(*args, **kwargs)  # type: ignore[operator]
    message = str(caught.value)
    assert "Traceback" not in message and len(message) < 5000
    return " ".join(message.split())


# The same space, as a file and as a dict: the same message, naming "the space dict" for the dict.
BAD_SPACES = {
    "unknown top-level key": {**SPACE, "epoch": 3},
    "unknown variant": {**SPACE, "variants": {"sgdd": {}}},
    "unknown variant key": {**SPACE, "variants": {"sgd": {"lrr": 0.1}}},
    "low above high": {**SPACE, "variants": {"sgd": {"lr": {"uniform": [0.2, 0.1]}}}},
    "cycles beyond the budget": {**SPACE, "variants": {"snapshot": {"cycles": {"int": [2, 9]}}}},
    "a searched data argument": {
        **SPACE,
        "dataset": "userdata:load",
        "data_args": {"n": {"int": [300, 400]}},
    },
    "a bad name": {**SPACE, "name": "two words"},
    "a budget that is not a number": {**SPACE, "epochs": True},
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES), ids=str)
def test_a_bad_space_dict_says_what_the_same_file_would(case, here):
    raw = BAD_SPACES[case]
    path = here / "space.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML: the same content as a file
    opts = options(here)
    cli = cli_message(
        ["search", str(path), "--tracking-uri", opts["tracking_uri"], "--storage", opts["storage"]]
    )
    api = api_message(raw, **opts)
    assert str(path) in cli
    assert api == cli.replace(str(path), "the space dict")


def test_a_space_dict_needs_a_name(here):
    raw = {k: v for k, v in SPACE.items() if k != "name"}
    assert "the space dict: name: give the search a name" in api_message(raw, **options(here))


BAD_OPTIONS = {
    "no samples": ({"samples": 0}, ["--samples", "0"]),
    "a scheduler that is none": ({"scheduler": "hyperband"}, ["--scheduler", "hyperband"]),
    "a GPU share that wastes a GPU": ({"gpus_per_trial": 0.3}, ["--gpus-per-trial", "0.3"]),
    "a name with a slash": ({"name": "a/b"}, ["--name", "a/b"]),
    "resume with fixed settings": (
        {"resume": True, "seed": 3, "samples": 4},
        ["--resume", "--seed", "3", "--samples", "4"],
    ),
    "resume with nothing to resume": ({"resume": True}, ["--resume"]),
    "more CPUs than the machine": ({"cpus_per_trial": 4096}, ["--cpus-per-trial", "4096"]),
    "storage that is a file": ({"storage": "{here}/file"}, ["--storage", "{here}/file"]),
    "a tracking URI that is no store": (
        {"tracking_uri": "ftp://127.0.0.1/x"},
        ["--tracking-uri", "ftp://127.0.0.1/x"],
    ),
}


# Numbers outside the ranges --help states: both name the option and the range.
PARSED = {"no samples": ("--samples", "greater than or equal to 1 (got 0)")}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS), ids=str)
def test_bad_options_raise_the_message_the_cli_prints(case, here):
    given, args = BAD_OPTIONS[case]
    (here / "file").write_text("not a folder")
    given = {
        k: v.replace("{here}", str(here)) if isinstance(v, str) else v for k, v in given.items()
    }
    args = [a.replace("{here}", str(here)) for a in args]
    path = here / "space.yaml"
    path.write_text(json.dumps(SPACE))
    opts = {**options(here), **{k: v for k, v in given.items() if k in ("storage", "tracking_uri")}}
    flags = [] if "--tracking-uri" in args else ["--tracking-uri", opts["tracking_uri"]]
    flags += [] if "--storage" in args else ["--storage", opts["storage"]]
    cli = cli_message(["search", str(path), *args, *flags])
    api = api_message(str(path), **{**given, **opts})
    if case in PARSED:  # the CLI refuses it while reading the command line, in its own words
        for text in (api, cli):
            assert PARSED[case][0] in text and PARSED[case][1] in text, text
        return
    assert api == cli


def test_bad_callables_are_refused_before_ray(here):
    """A model or data set given from Python is checked as one named in a space file is: built and
    loaded on the driver, each error in one paragraph naming the option or the callable."""
    opts = options(here)
    cases = [
        (
            {"model": 42},
            "model=: expected a callable build(input_shape, num_classes, **model_args)",
        ),
        ({"data": 3.5}, "data=: expected a callable load(**data_args)"),
        (
            {"model": not_a_module},
            "variants.sgd: model callable:not_a_module returned an int, not a torch.nn.Module",
        ),
        (
            {"model": build_mlp, "data": blobs, "space": {**SPACE, "model_args": {"depth": 2}}},
            "model callable:build_mlp: model_args: unknown argument(s) depth",
        ),
        ({"data": lambda: (1, 2, 3)}, "dataset callable:lambda returned a tuple of 3"),
        (
            {"model": lambda shape, classes: LOCK.locked() or build_mlp(shape, classes)},
            "model=: <lambda> cannot be sent to the Ray workers: cloudpickle cannot pickle it",
        ),
        (
            {"model": build_mlp, "space": {**SPACE, "fixed": {"model": "cnn1d"}}},
            "the space dict: fixed.model: model= gives every trial its model",
        ),
        (
            {"model": build_mlp, "space": {**SPACE, "variants": {"sgd": {"model": "small_cnn"}}}},
            "the space dict: variants.sgd.model: model= gives every trial its model",
        ),
        (
            {"data": blobs, "space": {**SPACE, "fixed": {"dataset": "mnist1d"}}},
            "the space dict: fixed.dataset: data= gives every trial its dataset",
        ),
        ({"space": 7}, "space: expected a space file's path, a bundled space's name or a dict"),
    ]
    for given, needle in cases:
        space = given.pop("space", SPACE)
        message = api_message(space, **given, **opts)
        assert needle in message, (needle, message)
        if "variants.sgd: model" in needle:
            assert message.startswith("the space dict: "), message


# ----------------------------------------------------------------------------- one trial


def test_train_takes_callables_and_names_what_ran(tmp_path, monkeypatch):
    """flatbasin.train runs here, without Ray: a callable the current folder can import is named
    module:qualname (as --set model=... names it), any other callable:NAME with its source kept;
    two closures of one name are two data sets, never one cached copy."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "userdata.py").write_text(USERDATA)
    monkeypatch.syspath_prepend(str(tmp_path))
    import userdata

    monkeypatch.setitem(sys.modules, "userdata", userdata)  # gone again after the test

    quiet = Console(quiet=True)
    by_name = flatbasin.train(
        "sgd", model=userdata.build, data=userdata.load, epochs=1, console=quiet
    )
    assert (by_name.config.model, by_name.config.dataset) == ("userdata:build", "userdata:load")
    assert by_name.config.code_dir == str(tmp_path) and not by_name.config.passed

    def sized(n):
        return lambda: blobs(n=n)

    first = flatbasin.train(
        "sgd", model=build_mlp, data=sized(200), epochs=1, console=quiet, model_args={"width": 8}
    )
    again = flatbasin.train(
        "sgd", model=build_mlp, data=sized(320), epochs=1, console=quiet, model_args={"width": 8}
    )
    assert first.config.model == "callable:build_mlp" and first.config.dataset == "callable:lambda"
    assert "def build_mlp(" in first.config.passed["callable:build_mlp"].source
    assert first.data_fingerprint != again.data_fingerprint  # another closure: other data
    assert first.config.model_args == {"width": 8}

    # The command line is the same function: the same trial, the same numbers.
    out = tmp_path / "cli.json"
    result = runner.invoke(app, ["train", "--variant", "sgd", "--epochs", "1", "--set", "model=userdata:build",
                                 "--set", "dataset=userdata:load", "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["score"] == by_name.score

    with pytest.raises(UsageError, match=r"(?s)invalid settings for variant 'sgd'.*lr"):
        flatbasin.train("sgd", model=build_mlp, data=blobs, lr=-1, console=quiet)
    with pytest.raises(UsageError, match="data= and dataset= name the same setting"):
        flatbasin.train("sgd", data=blobs, dataset="digits", console=quiet)
    with pytest.raises(UsageError, match="unknown setting"):
        flatbasin.train("sgd", model=build_mlp, data=blobs, epoch=1, console=quiet)


def test_train_from_a_script_names_its_functions(tmp_path):
    """A script's (a notebook's) own function, and one from a module the current folder cannot
    import, are callable:NAME."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "elsewhere.py").write_text(USERDATA)
    script = tmp_path / "notebook.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(lib)!r})
        import numpy as np
        from rich.console import Console
        from torch import nn
        import elsewhere
        import flatbasin

        def build(input_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))

        result = flatbasin.train("sgd", model=build, data=elsewhere.load, epochs=1, console=Console(quiet=True))
        print(result.config.model, result.config.dataset, *sorted(result.config.passed))
    """))  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [
        "callable:build",
        "callable:load",
        "callable:build",
        "callable:load",
    ]


# ----------------------------------------------------------------------------- a real search

DRIVER = """
import json, sys
sys.path.insert(0, {tests!r})
import test_api      # the test module: not importable by the workers, so pickled by value
import userdata      # a temporary module in this folder: the workers import it by name
import flatbasin

result = flatbasin.search(
    {space!r}, model=test_api.build_mlp, data=userdata.load, samples=2, seed=1, confirm_seeds=2,
    tracking_uri={uri!r}, storage="runs",
)
best = result.best_trial
json.dump({{
    "state": result.state, "winner": result.winner, "parent": result.parent_run_id,
    "recommended": result.recommended, "verdict": result.verdict,
    "tracking_uri": result.tracking_uri, "report": str(result.report), "run_ids": result.run_ids,
    "best": [[b.variant, b.score, b.test_acc, b.run_id, b.trials, b.params] for b in result.best],
    "confirmed": [[c.variant, c.seeds, c.val_mean, c.verdict] for c in result.confirmed],
    "to_reproduce": best.run_id, "model": best.config["model"], "dataset": best.config["dataset"],
}}, open("result.json", "w"))
"""


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_search_from_python_with_callables_and_reproduce(tmp_path, ray_tmpdir, process_groups):
    """A notebook's search: a dict space, a model from the test module (pickled by value) and data
    from a temporary module (imported by name), through real Ray and MLflow; the result's run ids
    are MLflow's, and `flatbasin reproduce` retrains the best trial exactly from MLflow alone."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "userdata.py").write_text(USERDATA)
    (tmp_path / "notebook.py").write_text(DRIVER.format(tests=str(TESTS), space=SPACE, uri=uri))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmpdir)}
    proc = process_groups.spawn([sys.executable, "notebook.py"], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out, _ = proc.communicate(timeout=840)
    assert proc.returncode == 0, out[-5000:]
    assert "best trial per variant" in out and "Verdict:" in out
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["state"] == "finished" and result["tracking_uri"] == uri
    assert result["model"] == "callable:build_mlp" and result["dataset"] == "userdata:load"
    assert {b[0] for b in result["best"]} == {"sgd", "swa"}
    assert [c[1] for c in result["confirmed"]] == [2, 2] and result["winner"] in (
        "sgd",
        "swa",
        None,
    )
    assert result["recommended"] in ("sgd", "swa") and f"Verdict:      {result['verdict']}" in out
    recommended = {b[0]: b[3] for b in result["best"]}[result["recommended"]]
    assert result["to_reproduce"] == recommended  # the winner, or the cheapest of a tie
    assert Path(result["report"]).is_file()

    client = MlflowClient(uri)
    parent = client.get_run(result["parent"])
    assert (
        parent.data.tags["flatbasin.role"] == "search"
        and parent.data.params["space"] == "the space dict"
    )
    for variant, score, test_acc, run_id, trials, _ in result["best"]:
        run = client.get_run(run_id)  # the run ids are MLflow's
        assert run.data.tags["mlflow.parentRunId"] == result["parent"]
        assert run.data.tags["flatbasin.variant"] == variant and trials == 1
        assert run.data.metrics["final_score"] == pytest.approx(score)
        assert run.data.metrics["test_acc"] == pytest.approx(test_acc)
        assert run.data.params["model"] == "callable:build_mlp"  # params stay readable
    assert result["run_ids"][result["best"][0][0]] == result["best"][0][3]
    logged = {a.path for a in client.list_artifacts(result["parent"], "code")}
    assert logged == {"code/build_mlp.pkl", "code/build_mlp.py"}
    assert "fromdict.yaml" in {a.path for a in client.list_artifacts(result["parent"])}

    # Reproduce from another folder, with neither the test module nor userdata.py importable there:
    # the model from its recorded pickle, the data by name from the recorded code_dir.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "flatbasin", "reproduce", result["to_reproduce"], "--tracking-uri", uri],
        cwd=elsewhere, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "exact match" in done.stdout and "code/build_mlp.pkl" in done.stdout

    # Without its recorded pickle, a notebook's callable cannot be rebuilt: one paragraph, exit 2.
    pickles = list((tmp_path / "mlruns").rglob("build_mlp.pkl"))
    assert len(pickles) == 1
    pickles[0].unlink()
    done = subprocess.run(
        [sys.executable, "-m", "flatbasin", "reproduce", result["to_reproduce"], "--tracking-uri", uri],
        cwd=elsewhere, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    message = " ".join(done.stderr.split())
    assert "a Python callable handed to flatbasin.search from a notebook or script" in message
    assert "its source is in the run's trial_config.json" in message and "Traceback" not in message
