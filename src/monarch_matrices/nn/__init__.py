"""``torch.nn`` layers built on the Monarch ops."""

from .blockdiag import BlockdiagLinear
from .linear import MonarchLinear

__all__ = ["BlockdiagLinear", "MonarchLinear"]
