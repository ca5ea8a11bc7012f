"""What a variant keeps while it trains and which model it deploys, built on torch.optim.swa_utils.

An averager is told about every completed optimizer step (`update(model, step)`, step counted from 1)
and says whether a new member joined. Members join at steps the variant chose (cycle ends); EMA
updates every step. `probes` are the modules whose predictions make the newest curve entry.

Averages are kept in fp32 whatever precision the forward pass runs in: they copy the parameters,
which autocast never changes. An update between joins never waits for the GPU (AveragedModel keeps
its `n_averaged` counter on the CPU, so `count` reads it without a device round trip).
"""

from __future__ import annotations

import copy
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

BatchSource = Callable[[], Iterable[Tensor]]
# How curve entries combine the members' predictions:
#   final    - one entry, the deployed model at the end (sgd, ema)
#   prefix   - entry k is the model after k members joined (the running weight average)
#   each     - entry k is member k alone (sgdr's restart boundaries)
#   ensemble - entry k is the softmax average of k members (newest first or oldest first)
CurveKind = Literal["final", "prefix", "each", "ensemble"]


class Averager(ABC):
    curve_kind: ClassVar[CurveKind]
    newest_first: bool = False

    @abstractmethod
    def update(self, model: nn.Module, step: int) -> bool:
        """Called after every optimizer step; True when a member joined at this step."""

    @abstractmethod
    def deployed(self, model: nn.Module) -> nn.Module:
        """The model this variant would ship, given the live model."""

    def probes(self, model: nn.Module) -> dict[str, nn.Module]:
        """Modules to score when a member joins: 'member' feeds the main curve, others extra curves."""
        return {}

    @property
    def count(self) -> int:
        return 0

    def model_copies(self) -> int:
        """Copies of the model (parameters and buffers) it holds at most: for the memory estimate."""
        return 0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless by default
        pass


class Live(Averager):
    """Plain training: deploy the weights as they are."""

    curve_kind = "final"

    def update(self, model: nn.Module, step: int) -> bool:
        return False

    def deployed(self, model: nn.Module) -> nn.Module:
        return model


class EqualAverage(Averager):
    """SWA-style equal average of the weights at chosen steps; BN statistics recomputed after each join.

    BN caveat (swa_utils docs): averaged weights need their own running statistics, hence `update_bn`
    over the training inputs after every join, before the average is scored.
    """

    curve_kind = "prefix"

    def __init__(self, model: nn.Module, join_steps: Iterable[int], bn_batches: BatchSource):
        self.average = AveragedModel(model)
        self.join_steps = frozenset(join_steps)
        self.bn_batches = bn_batches

    def update(self, model: nn.Module, step: int) -> bool:
        if step not in self.join_steps:
            return False
        self.average.update_parameters(model)
        update_bn(self.bn_batches(), self.average)
        return True

    def deployed(self, model: nn.Module) -> nn.Module:
        return self.average if self.count else model

    def probes(self, model: nn.Module) -> dict[str, nn.Module]:
        return {"member": self.average}

    @property
    def count(self) -> int:
        return int(self.average.n_averaged)

    def model_copies(self) -> int:
        return 1

    def mean_parameters(self) -> list[Tensor]:
        """w-bar, aligned with model.parameters() (AveragedModel keeps the copy under .module)."""
        return list(self.average.module.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average.load_state_dict(state["average"])


class EMA(Averager):
    """Exponential moving average of weights and buffers, updated every step."""

    curve_kind = "final"

    def __init__(self, model: nn.Module, decay: float):
        self.ema_step = get_ema_multi_avg_fn(decay)
        self.average = AveragedModel(model, multi_avg_fn=self.ema_step, use_buffers=True)

    def update(self, model: nn.Module, step: int) -> bool:
        if int(self.average.n_averaged) == 0:
            self.average.update_parameters(model)  # the first update copies the weights
            return False
        # update_parameters' own EMA step, less its copy of the CPU counter to the GPU on every
        # call (which the EMA ignores): a blocking copy there would make every step wait.
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        averaged = itertools.chain(self.average.module.parameters(), self.average.module.buffers())
        live = itertools.chain(model.parameters(), model.buffers())
        for mine, theirs in zip(averaged, live, strict=True):
            group = groups.setdefault((mine.device, mine.dtype), ([], []))
            group[0].append(mine.detach())
            group[1].append(theirs.detach())
        for mine_list, theirs_list in groups.values():
            self.ema_step(mine_list, theirs_list, self.average.n_averaged)
        self.average.n_averaged += 1
        return False

    def deployed(self, model: nn.Module) -> nn.Module:
        return self.average

    def model_copies(self) -> int:
        return 1

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average.load_state_dict(state["average"])


class SoftmaxEnsemble(nn.Module):
    """Averages its members' softmax outputs; returns the log of the mean (so softmax gives the mean)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        probs = torch.stack([m(x).softmax(dim=1) for m in self.members]).mean(dim=0)
        return probs.log()


class Snapshots(Averager):
    """Weights saved at chosen steps (snapshot ensembles, FGE, SGDR restart boundaries).

    `ensemble=True` deploys the softmax average of all snapshots; otherwise the newest snapshot.
    `weight_average=True` also keeps the equal weight average of the snapshots, scored as an extra curve.
    """

    def __init__(
        self,
        model: nn.Module,
        join_steps: Iterable[int],
        *,
        ensemble: bool,
        newest_first: bool = False,
        weight_average: bool = False,
        bn_batches: BatchSource | None = None,
    ):
        self.join_steps = frozenset(join_steps)
        self.ensemble = ensemble
        self.newest_first = newest_first
        self.members: list[dict[str, Tensor]] = []
        self._template = copy.deepcopy(model)
        self.average = (
            EqualAverage(model, self.join_steps, bn_batches)
            if weight_average and bn_batches is not None
            else None
        )

    @property
    def curve_kind(self) -> CurveKind:  # type: ignore[override]
        return "ensemble" if self.ensemble else "each"

    def update(self, model: nn.Module, step: int) -> bool:
        if step not in self.join_steps:
            return False
        self.members.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if self.average is not None:
            self.average.update(model, step)
        return True

    def _member(self, state: dict[str, Tensor]) -> nn.Module:
        module = copy.deepcopy(self._template)
        module.load_state_dict(state)
        return module

    def deployed(self, model: nn.Module) -> nn.Module:
        if not self.members:
            return model
        if self.ensemble:
            return SoftmaxEnsemble([self._member(s) for s in self.members])
        return self._member(self.members[-1])

    def probes(self, model: nn.Module) -> dict[str, nn.Module]:
        probes = {"member": model}  # called right after a join: the live weights are the new member
        if self.average is not None:
            probes["weight_avg"] = self.average.average
        return probes

    @property
    def count(self) -> int:
        return len(self.members)

    def model_copies(self) -> int:
        """The template, every member, and the weight average when it keeps one."""
        return 1 + len(self.join_steps) + (self.average is not None)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"members": self.members}
        if self.average is not None:
            state["average"] = self.average.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.members = list(state["members"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])
