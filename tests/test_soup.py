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
from flatbasin.search.errors import UsageError, plain_console
from flatbasin.search.tracking import FROM_SHA, BASE_RUN, Tracker, TrialRecord
from flatbasin.trainables import soups
from flatbasin.trainables.config import make_config, trial_config
from flatbasin.trainables.curve import accuracy
from flatbasin.trainables.data import DataSpec, load_data
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
    assert [s.added for s in result.steps] == soups.ranked(scores)[1:]  # each candidate once, in order
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
    _, _, xv, yv = blobs
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
        want = 0.5 * (0.5 * nets[0](xv).softmax(1) + 0.5 * nets[1](xv).softmax(1)) + 0.5 * nets[
            2
        ](xv).softmax(1)
        torch.testing.assert_close(outer(xv).softmax(1), want)
    assert soups.networks_of(outer) == nets
    with pytest.raises(ValueError, match="positive"):
        soups.WeightedEnsemble(nets[:1], [0.0])


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
        role_folder = storage if not config.get("confirm_of") else storage.with_name(f"{SEARCH}.confirm")
        path = role_folder / f"{config['variant']}_{trial_id}" / "checkpoint_000000" / CHECKPOINT_FILE
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


@pytest.mark.slow
def test_soups_and_the_ensemble_are_recorded_with_their_members(recorded):
    folder, uri, parent, data = recorded
    report = soup.make(SEARCH, uri, "all", "cpu", plain_console())
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
            assert accuracy(predict(deployed, data.inputs("test")), data.labels("test")) == result.test_acc
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
