"""Reference implementations written straight from the index convention, for tests."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st


@st.composite
def factor_shapes(draw, max_block: int = 5, max_blocks: int = 4):
    """Random (k, q, p), (l, s, r) with k·q = l·r, deliberately awkward (k ≠ l, q ≠ r, s ≠ p)."""
    k = draw(st.integers(1, max_blocks))
    l = draw(st.integers(1, max_blocks))
    base = k * l // math.gcd(k, l)
    width = base * draw(st.integers(1, max(1, 12 // base)))
    p = draw(st.integers(1, max_block))
    s = draw(st.integers(1, max_block))
    return (k, width // k, p), (l, s, width // l)


def dense_by_formula(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """M[e·l + v, a·p + j] = Σ over channels t = a·q + c = u·l + v of w2[v, e, u]·w1[a, c, j]."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    M = torch.zeros(s * l, k * p, dtype=torch.promote_types(w1.dtype, w2.dtype))
    for a in range(k):
        for c in range(q):
            u, v = divmod(a * q + c, l)
            for e in range(s):
                for j in range(p):
                    M[e * l + v, a * p + j] += w2[v, e, u] * w1[a, c, j]
    return M


def multiply_by_loops(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The two sums of the convention, written as scalar loops over one vector ``x``."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    h = [sum(w1[a, c, j] * x[a * p + j] for j in range(p)) for a in range(k) for c in range(q)]
    y = torch.zeros(s * l, dtype=x.dtype)
    for e in range(s):
        for v in range(l):
            y[e * l + v] = sum(w2[v, e, u] * h[u * l + v] for u in range(r))
    return y
