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

__all__ = ["REGISTRY", "BudgetError", "Variant", "VariantParams"]
