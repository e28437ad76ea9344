"""Plain reference implementations: slow, obviously right, used to check the fast paths."""

from __future__ import annotations

import torch
from einops import rearrange

from .shapes import check_factors

__all__ = ["monarch_multiply_reference"]


def monarch_multiply_reference(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """The Monarch multiply written as two einsums over explicit reshapes.

    Same contract as :func:`monarch_multiply`; kept as the readable twin that
    tests (and the benchmark) compare the fast path against.
    """
    check_factors(w1, w2)
    k, l = w1.shape[0], w2.shape[0]
    h = torch.einsum("kqp,...kp->...kq", w1, rearrange(x, "... (k p) -> ... k p", k=k))
    h = rearrange(h, "... k q -> ... (k q)")
    # channel t = u·l + v feeds block v at position u
    h = rearrange(h, "... (u v) -> ... u v", v=l)
    y = torch.einsum("ves,...sv->...ev", w2, h)
    return rearrange(y, "... e v -> ... (e v)")
