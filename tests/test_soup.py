"""Weight soups and greedy ensembles of a search's trials (`flatbasin soup`, `search --soup`).

The numerics on tiny models and digits, without Ray: a greedy soup never below its first member on
validation, batch norm re-estimated for every candidate average, an ensemble's probabilities the
weighted mean of its members'. A search recorded straight into MLflow and Tune's storage layout by
the real writer (no Ray): soups and the ensemble recorded as runs with their members, `reproduce`
and `train --from` of a soup. Bad input: one paragraph, exit 2, no traceback, nothing recorded. One
search through the real CLI, Ray and MLflow (marked integration and slow).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from torch import nn
from torch.optim.swa_utils import update_bn
from typer.testing import CliRunner

from flatbasin.search import soup
from flatbasin.search.cli import app
from flatbasin.search.errors import plain_console
from flatbasin.search.tags import BASE_RUN, FROM_SHA
from flatbasin.search.tracking import Tracker, TrialRecord
from flatbasin.trainables import soups
from flatbasin.trainables.config import make_config, trial_config
from flatbasin.trainables.curve import accuracy
from flatbasin.trainables.data import load_data
from flatbasin.trainables.data_spec import DataSpec
from flatbasin.trainables.loop import load_deployed, predict, train
from flatbasin.trainables.start import StartPoint, read_converged

runner = CliRunner()


# ----------------------------------------------------------------------------- numerics


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture(scope="module")
def blobs():
    """Three Gaussian blobs in 4-D, train / val split; BN-relevant scale (shifted, not centred)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 4, generator=g) * 2 + 5
    y = torch.arange(600) % 3
    x = centres[y] + torch.randn(600, 4, generator=g)
    return x[:400], y[:400], x[400:], y[400:]


def fit(net: nn.Module, x, y, lr: float, steps: int, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def from_one_base(blobs):
    """A base trained briefly, then five tails from it with different learning rates and seeds."""
    x, y, _, _ = blobs
    base = fit(tiny_net(0), x, y, 0.05, 30, 0)
    tails = {}
    for i, lr in enumerate([0.002, 0.01, 0.03, 0.1, 0.3]):
        net = tiny_net(0)
        net.load_state_dict(base.state_dict())
        tails[f"t{i}"] = fit(net, x, y, lr, 20, i + 1)
    return tails


def val_score(blobs):
    _, _, xv, yv = blobs
    return lambda net: accuracy(predict(net, [xv]), yv)


def test_a_greedy_soup_is_never_worse_on_validation_than_its_first_member(blobs, from_one_base):
    x = blobs[0]
    score = val_score(blobs)
    scores = {k: score(n) for k, n in from_one_base.items()}
    result = soups.greedy_soup(from_one_base, scores, score, lambda: [x])
    first = soups.ranked(scores)[0]
    assert result.members[0] == first
    assert result.val_acc >= scores[first]
    assert [s.added for s in result.steps] == soups.ranked(scores)[
        1:
    ]  # each candidate once, in order
    level = scores[first]
    for step in result.steps:  # kept exactly when it does not lower the soup's validation accuracy
        assert step.kept == (step.val_acc >= level)
        level = step.val_acc if step.kept else level
    assert result.val_acc == level == score(result.network)
    # A candidate that ruins the average (another initialisation, far from this basin) is left out.
    stranger = fit(tiny_net(99), blobs[0], blobs[1], 0.5, 5, 99)
    with_stranger = {**from_one_base, "zz": stranger}
    scores["zz"] = score(stranger)
    again = soups.greedy_soup(with_stranger, scores, score, lambda: [x])
    assert again.val_acc >= scores[soups.ranked(scores)[0]]


def manual_average(networks: list[nn.Module], batches: list[torch.Tensor]) -> nn.Module:
    """The equal average of the parameters by hand, then a BN pass by hand (torch's update_bn)."""
    out = tiny_net(123)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(torch.stack([dict(n.named_parameters())[name] for n in networks]).mean(0))
    update_bn(batches, out)
    return out.eval()


def test_batch_norm_is_re_estimated_for_every_candidate_average(blobs, from_one_base):
    x = blobs[0]
    score = val_score(blobs)
    scores = {k: score(n) for k, n in from_one_base.items()}
    result = soups.greedy_soup(from_one_base, scores, score, lambda: [x])
    joined = [result.members[0]]
    for step in result.steps:
        by_hand = manual_average([from_one_base[k] for k in [*joined, step.added]], [x])
        assert step.val_acc == score(by_hand)  # each candidate scored after its own BN pass
        if step.kept:
            joined.append(step.added)
    assert len(result.steps) == 4
    averaged = soups.average(list(from_one_base.values()), lambda: [x])
    by_hand = manual_average(list(from_one_base.values()), [x])
    bn, bn_hand = averaged[1], by_hand[1]
    torch.testing.assert_close(bn.running_mean, bn_hand.running_mean)
    torch.testing.assert_close(bn.running_var, bn_hand.running_var)
    # re-estimated, not copied: the statistics of the averaged network's own activations
    for member in from_one_base.values():
        assert not torch.allclose(bn.running_mean, member[1].running_mean)
    assert len(set(map(id, from_one_base.values()))) == 5  # members untouched (copies averaged)


def test_ensemble_probabilities_are_the_weighted_mean_of_its_members(blobs, from_one_base):
    _, _, xv, _yv = blobs
    nets = list(from_one_base.values())[:3]
    ensemble = soups.WeightedEnsemble(nets, [3.0, 1.0, 2.0]).eval()
    with torch.no_grad():
        got = ensemble(xv).softmax(dim=1)
        want = sum(w * n(xv).softmax(dim=1) for w, n in zip([3, 1, 2], nets, strict=True)) / 6
    torch.testing.assert_close(got, want)
    # ensembles inside an ensemble (a snapshot trial's members) count as their probabilities
    inner = soups.WeightedEnsemble(nets[:2], [1.0, 1.0])
    outer = soups.WeightedEnsemble([inner, nets[2]], [1.0, 1.0]).eval()
    with torch.no_grad():
        want = 0.5 * (0.5 * nets[0](xv).softmax(1) + 0.5 * nets[1](xv).softmax(1)) + 0.5 * nets[2](
            xv
        ).softmax(1)
        torch.testing.assert_close(outer(xv).softmax(1), want)
    assert soups.networks_of(outer) == nets
    with pytest.raises(ValueError, match="positive"):
        soups.WeightedEnsemble(nets[:1], [0.0])


def test_a_trial_that_deploys_an_ensemble_joins_a_soup_as_its_members_average(blobs, from_one_base):
    """snapshot and fge deploy a softmax ensemble of their snapshots: as one network (a soup's
    ingredient) they are the weight average of those snapshots, batch norm re-estimated; a trial
    deploying one network (an AveragedModel, TTA or not) is that network."""
    from torch.optim.swa_utils import AveragedModel

    from flatbasin.trainables.averagers import SoftmaxEnsemble
    from flatbasin.trainables.tta import TestTimeAugmented

    x = blobs[0]
    nets = list(from_one_base.values())[:2]
    deployed = SoftmaxEnsemble(nets)
    assert soups.networks_of(deployed) == nets
    one = soups.single_network(deployed, lambda: [x])
    by_hand = soups.average(nets, lambda: [x])
    for a, b in zip(one.state_dict().values(), by_hand.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    averaged = AveragedModel(nets[0])
    assert soups.networks_of(TestTimeAugmented(averaged, "flip_shift")) == [averaged.module]
    assert soups.single_network(averaged, lambda: [x]) is averaged.module


def test_greedy_ensemble_selection_with_replacement(blobs, from_one_base):
    _, _, xv, yv = blobs
    probs = {k: predict(n, [xv]) for k, n in from_one_base.items()}
    selection = soups.greedy_ensemble(probs, yv, rounds=10)
    assert len(selection.rounds) == 10
    first, first_acc = selection.rounds[0]
    best_single = max(soups.accuracy_and_nll(p, yv) for p in probs.values())
    assert soups.accuracy_and_nll(probs[first], yv) == best_single  # round 1: the best alone
    assert selection.val_acc >= first_acc  # the best round's ensemble, never below the first
    n = sum(selection.counts.values())
    mean = sum(c * probs[k].double() for k, c in selection.counts.items()) / n
    assert (selection.val_acc, selection.val_nll) == soups.accuracy_and_nll(mean, yv)
    picks = [k for k, _ in selection.rounds[:n]]
    assert {k: picks.count(k) for k in set(picks)} == selection.counts  # weights = counts


# ----------------------------------------------------------------------------- a recorded search


SEARCH = "souped"


def sampled(variant: str, params: dict, start: StartPoint, seed: int = 0, confirm_of: str = ""):
    """A trial's config as Tune samples it (what the MLflow writer records)."""
    config = {
        "variant": variant, variant: params, "start": start.model_dump(mode="json"),
        "settings": {"epochs": 2, "batch_size": 64, "threads": 1, "seed": seed},
    }  # fmt: skip
    return {**config, "confirm_of": confirm_of} if confirm_of else config


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A post-convergence search on digits written as the search writes one, without Ray: a base
    trained once (its run), trials continuing it, each trial's last checkpoint where Tune keeps it
    (runs/NAME/VARIANT_ID/checkpoint_000000), each trial's run written by the real MLflow writer
    from the real final result (ray_entry.final_metrics); one confirmation run."""
    from flatbasin.trainables.ray_entry import CHECKPOINT_FILE, final_metrics

    folder = tmp_path_factory.mktemp("souped")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    storage = folder / "runs" / SEARCH
    tracker = Tracker(uri, SEARCH, search_key=str(storage))
    parent = tracker.parent({"from": "base"})
    data = load_data(DataSpec(), "cpu")
    base_config = make_config("sgd", {"epochs": 2, "batch_size": 64, "threads": 1})
    base_path = folder / "base.pt"
    base = train(base_config, data=data, on_epoch=lambda m, save: save(base_path))
    base_run = tracker.record_base(base_path, "base", base.to_json())
    converged = read_converged(base_path)
    start = StartPoint(source="base", sha256=converged.sha256, run_id=base_run, epochs=2)
    tracker.client.set_tag(parent, FROM_SHA, converged.sha256)
    tracker.client.set_tag(parent, BASE_RUN, base_run)
    trials = [
        ("a0000001", sampled("swa", {"swa_lr": 0.01}, start)),
        ("a0000002", sampled("swa", {"swa_lr": 0.05}, start, seed=1)),
        ("a0000003", sampled("ema", {"decay": 0.9}, start, seed=2)),
        ("a0000004", sampled("snapshot", {"cycles": 2}, start, seed=3)),
        ("c0000001", sampled("swa", {"swa_lr": 0.01}, start, seed=7, confirm_of="a0000001")),
    ]
    for trial_id, config in trials:
        role_folder = (
            storage if not config.get("confirm_of") else storage.with_name(f"{SEARCH}.confirm")
        )
        path = (
            role_folder / f"{config['variant']}_{trial_id}" / "checkpoint_000000" / CHECKPOINT_FILE
        )
        path.parent.mkdir(parents=True)
        result = train(
            trial_config(config), data=data, start_weights=converged.weights,
            on_epoch=lambda m, save, path=path: save(path),
        )  # fmt: skip
        record = TrialRecord(trial_id, config)
        record.add(final_metrics(result, []))
        record.status = "FINISHED"
        tracker.write(record)
    tracker.end_parent("finished")
    return folder, uri, parent, data


@pytest.fixture(scope="module")
def souped(recorded):
    """`flatbasin soup` of the recorded search, through the CLI."""
    _folder, uri, _, _ = recorded
    result = runner.invoke(app, ["soup", SEARCH, "--tracking-uri", uri, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for title in ("best single trial", "uniform soup", "greedy soup", "greedy ensemble"):
        assert title in result.output, result.output
    client = MlflowClient(uri)
    parent = client.get_run(recorded[2])
    return soup.recorded(client, parent), result.output


@pytest.mark.slow
def test_soups_and_the_ensemble_are_recorded_with_their_members(recorded):
    folder, uri, parent, data = recorded
    import flatbasin

    report = flatbasin.soup(SEARCH, tracking_uri=uri, device="cpu", console=plain_console())
    client = MlflowClient(uri)
    kinds = [r.kind for r in report.results]
    assert kinds == ["uniform", "greedy", "ensemble"]
    candidates = {"a0000001", "a0000002", "a0000003", "a0000004", "c0000001"}
    for result in report.results:
        run = client.get_run(result.run_id)
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags[MLFLOW_PARENT_RUN_ID] == parent and run.info.status == "FINISHED"
        assert tags["flatbasin.role"] == ("ensemble" if result.kind == "ensemble" else "soup")
        assert tags["flatbasin.soup_kind"] == result.kind
        assert tags["flatbasin.members"].split(",") == [m.trial_id for m in result.members]
        assert params["members"] == str(len(result.members)) and params["candidates"] == "5"
        assert metrics["val_acc"] == result.val_acc and metrics["test_acc"] == result.test_acc
        assert metrics["inference_cost"] == result.inference_cost
        local = Path(client.download_artifacts(result.run_id, "soup.json", str(folder)))
        record = json.loads(local.read_text())
        assert [m["trial_id"] for m in record["members"]] == [m.trial_id for m in result.members]
        assert [m["weight"] for m in record["members"]] == [m.weight for m in result.members]
        assert {m.trial_id for m in result.members} <= candidates
        artifacts = {a.path for a in client.list_artifacts(result.run_id)}
        with torch.no_grad():  # the deployed model, as MLflow keeps it, scores what was recorded
            deployed = mlflow_load(uri, result.run_id)
            assert (
                accuracy(predict(deployed, data.inputs("test")), data.labels("test"))
                == result.test_acc
            )
        assert ("checkpoint.pt" in artifacts) == (result.kind != "ensemble")
    uniform, greedy, ensemble = report.results
    assert {m.trial_id for m in uniform.members} == candidates and uniform.inference_cost == 1
    first = greedy.members[0]
    assert first.val_acc == max(m.val_acc for m in uniform.members)  # the best ingredient first
    assert greedy.val_acc >= first.val_acc and greedy.inference_cost == 1
    snapshot_networks = 2  # a snapshot trial of 2 cycles deploys 2 networks
    assert ensemble.inference_cost == sum(
        snapshot_networks if m.variant == "snapshot" else 1 for m in ensemble.members
    )
    # The deployed ensemble, as MLflow keeps it: the weighted mean of its members' probabilities.
    with torch.no_grad():
        got = predict(mlflow_load(uri, ensemble.run_id), data.inputs("val"))
        total = sum(m.weight for m in ensemble.members)
        want = torch.zeros_like(got)
        for m in ensemble.members:
            where = f"{SEARCH}.confirm" if m.role == "confirm" else SEARCH
            path = folder / "runs" / where / f"{m.variant}_{m.trial_id}" / "checkpoint_000000"
            deployed = deployed_model(client, m.run_id, path / "checkpoint.pt", folder)
            want += m.weight / total * predict(deployed, data.inputs("val"))
    torch.testing.assert_close(got, want)
    assert accuracy(got, data.labels("val")) == ensemble.val_acc


def mlflow_load(uri: str, run_id: str) -> nn.Module:
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(uri)
    return mlflow.pytorch.load_model(f"runs:/{run_id}/model").eval()


def deployed_model(client: MlflowClient, run_id: str, checkpoint: Path, folder: Path) -> nn.Module:
    from flatbasin.trainables.config import TrialConfig

    local = Path(client.download_artifacts(run_id, "trial_config.json", str(folder / run_id)))
    config = TrialConfig.model_validate(json.loads(local.read_text())["config"])
    return load_deployed(config, checkpoint)


@pytest.mark.slow
def test_a_search_is_found_by_name_run_id_or_tune_folder(recorded):
    folder, uri, parent, _ = recorded
    for search in (SEARCH, parent, str(folder / "runs" / SEARCH)):
        found = soup.plan(search, uri, "all")
        assert found.parent.info.run_id == parent and len(found.candidates) == 5
        assert [c.role for c in found.candidates].count("confirm") == 1


def test_the_resume_command_keeps_soup_as_given(tmp_path):
    from flatbasin.search.options import SearchOptions
    from flatbasin.search.resume import resume_command
    from flatbasin.spaces import load_space

    space = load_space("swa")
    for soup_option, expected in ((True, "--soup"), (False, "--no-soup"), (None, None)):
        options = SearchOptions(tracking_uri="sqlite:///x.db", storage=tmp_path, soup=soup_option)
        command = resume_command(space, options)
        assert command.endswith("--resume")
        assert (expected in command.split()) if expected else "soup" not in command


@pytest.mark.slow
def test_reproduce_rebuilds_a_soup_from_its_members_and_from_continues_it(recorded, souped):
    """reproduce of a soup or an ensemble rebuilds it from its recorded members: from their final
    weights in Tune's storage, or, where those are gone, by retraining the member from its run; on
    the CPU it matches exactly. `train --from SOUP_RUN` continues the soup's weights."""
    folder, uri, _, _ = recorded
    runs = {row["title"]: row["run_id"] for row in souped[0]}
    greedy, ensemble = runs["greedy soup"], runs["greedy ensemble"]
    for run_id in (greedy, ensemble):
        result = runner.invoke(app, ["reproduce", run_id, "--tracking-uri", uri])
        assert result.exit_code == 0 and "exact match" in result.output, result.output
        assert "its final weights in Tune's storage" in result.output
    client = MlflowClient(uri)
    members = json.loads(
        Path(client.download_artifacts(greedy, "soup.json", str(folder / "g"))).read_text()
    )["members"]
    gone = Path(members[0]["checkpoint"]).parent.parent
    shutil.move(gone, folder / "moved")  # Tune's copy of the first member is gone
    try:
        result = runner.invoke(app, ["reproduce", greedy, "--tracking-uri", uri])
    finally:
        shutil.move(folder / "moved", gone)
    assert result.exit_code == 0 and "exact match" in result.output, result.output
    assert f"member {members[0]['trial_id']}: no checkpoint in Tune's storage" in result.output
    reproductions = client.search_runs(
        [client.get_run(greedy).info.experiment_id],
        filter_string=f"tags.`flatbasin.reproduces` = '{greedy}'",
    )
    assert len(reproductions) == 2
    assert all(r.data.tags["flatbasin.exact_match"] == "true" for r in reproductions)

    tail = runner.invoke(
        app, ["train", "--variant", "swa", "--epochs", "1", "--set", "threads=1", "--from", greedy,
              "--tracking-uri", uri],
    )  # fmt: skip
    assert tail.exit_code == 0 and f"continuing run {greedy}" in tail.output, tail.output
    refused = runner.invoke(
        app, ["train", "--variant", "swa", "--from", ensemble, "--tracking-uri", uri]
    )
    assert refused.exit_code == 2 and "kept no weights" in refused.output, refused.output


# ----------------------------------------------------------------------------- bad input


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hand_made(tmp_path: Path, name: str, start: str | None, trials: list[dict]) -> str:
    """A search's run and its trial runs written straight into MLflow (real SQLite store), with
    Tune's folder named but never made."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, name, search_key=str(tmp_path / "runs" / name))
    parent = tracker.parent({"from": "base"} if start else {})
    if start:
        tracker.client.set_tag(parent, FROM_SHA, start)
    for i, trial in enumerate(trials):
        run = tracker.client.create_run(tracker.experiment_id, tags={
            MLFLOW_PARENT_RUN_ID: parent, "flatbasin.role": "trial", "flatbasin.variant": "swa",
            "flatbasin.trial_id": f"t{i}", **({"flatbasin.final_logged": "true",
            "flatbasin.diverged": "false"} if trial.get("finished", True) else {})})  # fmt: skip
        if trial.get("sha"):
            tracker.client.log_param(run.info.run_id, "from_sha256", trial["sha"])
        tracker.client.log_metric(run.info.run_id, "final_score", 0.9)
    return uri


def soup_fails(uri: str, *args: str) -> str:
    client_runs = _runs(uri)
    result = runner.invoke(
        app, ["soup", *args, "--tracking-uri", uri], env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    )
    output = result.output
    assert result.exit_code == 2, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in output and output.startswith("error: "), output
    assert sum(line.startswith("error:") for line in output.splitlines()) == 1, output
    assert _runs(uri) == client_runs  # nothing recorded
    return " ".join(output.split())


def _runs(uri: str) -> int:
    if not uri.startswith("sqlite:") or not Path(uri.removeprefix("sqlite:///")).is_file():
        return 0
    client = MlflowClient(uri)
    return sum(
        len(client.search_runs([e.experiment_id], max_results=1000))
        for e in client.search_experiments()
    )


SHA_A, SHA_B = "a" * 64, "b" * 64


def test_soups_of_trials_from_different_starts_are_refused(tmp_path):
    uri = hand_made(tmp_path, "mixed", SHA_A, [{"sha": SHA_A}, {"sha": SHA_B}, {"sha": None}])
    text = soup_fails(uri, "mixed")
    assert "do not all continue the search's converged model (sha256 aaaaaaaaaaaa)" in text
    assert "bbbbbbbbbbbb" in text and "none (from scratch)" in text
    assert "cannot be averaged" in text


def test_soups_of_a_search_from_scratch_are_refused_with_what_to_do(tmp_path):
    uri = hand_made(tmp_path, "scratch", None, [{"sha": None}])
    for args in (["scratch"], ["scratch", "--only", "soups"]):
        text = soup_fails(uri, *args)
        assert (
            "search 'scratch': a weight soup averages the weights of trials that continue" in text
        )
        assert "--from base" in text and "--only ensemble" in text
    # The ensemble needs no shared start: it gets as far as the trials' weights (not kept here).
    text = soup_fails(uri, "scratch", "--only", "ensemble")
    assert "the trials' final weights are kept in Tune's storage" in text and "not there" in text


@pytest.mark.parametrize(
    "case",
    ["unknown search", "no finished trials", "store missing", "server down", "bad --only",
     "no such folder", "a folder of no search"],
)  # fmt: skip
def test_bad_input_ends_in_one_paragraph(case, tmp_path):
    uri = hand_made(tmp_path, "some", SHA_A, [{"sha": SHA_A, "finished": False}])
    search, needle = "some", ""
    if case == "unknown search":
        search, needle = "nothere", "no search named or with run id 'nothere'"
    elif case == "no finished trials":
        needle = "search 'some' (run "
    elif case == "store missing":
        uri, needle = f"sqlite:///{tmp_path / 'typo' / 'mlflow.db'}", "no MLflow store at"
    elif case == "server down":
        uri, needle = f"http://127.0.0.1:{closed_port()}", "is not reachable"
    elif case == "no such folder":
        search, needle = str(tmp_path / "runs" / "gone"), "gone: no such folder"
    elif case == "a folder of no search":
        search, needle = str(tmp_path), f"holds no search whose Tune folder is {tmp_path}"
    text = soup_fails(uri, search, *(["--only", "everything"] if case == "bad --only" else []))
    if case == "no finished trials":
        assert "has no finished trials" in text
    if case == "bad --only":
        needle = "--only everything: expected all, soups or ensemble"
    assert needle in text, text
    assert not (tmp_path / "typo").exists()


def test_search_soup_from_scratch_is_refused_before_ray(tmp_path, ray_tmpdir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text("epochs: 2\nvariants:\n  sgd: {lr: {loguniform: [0.02, 0.1]}}\n")
    result = runner.invoke(
        app, ["search", str(space), "--soup", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
              "--storage", str(tmp_path / "runs")], env={"RAY_TMPDIR": str(ray_tmpdir)},
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert text.startswith("error: --soup: a weight soup averages") and "--from base" in text
    assert "Traceback" not in result.output
    assert not list(ray_tmpdir.rglob("session_*")) and not (tmp_path / "runs").exists()
    assert not (tmp_path / "m.db").exists()


# ----------------------------------------------------------------------------- end to end

E2E_SPACE = """
name: soup-e2e
samples: 3
epochs: 2
confirm_seeds: 2
fixed: {batch_size: 64}
from: base
base: {epochs: 2}
variants:
  swa: {swa_lr: {loguniform: [0.005, 0.05]}}
  snapshot: {lr: {loguniform: [0.02, 0.1]}, cycles: 2}
"""


@pytest.mark.integration
@pytest.mark.slow
def test_a_search_from_base_ends_with_its_soups(tmp_path, ray_tmpdir, process_groups):
    """`from: base` through the real CLI, Ray and MLflow: --soup is on by default, the summary
    shows the soups and the ensemble beside the best trial and the confirmed winner, each is a run
    under the search's, and the report has their section."""
    space = tmp_path / "soup-e2e.yaml"
    space.write_text(E2E_SPACE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmpdir)}
    proc = process_groups.spawn(
        [sys.executable, "-m", "flatbasin", "search", str(space), "--tracking-uri", uri,
         "--storage", str(tmp_path / "runs"), "--seed", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    out, _ = proc.communicate(timeout=840)
    assert proc.returncode == 0, out
    text = " ".join(out.split())
    assert "one model from the whole search" in text, out
    for row in ("best single trial", "uniform soup", "greedy soup", "greedy ensemble"):
        assert row in text, out
    # the winner beyond noise, or the variant recommended among those that tie
    assert "confirmed winner (" in text or "confirmed choice, a tie (" in text, out
    assert text.index("confirmed over 2") < text.index("one model from the whole search")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("soup-e2e").experiment_id
    runs = client.search_runs([experiment])
    parent = next(r for r in runs if r.data.tags.get("flatbasin.role") == "search")
    made = [r for r in runs if r.data.tags.get("flatbasin.role") in ("soup", "ensemble")]
    assert sorted(r.data.tags["flatbasin.soup_kind"] for r in made) == [
        "ensemble",
        "greedy",
        "uniform",
    ]
    trials = {r.data.tags["flatbasin.trial_id"] for r in runs
              if r.data.tags.get("flatbasin.role") in ("trial", "confirm")}  # fmt: skip
    for run in made:
        assert run.data.tags[MLFLOW_PARENT_RUN_ID] == parent.info.run_id
        assert set(run.data.tags["flatbasin.members"].split(",")) <= trials
        assert run.data.params["candidates"] == "7"  # 3 trials and 4 confirmation runs
    page = (tmp_path / "reports" / "soup-e2e" / "report.html").read_text()
    assert "One model from the whole search" in page and "greedy ensemble" in page
