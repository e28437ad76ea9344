"""``torch.nn`` layers built on the Monarch ops."""

from .blockdiag import BlockdiagLinear
from .linear import MonarchLinear
from .lowrank import MonarchLowRankLinear
from .product import MonarchProduct

__all__ = ["BlockdiagLinear", "MonarchLinear", "MonarchLowRankLinear", "MonarchProduct"]
