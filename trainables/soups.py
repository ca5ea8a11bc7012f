"""One model from many trials: weight soups (Wortsman et al. 2022) and greedy ensembles (Caruana et
al. 2004), in plain PyTorch. Averages go through torch.optim.swa_utils (AveragedModel, then
update_bn: an average of weights needs batch-norm statistics of its own, as SWA's does).

Every choice here is made on validation data handed in by the caller; nothing here sees a test split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, update_bn

from flatbasin.trainables.averagers import SoftmaxEnsemble
from flatbasin.trainables.tta import TestTimeAugmented

BatchSource = Callable[[], Iterable[Tensor]]  # the training inputs, for a batch-norm pass
Score = Callable[[nn.Module], float]  # validation accuracy of a network


def networks_of(deployed: nn.Module) -> list[nn.Module]:
    """The networks a deployed model runs per prediction: one for a plain network or a weight
    average, each member for a softmax ensemble (snapshot, fge, sgdr's ensemble)."""
    if isinstance(deployed, TestTimeAugmented):
        return networks_of(deployed.module)
    if isinstance(deployed, AveragedModel):
        return [deployed.module]
    if isinstance(deployed, SoftmaxEnsemble | WeightedEnsemble):
        return [net for member in deployed.members for net in networks_of(member)]
    return [deployed]


def plain(deployed: nn.Module) -> nn.Module:
    """The deployed model without swa_utils' wrapper (AveragedModel's forward is its module's)."""
    if isinstance(deployed, TestTimeAugmented):
        return TestTimeAugmented(plain(deployed.module), deployed.tta)
    if isinstance(deployed, AveragedModel):
        return deployed.module
    return deployed


def average(networks: Sequence[nn.Module], bn_batches: BatchSource) -> nn.Module:
    """The equal average of the networks' parameters, its batch-norm statistics re-estimated on the
    training inputs (update_bn: one pass, a cumulative average over the batches). The networks are
    left as they were."""
    if not networks:
        raise ValueError("an average of no networks")
    soup = AveragedModel(
        networks[0]
    )  # a copy; its buffers are recomputed below where they are BN's
    for network in networks:
        soup.update_parameters(network)
    update_bn(bn_batches(), soup)
    return soup.module.eval()


def single_network(deployed: nn.Module, bn_batches: BatchSource) -> nn.Module:
    """A trial as one network, a soup's ingredient: the model it deploys when that is one network;
    for a trial that deploys an ensemble of its own snapshots, their weight average."""
    networks = networks_of(deployed)
    return networks[0] if len(networks) == 1 else average(networks, bn_batches)


@dataclass(frozen=True)
class Step:
    """One candidate of a greedy soup: the soup with `added`, its validation accuracy, and whether
    it was kept (it did not lower the soup's validation accuracy)."""

    added: str
    val_acc: float
    kept: bool


@dataclass
class Soup:
    members: list[str]  # in the order they joined; each weighs the same
    network: nn.Module
    val_acc: float
    steps: list[Step] = field(default_factory=list)  # greedy: every candidate after the first


def ranked(scores: Mapping[str, float]) -> list[str]:
    """Keys best first: validation accuracy down, then the key, so that the order is the same on
    every machine."""
    return sorted(scores, key=lambda key: (-scores[key], key))


def uniform_soup(
    ingredients: Mapping[str, nn.Module], score: Score, bn_batches: BatchSource
) -> Soup:
    """Every ingredient's weights averaged with equal weight (a single ingredient is itself)."""
    keys = sorted(ingredients)
    networks = [ingredients[k] for k in keys]
    network = networks[0] if len(networks) == 1 else average(networks, bn_batches)
    return Soup(keys, network, score(network))


def greedy_soup(
    ingredients: Mapping[str, nn.Module],
    scores: Mapping[str, float],
    score: Score,
    bn_batches: BatchSource,
) -> Soup:
    """Wortsman et al.'s greedy soup: ingredients sorted by validation accuracy (`scores`); the best
    is the soup; each next one joins when the equal average with it, batch norm re-estimated, scores
    at least as well on validation as the soup without it. So it never scores below its first."""
    order = ranked(scores)
    first = order[0]
    soup = Soup([first], ingredients[first], scores[first])
    for key in order[1:]:
        candidate = average([ingredients[k] for k in [*soup.members, key]], bn_batches)
        val_acc = score(candidate)
        kept = val_acc >= soup.val_acc
        soup.steps.append(Step(key, val_acc, kept))
        if kept:
            soup.members.append(key)
            soup.network, soup.val_acc = candidate, val_acc
    return soup


def accuracy_and_nll(probs: Tensor, labels: Tensor) -> tuple[float, float]:
    labels = labels.to(probs.device)
    acc = (probs.argmax(dim=1) == labels).float().mean().item()
    nll = -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean().item()
    return acc, nll


@dataclass
class Selection:
    counts: dict[str, int]  # how often each member was chosen: its weight
    val_acc: float
    val_nll: float
    rounds: list[tuple[str, float]] = field(default_factory=list)  # each round's pick, val acc


def greedy_ensemble(val_probs: Mapping[str, Tensor], labels: Tensor, rounds: int = 25) -> Selection:
    """Caruana et al.'s ensemble selection: start empty; each round add, with replacement, the model
    whose probabilities make the ensemble's validation accuracy highest (its validation NLL breaks
    ties: accuracy on a few hundred examples ties often); keep the best of the rounds' ensembles
    (the earliest, so the smallest, among equals). Weights are the counts."""
    if not val_probs:
        raise ValueError("an ensemble of no models")
    keys = sorted(val_probs)
    total = torch.zeros_like(val_probs[keys[0]], dtype=torch.float64)
    picks: list[str] = []
    best: tuple[tuple[float, float], int] | None = None
    history: list[tuple[str, float]] = []
    for n in range(1, rounds + 1):
        choice, choice_key = None, None
        for key in keys:
            acc, nll = accuracy_and_nll((total + val_probs[key]) / n, labels)
            if choice_key is None or (acc, -nll) > choice_key:
                choice, choice_key = key, (acc, -nll)
        assert choice is not None and choice_key is not None
        total += val_probs[choice]
        picks.append(choice)
        history.append((choice, choice_key[0]))
        if best is None or choice_key > best[0]:
            best = (choice_key, n)
    assert best is not None
    (acc, neg_nll), n = best
    counts: dict[str, int] = {}
    for key in picks[:n]:
        counts[key] = counts.get(key, 0) + 1
    return Selection(counts, acc, -neg_nll, history)


class WeightedEnsemble(nn.Module):
    """A deployed ensemble of deployed models: the weighted mean of the members' probabilities
    (each member's output through a softmax: a network's logits, or an ensemble's or TTA model's
    log-probabilities). Returns the log of that mean, as SoftmaxEnsemble does, so a softmax of its
    output gives the mean back."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float]):
        super().__init__()
        if len(members) != len(weights) or not members:
            raise ValueError("one weight per member, and at least one member")
        if any(not math.isfinite(w) or w <= 0 for w in weights):
            raise ValueError(f"member weights must be positive numbers (got {list(weights)})")
        self.members = nn.ModuleList(members)
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights]))

    def forward(self, x: Tensor) -> Tensor:
        weights = self.get_buffer("weights")
        probs = torch.stack([m(x).float().softmax(dim=1) for m in self.members])
        return torch.einsum("m,mnc->nc", weights, probs).clamp_min(1e-12).log()
