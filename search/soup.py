"""`flatbasin soup SEARCH` (and `flatbasin search --soup`): one model from a whole search.

From the finished trials of a search and its confirmation runs: the uniform soup and the greedy
soup (Wortsman et al. 2022) of trials that continue one converged model (`--from`: they lie in one
basin, where an average of their weights is itself a good model), and the greedy ensemble (Caruana
et al. 2004) of any search's trials. Every choice is made on the search's validation split; the test
split is scored once per result, at the end. Each result becomes its own MLflow run under the
search's run (flatbasin.role soup or ensemble) with its members and weights (soup.json, tags,
params), its accuracies and its deployed model; a soup also keeps its weights (checkpoint.pt), so
`--from RUN_ID` continues it as it continues a trial. `flatbasin reproduce` of such a run rebuilds
it from its recorded members (reproduce_result).

The trials' final weights come from Tune's storage, which keeps each trial's last checkpoint
(runs/NAME/VARIANT_TRIALID, runs/NAME.confirm/... for confirmation runs): nothing more is stored
for a soup. Probabilities for the ensemble are computed from those weights here, not saved per
trial (docs/soups.md has the sizes and the timing).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from flatbasin.search.credentials import redact_uri
from flatbasin.search.errors import Unwritten, UsageError
from flatbasin.search.search_run import base_tags, quoted
from flatbasin.search.store import TrackingUnavailable, read_store
from flatbasin.search.tags import (
    BASE_RUN,
    CHECKPOINT_ARTIFACT,
    FINAL,
    FROM_SHA,
    RECOMMENDED,
    ROLE,
    SEARCH_KEY,
    TRIAL_ID,
    VARIANT,
    WINNER,
)
from flatbasin.trainables.start import DATA_KEYS

SOUP_ROLE, ENSEMBLE_ROLE = "soup", "ensemble"
KIND = "flatbasin.soup_kind"  # uniform, greedy or ensemble
MEMBERS = "flatbasin.members"  # the members' trial ids (weights in soup.json and the params)
COST = "flatbasin.inference_cost"  # networks run per prediction
RECORD = (
    "soup.json"  # members, weights, every candidate's validation accuracy: what reproduce reads
)
WHAT = Literal["all", "soups", "ensemble"]
TITLES = {"uniform": "uniform soup", "greedy": "greedy soup", "ensemble": "greedy ensemble"}
ENSEMBLE_ROUNDS = (
    25  # Caruana's selection rounds (with replacement); the best round's ensemble is kept
)

log = logging.getLogger(__name__)


def from_scratch_refusal(where: str) -> str:
    """Why weight soups need a shared start, and what to run instead."""
    return (
        f"{where}: a weight soup averages the weights of trials that continue one converged model "
        "(a search with --from), which lie in one basin, where the average of their weights is "
        "itself a good model; this search trained every trial from its own random initialisation, "
        "and an average of independently trained networks is no model at all (their units do not "
        "line up). Search with --from base (the base phase trained once, every trial continuing "
        "it) to make soups, or build only the greedy ensemble of these trials, which needs no "
        "shared start, with `flatbasin soup SEARCH --only ensemble`"
    )


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SoupMember:
    run_id: str
    trial_id: str
    role: str  # trial or confirm
    variant: str
    weight: float  # a soup's members weigh the same; an ensemble's weight is its selection count
    val_acc: float  # of the member as the soup or ensemble took it
    networks: int  # networks it runs per prediction (an ensemble trial: its members)


@dataclass(frozen=True)
class SoupResult:
    """A uniform soup, a greedy soup or a greedy ensemble of a search's trials."""

    kind: str  # uniform, greedy, ensemble
    val_acc: float  # the validation split chose it: this number flatters
    test_acc: float  # scored once, after every choice
    members: tuple[SoupMember, ...]
    candidates: int  # trials (and confirmation runs) it was chosen from
    inference_cost: int  # networks run per prediction: 1 for a soup
    run_id: str | None = None  # its MLflow run

    @property
    def title(self) -> str:
        return TITLES[self.kind]


@dataclass(frozen=True)
class Reference:
    """A row the results stand beside: the best single trial, the confirmed winner."""

    label: str
    val: str
    test: str
    members: str
    inference_cost: int | None
    run_id: str | None = None


@dataclass
class SoupReport:
    search: str
    parent_run_id: str
    results: list[SoupResult]
    references: list[Reference]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- what is there


@dataclass(frozen=True)
class Candidate:
    """A finished trial or confirmation run, and where Tune kept its final weights."""

    run_id: str
    trial_id: str
    role: str
    variant: str
    score: float  # its recorded validation score
    val_loss: float
    start_sha: str | None  # the converged model it continued (None: from scratch)
    data: tuple[tuple[str, str | None], ...]  # its data settings: the split it was scored on
    checkpoint: Path
    epochs_run: int | None


@dataclass
class Plan:
    search: str
    uri: str
    client: MlflowClient
    parent: Run
    kinds: tuple[str, ...]
    candidates: list[Candidate]
    notes: list[str]
    winner: str | None


def plan(search: str, uri: str, only: WHAT = "all") -> Plan:
    """Everything checked before any model is loaded: the store answers, the search is there, it
    has finished trials whose final weights Tune kept, and (for soups) they share one start.
    Raises UsageError saying what is wrong."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # small files
    from flatbasin.search.search_lookup import find_search

    kinds = {"all": ("uniform", "greedy", "ensemble"), "soups": ("uniform", "greedy"),
             "ensemble": ("ensemble",)}[only]  # fmt: skip
    try:
        client = read_store(uri)
    except TrackingUnavailable as err:
        raise UsageError(str(err)) from err
    try:
        parent = _by_folder(client, search, uri) if _folder_like(search) else None
        parent = parent or find_search(client, search, uri)
        runs = [
            r for r in _children(client, parent) if r.data.tags.get(ROLE) in ("trial", "confirm")
        ]
    except MlflowException as err:
        raise UsageError(
            f"cannot read search '{search}' from {redact_uri(uri)}: {_first_line(err)}"
        ) from err
    name = client.get_experiment(parent.info.experiment_id).name
    finished = [r for r in runs if _finished(r)]
    if not finished:
        raise UsageError(
            f"search '{name}' (run {parent.info.run_id}) has no finished trials ({len(runs)} trial "
            "run(s), none finished without diverging): a soup or an ensemble is made of them"
        )
    start = parent.data.tags.get(FROM_SHA)
    if start is None and set(kinds) & {"uniform", "greedy"}:
        raise UsageError(from_scratch_refusal(f"search '{name}'"))
    notes: list[str] = []
    starts = {r.data.params.get("from_sha256") for r in finished}
    if start is not None and starts != {start}:
        other = sorted(s[:12] if s else "none (from scratch)" for s in starts - {start})
        raise UsageError(
            f"search '{name}': its trials do not all continue the search's converged model "
            f"(sha256 {start[:12]}); some continue {', '.join(other)}: trials from different "
            "starts lie in different basins, and their weights cannot be averaged into one model"
        )
    folder = Path(parent.data.tags.get(SEARCH_KEY, ""))
    if not folder.name or not folder.is_dir():
        raise UsageError(
            f"search '{name}': the trials' final weights are kept in Tune's storage, at {folder}, "
            "which is not there (moved, deleted, or on another machine); run this where that "
            "folder is, or put it back"
        )
    ordered = sorted(finished, key=lambda r: (r.data.tags.get(ROLE) != "trial", _trial_id(r)))
    # The search's own split: its first trial's (never a confirmation run's, which has its own split;
    # MLflow lists the newest runs first, so the confirmation's came first here once)
    search_data = _data(ordered[0])
    candidates = []
    for run in ordered:
        if _data(run) != search_data:
            notes.append(
                f"{_label(run)} left out: it was scored on another validation split than the "
                "search's trials, which the choices here are made on"
            )
            continue
        checkpoint = _checkpoint(folder, run)
        if checkpoint is None:
            notes.append(
                f"{_label(run)} left out: Tune kept no checkpoint of it in {folder.parent}"
            )
            continue
        epochs = run.data.metrics.get("epochs_run")
        candidates.append(
            Candidate(
                run_id=run.info.run_id, trial_id=_trial_id(run), role=run.data.tags[ROLE],
                variant=run.data.tags.get(VARIANT, "?"),
                score=float(run.data.metrics.get("final_score", run.data.metrics.get("score", 0))),
                val_loss=float(run.data.metrics.get("val_loss", math.inf)),
                start_sha=run.data.params.get("from_sha256"), data=_data(run),
                checkpoint=checkpoint, epochs_run=int(epochs) if epochs is not None else None,
            )
        )  # fmt: skip
    if not candidates:
        raise UsageError(
            f"search '{name}': none of its {len(finished)} finished trial(s) has its final weights "
            f"in Tune's storage ({folder}); " + "; ".join(notes[:3])
        )
    return Plan(name, uri, client, parent, kinds, candidates, notes,
                # the confirmed winner, else the variant recommended among those that tie
                parent.data.tags.get(WINNER) or parent.data.tags.get(RECOMMENDED) or None)  # fmt: skip


def _folder_like(search: str) -> bool:
    """SEARCH given as the search's Tune folder (runs/NAME), not as its name or run id."""
    return "/" in search or Path(search).is_dir()


def _by_folder(client: MlflowClient, search: str, uri: str) -> Run:
    """The search whose Tune folder this is: its run records the folder (flatbasin.search)."""
    folder = Path(search).expanduser().resolve()
    if not folder.is_dir():
        raise UsageError(
            f"{search}: no such folder; give a search's name, its MLflow run id, or its Tune "
            "folder (runs/NAME)"
        )
    experiment = client.get_experiment_by_name(folder.name)
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{ROLE}` = 'search' and tags.`{SEARCH_KEY}` = '{quoted(str(folder))}'",
        max_results=1,
    ) if experiment is not None else []  # fmt: skip
    if not found:
        raise UsageError(
            f"{search}: {redact_uri(uri)} holds no search whose Tune folder is {folder} (a search "
            "is recorded in the MLflow store it ran with: pass that one with --tracking-uri)"
        )
    return found[0]


def _finished(run: Run) -> bool:
    tags = run.data.tags
    return tags.get(FINAL) == "true" and tags.get("flatbasin.diverged") != "true"


def _trial_id(run: Run) -> str:
    return run.data.tags.get(TRIAL_ID, run.info.run_id[:8])


def _label(run: Run) -> str:
    what = "confirmation run" if run.data.tags.get(ROLE) == "confirm" else "trial"
    return f"{what} {_trial_id(run)} ({run.data.tags.get(VARIANT, '?')})"


def _data(run: Run) -> tuple[tuple[str, str | None], ...]:
    return tuple((key, run.data.params.get(key)) for key in DATA_KEYS)


def _children(client: MlflowClient, parent: Run) -> list[Run]:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'",
            max_results=1000, page_token=token,
        )  # fmt: skip
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _checkpoint(folder: Path, run: Run) -> Path | None:
    """The trial's last checkpoint in Tune's storage: its folder is VARIANT_TRIALID (tuner.trial_name),
    under the search's folder, or the confirmation runs' folder beside it (resume.confirm_path)."""
    where = (
        folder if run.data.tags.get(ROLE) == "trial" else folder.with_name(f"{folder.name}.confirm")
    )
    trial = where / f"{run.data.tags.get(VARIANT, '?')}_{_trial_id(run)}"
    found = sorted(trial.glob("checkpoint_*/checkpoint.pt"))
    return found[-1] if found else None


# ----------------------------------------------------------------------------- building


@dataclass
class Loaded:
    """A candidate's models, on the soup's device."""

    candidate: Candidate
    config: Any  # TrialConfig
    deployed: Any  # nn.Module: what the trial deploys (TTA included), for the ensemble
    network: Any  # nn.Module | None: the trial as one network, for the soups
    networks: int
    sha256: str  # of the deployed model's weights: the trial's final state
    epoch: int
    step: int


def build(plan: Plan, device: str = "auto", console: Console | None = None) -> SoupReport:
    """Load every candidate, make the results, score each on test once, record each as a run."""
    import torch

    from flatbasin.trainables.accel import resolve_device
    from flatbasin.trainables.data import load_data
    from flatbasin.trainables.data_spec import DataError

    console = console or Console(quiet=True)
    started = time.perf_counter()
    try:
        torch_device = resolve_device(device)
    except ValueError as err:
        raise UsageError(f"--device {device}: {err}") from err
    first = _config(plan.client, plan.candidates[0], str(torch_device))
    try:
        data = load_data(first.data_spec, str(torch_device))
    except DataError as err:
        raise UsageError(f"search '{plan.search}': its data cannot be loaded here: {err}") from err
    soups = bool(set(plan.kinds) & {"uniform", "greedy"})
    console.print(
        f"Soup of search '{plan.search}': {len(plan.candidates)} finished trial(s) and "
        f"confirmation run(s), {', '.join(TITLES[k] for k in plan.kinds)}; chosen on "
        f"{data.size('val')} validation examples, BN re-estimated on {data.size('train')} "
        "training examples for every average"
    )
    with torch.no_grad():
        loaded = [load(plan.client, c, data, str(torch_device), soups) for c in plan.candidates]
    results = _make(plan, loaded, data)
    report = SoupReport(plan.search, plan.parent.info.run_id, [], [], list(plan.notes))
    for result, model, record in results:
        run_id = _record(plan, result, model, record, loaded, data)
        report.results.append(_with_run(result, run_id))
    report.references = references(plan, loaded)
    report.seconds = time.perf_counter() - started
    load_data.cache_clear()
    return report


def _config(client: MlflowClient, candidate: Candidate, device: str) -> Any:
    """The trial's config as its checkpoint holds it (what trained those weights), on `device`;
    its own Python callables (a model or data set handed to flatbasin.search) registered."""
    from flatbasin.search.run_record import load_passed
    from flatbasin.trainables.checkpoint import CheckpointError, read_checkpoint
    from flatbasin.trainables.config import TrialConfig

    try:
        state = read_checkpoint(candidate.checkpoint)
    except CheckpointError as err:
        raise UsageError(f"trial {candidate.trial_id}: {err}") from err
    config = TrialConfig.model_validate({**state["config"], "device": device})
    load_passed(client, candidate.run_id, config)
    return config


def load(client: MlflowClient, candidate: Candidate, data: Any, device: str, soups: bool) -> Loaded:
    """A candidate's deployed model from its last checkpoint, and (`soups`) the trial as one network."""
    from flatbasin.trainables.checkpoint import CheckpointError, read_checkpoint
    from flatbasin.trainables.loop import load_deployed
    from flatbasin.trainables.soups import networks_of, plain, single_network
    from flatbasin.trainables.start import weights_sha256

    config = _config(client, candidate, device)
    state = read_checkpoint(candidate.checkpoint)
    if candidate.epochs_run is not None and int(state["epoch"]) != candidate.epochs_run:
        raise UsageError(
            f"trial {candidate.trial_id}: Tune's last checkpoint of it ({candidate.checkpoint}) "
            f"is of epoch {state['epoch']}, not of its last epoch ({candidate.epochs_run})"
        )
    try:
        deployed = plain(load_deployed(config, candidate.checkpoint, data))
    except CheckpointError as err:
        raise UsageError(f"trial {candidate.trial_id}: {err}") from err
    networks = networks_of(deployed)
    network = single_network(deployed, lambda: data.inputs("train")) if soups else None
    digest = weights_sha256(deployed.state_dict())  # the trial's final state, whatever is built
    return Loaded(candidate, config, deployed, network, len(networks), digest,
                  int(state["epoch"]), int(state["step"]))  # fmt: skip


def _probs(module: Any, data: Any, split: str) -> Any:
    from flatbasin.trainables.loop import predict

    return predict(module, data.inputs(split), "none")


def _accuracy(module: Any, data: Any, split: str) -> float:
    from flatbasin.trainables.curve import accuracy

    return accuracy(_probs(module, data, split), data.labels(split))


def _make(
    plan: Plan, loaded: list[Loaded], data: Any
) -> list[tuple[SoupResult, Any, dict[str, Any]]]:
    """Each result, its deployed model and its record (soup.json); test scored last, once each."""
    import torch

    from flatbasin.trainables import soups
    from flatbasin.trainables.tta import with_tta

    by_key = {item.candidate.trial_id + "@" + item.candidate.role: item for item in loaded}
    tta = loaded[0].config.tta

    def score(network: Any) -> float:
        return _accuracy(with_tta(network, tta).eval(), data, "val")

    def bn() -> Any:
        return data.inputs("train")

    made: list[tuple[str, Any, list[tuple[str, float]], float, dict[str, Any]]] = []
    extra: dict[str, Any]
    with torch.no_grad():
        if set(plan.kinds) & {"uniform", "greedy"}:
            ingredients = {k: item.network for k, item in by_key.items()}
            scores = {k: score(net) for k, net in ingredients.items()}
            extra = {"ingredient_val_acc": scores}
            if "uniform" in plan.kinds:
                soup = soups.uniform_soup(ingredients, score, bn)
                made.append(("uniform", with_tta(soup.network, tta).eval(),
                             [(k, 1.0) for k in soup.members], soup.val_acc, extra))  # fmt: skip
            if "greedy" in plan.kinds:
                soup = soups.greedy_soup(ingredients, scores, score, bn)
                steps = {"steps": [asdict(s) for s in soup.steps]}
                made.append(("greedy", with_tta(soup.network, tta).eval(),
                             [(k, 1.0) for k in soup.members], soup.val_acc, {**extra, **steps}))  # fmt: skip
        if "ensemble" in plan.kinds:
            val_probs = {k: _probs(item.deployed, data, "val") for k, item in by_key.items()}
            selection = soups.greedy_ensemble(val_probs, data.labels("val"), ENSEMBLE_ROUNDS)
            keys = sorted(selection.counts, key=lambda k: (-selection.counts[k], k))
            model = soups.WeightedEnsemble(
                [by_key[k].deployed for k in keys], [float(selection.counts[k]) for k in keys]
            ).eval()
            chosen: dict[str, Any] = {
                "rounds": [{"added": k, "val_acc": a} for k, a in selection.rounds],
                "member_val_acc": {k: _accuracy(item.deployed, data, "val") for k, item in by_key.items()},
            }  # fmt: skip
            made.append(("ensemble", model, [(k, float(selection.counts[k])) for k in keys],
                         _accuracy(model, data, "val"), chosen))  # fmt: skip
        out = []
        for kind, model, members, val_acc, record in made:
            test_acc = _accuracy(model, data, "test")  # the test split: once, at the end
            own: dict[str, float] = (
                record.get("ingredient_val_acc") or record.get("member_val_acc") or {}
            )
            result = SoupResult(
                kind=kind, val_acc=val_acc, test_acc=test_acc,
                members=tuple(
                    SoupMember(
                        run_id=by_key[k].candidate.run_id, trial_id=by_key[k].candidate.trial_id,
                        role=by_key[k].candidate.role, variant=by_key[k].candidate.variant,
                        weight=w, val_acc=float(own.get(k, math.nan)), networks=by_key[k].networks,
                    )
                    for k, w in members
                ),
                candidates=len(loaded),
                inference_cost=1 if kind != "ensemble" else sum(by_key[k].networks for k, _ in members),
            )  # fmt: skip
            out.append((result, model, {**record, "keys": [k for k, _ in members]}))
    return out


def _with_run(result: SoupResult, run_id: str) -> SoupResult:
    from dataclasses import replace

    return replace(result, run_id=run_id)


# ----------------------------------------------------------------------------- recording


def _record(
    plan: Plan,
    result: SoupResult,
    model: Any,
    record: dict[str, Any],
    loaded: list[Loaded],
    data: Any,
) -> str:
    """The result as a run under the search's: tags, params, metrics, soup.json, the deployed model
    and, for a soup, its weights as checkpoint.pt. A store that fails midway is Unwritten."""
    import torch

    client, parent = plan.client, plan.parent
    role = ENSEMBLE_ROLE if result.kind == "ensemble" else SOUP_ROLE
    by_run = {item.candidate.run_id: item for item in loaded}
    lead = by_run[result.members[0].run_id]
    network = model.module if result.kind != "ensemble" and hasattr(model, "tta") else model
    soup_sha = None
    if result.kind != "ensemble":
        from flatbasin.trainables.start import weights_sha256

        soup_sha = weights_sha256(network.state_dict())
    members = ",".join(m.trial_id for m in result.members)
    tags = {
        MLFLOW_PARENT_RUN_ID: parent.info.run_id, ROLE: role, KIND: result.kind,
        MEMBERS: members if len(members) <= 5000 else members[:4990] + ",…",
        COST: str(result.inference_cost), "flatbasin.dataset": lead.config.dataset,
        "flatbasin.data_fingerprint": data.fingerprint,
        "flatbasin.model": str(lead.config.model), **base_tags(),
    }  # fmt: skip
    start = lead.config.start
    if start is not None:
        tags[FROM_SHA] = start.sha256
        if start.run_id:
            tags[BASE_RUN] = start.run_id
    params = {
        "kind": result.kind, "members": len(result.members), "candidates": result.candidates,
        "weights": ", ".join(f"{m.trial_id}:{m.weight:g}" for m in result.members)[:6000],
        "selection": {
            "uniform": "every candidate, equal weights",
            "greedy": "candidates by validation accuracy, each kept if the average's does not drop",
            "ensemble": f"Caruana, with replacement, {ENSEMBLE_ROUNDS} rounds, best round kept",
        }[result.kind],
        "variant": lead.config.variant, "tta": lead.config.tta,
    }  # fmt: skip
    soup_record = {
        "kind": result.kind, "search": plan.search, "search_run_id": parent.info.run_id,
        "val_acc": result.val_acc, "test_acc": result.test_acc,
        "inference_cost": result.inference_cost, "candidates": result.candidates,
        "soup_sha256": soup_sha, "tta": lead.config.tta, "data_fingerprint": data.fingerprint,
        "threads": torch.get_num_threads(), "device": str(next(model.parameters()).device),
        "members": [
            {**asdict(m), "sha256": by_run[m.run_id].sha256,
             "checkpoint": str(by_run[m.run_id].candidate.checkpoint)}
            for m in result.members
        ],
        "candidate_runs": [
            {"run_id": item.candidate.run_id, "trial_id": item.candidate.trial_id,
             "role": item.candidate.role, "variant": item.candidate.variant}
            for item in loaded
        ],
        **{k: v for k, v in record.items() if k != "keys"},
    }  # fmt: skip
    run_id = None
    try:
        run = client.create_run(
            parent.info.experiment_id, run_name=TITLES[result.kind].replace(" ", "-"), tags=tags
        )
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        values = {"val_acc": result.val_acc, "final_score": result.val_acc,
                  "test_acc": result.test_acc, "members": len(result.members),
                  "inference_cost": result.inference_cost}  # fmt: skip
        client.log_batch(
            run_id,
            params=[Param(k, str(v)) for k, v in params.items()],
            metrics=[Metric(k, float(v), now, 0) for k, v in values.items()],
        )
        client.log_dict(run_id, soup_record, RECORD)
        if result.kind != "ensemble":
            _log_weights(client, run_id, network, lead)
        _log_model(plan.uri, run_id, model)
        client.set_terminated(run_id, "FINISHED")
    except BaseException as err:
        if run_id is not None:  # Ctrl-C or a store that failed: the run must not say RUNNING
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, "KILLED")
        if isinstance(err, MlflowException | OSError):
            raise Unwritten(
                f"the {result.title} was made (val acc {result.val_acc:.4f}, test acc "
                f"{result.test_acc:.4f}), but MLflow at {redact_uri(plan.uri)} failed to record "
                f"it: {_first_line(err)}"
            ) from err
        raise
    return run_id


def _log_weights(client: MlflowClient, run_id: str, network: Any, lead: Loaded) -> None:
    """checkpoint.pt as a trial's run keeps it (trainables/start.write_converged): the soup's weights
    with the config of its first member, so `--from RUN_ID` continues it (same model, same data)."""
    import torch

    from flatbasin.trainables.checkpoint import FORMAT

    state = {
        "format": FORMAT, "config": lead.config.model_dump(mode="json"),
        "model": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "epoch": lead.epoch, "step": lead.step,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="flatbasin-soup-") as folder:
        path = Path(folder) / CHECKPOINT_ARTIFACT
        torch.save(state, path)
        client.log_artifact(run_id, str(path))


def _log_model(uri: str, run_id: str, model: Any) -> None:
    """The deployed model, as the search logs each variant's best trial's (pickle format)."""
    import mlflow
    import mlflow.pytorch
    import torch

    import flatbasin

    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    mlflow.set_tracking_uri(uri)
    on_cpu = copy.deepcopy(model).cpu().eval()
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            on_cpu, name="model", serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"flatbasin=={flatbasin.__version__}"],
        )  # fmt: skip


# ----------------------------------------------------------------------------- the table


def references(plan: Plan, loaded: list[Loaded]) -> list[Reference]:
    """The best single trial of the search and the confirmed winner, as the summary names them."""
    networks: dict[str, int] = {}
    for item in loaded:
        networks.setdefault(item.candidate.variant, item.networks)
    runs = _children(plan.client, plan.parent)
    trials = [r for r in runs if r.data.tags.get(ROLE) == "trial" and _finished(r)]
    rows = []
    if trials:
        best = min(trials, key=lambda r: (-r.data.metrics.get("final_score", 0.0),
                                          r.data.metrics.get("val_loss", math.inf), _trial_id(r)))  # fmt: skip
        variant = best.data.tags.get(VARIANT, "?")
        best_test = best.data.metrics.get("test_acc")
        rows.append(Reference(
            f"best single trial ({variant} {_trial_id(best)})",
            f"{best.data.metrics.get('final_score', math.nan):.4f}",
            "–" if best_test is None else f"{best_test:.4f}", "1 trial", networks.get(variant),
            best.info.run_id,
        ))  # fmt: skip
    if plan.winner:
        mine = [r for r in runs if r.data.tags.get(ROLE) == "confirm"
                and r.data.tags.get(VARIANT) == plan.winner and r.data.tags.get(FINAL) == "true"]  # fmt: skip
        val = [r.data.metrics.get("final_score", 0.0) for r in mine]
        test = [r.data.metrics.get("test_acc", 0.0) for r in mine]
        if val:
            rows.append(Reference(
                f"confirmed {'winner' if plan.winner == plan.parent.data.tags.get(WINNER) else 'choice, a tie'}"
                f" ({plan.winner}, {len(val)} seeds)", _mean_std(val),
                _mean_std(test), "1 configuration, retrained", networks.get(plan.winner),
            ))  # fmt: skip
    return rows


def _mean_std(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def members_text(result: SoupResult) -> str:
    if result.kind == "ensemble":
        weights = ", ".join(f"{m.weight:g}" for m in result.members)
        return f"{len(result.members)} of {result.candidates} (weights {weights})"
    return f"{len(result.members)} of {result.candidates}"


def print_table(report: SoupReport, console: Console) -> None:
    # As the search's own tables: 79 columns at most, numbers never wrapped; the run ids follow
    # the table, one a line, whole (a folded id cannot be copied).
    table = Table(
        title=f"search '{report.search}': one model from the whole search",
        box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
    )  # fmt: skip
    table.add_column("model")
    for column in ("val acc", "test acc"):
        table.add_column(column, no_wrap=True, justify="right")
    table.add_column("members")
    table.add_column("networks", justify="right")  # per prediction: its inference cost
    runs: list[tuple[str, str]] = []
    for ref in report.references:
        cost = "?" if ref.inference_cost is None else str(ref.inference_cost)
        table.add_row(ref.label, ref.val, ref.test, ref.members, cost)
        runs.append((ref.label, ref.run_id or "-"))
    for r in report.results:
        table.add_row(r.title, f"{r.val_acc:.4f}", f"{r.test_acc:.4f}", members_text(r),
                      str(r.inference_cost))  # fmt: skip
        runs.append((r.title, r.run_id or "-"))
    console.print(table, width=min(console.width, 80) - 1)
    for label, run_id in runs:
        console.print(Text(f"  {label}: ") + Text(run_id), soft_wrap=True)
    console.print(
        "networks: per prediction. Every row was chosen on the validation split, so its val acc flatters it; the test split "
        "was scored once per row, after every choice."
    )
    for note in report.notes:
        console.print(f"note: {note}", style="yellow")


def make(
    search: str, uri: str, only: WHAT = "all", device: str = "auto", console: Console | None = None
) -> SoupReport:
    """`flatbasin soup`: plan (every check), then build and record."""
    return build(plan(search, uri, only), device, console)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


# ----------------------------------------------------------------------------- reproduce


def reproduce_result(client: MlflowClient, run: Run, uri: str, console: Console) -> bool:
    """`flatbasin reproduce` of a soup or ensemble run: rebuild it from its recorded members, with
    their recorded weights, and compare. Each member's final weights come from Tune's storage when
    they are still there and are the ones recorded (sha256); otherwise the member is retrained from
    its run, as `flatbasin reproduce` retrains a trial. Logged as a reproduction run."""
    import os

    import torch

    from flatbasin.trainables import soups
    from flatbasin.trainables.data import load_data
    from flatbasin.trainables.tta import with_tta

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory(prefix="flatbasin-soup-") as folder:
        try:
            path = client.download_artifacts(run_id, RECORD, folder)
        except MlflowException as err:
            raise UsageError(f"run {run_id} has no {RECORD}: {_first_line(err)}") from err
        record = json.loads(Path(path).read_text())
    kind = record["kind"]
    console.print(
        f"rebuilding the {TITLES[kind]} of run {run_id} from its {len(record['members'])} "
        "recorded member(s)"
    )
    work = tempfile.TemporaryDirectory(prefix="flatbasin-members-")
    loaded = []
    for member in record["members"]:
        loaded.append(_member(client, member, Path(work.name), kind != "ensemble", console))
    data = load_data(loaded[0].config.data_spec, "cpu")
    tta = record.get("tta", "none")
    torch.set_num_threads(int(record.get("threads", torch.get_num_threads())))  # as it was made
    with torch.no_grad():
        model: torch.nn.Module
        if kind == "ensemble":
            model = soups.WeightedEnsemble(
                [item.deployed for item in loaded], [m["weight"] for m in record["members"]]
            ).eval()
            sha = None
        else:
            networks = [item.network for item in loaded]
            network = (
                networks[0]
                if len(networks) == 1
                else soups.average(networks, lambda: data.inputs("train"))
            )
            model = with_tta(network, tta).eval()
            from flatbasin.trainables.start import weights_sha256

            sha = weights_sha256(network.state_dict())
        val_acc, test_acc = _accuracy(model, data, "val"), _accuracy(model, data, "test")
    work.cleanup()
    rows: list[tuple[str, Any, Any]] = [
        ("val_acc", record["val_acc"], val_acc),
        ("test_acc", record["test_acc"], test_acc),
    ]
    if kind != "ensemble":
        rows.append(("weights sha256", record["soup_sha256"], sha))
    exact = all(a == b for _, a, b in rows)
    table = Table(title=f"run {run_id}: recorded vs rebuilt")
    for column in ("metric", "recorded", "rebuilt", ""):
        table.add_column(column)
    for name, a, b in rows:
        shown = [f"{v:.6f}" if isinstance(v, float) else str(v) for v in (a, b)]
        table.add_row(name, *shown, "=" if a == b else "differs")
    console.print(table)
    new = client.create_run(
        run.info.experiment_id, run_name=f"reproduce-{run.info.run_name}",
        tags={ROLE: "reproduction", "flatbasin.reproduces": run_id, KIND: kind,
              "flatbasin.exact_match": str(exact).lower(), **base_tags(),
              **({MLFLOW_PARENT_RUN_ID: p} if (p := run.data.tags.get(MLFLOW_PARENT_RUN_ID)) else {})},
    )  # fmt: skip
    try:
        client.log_batch(new.info.run_id, metrics=[
            Metric("val_acc", val_acc, 0, 0), Metric("test_acc", test_acc, 0, 0)])  # fmt: skip
        if kind != "ensemble":
            _log_weights(
                client, new.info.run_id, model.module if hasattr(model, "tta") else model, loaded[0]
            )
        client.set_terminated(new.info.run_id)
    except BaseException:
        with contextlib.suppress(Exception):
            client.set_terminated(new.info.run_id, "KILLED")
        raise
    console.print(
        ("exact match" if exact else "numbers differ") + f"; logged as run {new.info.run_id}",
        style="green" if exact else "red",
    )
    return exact


def _member(
    client: MlflowClient, member: dict[str, Any], folder: Path, soups: bool, console: Console
) -> Loaded:
    """A recorded member: from Tune's storage when its weights there are the recorded ones, else
    retrained from its run."""
    from flatbasin.search.run_record import converged_weights, fetch_record, load_passed
    from flatbasin.trainables.config import TrialConfig
    from flatbasin.trainables.loop import train

    candidate = Candidate(
        run_id=member["run_id"], trial_id=member["trial_id"], role=member["role"],
        variant=member["variant"], score=member["val_acc"], val_loss=math.inf, start_sha=None,
        data=(), checkpoint=Path(member["checkpoint"]), epochs_run=None,
    )  # fmt: skip
    from flatbasin.trainables.data import load_data

    if candidate.checkpoint.is_file():
        config = _config(client, candidate, "cpu")
        item = load(client, candidate, load_data(config.data_spec, "cpu"), "cpu", soups)
        if item.sha256 == member["sha256"]:
            console.print(f"member {candidate.trial_id}: its final weights in Tune's storage")
            return item
        console.print(
            f"member {candidate.trial_id}: the checkpoint in Tune's storage holds other weights "
            "than the recorded ones; retraining it", style="yellow",
        )  # fmt: skip
    else:
        console.print(
            f"member {candidate.trial_id}: no checkpoint in Tune's storage "
            f"({candidate.checkpoint}); retraining it from its run"
        )
    trial = fetch_record(client, candidate.run_id)
    config = TrialConfig.model_validate(
        {**trial["config"], "threads": trial["threads"], "device": "cpu"}
    )
    load_passed(client, candidate.run_id, config)
    path = folder / f"{candidate.trial_id}-{candidate.role}.pt"

    def keep_last(metrics: Any, save: Any) -> None:
        save(path)  # every epoch: the last one written is the trial's end

    train(config, on_epoch=keep_last, start_weights=converged_weights(client, config))
    retrained = Candidate(**{**asdict(candidate), "checkpoint": path})
    return load(client, retrained, load_data(config.data_spec, "cpu"), "cpu", soups)


# ----------------------------------------------------------------------------- the report


def recorded(client: MlflowClient, parent: Run) -> list[dict[str, Any]]:
    """The soups and ensemble recorded under a search's run, the newest of each kind (a second
    `flatbasin soup` makes new runs; the report shows the latest), in the order of TITLES."""
    newest: dict[str, Run] = {}
    run: Run | None
    for run in _children(client, parent):
        kind = run.data.tags.get(KIND)
        if run.data.tags.get(ROLE) not in (SOUP_ROLE, ENSEMBLE_ROLE) or kind not in TITLES:
            continue
        if run.info.status != "FINISHED":
            continue
        if kind not in newest or run.info.start_time > newest[kind].info.start_time:
            newest[kind] = run
    return [
        {
            "title": TITLES[kind], "run_id": run.info.run_id,
            "val_acc": run.data.metrics.get("val_acc"), "test_acc": run.data.metrics.get("test_acc"),
            "members": int(run.data.metrics.get("members", 0)),
            "candidates": run.data.params.get("candidates", "?"),
            "weights": run.data.params.get("weights", ""),
            "inference_cost": int(run.data.metrics.get("inference_cost", 0)),
        }
        for kind in TITLES
        if (run := newest.get(kind)) is not None
    ]  # fmt: skip


def html_section(
    rows: list[dict[str, Any]], best: Any, winner: Any, label: str = "confirmed winner"
) -> str:
    """The report's section: the soups and ensemble beside the best single trial and the confirmed
    winner, or the choice among those that tie (report.Trial and report.Confirmed, or None; `label`
    names it). Every string is escaped here."""
    from html import escape as esc

    def pct(value: float | None) -> str:
        return "–" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"

    if not rows:
        return ""
    body = []
    if best is not None:
        body.append([esc(f"best single trial ({best.variant} {best.trial_id})"), pct(best.score),
                     pct(best.test_acc), "1 trial", "–", f"<code>{esc(best.run_id)}</code>"])  # fmt: skip
    if winner is not None:
        test = "–" if winner.test_mean is None else (
            f"{100 * winner.test_mean:.2f} ± {100 * (winner.test_std or 0.0):.2f}"
        )  # fmt: skip
        body.append([esc(f"{label} ({winner.variant}, {winner.seeds} seeds)"),
                     esc(f"{100 * winner.val_mean:.2f} ± {100 * winner.val_std:.2f}"), esc(test),
                     "1 configuration, retrained", "–", "–"])  # fmt: skip
    for row in rows:
        members = f"{row['members']} of {row['candidates']}"
        if row["title"] == TITLES["ensemble"]:
            members += f" ({row['weights']})"
        body.append([esc(row["title"]), pct(row["val_acc"]), pct(row["test_acc"]), esc(members),
                     str(row["inference_cost"]), f"<code>{esc(row['run_id'])}</code>"])  # fmt: skip
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "model",
            "val acc",
            "test acc",
            "members",
            "networks per prediction",
            "MLflow run",
        )
    )
    cells = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
    return (
        "<h2>One model from the whole search</h2>"
        '<p class="muted">Weight soups (the equal average of trials\' weights, batch norm '
        "re-estimated; greedy: trials by validation accuracy, each kept if the soup's validation "
        "accuracy does not drop) run one network per prediction; the greedy ensemble (selection "
        "with replacement, weights = counts) runs each member's networks. Every row was chosen on "
        "the validation split, which flatters its val acc; test was scored once, at the end.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>"
    )
