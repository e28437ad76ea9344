"""``BlockdiagLinear``: one block-diagonal factor, the paper's sparse baseline."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import blockdiag_multiply, blockdiag_to_dense, monarch_shape, project_blockdiag
from ._common import StructuredLinear, check_bias, check_linear

__all__ = ["BlockdiagLinear"]


class BlockdiagLinear(StructuredLinear):
    """Applies ``y = x Bᵀ + b`` with ``B`` block-diagonal (``nblocks`` blocks).

    A drop-in for :class:`torch.nn.Linear` with ``1/nblocks`` of its weight;
    unlike Monarch, input block ``i`` only ever reaches output block ``i``.
    Sizes not divisible by ``nblocks`` are zero-padded as in :class:`MonarchLinear`.

    Args:
        in_features, out_features, bias: as in ``nn.Linear``.
        nblocks: number of diagonal blocks, ``1 <= nblocks <= min(in, out)``.

    Shape:
        - Input: ``(*, in_features)``. Output: ``(*, out_features)``.

    Attributes:
        blocks: ``(nblocks, ceil(out/nblocks), ceil(in/nblocks))``, initialized
            ``U(-1/√ib, 1/√ib)`` with ``ib = ceil(in/nblocks)``, the fan-in of one
            block, so outputs have ``nn.Linear``'s variance.
        bias: ``(out_features,)``, ``U(-1/√in, 1/√in)`` as in ``nn.Linear``.

    Examples::

        >>> layer = BlockdiagLinear(768, 3072, nblocks=4)
        >>> layer(torch.randn(2, 768)).shape, layer.param_ratio
        (torch.Size([2, 3072]), 0.25)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        nblocks: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        shape = monarch_shape(in_features, out_features, nblocks)
        self.in_features = in_features
        self.out_features = out_features
        self.nblocks = nblocks
        self.padded_in = shape.padded_in
        self.padded_out = shape.padded_out
        self.blocks = nn.Parameter(
            torch.empty(nblocks, shape.out_block, shape.in_block, **factory_kwargs)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.blocks.shape[-1])
        nn.init.uniform_(self.blocks, -bound, bound)
        self._reset_bias()

    def _structured_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = blockdiag_multiply(x, self.blocks)
        return y if bias is None else y + bias

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` block-diagonal weight (differentiable)."""
        return blockdiag_to_dense(self.blocks)[: self.out_features, : self.in_features]

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, nblocks: int = 4
    ) -> BlockdiagLinear:
        """Keep the diagonal blocks of ``weight`` (the Frobenius-optimal choice)."""
        result = project_blockdiag(weight, nblocks=nblocks)
        out_f, in_f = weight.shape
        check_bias(bias, out_f)
        layer = cls(
            in_f, out_f, bias=bias is not None, nblocks=nblocks,
            device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.blocks.copy_(result.w)
            if bias is not None:
                layer.bias.copy_(bias)
        layer.projection_error = float(result.relative_error)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, nblocks: int = 4) -> BlockdiagLinear:
        """Block-diagonal part of an ``nn.Linear`` (see :meth:`from_dense`)."""
        check_linear(linear)
        with torch.no_grad():
            return cls.from_dense(linear.weight, linear.bias, nblocks=nblocks)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nblocks={self.nblocks}, bias={self.bias is not None}"
        )
