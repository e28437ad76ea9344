"""Recover the factors of a product ``M = M₁·M₂*`` (the paper's class MM*).

Let ``n = m²`` and ``Q`` be the transpose permutation of an ``m×m`` grid (the
stride permutation of the square Monarch convention, ``Q = Qᵀ = Q⁻¹``).  A square
Monarch factor is ``Mon(w1, w2) = Q B(w2) Q B(w1)`` with ``B(w)`` the
block-diagonal of ``w``'s blocks, and by :func:`~monarch_matrices.ops.mm_star_factors`

    M₁M₂* = Mon(R, L) · Mon(1, K)    i.e.    Q M Q = B(L) · (Q B(R) Q) · B(K)

(``L = w2`` of ``M₁``; ``R = w1 of M₁ · (w1 of M₂)*``; ``K = (w2 of M₂)*``).  The
middle term ``Q B(R) Q`` has *diagonal* ``m×m`` blocks: block ``(i, i')`` is
``Δ_{ii'} = diag_j R[j][i, i']``.  So the blocks of ``X = Q M Q`` obey

    X_{ii'} = L_i · Δ_{ii'} · K_{i'}        (i, i' < m)

— every row of blocks shares ``L_i``, every column ``K_{i'}``, and the products
``(X_{0i'} X_{1i'}⁻¹)(X_{00} X_{10}⁻¹)⁻¹ = L_0 Λ_{i'} L_0⁻¹`` (``Λ`` diagonal) commute:
``L_0`` diagonalizes them all simultaneously.  One eigendecomposition of a random
combination of them gives ``L_0``; then ``K_{i'} = L_0⁻¹ X_{0i'}``,
``L_i = X_{i0} K_0⁻¹`` and ``Δ_{ii'} = diag(L_i⁻¹ X_{ii'} K_{i'}⁻¹)``.  The last step
does ``m²`` products of ``m×m`` blocks: ``O(m⁵) = O(n^2.5)``, the cost the paper
states; everything before it is ``O(n²)``.

Ambiguity.  The factors are never unique: for any permutation ``Π`` and
invertible diagonals ``S_i``, ``T_{i'}``, the factors ``L_i S_i Π``,
``Πᵀ T_{i'} K_{i'}`` and ``Δ_{ii'} → Πᵀ S_i⁻¹ Δ_{ii'} T_{i'}⁻¹ Π`` give the same
``M``.  The eigenvector order fixes ``Π``, unit-norm eigenvectors fix ``S_0``,
and the remaining scalings are fixed by making ``Δ_{0i'} = Δ_{i0} = I``.  So
the recovered factors reproduce ``M`` but need not equal the ones it was built
from.
"""

from __future__ import annotations

import math

import torch

from .product import ProductFactors

__all__ = ["factor_mm_star"]

# A block whose condition number exceeds this is treated as singular.
_MAX_COND = 1e12
# Eigenvalues closer than this (relative to the largest) count as repeated.
_MIN_GAP = 1e-9
# Eigenvectors whose imaginary part (after fixing each column's phase) is below this,
# relative, are real, so a real m gets real factors.  Genuinely complex ones (a real
# m that needs complex factors) have imaginary parts of order one.
_REAL_TOL = {8: 1e-7, 4: 1e-2, 2: 1e-1}  # by bytes per real element of m


def _check_input(m: object, nblocks: object) -> tuple[torch.Tensor, int]:
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"m must be a torch.Tensor, got {type(m).__name__}")
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"m must be a square 2-D matrix, got shape {tuple(m.shape)}")
    if not (m.is_floating_point() or m.is_complex()):
        raise TypeError(f"m must be a floating or complex tensor, got {m.dtype}")
    if isinstance(nblocks, bool) or not isinstance(nblocks, int):
        raise TypeError(f"nblocks must be an int, got {type(nblocks).__name__} ({nblocks!r})")
    n = m.shape[0]
    if nblocks < 1 or nblocks * nblocks != n:
        root = math.isqrt(n)
        hint = f"use nblocks={root}" if root * root == n else "n must be a perfect square"
        raise ValueError(
            f"nblocks={nblocks} does not fit n={n}: factor_mm_star handles the square "
            f"Monarch case n = nblocks² (blocks of size √n); {hint}"
        )
    if not bool(torch.isfinite(m).all()):
        raise ValueError("m has NaN/inf entries; cannot factor a non-finite matrix")
    return m.detach(), nblocks


def _check_invertible(blocks: torch.Tensor, names: list[str]) -> None:
    cond = torch.linalg.cond(blocks)  # 2-norm condition numbers
    cond = torch.where(torch.isnan(cond), torch.inf, cond)
    worst = int(torch.argmax(cond))
    if float(cond[worst]) > _MAX_COND:
        raise ValueError(
            f"block {names[worst]} of the permuted matrix Q·m·Q is singular or nearly so "
            f"(condition number {float(cond[worst]):.3g} > {_MAX_COND:.0e}), and no better "
            "pivot exists; factor_mm_star handles the generic case, where two rows and one "
            "column of m×m blocks are invertible"
        )


def _pivot_order(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block rows and columns ordered best-conditioned first (the pivots come first).

    The closed form divides by the blocks of two rows and one column; the
    error it leaves grows with their condition numbers, so pick the best ones.
    """
    cond = torch.linalg.cond(x)  # (b, b)
    logc = torch.where(torch.isfinite(cond), cond, torch.inf).log()
    return logc.amax(1).argsort(), logc.amax(0).argsort()


def _simultaneous_eigvecs(
    x: torch.Tensor, rows: list[int], cols: list[int], real_tol: float
) -> torch.Tensor:
    """``L_0`` (up to column order and scale) from the blocks ``x[i, i']`` of ``Q m Q``.

    ``rows``/``cols`` are the original block indices, for error messages only.
    Real when ``x`` is real and real eigenvectors exist (a real ``m`` with real factors).
    """
    b = x.shape[0]
    _check_invertible(x[0, :], [f"({rows[0]}, {c})" for c in cols])
    _check_invertible(x[1, :], [f"({rows[1]}, {c})" for c in cols])
    _check_invertible(x[:, 0], [f"({r}, {cols[0]})" for r in rows])
    # Y_{i'} = X_{0i'} X_{1i'}⁻¹ = L_0 (Δ_{0i'} Δ_{1i'}⁻¹) L_1⁻¹, so the Y_{i'} Y_0⁻¹ =
    # L_0 Λ_{i'} L_0⁻¹ are commuting matrices, all diagonalized by L_0.  A random
    # combination of them has distinct eigenvalues unless the Λ's are degenerate.
    y = torch.linalg.solve(x[1, :], x[0, :], left=False)  # (b, b, b)
    pencil = torch.linalg.solve(y[0], y[1:], left=False)  # (b-1, b, b)
    # Complex coefficients spread the eigenvalues over the plane even when the Λ's
    # are real (real factors), which keeps them apart and the eigenvectors accurate.
    gen = torch.Generator().manual_seed(0)
    coef = torch.randn(b - 1, generator=gen, dtype=torch.complex128)
    eigvals, vecs = torch.linalg.eig(torch.einsum("c,cij->ij", coef, pencil.to(coef.dtype)))
    gaps = (eigvals[:, None] - eigvals[None, :]).abs()
    gaps = gaps + torch.diag(torch.full((b,), torch.inf, dtype=gaps.dtype))
    scale = float(eigvals.abs().max())
    if float(gaps.min()) <= _MIN_GAP * max(scale, 1e-300):
        raise ValueError(
            "the simultaneous eigenproblem of the blocks has repeated eigenvalues "
            f"(gap {float(gaps.min()):.3g}); the MM* factors are not determined by it "
            "(degenerate diagonal middle factor), so factor_mm_star cannot recover them"
        )
    if not x.is_complex():
        # Real factors exist iff the eigenvectors are real up to a phase each: rotate
        # every column so its largest entry is real and positive, then test.
        top = vecs.gather(0, vecs.abs().argmax(0, keepdim=True))
        vecs = vecs * (top.abs() / top)
        if float(vecs.imag.abs().max()) <= real_tol * float(vecs.abs().max()):
            return vecs.real
    return vecs


def _closed_form(x: torch.Tensor, left: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(L, Δ, K)`` from ``L_0``: exact on rows/column 0, diagonal part elsewhere."""
    # K_{i'} = L_0⁻¹ X_{0i'} (sets Δ_{0i'} = I), L_i = X_{i0} K_0⁻¹ (sets Δ_{i0} = I).
    k_blocks = torch.linalg.solve(left, x[0, :])  # (b, b, b)
    l_blocks = torch.linalg.solve(k_blocks[0], x[:, 0], left=False)  # (b, b, b)
    # Δ_{ii'} = diag(L_i⁻¹ X_{ii'} K_{i'}⁻¹): m² block products, the O(n^2.5) step.
    t = torch.linalg.inv(l_blocks)[:, None] @ x  # (i, i', j, l)
    delta = (t * torch.linalg.inv(k_blocks).transpose(-1, -2)[None]).sum(-1)  # (i, i', j)
    return l_blocks, delta, k_blocks


def _polish(x: torch.Tensor, l_blocks: torch.Tensor, delta: torch.Tensor, k_blocks: torch.Tensor):
    """One sweep of alternating least squares on ``X_{ii'} = L_i diag(Δ_{ii'}) K_{i'}``.

    The closed form divides by a few pivot blocks and so inherits their
    conditioning; a sweep refits each of L, K, Δ to *all* blocks at once (exact
    linear least squares for each, ``O(m⁵)``), which cuts the residual of an
    ill-conditioned but exact MM* product by one to two orders of magnitude.
    """
    # L_i (Σ_a C C*) = Σ_a X_{ia} C*, with C_{ia} = diag(Δ_{ia}) K_a
    c = delta[..., None] * k_blocks[None]  # (i, a, j, l)
    gram = torch.einsum("iajl,iakl->ijk", c, c.conj())
    rhs = torch.einsum("iaml,iakl->imk", x, c.conj())
    l_blocks = torch.linalg.solve(gram, rhs, left=False)
    # (Σ_i E* E) K_a = Σ_i E* X_{ia}, with E_{ia} = L_i diag(Δ_{ia})
    e = l_blocks[:, None] * delta[:, :, None, :]  # (i, a, j, k)
    gram = torch.einsum("iajk,iajl->akl", e.conj(), e)
    rhs = torch.einsum("iajk,iajl->akl", e.conj(), x)
    k_blocks = torch.linalg.solve(gram, rhs)
    # Δ_{ia}: X_{ia} = Σ_j δ_j l_j k_jᵀ; Gram[j, k] = (L*L)[j, k] · (K K*)[k, j]
    gl = l_blocks.mH @ l_blocks  # (i, j, k)
    gk = k_blocks @ k_blocks.mH  # (a, j, k)
    gram = gl[:, None] * gk[None].transpose(-1, -2)
    rhs = ((l_blocks.mH[:, None] @ x) * k_blocks.conj()[None]).sum(-1)  # diag(L* X K*)
    delta = torch.linalg.solve(gram, rhs[..., None])[..., 0]
    return l_blocks, delta, k_blocks


def factor_mm_star(
    m: torch.Tensor, nblocks: int, tol: float | None = None, sweeps: int = 2
) -> ProductFactors:
    """Factors of ``m = M₁·M₂*`` (two square Monarch matrices with ``nblocks = √n``).

    Args:
        m: ``(n, n)`` real or complex matrix, ``n = nblocks²`` (treated as a
            constant: the factorization is not differentiated through).
        nblocks: ``√n``: blocks per factor, each ``√n × √n`` (the paper's setting).
        tol: largest accepted relative Frobenius error of the reconstruction;
            default ``1e-6`` for 64-bit input, ``1e-3`` otherwise.
        sweeps: alternating-least-squares sweeps that polish the closed-form
            factors (each ``O(n^2.5)``); ``0`` keeps the closed form alone.

    Returns:
        A :class:`~monarch_matrices.ops.ProductFactors` with two factors (in
        application order) ``[Mon(1, K), Mon(R, L)]`` and no index maps, so that
        ``product.to_dense() ≈ m``; wrap it with ``nn.MonarchProduct.from_factors``
        to train it.  Computed in float64/complex128 and returned in ``m``'s dtype,
        or in the matching complex dtype when a real ``m`` needs complex factors
        (e.g. a real circulant, which diagonalizes over the DFT).  The factors are
        determined only up to a permutation and diagonal scalings (module docs).

    Raises:
        ValueError: ``n ≠ nblocks²``; the pivot blocks are singular; the
            simultaneous eigenproblem has repeated eigenvalues (the factors are
            then not determined by it); or the recovered factors miss ``m`` by
            more than ``tol`` (``m`` is not in MM*).

    >>> from monarch_matrices.ops import mm_star_factors, product_to_dense
    >>> a, b, c, d = (torch.randn(4, 4, 4, dtype=torch.float64) for _ in range(4))
    >>> m = product_to_dense(mm_star_factors(a, b, c, d))
    >>> product = factor_mm_star(m, nblocks=4)
    >>> bool(torch.linalg.norm(product.to_dense() - m) < 1e-8 * torch.linalg.norm(m))
    True
    """
    m, b = _check_input(m, nblocks)
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
        raise ValueError(f"sweeps={sweeps!r} must be an int >= 0")
    n = m.shape[0]
    if tol is None:
        tol = 1e-6 if m.dtype in (torch.float64, torch.complex128) else 1e-3
    real = not m.is_complex()
    work = m.to(torch.float64 if real else torch.complex128)
    # X[i, i', j, j'] = (Q m Q)[i·b + j, i'·b + j'] = m[j·b + i, j'·b + i']
    x = work.reshape(b, b, b, b).permute(1, 3, 0, 2)
    if b == 1:  # a 1×1 matrix: M = 1 · m · 1
        one = torch.ones(1, 1, 1, dtype=work.dtype)
        factors = [(one, x[0]), (one, one)]
    else:
        rows, cols = _pivot_order(x)
        xp = x[rows][:, cols]
        real_tol = _REAL_TOL.get(m.element_size() // (2 if m.is_complex() else 1), 1e-1)
        left = _simultaneous_eigvecs(xp, rows.tolist(), cols.tolist(), real_tol)
        if left.is_complex() and not xp.is_complex():  # a real m that needs complex factors
            xp = xp.to(torch.complex128)
        l_blocks, delta, k_blocks = _closed_form(xp, left.to(xp.dtype))
        for _ in range(sweeps):
            l_blocks, delta, k_blocks = _polish(xp, l_blocks, delta, k_blocks)
        inv_rows, inv_cols = rows.argsort(), cols.argsort()
        l_blocks, k_blocks = l_blocks[inv_rows], k_blocks[inv_cols]
        delta = delta[inv_rows][:, inv_cols]
        r_blocks = delta.permute(2, 0, 1).contiguous()  # R[j][i, i'] = Δ_{ii'}[j]
        ones = torch.ones(n, 1, 1, dtype=xp.dtype)
        factors = [(ones, k_blocks.contiguous()), (r_blocks, l_blocks.contiguous())]
    product = ProductFactors(tuple(factors))
    target = work.to(product.dtype)
    norm = float(torch.linalg.norm(target))
    err = float(torch.linalg.norm(product.to_dense() - target)) / (norm if norm > 0 else 1.0)
    if not err <= tol:
        raise ValueError(
            f"m is not (numerically) in MM* with nblocks={b}: the recovered factors "
            f"reproduce it only to relative error {err:.3g} > tol={tol:.1e}"
        )
    out_dtype = m.dtype
    if product.dtype.is_complex and real:
        out_dtype = torch.complex128 if m.dtype == torch.float64 else torch.complex64
    return ProductFactors(
        tuple((w1.to(m.device, out_dtype), w2.to(m.device, out_dtype)) for w1, w2 in factors)
    )
