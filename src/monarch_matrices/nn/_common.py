"""Pieces the structured linear layers share: input checks, padding, bias, conversions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class StructuredLinear(nn.Module):
    """Base of the layers that replace ``nn.Linear`` with a structured matrix.

    A subclass stores ``in_features``, ``out_features``, ``nblocks`` and a
    ``bias`` (a parameter or ``None``), pads inputs to ``padded_in`` and
    implements :meth:`_structured_forward` (padded input → padded output, plus the
    bias when one is passed) and
    :meth:`to_dense`.  This base adds what every such layer offers: the
    ``nn.Linear`` call contract, exact conversion back to ``nn.Linear``, and
    parameter accounting.
    """

    in_features: int
    out_features: int
    nblocks: int
    padded_in: int
    padded_out: int
    bias: nn.Parameter | None

    def _structured_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Padded input → padded output, plus ``bias`` (padded-output sized) when given."""
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The layer's weight as a dense ``(out_features, in_features)`` matrix."""
        raise NotImplementedError

    @property
    def num_structured_params(self) -> int:
        """Parameters of the structured weight (bias excluded)."""
        return sum(p.numel() for name, p in self.named_parameters() if name != "bias")

    @property
    def param_ratio(self) -> float:
        """Structured weight parameters over dense ``in·out`` (bias excluded); < 1 saves."""
        return self.num_structured_params / (self.in_features * self.out_features)

    @property
    def ideal_speedup(self) -> float:
        """``1 / param_ratio``: the speedup over ``nn.Linear`` at equal FLOP efficiency."""
        return 1.0 / self.param_ratio

    def _reset_bias(self) -> None:
        # nn.Linear's bias init: U(-1/√in, 1/√in).
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects input (*, {self.in_features}), "
                f"got shape {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.padded_in != self.in_features:
            x = F.pad(x, (0, self.padded_in - self.in_features))
        cut = self.padded_out != self.out_features
        # a bias the structured op can take is added in its output pass
        y = self._structured_forward(x, None if cut else self.bias)
        if cut:
            y = y[..., : self.out_features]
            if self.bias is not None:
                y = y + self.bias
        return y

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same map (its weight is :meth:`to_dense`)."""
        w = self.to_dense()
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        linear.weight.copy_(w)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear


def check_linear(linear: object) -> nn.Linear:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
    return linear


def check_bias(bias: torch.Tensor | None, out_features: int) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or bias.shape != (out_features,):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must have shape ({out_features},), got {shape}")
    if not bool(torch.isfinite(bias).all()):
        raise ValueError("bias has NaN/inf entries")
