"""Monarch matrices for PyTorch: fast structured layers with a closed-form projection.

The public API, importable from the top level::

    from monarch_matrices import MonarchLinear, monarch_multiply, project

Submodules are layered (``ops`` ← ``nn`` ← higher layers) and loaded lazily,
so ``import monarch_matrices.ops`` pulls in nothing above it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BlockdiagLinear",
    "MonarchLinear",
    "MonarchLowRankLinear",
    "MonarchProduct",
    "MonarchReport",
    "MonarchShape",
    "MonarchifyConfig",
    "ProductFactors",
    "Projection",
    "__version__",
    "blockdiag_multiply",
    "blockdiag_to_dense",
    "densify",
    "factor_mm_star",
    "fit_lowrank",
    "load_monarch",
    "mm_star_factors",
    "monarch_multiply",
    "monarch_multiply_reference",
    "monarch_shape",
    "monarch_to_dense",
    "monarchify",
    "product_multiply",
    "product_to_dense",
    "project",
    "project_blockdiag",
    "project_factors",
    "save_monarch",
]
# the rest of __all__ is in ops
_NN = {"BlockdiagLinear", "MonarchLinear", "MonarchLowRankLinear", "MonarchProduct"}
_CONVERT = {
    "MonarchReport", "MonarchifyConfig", "densify", "load_monarch", "monarchify", "save_monarch"
}
_SUBMODULES = {"transforms"}  # loaded on first attribute access, like the names above

if TYPE_CHECKING:
    from . import transforms as transforms
    from .convert import (
        MonarchifyConfig,
        MonarchReport,
        densify,
        load_monarch,
        monarchify,
        save_monarch,
    )
    from .nn import BlockdiagLinear, MonarchLinear, MonarchLowRankLinear, MonarchProduct
    from .ops import (
        MonarchShape,
        ProductFactors,
        Projection,
        blockdiag_multiply,
        blockdiag_to_dense,
        factor_mm_star,
        fit_lowrank,
        mm_star_factors,
        monarch_multiply,
        monarch_multiply_reference,
        monarch_shape,
        monarch_to_dense,
        product_multiply,
        product_to_dense,
        project,
        project_blockdiag,
        project_factors,
    )


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in __all__:
        module = "nn" if name in _NN else "convert" if name in _CONVERT else "ops"
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
