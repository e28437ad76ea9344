"""The Monarch multiply: two batched GEMMs with a stride permutation between them."""

from __future__ import annotations

import torch

from .shapes import check_factors

__all__ = ["monarch_multiply", "monarch_to_dense"]


def _autocast_active(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def monarch_multiply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Multiply ``x`` by the Monarch matrix with factors ``w1``, ``w2``: ``y = x @ M.T``.

    Args:
        x: ``(*, k·p)``: any number of leading dims, including none or zero-size.
        w1: ``(k, q, p)``: the first block-diagonal factor.
        w2: ``(l, s, r)``: the second block-diagonal factor, with ``k·q = l·r``.

    Returns:
        ``(*, s·l)``, computed as::

            h[a·q + c] = Σ_j w1[a, c, j] · x[a·p + j]
            y[e·l + v] = Σ_u w2[v, e, u] · h[u·l + v]

    Built from plain differentiable ops (``bmm``, views, one copy for the
    permutation), so autograd saves only ``x``, the middle activation and the
    factors, honours ``requires_grad`` of each, supports double backward, and
    autocast applies to both GEMMs as it does to ``nn.Linear``.

    >>> w1, w2 = torch.randn(2, 3, 4), torch.randn(3, 5, 2)
    >>> monarch_multiply(torch.randn(7, 8), w1, w2).shape
    torch.Size([7, 15])
    """
    check_factors(w1, w2)
    k, q, p = w1.shape
    l, s, r = w2.shape
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != k * p:
        raise ValueError(
            f"x has last dim {tuple(x.shape)[-1:] or '()'} but the Monarch factors expect "
            f"k*p = {k}*{p} = {k * p} input features"
        )
    if not (x.dtype == w1.dtype == w2.dtype) and not _autocast_active(x.device.type):
        raise TypeError(
            f"dtypes differ: x is {x.dtype}, w1 is {w1.dtype}, w2 is {w2.dtype}; "
            "cast them to one dtype or run under torch.autocast"
        )
    batch_shape = x.shape[:-1]
    xb = x.reshape(-1, k, p).transpose(0, 1)  # (k, B, p)
    n = xb.shape[1]
    h = torch.bmm(xb, w1.transpose(1, 2))  # (k, B, q): h[a, :, c] is channel t = a·q + c
    # Stride permutation: channel t = u·l + v goes to block v, position u.
    h = h.transpose(0, 1).reshape(n, r, l).permute(2, 0, 1)  # (l, B, r)
    y = torch.bmm(h, w2.transpose(1, 2))  # (l, B, s): y[v, :, e] is output e·l + v
    return y.permute(1, 2, 0).reshape(*batch_shape, s * l)


def monarch_to_dense(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The ``(s·l, k·p)`` matrix ``M`` with ``monarch_multiply(x, w1, w2) == x @ M.T``.

    Differentiable in ``w1`` and ``w2``; costs one Monarch multiply of the identity.

    >>> w1 = torch.randn(2, 3, 4, dtype=torch.float64)
    >>> w2 = torch.randn(3, 5, 2, dtype=torch.float64)
    >>> x = torch.randn(6, 8, dtype=torch.float64)
    >>> torch.allclose(monarch_multiply(x, w1, w2), x @ monarch_to_dense(w1, w2).T)
    True
    """
    check_factors(w1, w2)
    k, _, p = w1.shape
    eye = torch.eye(k * p, dtype=w1.dtype, device=w1.device)
    return monarch_multiply(eye, w1, w2).T
