"""``MonarchLowRankLinear``: a Monarch weight plus a rank-``r`` term."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import fit_lowrank, monarch_multiply
from .linear import MonarchLinear

__all__ = ["MonarchLowRankLinear"]


class MonarchLowRankLinear(MonarchLinear):
    r"""Applies ``y = x (M + B A)ᵀ + b``: a Monarch matrix plus a rank-``lowrank`` term.

    The low-rank term reaches the global directions the block structure cannot:
    the paper's S2D runs train "Monarch + low-rank" before densifying, and D2S
    fine-tuning gains from it as trainable capacity (docs/results.md);
    :meth:`from_dense` fits it to what the projection misses
    (:func:`~monarch_matrices.ops.fit_lowrank`).
    ``lowrank=8`` on a 384 → 1536 layer adds 5% to the Monarch parameters.

    Args:
        in_features, out_features, bias, nblocks, rank, device, dtype: as
            :class:`MonarchLinear`.
        lowrank: rank ``r`` of the added term, ``1 <= r <= min(in, out)``.

    Attributes:
        lowrank_a: ``(lowrank, in_features)``, initialized ``U(-1/√in, 1/√in)``.
        lowrank_b: ``(out_features, lowrank)``, initialized to zeros (as LoRA's),
            so a freshly built layer computes exactly its Monarch part.

    Examples::

        >>> layer = MonarchLowRankLinear(384, 1536, nblocks=4, lowrank=8)
        >>> layer(torch.randn(2, 7, 384)).shape
        torch.Size([2, 7, 1536])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        nblocks: int = 4,
        lowrank: int = 8,
        rank: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(lowrank, bool) or not isinstance(lowrank, int) or lowrank < 1:
            raise ValueError(f"lowrank={lowrank!r} must be an int >= 1")
        if lowrank > min(in_features, out_features):
            raise ValueError(
                f"lowrank={lowrank} is more than a {in_features} -> {out_features} layer can "
                f"hold; use 1 <= lowrank <= {min(in_features, out_features)}"
            )
        super().__init__(in_features, out_features, bias, nblocks, rank=rank,
                         device=device, dtype=dtype)
        factory_kwargs = {"device": device, "dtype": dtype}
        self.lowrank = lowrank
        self.lowrank_a = nn.Parameter(torch.empty(lowrank, in_features, **factory_kwargs))
        self.lowrank_b = nn.Parameter(torch.empty(out_features, lowrank, **factory_kwargs))
        self._reset_lowrank()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "lowrank_a"):  # MonarchLinear.__init__ calls this before they exist
            self._reset_lowrank()

    @torch.no_grad()
    def _reset_lowrank(self) -> None:
        bound = 1 / math.sqrt(self.in_features)
        nn.init.uniform_(self.lowrank_a, -bound, bound)
        nn.init.zeros_(self.lowrank_b)

    def _structured_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # the term rides along in the chunked multiply (one pass over the output);
        # on padded sizes its factors get zero columns/rows, as the input and output do
        a, b = self.lowrank_a, self.lowrank_b
        if self.padded_in != self.in_features:
            a = F.pad(a, (0, self.padded_in - self.in_features))
        if self.padded_out != self.out_features:
            b = F.pad(b, (0, 0, 0, self.padded_out - self.out_features))
        return monarch_multiply(x, self.w1, self.w2, bias, lowrank=(a, b))

    def monarch_dense(self) -> torch.Tensor:
        """The Monarch part ``M`` alone, ``(out_features, in_features)``."""
        return super().to_dense()

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight ``M + B A`` (differentiable)."""
        return self.monarch_dense() + self.lowrank_b @ self.lowrank_a

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        nblocks: int = 4,
        rank: int | None = None,
        lowrank: int = 8,
    ) -> MonarchLowRankLinear:
        """The nearest Monarch matrix to ``weight``, plus the best rank-``lowrank`` term.

        ``M`` is the closed-form projection; ``B A`` the truncated SVD of
        ``W − M`` (:func:`~monarch_matrices.ops.fit_lowrank`).  The relative
        error ``‖W − M − B A‖_F / ‖W‖_F`` is stored as ``projection_error``.
        """
        plain = MonarchLinear.from_dense(weight, bias, nblocks=nblocks, rank=rank)
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bias=bias is not None, nblocks=nblocks, lowrank=lowrank,
                    rank=rank, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.load_state_dict(plain.state_dict(), strict=False)  # w1, w2, bias
            fit = fit_lowrank(weight, plain.to_dense(), lowrank)
            layer.lowrank_a.copy_(fit.a)
            layer.lowrank_b.copy_(fit.b)
            err = (weight.double() - layer.to_dense().double()).norm()
            layer.projection_error = float(err / weight.double().norm().clamp(min=1e-300))
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lowrank={self.lowrank}"
