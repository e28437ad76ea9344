"""The rank-``r`` term that best completes a Monarch approximation: ``W ≈ M + B A``.

A rank-``r`` term ``B A`` reaches directions the block structure cannot, for
``r·(in + out)`` more parameters.  How much of a layer's function it buys
depends on how concentrated the Monarch error is: on all-MiniLM-L6-v2 it is
spread out (rank 8 moves the embedding cosine from 0.75 to 0.76, rank 96 to
0.90; docs/convert.md), while as trainable capacity in fine-tuning even rank 8
helps (docs/results.md).

With ``gram=None`` the term minimizes ``‖W − M − B A‖_F``: the truncated SVD of
the residual.  With a Gram matrix ``C = X Xᵀ`` of the layer's inputs it
minimizes the same damped calibration objective as
:func:`~monarch_matrices.ops.project_calibrated`,

    f_λ(N) = ‖W X_t − N X‖² + λ‖W − N‖²,     N = M + B A,

which is ``‖(T − N) L‖²`` plus a constant, where ``C_λ = C + λI = L Lᵀ`` and
``T = K C_λ⁻¹`` with ``K = W X_t Xᵀ + λW`` (``T = W`` when ``X_t = X``).  So the
optimum is the truncated SVD of ``(T − M) L``, mapped back through ``L⁻¹``;
``docs/math.md`` §7 has the steps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .calibrate import check_cross, check_gram

__all__ = ["LowRankFit", "fit_lowrank"]


class LowRankFit(NamedTuple):
    """Result of :func:`fit_lowrank`: ``B A`` with ``a`` ``(r, in)`` and ``b`` ``(out, r)``.

    The factors are balanced (both carry ``√σ`` of each singular value), so
    neither dwarfs the other when they are trained on.  ``singular_values`` are
    all of the weighted residual's, largest first: their tail beyond ``r`` is
    the error that remains, ``√Σ_{i>r} σ_i²``.
    """

    a: torch.Tensor
    b: torch.Tensor
    singular_values: torch.Tensor


def fit_lowrank(
    weight: torch.Tensor,
    monarch: torch.Tensor,
    rank: int,
    gram: torch.Tensor | None = None,
    *,
    cross: torch.Tensor | None = None,
    target_cross: torch.Tensor | None = None,
    damping: float = 0.01,
) -> LowRankFit:
    """The rank-``rank`` ``B A`` minimizing the error of ``monarch + B A`` against ``weight``.

    Args:
        weight: the dense ``(out, in)`` weight ``W``.
        monarch: the ``(out, in)`` dense form of its Monarch approximation ``M``.
        rank: ``1 <= rank <= min(out, in)``.
        gram: ``X Xᵀ`` over the layer's inputs (``(in, in)``); ``None`` fits in
            Frobenius norm.
        cross: ``X_t Xᵀ`` when the targets are ``W X_t`` on other inputs (the
            dense model's), as in :func:`~monarch_matrices.ops.project_calibrated`.
        target_cross: ``Y Xᵀ`` (``(out, in)``) when the targets are any ``Y``
            (:func:`~monarch_matrices.ops.project_calibrated`'s argument of that
            name); not together with ``cross``.
        damping: ``λ = damping · mean(diag C)`` (with ``gram``).

    Returns:
        :class:`LowRankFit` in ``weight``'s dtype and device (computed in float64).
    """
    if weight.ndim != 2 or monarch.shape != weight.shape:
        raise ValueError(
            f"weight {tuple(weight.shape)} and monarch {tuple(monarch.shape)} must be the same "
            "(out, in) matrix shape"
        )
    out_f, in_f = weight.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(out_f, in_f):
        raise ValueError(f"rank={rank!r} must be an int in [1, {min(out_f, in_f)}] for a "
                         f"{out_f}x{in_f} weight")
    if weight.is_complex():
        raise TypeError("fit_lowrank takes real weights")
    w, m = weight.double(), monarch.double()
    chol = None
    if gram is None:
        if cross is not None or target_cross is not None:
            raise ValueError("cross needs gram (so does target_cross)")
        resid = w - m
    else:
        check_gram(gram, in_f)
        if cross is not None and target_cross is not None:
            raise ValueError("give cross (targets W X_t) or target_cross (targets Y), not both")
        if cross is not None:
            check_cross(cross, in_f, in_f, "cross", "X_t Xᵀ")
            target_cross = w @ cross.double()  # Y = W X_t
        elif target_cross is not None:
            check_cross(target_cross, out_f, in_f)
        chol, resid = _weighted_residual(w, m, gram, target_cross, damping)
    u, s, vh = torch.linalg.svd(resid, full_matrices=False)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    if chol is not None:  # A = √σ V_rᵀ L⁻¹ = (L⁻ᵀ V_r √σ)ᵀ
        a = torch.linalg.solve_triangular(chol.T, a.T, upper=True).T
    return LowRankFit(a.to(weight.dtype), (u[:, :rank] * root).to(weight.dtype),
                      s.to(weight.dtype))


def _weighted_residual(
    w: torch.Tensor,
    m: torch.Tensor,
    gram: torch.Tensor,
    target_cross: torch.Tensor | None,
    damping: float,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(L, (T − M) L)`` with ``C_λ = L Lᵀ``: the damped objective as a Frobenius one.

    ``target_cross`` is ``Y Xᵀ`` for targets ``Y``; ``None`` means ``Y = W X``.
    ``(None, W − M)`` when ``C`` is zero: then the Frobenius fit is as good as any.
    """
    in_f = w.shape[1]
    if not damping >= 0:
        raise ValueError(f"damping={damping!r} must be >= 0")
    c = gram.double()
    if not float(c.diagonal().sum()) > 0:
        # Inputs that are all zero (or constant, once centred): every term is
        # equally good on them, so take the Frobenius one, as project_calibrated does.
        return None, w - m
    c = 0.5 * (c + c.T)
    lam = damping * float(c.diagonal().mean())
    c = c + lam * torch.eye(in_f, dtype=c.dtype, device=c.device)
    chol, info = torch.linalg.cholesky_ex(c)
    if int(info) > 0:
        raise ValueError("gram is not positive definite after damping; give damping > 0 "
                         "(or a Gram matrix X Xᵀ of real inputs)")
    if target_cross is None:
        return chol, (w - m) @ chol  # T = W
    k = target_cross.double() + lam * w  # K; T L = K L⁻ᵀ = (L⁻¹ Kᵀ)ᵀ
    return chol, torch.linalg.solve_triangular(chol, k.T, upper=False).T - m @ chol
