"""The registry: every variant flatbasin can train. Adding one is a file here and a line below."""

from trainables.variants.base import BudgetError, Variant, VariantParams
from trainables.variants.cyclic_average import CyclicAverage
from trainables.variants.ema import EMAVariant
from trainables.variants.fge import FGE
from trainables.variants.sgd import SGD
from trainables.variants.sgdr import SGDR
from trainables.variants.snapshot import Snapshot
from trainables.variants.swa import SWA

REGISTRY: dict[str, type[Variant]] = {
    v.name: v for v in (SGD, SWA, CyclicAverage, Snapshot, SGDR, FGE, EMAVariant)
}

__all__ = ["REGISTRY", "BudgetError", "Variant", "VariantParams"]
