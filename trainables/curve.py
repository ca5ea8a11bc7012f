"""The accuracy-versus-number-averaged curve, built as members join.

Each join scores the averager's probes on the validation and test splits once. Ensembles keep each
member's softmax outputs so that any prefix (newest or oldest first) is a cheap mean; weight averages
keep only accuracies, since their newest probe already is the prefix model. From the kept outputs
comes the members' diversity too: members that err together add nothing to an ensemble (seed 003).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flatbasin.trainables.averagers import CurveKind


@dataclass(frozen=True)
class CurvePoint:
    count: int  # models averaged or ensembled
    val_acc: float
    test_acc: float


@dataclass(frozen=True)
class DiversityPoint:
    count: int  # the first `count` members, in the curve's order
    disagreement: float  # share of test examples two members label differently, mean over pairs
    error_corr: float | None  # Pearson correlation of two members' 0/1 errors, mean over pairs;
    # None when no pair has it (a member right or wrong on every example has no error variance)


def accuracy(probs: Tensor, labels: Tensor) -> float:
    return (probs.argmax(dim=1) == labels).float().mean().item()


def diversity(member_probs: list[Tensor], labels: Tensor) -> list[DiversityPoint]:
    """Disagreement and error correlation of the first k members, for k = 2..M.

    Both are means over the pairs among the first k members, so every prefix comes from one M x M
    matrix per measure. A pair whose correlation is undefined (a member with no error variance) is
    left out of the mean rather than counted as 0 or 1.
    """
    if len(member_probs) < 2:
        return []
    preds = torch.stack(member_probs).argmax(dim=2)  # (M, N)
    disagree = (preds[:, None, :] != preds[None, :, :]).double().mean(dim=2)  # (M, M)
    corr = torch.corrcoef((preds != labels).double())  # (M, M); NaN where a row is constant
    points = []
    for k in range(2, len(member_probs) + 1):
        i, j = torch.triu_indices(k, k, offset=1)
        pair_corr = corr[i, j]
        known = pair_corr[~pair_corr.isnan()]
        points.append(
            DiversityPoint(
                k,
                disagree[i, j].mean().item(),
                known.mean().item() if len(known) else None,
            )
        )
    return points


class Curve:
    def __init__(self, kind: CurveKind, newest_first: bool, y_val: Tensor, y_test: Tensor):
        self.kind, self.newest_first = kind, newest_first
        self.y_val, self.y_test = y_val, y_test
        self.member_probs: list[
            tuple[Tensor, Tensor]
        ] = []  # ensembles: (val, test) softmax outputs
        self.accuracies: dict[str, list[tuple[float, float]]] = {}  # probe -> (val, test) per join

    def add(self, probe: str, val_probs: Tensor, test_probs: Tensor) -> None:
        if probe == "member" and self.kind == "ensemble":
            self.member_probs.append((val_probs, test_probs))
        else:
            point = (accuracy(val_probs, self.y_val), accuracy(test_probs, self.y_test))
            self.accuracies.setdefault(probe, []).append(point)

    def score(self) -> float | None:
        """Validation accuracy of what is deployed now, or None when no member has joined yet."""
        if self.kind == "ensemble":
            if not self.member_probs:
                return None
            return accuracy(torch.stack([v for v, _ in self.member_probs]).mean(0), self.y_val)
        members = self.accuracies.get("member")
        return members[-1][0] if members else None

    def points(self) -> list[CurvePoint]:
        if self.kind == "ensemble":
            probs = self.member_probs[::-1] if self.newest_first else self.member_probs
            out = []
            for k in range(1, len(probs) + 1):
                val = torch.stack([v for v, _ in probs[:k]]).mean(0)
                test = torch.stack([t for _, t in probs[:k]]).mean(0)
                out.append(CurvePoint(k, accuracy(val, self.y_val), accuracy(test, self.y_test)))
            return out
        return self._points("member")

    def diversity(self) -> list[DiversityPoint]:
        """Of the ensemble's members on the test split, in the order the curve adds them."""
        if self.kind != "ensemble":
            return []
        probs = self.member_probs[::-1] if self.newest_first else self.member_probs
        return diversity([t for _, t in probs], self.y_test)

    def extra(self) -> dict[str, list[CurvePoint]]:
        return {name: self._points(name) for name in self.accuracies if name != "member"}

    def _points(self, probe: str) -> list[CurvePoint]:
        return [
            CurvePoint(k, v, t) for k, (v, t) in enumerate(self.accuracies.get(probe, []), start=1)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"member_probs": self.member_probs, "accuracies": self.accuracies}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.member_probs = [tuple(p) for p in state["member_probs"]]
        self.accuracies = {k: [tuple(p) for p in v] for k, v in state["accuracies"].items()}
