"""Products of Monarch matrices (the paper's Monarch-p and its class MM*).

A product is a chain of Monarch factors ``(w1, w2)`` (DESIGN §2 convention), listed
in the order they are applied, like ``nn.Sequential``::

    y = S_out · M_{p-1} ⋯ M_1 · M_0 · S_in · x        (M_i = monarch factor i)

``S_in`` and ``S_out`` are optional fixed *index maps* (gathers): ``in_index[i]``
says which input feeds position ``i`` of the first factor (``-1`` reads a zero,
which is how inputs are zero-padded), ``out_index[i]`` says which output of the
last factor becomes output ``i``.  The DFT needs its input in "digit-reversed"
order and that reordering is a stride permutation, which no block-diagonal
factor can absorb; a gather is one cheap copy, so permutations, padding and
cropping are kept as index maps at the two ends of the chain and nowhere else.

Conjugate transposes need no special case either: ``M* = Mon(w1*, 1) ·
Mon(1, w2*)`` exactly (see :func:`adjoint_factors`), so ``M₁M₂*`` is two plain
factors (:func:`mm_star_factors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .multiply import monarch_multiply
from .reference import monarch_multiply_reference
from .shapes import check_factors

__all__ = [
    "Factor",
    "ProductFactors",
    "adjoint_factors",
    "check_product",
    "mm_star_factors",
    "product_multiply",
    "product_to_dense",
    "product_to_dense_reference",
]

Factor = tuple[torch.Tensor, torch.Tensor]
"""One Monarch factor ``(w1, w2)``: ``w1`` is ``(k, q, p)``, ``w2`` is ``(l, s, r)``."""


def _widths(w1: torch.Tensor, w2: torch.Tensor) -> tuple[int, int]:
    k, _, p = w1.shape
    l, s, _ = w2.shape
    return k * p, s * l


def _as_factors(factors: object) -> tuple[Factor, ...]:
    if isinstance(factors, ProductFactors):
        return factors.factors
    if isinstance(factors, torch.Tensor) or not isinstance(factors, Sequence):
        raise TypeError(
            f"factors must be a sequence of (w1, w2) pairs, got {type(factors).__name__}"
        )
    out = []
    for i, f in enumerate(factors):
        if isinstance(f, torch.Tensor) or not isinstance(f, Sequence) or len(f) != 2:
            raise TypeError(f"factors[{i}] must be a pair (w1, w2), got {type(f).__name__}")
        out.append((f[0], f[1]))
    if not out:
        raise ValueError("a Monarch product needs at least one factor, got none")
    return tuple(out)


def _check_index(name: str, index: object, length_limit: int | None, low: int) -> torch.Tensor:
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D int64 tensor, got {type(index).__name__}")
    if index.dim() != 1 or index.dtype != torch.int64:
        raise TypeError(
            f"{name} must be a 1-D int64 tensor, got shape {tuple(index.shape)}, {index.dtype}"
        )
    if index.numel() and int(index.min()) < low:
        raise ValueError(f"{name} has entry {int(index.min())}; entries must be >= {low}")
    if length_limit is not None and index.numel() and int(index.max()) >= length_limit:
        raise ValueError(
            f"{name} has entry {int(index.max())} but there are only {length_limit} features"
        )
    return index


def check_product(
    factors: Sequence[Factor],
    in_index: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    in_features: int | None = None,
) -> tuple[int, int]:
    """Validate a product and return its ``(in_features, out_features)``.

    Each factor must be valid Monarch factors (:func:`check_factors`), consecutive
    factors must chain (output width of one = input width of the next), and all
    must share one dtype and device.  ``in_index`` has one entry per input of the
    first factor, each in ``[-1, in_features)``; ``out_index`` entries index the
    last factor's outputs.  ``in_features`` defaults to the first factor's width
    without ``in_index``, else to ``max(in_index) + 1``.
    """
    factors = _as_factors(factors)
    dtype, device = factors[0][0].dtype, factors[0][0].device
    width = None
    for i, (w1, w2) in enumerate(factors):
        check_factors(w1, w2)
        if w1.dtype != dtype or w2.dtype != dtype or w1.device != device:
            raise TypeError(
                f"factor {i} is ({w1.dtype}, {w2.dtype}) on {w1.device} but factor 0 is "
                f"{dtype} on {device}; all factors of a product share one dtype and device"
            )
        n_in, n_out = _widths(w1, w2)
        if width is not None and n_in != width:
            raise ValueError(
                f"factor {i} takes {n_in} inputs but factor {i - 1} gives {width} outputs; "
                "consecutive factors must chain"
            )
        width = n_out
    first_in = _widths(*factors[0])[0]
    if in_index is None:
        if in_features is not None and in_features != first_in:
            raise ValueError(
                f"in_features={in_features} but the first factor takes {first_in} inputs; "
                "pass an in_index (use -1 entries to zero-pad)"
            )
        n_in = first_in
    else:
        _check_index("in_index", in_index, in_features, low=-1)
        if in_index.numel() != first_in:
            raise ValueError(
                f"in_index has {in_index.numel()} entries but the first factor takes "
                f"{first_in} inputs"
            )
        if in_features is None:
            in_features = int(in_index.max()) + 1 if in_index.numel() else 0
        n_in = in_features
    if out_index is None:
        n_out = width
    else:
        _check_index("out_index", out_index, width, low=0)
        n_out = out_index.numel()
    return n_in, n_out


def _promote_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A real signal into a complex transform (the DFT of real data) is the common
    # case; promote it so callers need not.  Anything else is left to
    # monarch_multiply, which names the mismatch (or lets autocast handle it).
    if dtype.is_complex and not x.is_complex() and x.dtype == dtype.to_real():
        return x.to(dtype)
    return x


def _gather_last(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # torch.gather with an expanded index: several times faster than index_select
    # along the last dim for complex tensors on CPU, and differentiable.
    return torch.gather(x, -1, index.to(x.device).expand(*x.shape[:-1], index.numel()))


def _gather_input(x: torch.Tensor, in_index: torch.Tensor) -> torch.Tensor:
    # Entries -1 read an appended zero: pad by one feature and remap -1 to it.
    if bool((in_index < 0).any()):
        n = x.shape[-1]
        return _gather_last(F.pad(x, (0, 1)), torch.where(in_index < 0, n, in_index))
    return _gather_last(x, in_index)


def product_multiply(
    x: torch.Tensor,
    factors: Sequence[Factor],
    in_index: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply a Monarch product to ``x``: ``y = x @ M.T`` with ``M = S_out M_{p-1}⋯M_0 S_in``.

    Args:
        x: ``(*, n_in)``; a real ``x`` is promoted to the factors' complex dtype.
        factors: the factors ``(w1, w2)`` in application order (``factors[0]`` first).
        in_index: optional ``(k·p,)`` int64 gather into ``x`` (``-1`` reads zero).
        out_index: optional int64 gather from the last factor's outputs.

    Costs one :func:`monarch_multiply` per factor plus a copy per index map, and is
    differentiable in ``x`` and every factor (plain autograd, double backward too).

    >>> w = [(torch.randn(2, 2, 2), torch.randn(2, 2, 2)) for _ in range(3)]
    >>> product_multiply(torch.randn(5, 4), w).shape
    torch.Size([5, 4])
    """
    factors = _as_factors(factors)
    check_product(factors, in_index, out_index)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    x = _promote_input(x, factors[0][0].dtype)
    if in_index is not None:
        if x.dim() == 0:
            raise ValueError("x must have at least one dim (*, n_in), got a 0-d tensor")
        if in_index.numel() and int(in_index.max()) >= x.shape[-1]:
            raise ValueError(
                f"in_index reads feature {int(in_index.max())} but x has last dim {x.shape[-1]}"
            )
        x = _gather_input(x, in_index)
    for w1, w2 in factors:
        x = monarch_multiply(x, w1, w2)
    if out_index is not None:
        x = _gather_last(x, out_index)
    return x


def product_to_dense(
    factors: Sequence[Factor],
    in_index: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    in_features: int | None = None,
) -> torch.Tensor:
    """The ``(out_features, in_features)`` matrix of the product (differentiable).

    Costs one :func:`product_multiply` of the identity.
    """
    factors = _as_factors(factors)
    n_in, _ = check_product(factors, in_index, out_index, in_features)
    w = factors[0][0]
    eye = torch.eye(n_in, dtype=w.dtype, device=w.device)
    return product_multiply(eye, factors, in_index, out_index).T


def product_to_dense_reference(
    factors: Sequence[Factor],
    in_index: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    in_features: int | None = None,
) -> torch.Tensor:
    """The same matrix as :func:`product_to_dense`, as an explicit chain of dense matrices.

    Each factor goes through the einsum twin :func:`monarch_multiply_reference`
    and the index maps become 0/1 selection matrices: slow, obviously right, kept
    for tests to compare the fast path against.
    """
    factors = _as_factors(factors)
    n_in, _ = check_product(factors, in_index, out_index, in_features)
    w = factors[0][0]
    kw = {"dtype": w.dtype, "device": w.device}
    if in_index is None:
        m = torch.eye(n_in, **kw)
    else:
        # one-hot rows; -1 selects the extra last column, which is then dropped
        m = torch.eye(n_in + 1, **kw)[torch.where(in_index < 0, n_in, in_index)][:, :n_in]
    for w1, w2 in factors:
        k, _, p = w1.shape
        dense = monarch_multiply_reference(torch.eye(k * p, **kw), w1, w2).T
        m = dense @ m
    if out_index is not None:
        m = m[out_index]
    return m


def adjoint_factors(w1: torch.Tensor, w2: torch.Tensor) -> tuple[Factor, Factor]:
    """Two factors, in application order, whose product is ``M*`` for ``M = Mon(w1, w2)``.

    ``M = P₂ B₂ P_m B₁`` (two stride permutations around block-diagonals), so
    ``M* = B₁* · (P_mᵀ B₂* P₂ᵀ)``.  The bracket is itself a Monarch factor whose
    first block-diagonal is the identity: ``Mon(ones(N, 1, 1), w2*)`` with ``w2*``
    the blockwise conjugate transpose, because transposing the permutations of
    the convention gives the permutations of the transposed shapes.  ``B₁*`` is
    the factor ``Mon(w1*, ones(N', 1, 1))`` (a second block-diagonal of 1×1 blocks
    permutes nothing).  The ``ones`` are real parameters like any other: the
    pair is a general Monarch-2 product initialized to ``M*``.

    >>> w1 = torch.randn(2, 3, 4, dtype=torch.complex128)
    >>> w2 = torch.randn(3, 5, 2, dtype=torch.complex128)
    >>> from monarch_matrices.ops import monarch_to_dense
    >>> torch.allclose(product_to_dense(adjoint_factors(w1, w2)), monarch_to_dense(w1, w2).mH)
    True
    """
    check_factors(w1, w2)
    k, _, p = w1.shape
    l, s, _ = w2.shape
    first = (torch.ones(s * l, 1, 1, dtype=w2.dtype, device=w2.device), w2.mH)
    second = (w1.mH, torch.ones(k * p, 1, 1, dtype=w1.dtype, device=w1.device))
    return first, second


def mm_star_factors(
    w1_a: torch.Tensor, w2_a: torch.Tensor, w1_b: torch.Tensor, w2_b: torch.Tensor
) -> tuple[Factor, ...]:
    """Factors, in application order, of ``M_a · M_b*`` (the paper's class MM*).

    With :func:`adjoint_factors`, ``M_a M_b* = Mon(w1_a, w2_a) · Mon(w1_b*, 1) ·
    Mon(1, w2_b*)``; when the first block-diagonals of ``M_a`` and ``M_b`` have the
    same blocks (``k`` and ``p`` agree, e.g. two square Monarch matrices of one
    size), the middle block-diagonal merges into ``w1_a``: two factors,
    ``[Mon(1, w2_b*), Mon(w1_a · w1_b*, w2_a)]``.  Otherwise three are returned.
    """
    check_factors(w1_a, w2_a)
    check_factors(w1_b, w2_b)
    (ones_b, w2_b_adj), (w1_b_adj, ones_a) = adjoint_factors(w1_b, w2_b)
    if w1_a.shape[0] == w1_b.shape[0] and w1_a.shape[2] == w1_b.shape[2]:
        return (ones_b, w2_b_adj), (w1_a @ w1_b_adj, w2_a)
    return (ones_b, w2_b_adj), (w1_b_adj, ones_a), (w1_a, w2_a)


@dataclass(frozen=True, eq=False)
class ProductFactors:
    """A Monarch product as plain tensors: what ops functions return and nn wraps.

    Attributes:
        factors: ``((w1, w2), ...)`` in application order (``factors[0]`` first).
        in_index: ``None`` or a ``(k·p,)`` int64 gather into the input (``-1`` = zero).
        out_index: ``None`` or an int64 gather from the last factor's outputs.
        in_features: input width (inferred as in :func:`check_product` if ``None``).

    ``nn.MonarchProduct.from_factors`` turns one into a trainable module.
    """

    factors: tuple[Factor, ...]
    in_index: torch.Tensor | None = None
    out_index: torch.Tensor | None = None
    in_features: int | None = None

    def __post_init__(self) -> None:
        factors = _as_factors(self.factors)
        n_in, _ = check_product(factors, self.in_index, self.out_index, self.in_features)
        object.__setattr__(self, "factors", factors)
        object.__setattr__(self, "in_features", n_in)

    @property
    def out_features(self) -> int:
        return check_product(self.factors, self.in_index, self.out_index, self.in_features)[1]

    @property
    def degree(self) -> int:
        """Number of Monarch factors ``p`` (the paper's Monarch-p)."""
        return len(self.factors)

    @property
    def num_params(self) -> int:
        """Entries of all factors (index maps are fixed, not parameters)."""
        return sum(w1.numel() + w2.numel() for w1, w2 in self.factors)

    @property
    def dtype(self) -> torch.dtype:
        return self.factors[0][0].dtype

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ M.T`` (see :func:`product_multiply`)."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"the product expects input (*, {self.in_features}), got shape {tuple(x.shape)}"
            )
        return product_multiply(x, self.factors, self.in_index, self.out_index)

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` matrix."""
        return product_to_dense(self.factors, self.in_index, self.out_index, self.in_features)
