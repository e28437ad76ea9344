"""Optimal projection of a dense matrix onto Monarch matrices (closed form).

Fix an input block ``a`` and an output residue ``v``: the entries
``M[e·l + v, a·p + j]`` form an ``s×p`` slice that only the middle channels
``t = a·q + c`` with ``t mod l = v`` touch, each as a rank-one term
``w2[v, :, t div l] ⊗ w1[a, c, :]``.  Distinct slices share no parameters, so
the nearest Monarch matrix in Frobenius norm is an independent truncated SVD
per slice (Eckart–Young), non-convex as the problem looks.  ``docs/math.md``
has the proof.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .multiply import monarch_to_dense
from .shapes import monarch_shape, slice_channel_counts

__all__ = ["Projection", "project", "project_factors"]


class Projection(NamedTuple):
    """Result of :func:`project`: the factors and the error they achieve.

    ``error`` is ``‖W - M‖_F`` over the target's entries (a 0-d float64 tensor),
    ``relative_error`` is that over ``‖W‖_F``.
    """

    w1: torch.Tensor
    w2: torch.Tensor
    error: torch.Tensor
    relative_error: torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype.is_complex else torch.float64


def _check_dense(weight: torch.Tensor, name: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if not (weight.is_floating_point() or weight.is_complex()):
        raise TypeError(f"{name} must be a floating or complex tensor, got {weight.dtype}")
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"{name} has {bad} NaN/inf entries; cannot project a non-finite matrix")


def project_factors(
    dense: torch.Tensor,
    w1_shape: tuple[int, int, int],
    w2_shape: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest Monarch factors of the given shapes to ``dense`` (exact size, no padding).

    Args:
        dense: ``(s·l, k·p)``.
        w1_shape: ``(k, q, p)``.  w2_shape: ``(l, s, r)``, with ``k·q = l·r``.

    Returns:
        ``(w1, w2, discarded)``: factors in ``dense``'s dtype, computed in float64
        (complex128 for complex input), with singular values split evenly
        (``√σ`` to each factor); ``discarded`` is the sum of the squared singular
        values that were dropped, i.e. the squared optimal error.
    """
    _check_dense(dense, "dense")
    k, q, p = w1_shape
    l, s, r = w2_shape
    if k * q != l * r:
        raise ValueError(f"middle widths differ: k*q={k * q} but l*r={l * r}")
    if tuple(dense.shape) != (s * l, k * p):
        raise ValueError(
            f"dense has shape {tuple(dense.shape)} but factors {tuple(w1_shape)}, "
            f"{tuple(w2_shape)} make a ({s * l}, {k * p}) matrix"
        )
    dev = dense.device
    A = dense.to(_compute_dtype(dense.dtype))
    # slice[a, v][e, j] = M[e·l + v, a·p + j]
    slices = A.reshape(s, l, k, p).permute(2, 1, 0, 3)  # (k, l, s, p)
    U, S, Vh = torch.linalg.svd(slices, full_matrices=False)  # (k,l,s,m) (k,l,m) (k,l,m,p)
    m = S.shape[-1]

    # Every middle channel t = a·q + c = u·l + v belongs to slice (a, v); within it
    # the channels are c ≡ c0 (mod l) with c0 < l, so t is that slice's (c div l)-th.
    t = torch.arange(k * q, device=dev)
    a, c = t // q, t % q
    u, v = t // l, t % l
    i = c // l
    kept = i < m
    i = i.clamp(max=m - 1)
    root = S[a, v, i].sqrt() * kept  # (N,)
    w1 = (Vh[a, v, i, :] * root[:, None]).reshape(k, q, p)
    w2_rows = U[a, v, :, i] * root[:, None]  # (N, s): the column w2[v, :, u]
    w2 = torch.zeros(l, r, s, dtype=A.dtype, device=dev)
    w2[v, u] = w2_rows
    w2 = w2.transpose(1, 2)

    count = slice_channel_counts(k, q, l, device=dev).clamp(max=m)  # (k, l)
    dropped = torch.arange(m, device=dev) >= count[..., None]  # (k, l, m)
    discarded = (S.square() * dropped).sum()
    return w1.to(dense.dtype).contiguous(), w2.to(dense.dtype).contiguous(), discarded


def project(
    weight: torch.Tensor,
    nblocks: int = 4,
    rank: int | None = None,
    *,
    refine_steps: int = 0,
    refine_tol: float = 1e-7,
) -> Projection:
    """Nearest Monarch layer factors to a dense ``(out, in)`` weight, in Frobenius norm.

    Shapes follow :func:`monarch_shape`.  The result is the proven optimum, one
    truncated SVD per slice, for every size.  When ``nblocks`` does not divide a
    size the layer pads its input and cuts its output, so the padded rows and
    columns of the Monarch matrix are free; but they are whole rows and whole
    columns of each slice, and the best rank-ρ fit of a matrix with free rows and
    columns is the truncated SVD of its fixed part — exactly what projecting the
    zero-padded matrix computes (``docs/math.md``).  The optional refinement
    (fill the free entries with the current approximation, re-project; the
    error never increases) therefore starts at its fixed point and stops after
    one round; it is kept as an executable check of that argument.

    Args:
        weight: dense ``(out_features, in_features)`` matrix, real or complex, finite.
        nblocks: blocks per factor; ``1 <= nblocks <= min(in, out)``.
        rank: channels per slice (see :func:`monarch_shape`); ``None`` for the default.
        refine_steps: refinement rounds for padded shapes (default none: see above).
        refine_tol: stop refining once an error improves by less than this, relatively.

    Returns:
        A :class:`Projection` ``(w1, w2, error, relative_error)``; ``w1``, ``w2`` have
        ``weight``'s dtype and device.

    >>> W = torch.randn(12, 8, dtype=torch.float64)
    >>> w1, w2, err, rel = project(W, nblocks=2)
    >>> bool(torch.isclose(err, (W - monarch_to_dense(w1, w2)).norm()))
    True
    """
    _check_dense(weight)
    if refine_steps < 0:
        raise ValueError(f"refine_steps={refine_steps} must be >= 0")
    out_f, in_f = weight.shape
    shape = monarch_shape(in_f, out_f, nblocks, rank)
    target = weight.to(_compute_dtype(weight.dtype))
    pad_in, pad_out = shape.padded_in - in_f, shape.padded_out - out_f
    padded = F.pad(target, (0, pad_in, 0, pad_out))

    def error_of(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return (target - monarch_to_dense(w1, w2)[:out_f, :in_f]).norm()

    w1, w2, _ = project_factors(padded, shape.w1_shape, shape.w2_shape)
    err = error_of(w1, w2)
    if pad_in or pad_out:
        for _ in range(refine_steps):
            filled = monarch_to_dense(w1, w2)
            filled[:out_f, :in_f] = target
            n1, n2, _ = project_factors(filled, shape.w1_shape, shape.w2_shape)
            new_err = error_of(n1, n2)
            if new_err > err:  # cannot happen in exact arithmetic; guard against rounding
                break
            improved = err - new_err
            w1, w2, err = n1, n2, new_err
            if improved <= refine_tol * err:
                break
    norm = target.norm()
    rel = err / norm if norm > 0 else torch.zeros_like(err)
    return Projection(
        w1.to(weight.dtype).contiguous(), w2.to(weight.dtype).contiguous(), err, rel
    )
