"""``MonarchProduct``: a trainable product of Monarch matrices (Monarch-p, MM*)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..ops import monarch_shape
from ..ops.product import (
    Factor,
    ProductFactors,
    check_product,
    product_multiply,
    product_to_dense,
)

__all__ = ["MonarchProduct"]


class MonarchProduct(nn.Module):
    r"""Applies ``y = x Mᵀ`` with ``M = S_out · M_{p-1} ⋯ M_1 · M_0 · S_in``, a product of Monarchs.

    Each ``M_i`` is a Monarch factor with parameters ``w1[i]``, ``w2[i]`` (DESIGN
    §2 convention); ``factors[0]`` is applied first, as in ``nn.Sequential``.
    ``S_in`` / ``S_out`` are fixed gathers (buffers ``in_index`` / ``out_index``,
    ``None`` when absent) used for zero-padding, cropping, and the input
    permutation of the DFT.  Real or complex; a real input is promoted to a
    complex module's dtype.  Exact transforms (DFT, DCT, Hadamard, convolutions)
    come from :mod:`monarch_matrices.transforms`, recovered MM* factors from
    :func:`~monarch_matrices.ops.factor_mm_star` via :meth:`from_factors`.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample (default ``in_features``).
        degree: number of Monarch factors ``p``.
        nblocks: blocks per factor, ``1 <= nblocks <= min(in, out)``.
        rank: middle channels per slice (see :func:`~monarch_matrices.ops.monarch_shape`).

    The first factor maps ``in → out`` with the shapes of ``MonarchLinear``, the
    others ``out → out``; sizes not divisible by ``nblocks`` are zero-padded and
    cropped through the index maps.

    Shape:
        - Input: ``(*, in_features)``: any number of leading dims, including none.
        - Output: ``(*, out_features)``.

    Attributes:
        w1, w2: ``ParameterList``\ s of the factors' ``(k, q, p)`` and ``(l, s, r)``
            tensors, initialized ``N(0, 1/p)`` and ``N(0, 1/r)`` (complex: the same
            variance split over real and imaginary parts) so every factor keeps
            the second moment of its input and a deep product neither blows up
            nor vanishes at init.

    Examples::

        >>> prod = MonarchProduct(16, degree=3, nblocks=4)
        >>> prod(torch.randn(8, 16)).shape
        torch.Size([8, 16])
        >>> prod.degree, prod.num_params
        (3, 384)
    """

    in_index: torch.Tensor | None
    out_index: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int | None = None,
        degree: int = 2,
        nblocks: int = 4,
        rank: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_features = in_features if out_features is None else out_features
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"degree={degree!r} must be an int >= 1 (the number of factors)")
        first = monarch_shape(in_features, out_features, nblocks, rank)
        rest = monarch_shape(out_features, out_features, nblocks, rank)
        shapes = [(first.w1_shape, first.w2_shape)]
        shapes += [(rest.w1_shape, rest.w2_shape)] * (degree - 1)
        in_index = out_index = None
        if first.padded_in != in_features:
            pad = torch.full((first.padded_in - in_features,), -1, dtype=torch.int64)
            in_index = torch.cat([torch.arange(in_features), pad])
        if first.padded_out != out_features:
            out_index = torch.arange(out_features)
        factory_kwargs = {"device": device, "dtype": dtype}
        factors = [
            (torch.empty(s1, **factory_kwargs), torch.empty(s2, **factory_kwargs))
            for s1, s2 in shapes
        ]
        self._setup(factors, in_index, out_index, in_features)
        self.reset_parameters()

    def _setup(
        self,
        factors: Sequence[Factor],
        in_index: torch.Tensor | None,
        out_index: torch.Tensor | None,
        in_features: int | None,
    ) -> None:
        in_f, out_f = check_product(factors, in_index, out_index, in_features)
        self.in_features = in_f
        self.out_features = out_f
        self.w1 = nn.ParameterList([nn.Parameter(w1) for w1, _ in factors])
        self.w2 = nn.ParameterList([nn.Parameter(w2) for _, w2 in factors])
        device = factors[0][0].device
        for name, index in (("in_index", in_index), ("out_index", out_index)):
            self.register_buffer(name, None if index is None else index.to(device))

    @classmethod
    def from_factors(
        cls,
        factors: ProductFactors | Sequence[Factor],
        in_index: torch.Tensor | None = None,
        out_index: torch.Tensor | None = None,
        in_features: int | None = None,
    ) -> MonarchProduct:
        """A module whose parameters are copies of the given factors (trainable).

        Accepts a :class:`~monarch_matrices.ops.ProductFactors` (its index maps are
        used) or a sequence of ``(w1, w2)`` pairs with optional index maps.
        Keeps the factors' device and dtype.
        """
        if isinstance(factors, ProductFactors):
            if in_index is not None or out_index is not None or in_features is not None:
                raise ValueError(
                    "pass index maps either inside the ProductFactors or as arguments, not both"
                )
            factors, in_index, out_index, in_features = (
                factors.factors,
                factors.in_index,
                factors.out_index,
                factors.in_features,
            )
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        copies = [(w1.detach().clone(), w2.detach().clone()) for w1, w2 in factors]
        module._setup(copies, in_index, out_index, in_features)
        return module

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Var(w1) = 1/p, Var(w2) = 1/r: each middle channel sums p inputs and each
        # output r channels, so every factor preserves E|x|² and so does the product.
        for w1, w2 in zip(self.w1, self.w2):
            for w, fan_in in ((w1, w1.shape[2]), (w2, w2.shape[2])):
                w.copy_(torch.randn(w.shape, dtype=w.dtype, device=w.device))
                w.mul_(1 / math.sqrt(fan_in))

    @property
    def factors(self) -> tuple[Factor, ...]:
        """``((w1[0], w2[0]), ...)`` in application order (the parameters themselves)."""
        return tuple(zip(self.w1, self.w2))

    @property
    def degree(self) -> int:
        """Number of Monarch factors ``p``."""
        return len(self.w1)

    @property
    def num_params(self) -> int:
        """Parameters of all factors (index maps are fixed buffers)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"MonarchProduct expects input (*, {self.in_features}), got shape {tuple(x.shape)}"
            )
        return product_multiply(x, self.factors, self.in_index, self.out_index)

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` matrix ``M`` (differentiable)."""
        return product_to_dense(self.factors, self.in_index, self.out_index, self.in_features)

    def to_factors(self) -> ProductFactors:
        """The product as plain tensors (the parameters, not copies)."""
        return ProductFactors(self.factors, self.in_index, self.out_index, self.in_features)

    def extra_repr(self) -> str:
        shapes = ", ".join(
            f"{tuple(w1.shape)}·{tuple(w2.shape)}" for w1, w2 in zip(self.w1, self.w2)
        )
        maps = "".join(
            f", {name}=True"
            for name in ("in_index", "out_index")
            if getattr(self, name) is not None
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"degree={self.degree}, factors=[{shapes}]{maps}"
        )
