"""``MonarchLinear``: a drop-in replacement for ``nn.Linear`` with a Monarch weight."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import monarch_multiply, monarch_shape, monarch_to_dense, project, slice_channel_counts
from ..ops.shapes import MonarchShape
from ._common import StructuredLinear, check_bias, check_linear

__all__ = ["MonarchLinear"]


class MonarchLinear(StructuredLinear):
    r"""Applies ``y = x Mᵀ + b`` where ``M`` is a Monarch matrix (two block-diagonal factors).

    Same call contract as :class:`torch.nn.Linear`, with about ``2/nblocks`` of its
    weight parameters and FLOPs at the default rank.  Sizes need not be
    divisible by ``nblocks``: the input is zero-padded to ``nblocks·ceil(in/nblocks)``
    and the output cut to ``out_features``.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: if ``False``, the layer learns no additive bias.
        nblocks: blocks per factor, ``1 <= nblocks <= min(in, out)``.  ``nblocks=4``
            is the paper's setting for transformer layers; ``nblocks=√n`` with
            ``rank=1`` is its square Monarch matrix.
        rank: middle channels per slice (``docs/math.md``); ``None`` gives the
            paper's middle width ``nblocks·min(ceil(in/b), ceil(out/b))``.

    Shape:
        - Input: ``(*, H_in)``: any number of leading dims, including none; ``H_in = in_features``.
        - Output: ``(*, H_out)`` with ``H_out = out_features``.

    Attributes:
        w1: first factor ``(nblocks, q, ceil(in/nblocks))``, initialized
            ``U(-1/√p, 1/√p)`` with ``p = ceil(in/nblocks)``.
        w2: second factor ``(nblocks, ceil(out/nblocks), q)``, each column scaled so
            that every entry of the composed ``(out, in)`` matrix has variance
            ``1/(3·in)``, the variance of ``nn.Linear``'s ``U(-1/√in, 1/√in)``.
            (When the middle block ``q`` is smaller than ``nblocks``, as for tiny
            layers like 10→14 at nblocks=4, some slices get no channel at all:
            those entries are structurally zero, see ``docs/math.md``.)
        bias: ``(out_features,)``, ``U(-1/√in, 1/√in)`` as in ``nn.Linear``.

    Examples::

        >>> layer = MonarchLinear(768, 3072, nblocks=4)
        >>> layer(torch.randn(8, 128, 768)).shape
        torch.Size([8, 128, 3072])
        >>> round(layer.param_ratio, 3)
        0.312
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        nblocks: int = 4,
        rank: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        shape = monarch_shape(in_features, out_features, nblocks, rank)
        self.in_features = in_features
        self.out_features = out_features
        self.nblocks = nblocks
        self.rank = rank
        self.padded_in = shape.padded_in
        self.padded_out = shape.padded_out
        self.w1 = nn.Parameter(torch.empty(shape.w1_shape, **factory_kwargs))
        self.w2 = nn.Parameter(torch.empty(shape.w2_shape, **factory_kwargs))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def shape(self) -> MonarchShape:
        """The factor shapes (:class:`~monarch_matrices.ops.MonarchShape`)."""
        return monarch_shape(self.in_features, self.out_features, self.nblocks, self.rank)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Match nn.Linear's per-entry variance 1/(3·in).  An entry of slice (a, v)
        # sums rho(a, v) products w2·w1 of independent zero-mean terms, so with
        # Var(w1) = 1/(3p) the w2 column of channel t needs Var = p / (in · rho).
        k, q, p = self.w1.shape
        l, _, r = self.w2.shape
        nn.init.uniform_(self.w1, -1 / math.sqrt(p), 1 / math.sqrt(p))
        counts = slice_channel_counts(k, q, l)  # (k, l)
        t = torch.arange(l * r).reshape(r, l).T  # t[v, u] = u·l + v
        rho = counts[t // q, t % l].to(torch.float64)  # (l, r)
        bound = (3 * p / (self.in_features * rho)).sqrt()
        nn.init.uniform_(self.w2, -1, 1)
        self.w2.mul_(bound[:, None, :].to(device=self.w2.device, dtype=self.w2.real.dtype))
        self._reset_bias()

    def _structured_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return monarch_multiply(x, self.w1, self.w2, bias)  # bias fused into the output pass

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight ``M`` (differentiable)."""
        return monarch_to_dense(self.w1, self.w2)[: self.out_features, : self.in_features]

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        nblocks: int = 4,
        rank: int | None = None,
    ) -> MonarchLinear:
        """The layer whose weight is the nearest Monarch matrix to ``weight`` (Frobenius).

        Uses :func:`~monarch_matrices.ops.project` (the closed-form optimum) and
        keeps ``weight``'s device and dtype; ``bias`` is copied.  The achieved
        error is stored as ``projection_error`` (relative, a float).
        """
        result = project(weight, nblocks=nblocks, rank=rank)
        out_f, in_f = weight.shape
        check_bias(bias, out_f)
        layer = cls(
            in_f,
            out_f,
            bias=bias is not None,
            nblocks=nblocks,
            rank=rank,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.w1.copy_(result.w1)
            layer.w2.copy_(result.w2)
            if bias is not None:
                layer.bias.copy_(bias)
        layer.projection_error = float(result.relative_error)
        return layer

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, nblocks: int = 4, rank: int | None = None
    ) -> MonarchLinear:
        """Project an ``nn.Linear`` onto Monarch (see :meth:`from_dense`)."""
        check_linear(linear)
        with torch.no_grad():
            return cls.from_dense(linear.weight, linear.bias, nblocks=nblocks, rank=rank)

    def extra_repr(self) -> str:
        rank = "" if self.rank is None else f", rank={self.rank}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nblocks={self.nblocks}{rank}, bias={self.bias is not None}"
        )
