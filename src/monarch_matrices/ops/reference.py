"""Plain reference implementations: slow, obviously right, used to check the fast paths."""

from __future__ import annotations

import torch
from einops import rearrange

from .shapes import check_factors

__all__ = ["monarch_multiply_bmm", "monarch_multiply_reference"]


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


def monarch_multiply_bmm(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The straightforward fast-ish path: two ``bmm`` with explicit permutation copies.

    This is how the paper's reference code multiplies, kept as the baseline the
    benchmark compares against.  Plain differentiable ops, so autograd (to any
    order) and autocast work as for any PyTorch code.
    """
    check_factors(w1, w2)
    k, q, p = w1.shape
    l, s, r = w2.shape
    batch_shape = x.shape[:-1]
    xb = x.reshape(-1, k, p).transpose(0, 1)  # (k, B, p)
    n = xb.shape[1]
    h = torch.bmm(xb, w1.transpose(1, 2))  # (k, B, q): h[a, :, c] is channel t = a·q + c
    # stride permutation: channel t = u·l + v goes to block v, position u
    h = h.transpose(0, 1).reshape(n, r, l).permute(2, 0, 1)  # (l, B, r)
    y = torch.bmm(h, w2.transpose(1, 2))  # (l, B, s): y[v, :, e] is output e·l + v
    return y.permute(1, 2, 0).reshape(*batch_shape, s * l)
