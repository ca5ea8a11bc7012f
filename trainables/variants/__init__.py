"""The registry: every variant flatbasin can train. Adding one is a file here and a line below."""

from flatbasin.trainables.variants.base import BudgetError, Variant, VariantParams
from flatbasin.trainables.variants.cyclic_average import CyclicAverage
from flatbasin.trainables.variants.ema import EMAVariant
from flatbasin.trainables.variants.fge import FGE
from flatbasin.trainables.variants.prior_guided import PriorGuided
from flatbasin.trainables.variants.sgd import SGD
from flatbasin.trainables.variants.sgdr import SGDR
from flatbasin.trainables.variants.snapshot import Snapshot
from flatbasin.trainables.variants.swa import SWA

REGISTRY: dict[str, type[Variant]] = {
    v.name: v for v in (SGD, SWA, CyclicAverage, Snapshot, SGDR, FGE, EMAVariant, PriorGuided)
}


def phase_flags(variant: str, phase: str | None) -> dict[str, float]:
    """An epoch's phase as the metrics its variant records: {"focus": 1.0} for a focus epoch of
    prior_guided, {"focus": 0.0} for its data epochs, nothing for variants that have no epochs
    without data (a run has no metric it cannot have)."""
    if phase is None or variant not in REGISTRY:
        return {}
    return {name: float(phase == name) for name in REGISTRY[variant].phases}


__all__ = ["REGISTRY", "BudgetError", "Variant", "VariantParams", "phase_flags"]
