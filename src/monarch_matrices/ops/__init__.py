"""Pure tensor functions on Monarch factors: multiply, dense form, projection.

Nothing here depends on ``torch.nn`` modules or on the higher layers of the package.
"""

from .blockdiag import (
    BlockdiagProjection,
    blockdiag_multiply,
    blockdiag_to_dense,
    project_blockdiag,
)
from .calibrate import (
    CalibratedProjection,
    calibration_error,
    check_gram,
    project_calibrated,
)
from .factor import factor_mm_star
from .lowrank import LowRankFit, fit_lowrank
from .multiply import monarch_multiply, monarch_to_dense
from .product import (
    ProductFactors,
    adjoint_factors,
    check_product,
    mm_star_factors,
    product_multiply,
    product_to_dense,
    product_to_dense_reference,
)
from .project import Projection, project, project_factors
from .reference import monarch_multiply_bmm, monarch_multiply_reference
from .shapes import MonarchShape, check_factors, monarch_shape, slice_channel_counts

__all__ = [
    "BlockdiagProjection",
    "CalibratedProjection",
    "LowRankFit",
    "MonarchShape",
    "ProductFactors",
    "Projection",
    "adjoint_factors",
    "blockdiag_multiply",
    "blockdiag_to_dense",
    "calibration_error",
    "check_factors",
    "check_gram",
    "check_product",
    "factor_mm_star",
    "fit_lowrank",
    "mm_star_factors",
    "monarch_multiply",
    "monarch_multiply_bmm",
    "monarch_multiply_reference",
    "monarch_shape",
    "monarch_to_dense",
    "product_multiply",
    "product_to_dense",
    "product_to_dense_reference",
    "project",
    "project_blockdiag",
    "project_calibrated",
    "project_factors",
    "slice_channel_counts",
]
