"""Calibrated projection: the Monarch matrix that is nearest on the inputs a layer sees.

:func:`~monarch_matrices.ops.project` minimizes ``‖W − M‖_F``, which treats every
input direction alike.  A trained layer's inputs are far from isotropic, so the
error that matters is ``‖(W − M) X‖_F`` over its real input activations ``X``
(one column per token).  That objective is a quadratic form in ``W − M``,

    f(M) = tr((W − M) C (W − M)ᵀ),        C = X Xᵀ  (in × in),

so the solver needs only the input Gram matrix ``C``: its memory does not grow
with the number of calibration tokens.  ``docs/math.md`` §6 derives the steps.

Method (alternating least squares that exploits the structure; with the padded
layer sizes, ``M = B·H``, ``H`` = blockdiag(w1), ``B`` = w2 with its stride):

- damping: ``C_λ = C + λ·I`` with ``λ = damping · mean(diag C)``.  Minimizing
  ``f_λ(M) = f(M) + λ‖W − M‖²`` handles rank-deficient ``C`` (fewer tokens than
  inputs, dead features), and since the Frobenius projection ``P`` minimizes the
  second term, any ``M`` with ``f_λ(M) ≤ f_λ(P)`` also has ``f(M) ≤ f(P)``:
  calibration never does worse than projection on the calibration data.
- start: the better (on ``f_λ``) of ``P`` and the *block-whitened* projection,
  which is exact when ``C`` is block-diagonal over the input blocks: with
  ``C_λ[a, a] = L_a L_aᵀ``, project ``W·blockdiag(L_a)`` and map ``w1[a]`` back
  through ``L_a⁻¹``.
- w2 step (exact): for fixed w1 the middle activation ``h = H x`` is fixed and
  output row ``e·l + v`` depends only on ``w2[v, e, :]`` through the channels
  ``t = u·l + v``, so the problem splits into ``l`` independent least-squares
  problems with an ``r × r`` normal matrix ``(H C_λ Hᵀ)`` restricted to those
  channels: ``w2[v] = (W C_λ Hᵀ)_v · (H C_λ Hᵀ)_v⁻¹``.
- w1 step: for fixed w2 the normal equations couple the input blocks through
  ``BᵀB`` and ``C_λ``; a few preconditioned conjugate-gradient iterations
  (preconditioner: the exactly invertible block-diagonal part
  ``(BᵀB)[a, a] ⊗ C_λ[a, a]``) solve them, warm-started from the current w1.

Each step cannot increase ``f_λ`` (an exact minimization, and CG iterates that
decrease the quadratic they minimize), so the error falls monotonically.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .multiply import monarch_to_dense
from .project import _check_dense, project_factors
from .shapes import monarch_shape

__all__ = ["CalibratedProjection", "calibration_error", "check_gram", "project_calibrated"]


class CalibratedProjection(NamedTuple):
    """Result of :func:`project_calibrated`.

    Errors are on the calibration objective ``‖(W − M) X‖_F = √tr(E C Eᵀ)``
    (undamped, 0-d float64 tensors; ``‖W X_t − M X‖`` or ``‖Y − M X‖`` when the
    targets are given); the relative ones divide by ``‖W X‖_F`` (``‖W X_t‖``,
    ``‖Y‖``).
    ``projection_*`` are the same for the Frobenius projection the solver
    starts from, so ``relative_error <= projection_relative_error`` always.
    ``history`` is the damped objective ``f_λ / tr(W C_λ Wᵀ)`` at the start and
    after each round (non-increasing).
    """

    w1: torch.Tensor
    w2: torch.Tensor
    error: torch.Tensor
    relative_error: torch.Tensor
    projection_error: torch.Tensor
    projection_relative_error: torch.Tensor
    history: tuple[float, ...]


def check_gram(gram: torch.Tensor, in_features: int, name: str = "gram") -> None:
    """Raise a clear error unless ``gram`` could be ``X Xᵀ`` for a layer with ``in_features``.

    Checks shape, dtype, finiteness, symmetry and a non-negative diagonal here;
    :func:`project_calibrated` also checks positive semi-definiteness with a
    Cholesky factorization of the damped matrix.
    """
    if not isinstance(gram, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(gram).__name__}")
    if tuple(gram.shape) != (in_features, in_features):
        raise ValueError(
            f"{name} has shape {tuple(gram.shape)} but the weight has in_features={in_features}; "
            f"{name} must be ({in_features}, {in_features}) = X Xᵀ over the layer's inputs"
        )
    if not gram.is_floating_point():
        raise TypeError(f"{name} must be a real floating tensor, got {gram.dtype}")
    if not bool(torch.isfinite(gram).all()):
        bad = int((~torch.isfinite(gram)).sum())
        raise ValueError(f"{name} has {bad} NaN/inf entries (did an activation overflow?)")
    g = gram.double()
    scale = float(g.abs().max()) if g.numel() else 0.0
    asym = float((g - g.T).abs().max()) if g.numel() else 0.0
    if asym > 1e-6 * max(scale, 1e-300):
        raise ValueError(
            f"{name} is not symmetric (max |C - Cᵀ| = {asym:.3g} against max |C| = {scale:.3g}); "
            "a Gram matrix X Xᵀ always is"
        )
    if bool((g.diagonal() < -1e-9 * max(scale, 1e-300)).any()):
        raise ValueError(f"{name} has a negative diagonal entry, so it is not positive "
                         "semi-definite; a Gram matrix X Xᵀ always is")


def check_cross(
    cross: torch.Tensor, rows: int, cols: int, name: str = "target_cross", meaning: str = "Y Xᵀ"
) -> None:
    """Raise a clear error unless ``cross`` is a finite ``(rows, cols)`` tensor: a
    product of targets and inputs, ``Y Xᵀ`` (``target_cross``) or ``X_t Xᵀ`` (``cross``)."""
    if not isinstance(cross, torch.Tensor) or tuple(cross.shape) != (rows, cols):
        shape = tuple(cross.shape) if isinstance(cross, torch.Tensor) else type(cross).__name__
        raise ValueError(f"{name} has shape {shape}; it must be ({rows}, {cols}) = {meaning}")
    if not bool(torch.isfinite(cross).all()):
        raise ValueError(f"{name} has NaN/inf entries (did an activation overflow?)")


def calibration_error(
    weight: torch.Tensor,
    dense: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor | None = None,
    target_gram: torch.Tensor | None = None,
    *,
    target_cross: torch.Tensor | None = None,
    target_sq: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``‖W X − M X‖_F`` from the Gram matrix ``C = X Xᵀ``: ``√tr(E C Eᵀ)``, ``E = W − M``.

    With ``cross = X_t Xᵀ`` and ``target_gram = X_t X_tᵀ`` it is ``‖W X_t − M X‖_F``
    instead: the targets come from other inputs ``X_t`` (the dense model's).  With
    ``target_cross = Y Xᵀ`` and ``target_sq = ‖Y‖_F²`` it is ``‖Y − M X‖_F`` for any
    targets ``Y``.  ``weight`` and ``dense`` are ``(out, in)``; computed in float64.
    """
    w, m, c = weight.double(), dense.double(), gram.double()
    if target_cross is not None:
        sq = torch.as_tensor(target_sq, dtype=torch.float64, device=m.device)
        sq = sq - 2 * (target_cross.double() * m).sum()
    elif cross is None:
        e = w - m
        return ((e @ c) * e).sum().clamp(min=0).sqrt()
    else:
        sq = ((w @ target_gram.double()) * w).sum() - 2 * ((w @ cross.double()) * m).sum()
    return (sq + ((m @ c) * m).sum()).clamp(min=0).sqrt()


class _Problem:
    """Padded float64 data of one calibrated projection, and its structured products."""

    def __init__(
        self,
        weight: torch.Tensor,
        gram: torch.Tensor,
        shape,
        lam: float,
        targets: tuple[torch.Tensor, float] | None = None,
    ) -> None:
        self.k, self.q, self.p = shape.w1_shape
        self.l, self.s, self.r = shape.w2_shape
        self.n_in, self.n_out = shape.padded_in, shape.padded_out
        self.mid = self.k * self.q
        out_f, in_f = weight.shape
        pad_in, pad_out = self.n_in - in_f, self.n_out - out_f
        w = weight.double()
        c = gram.double()
        c = 0.5 * (c + c.T)
        self.W = F.pad(w, (0, pad_in, 0, pad_out))
        # C_λ on the padded inputs; the padded inputs are always zero, so only the
        # damping acts there (it pulls their unused w1 columns towards zero).
        self.C = F.pad(c, (0, pad_in, 0, pad_in))
        self.C.diagonal().add_(lam)
        # K: the linear term, f_λ = const − 2⟨M, K⟩ + tr(M C_λ Mᵀ).  K = W C_λ when the
        # targets are W X on the same inputs, else Y Xᵀ + λW for targets Y
        # (``targets`` = (Y Xᵀ, ‖Y‖²)); the constant is ‖Y‖² + λ‖W‖².
        if targets is None:
            self.K = self.W @ self.C  # (n_out, n_in), fixed
            self.wcw = float((self.K * self.W).sum())  # tr(W C_λ Wᵀ)
        else:
            yx, y_sq = targets
            self.K = F.pad(yx.double(), (0, pad_in, 0, pad_out)) + lam * self.W
            self.wcw = float(y_sq) + lam * float((self.W * self.W).sum())
        _, info = torch.linalg.cholesky_ex(self.C)  # the one O(n³) step: is C PSD?
        if int(info) > 0:
            raise ValueError(
                "gram is not positive semi-definite (it has a negative eigenvalue beyond the "
                "damping); a Gram matrix X Xᵀ always is: was it summed from mismatched inputs?"
            )
        # the diagonal blocks C_λ[a, a] and their Cholesky factors (preconditioner, whitening)
        blocks = self.C.view(self.k, self.p, self.k, self.p).diagonal(dim1=0, dim2=2)
        self.C_blocks = blocks.permute(2, 0, 1).contiguous()  # (k, p, p)
        self.L = torch.linalg.cholesky(self.C_blocks)

    # --- structured products -------------------------------------------------------
    def h_times_c(self, w1: torch.Tensor) -> torch.Tensor:
        """``H C_λ``: (mid, n_in)."""
        rows = self.C.view(self.k, self.p, self.n_in)
        return torch.bmm(w1, rows).reshape(self.mid, self.n_in)

    def mid_gram(self, w1: torch.Tensor) -> torch.Tensor:
        """``G = H C_λ Hᵀ``: the Gram matrix of the middle activation, (mid, mid)."""
        hc = self.h_times_c(w1).view(self.mid, self.k, self.p)
        return torch.einsum("tap,acp->tac", hc, w1).reshape(self.mid, self.mid)

    def cross(self, w1: torch.Tensor) -> torch.Tensor:
        """``W C_λ Hᵀ``: (n_out, mid)."""
        wc = self.K.view(self.n_out, self.k, self.p)
        return torch.einsum("oap,acp->oac", wc, w1).reshape(self.n_out, self.mid)

    def per_block(self, g: torch.Tensor) -> torch.Tensor:
        """The ``(l, r, r)`` blocks ``g[u·l + v, u'·l + v]`` of a (mid, mid) matrix."""
        return g.view(self.r, self.l, self.r, self.l).diagonal(dim1=1, dim2=3).permute(2, 0, 1)

    def rows_per_block(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(l, s, r)`` entries ``x[e·l + v, u·l + v]`` of an (n_out, mid) matrix."""
        return x.view(self.s, self.l, self.r, self.l).diagonal(dim1=1, dim2=3).permute(2, 0, 1)

    def objective(self, w2: torch.Tensor, g: torch.Tensor, cross: torch.Tensor) -> float:
        """``f_λ = tr(W C Wᵀ) − 2⟨B, W C Hᵀ⟩ + ⟨BᵀB, H C Hᵀ⟩`` from precomputed pieces."""
        q = torch.bmm(w2.transpose(1, 2), w2)  # (l, r, r): BᵀB restricted to each v
        fit = (q * self.per_block(g)).sum()
        lin = (w2 * self.rows_per_block(cross)).sum()
        return float(self.wcw - 2 * lin + fit)

    # --- the two steps ---------------------------------------------------------------
    def solve_w2(self, g: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        """Exact minimizer over w2 for fixed w1: ``l`` independent r×r normal equations."""
        gv = self.per_block(g)  # (l, r, r)
        rhs = self.rows_per_block(cross)  # (l, s, r)
        # A channel with an all-zero w1 row has a zero row in G; a tiny ridge keeps
        # the solve defined there (its w2 column then goes to zero).
        ridge = 1e-12 * gv.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-300)
        gv = gv + ridge[:, None, None] * torch.eye(self.r, dtype=gv.dtype, device=gv.device)
        chol, info = torch.linalg.cholesky_ex(gv)
        if bool((info > 0).any()):
            return torch.linalg.lstsq(gv, rhs.transpose(1, 2)).solution.transpose(1, 2)
        return torch.cholesky_solve(rhs.transpose(1, 2), chol).transpose(1, 2)

    def _bt(self, x: torch.Tensor) -> torch.Tensor:
        """``Bᵀ x`` for an (n_out, n) matrix: (mid, n)."""
        n = x.shape[1]
        xv = x.view(self.s, self.l, n).permute(1, 0, 2)  # (l, s, n)
        return torch.bmm(self.w2.transpose(1, 2), xv).permute(1, 0, 2).reshape(self.mid, n)

    def _diag_blocks(self, z: torch.Tensor) -> torch.Tensor:
        """The (k, q, p) diagonal blocks ``z[a·q + c, a·p + j]`` of a (mid, n_in) matrix."""
        return z.view(self.k, self.q, self.k, self.p).diagonal(dim1=0, dim2=2).permute(2, 0, 1)

    def _normal_op(self, w1: torch.Tensor) -> torch.Tensor:
        """``w1 ↦ diag-blocks(BᵀB · H C_λ)``: the w1 normal operator (SPD on w1's space)."""
        hc = self.h_times_c(w1).view(self.r, self.l, self.n_in).permute(1, 0, 2)  # (l, r, n)
        z = torch.bmm(self.btb, hc).permute(1, 0, 2).reshape(self.mid, self.n_in)
        return self._diag_blocks(z)

    def solve_w1(self, w1: torch.Tensor, w2: torch.Tensor, iters: int) -> torch.Tensor:
        """A few block-Jacobi-preconditioned CG steps on the w1 normal equations."""
        self.w2 = w2
        self.btb = torch.bmm(w2.transpose(1, 2), w2)  # (l, r, r)
        full = torch.zeros(self.r, self.l, self.r, self.l, dtype=w2.dtype, device=w2.device)
        full.diagonal(dim1=1, dim2=3).copy_(self.btb.permute(1, 2, 0))
        q_blocks = full.view(self.k, self.q, self.k, self.q).diagonal(dim1=0, dim2=2)
        q_blocks = q_blocks.permute(2, 0, 1)  # (k, q, q): (BᵀB)[a, a]
        ridge = 1e-10 * q_blocks.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-300)
        eye = torch.eye(self.q, dtype=w2.dtype, device=w2.device)
        q_chol, info = torch.linalg.cholesky_ex(q_blocks + ridge[:, None, None] * eye)
        if bool((info > 0).any()):  # cannot happen for a Gram matrix plus a ridge; be safe
            q_chol = torch.linalg.cholesky(q_blocks + (ridge[:, None, None] + 1e-8) * eye)

        def precondition(res: torch.Tensor) -> torch.Tensor:
            y = torch.cholesky_solve(res, q_chol)  # (BᵀB)[a,a]⁻¹ R
            y = torch.cholesky_solve(y.transpose(1, 2), self.L).transpose(1, 2)  # · C[a,a]⁻¹
            return y

        b = self._diag_blocks(self._bt(self.K))
        x = w1.clone()
        res = b - self._normal_op(x)
        z = precondition(res)
        d = z.clone()
        rz = (res * z).sum()
        for _ in range(iters):
            ad = self._normal_op(d)
            dad = (d * ad).sum()
            if not bool(dad > 0) or not bool(rz > 0):
                break
            alpha = rz / dad
            x.add_(alpha * d)
            res.sub_(alpha * ad)
            z = precondition(res)
            rz_new = (res * z).sum()
            d = z + (rz_new / rz) * d
            rz = rz_new
        return x

    # --- starting points ------------------------------------------------------------
    def whitened_starts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Optima of ``f_λ`` with C_λ's off-diagonal blocks dropped.

        With ``C_λ[a, a] = L_a L_aᵀ``, ``f_λ`` is then ``Σ_a ‖M_a L_a − K_a L_a⁻ᵀ‖²`` plus a
        constant: a Frobenius projection of ``K_a L_a⁻ᵀ``, mapped back through ``L_a⁻¹``.
        ``W_a L_a`` (which equals ``K_a L_a⁻ᵀ`` when ``C_λ`` is block-diagonal) is the
        other candidate; the caller keeps whichever is better.
        """
        kv = self.K.view(self.n_out, self.k, self.p).permute(1, 2, 0)  # (k, p, n_out)
        k_white = torch.linalg.solve_triangular(self.L, kv, upper=False)  # L_a⁻¹ K_aᵀ
        w_white = torch.einsum("oap,apj->oaj", self.W.view(self.n_out, self.k, self.p), self.L)
        starts = []
        for target in (w_white.reshape(self.n_out, self.n_in),
                       k_white.permute(2, 0, 1).reshape(self.n_out, self.n_in)):
            w1, w2, _ = project_factors(target, (self.k, self.q, self.p),
                                        (self.l, self.s, self.r))
            # w1[a] ← w1'[a] L_a⁻¹, i.e. solve  L_aᵀ w1[a]ᵀ = w1'[a]ᵀ
            w1 = torch.linalg.solve_triangular(self.L.transpose(1, 2), w1.transpose(1, 2),
                                               upper=True).transpose(1, 2)
            starts.append((w1, w2))
        return starts


def project_calibrated(
    weight: torch.Tensor,
    gram: torch.Tensor,
    nblocks: int = 4,
    rank: int | None = None,
    *,
    steps: int = 10,
    damping: float = 0.01,
    cg_steps: int = 8,
    tol: float = 1e-5,
    cross: torch.Tensor | None = None,
    target_gram: torch.Tensor | None = None,
    target_cross: torch.Tensor | None = None,
    target_sq: float | torch.Tensor | None = None,
) -> CalibratedProjection:
    """Monarch factors minimizing ``‖(W − M) X‖_F`` given ``gram = X Xᵀ``.

    Starts from the Frobenius projection (:func:`~monarch_matrices.ops.project`) and
    its block-whitened variant, then alternates an exact w2 step with a few
    preconditioned CG steps for w1 (see the module docstring and ``docs/math.md``).
    Deterministic: no random numbers are drawn.

    Args:
        weight: dense ``(out_features, in_features)`` real matrix, finite.
        gram: ``(in_features, in_features)`` positive semi-definite ``X Xᵀ`` summed
            over the calibration inputs (any scale: only its shape matters).
        nblocks, rank: as for :func:`~monarch_matrices.ops.monarch_shape`.
        steps: alternating rounds (each one w2 solve and ``cg_steps`` CG steps);
            0 returns the best starting point.
        damping: ``λ / mean(diag C)``; makes a rank-deficient ``gram`` well posed,
            and a large value pulls the result towards the Frobenius projection.
        cg_steps: CG iterations per w1 step.
        tol: stop once a round improves the damped objective by less than this, relatively.
        cross, target_gram: ``X_t Xᵀ`` and ``X_t X_tᵀ`` when the targets are ``W X_t`` for
            other inputs ``X_t`` than the ones the Monarch layer sees (``gram = X Xᵀ``):
            in a partially converted model, ``X_t`` are the dense model's activations, and
            fitting ``‖W X_t − M X‖`` also corrects the drift of the layers before.
        target_cross, target_sq: ``Y Xᵀ`` (``(out, in)``) and ``‖Y‖_F²`` to fit
            ``‖Y − M X‖`` for targets ``Y`` of any origin, e.g. the dense output plus
            the drift of a residual stream the layer's output is added to.  The
            damping still pulls towards ``W``, and "never worse" is against ``W``'s
            projection on this objective.  Not together with ``cross``.

    Returns:
        A :class:`CalibratedProjection`; ``w1``, ``w2`` have ``weight``'s dtype and device.

    >>> W, X = torch.randn(16, 12, dtype=torch.float64), torch.randn(12, 40, dtype=torch.float64)
    >>> res = project_calibrated(W, X @ X.T, nblocks=2)
    >>> bool(res.relative_error <= res.projection_relative_error)
    True
    """
    _check_dense(weight)
    if weight.is_complex():
        raise TypeError("project_calibrated supports real weights only, got a complex weight")
    out_f, in_f = weight.shape
    check_gram(gram, in_f)
    if (cross is None) != (target_gram is None):
        raise ValueError("give cross and target_gram together (or neither)")
    if cross is not None:
        check_gram(target_gram, in_f, "target_gram")
        check_cross(cross, in_f, in_f, "cross", "X_t Xᵀ")
        cross = cross.to(device=weight.device, dtype=torch.float64)
        target_gram = target_gram.to(device=weight.device, dtype=torch.float64)
    if (target_cross is None) != (target_sq is None):
        raise ValueError("give target_cross and target_sq together (or neither)")
    if target_cross is not None:
        if cross is not None:
            raise ValueError("give either cross/target_gram (targets W X_t) or "
                             "target_cross/target_sq (targets Y), not both")
        check_cross(target_cross, out_f, in_f)
        target_cross = target_cross.to(device=weight.device, dtype=torch.float64)
        target_sq = float(target_sq)
        if not 0 <= target_sq < float("inf"):
            raise ValueError(f"target_sq={target_sq!r} must be a finite number >= 0 = ‖Y‖²")
    for name, value in (("steps", steps), ("cg_steps", cg_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be an int >= 0")
    if not (damping >= 0 and damping == damping and damping != float("inf")):
        raise ValueError(f"damping={damping!r} must be a finite number >= 0")
    shape = monarch_shape(in_f, out_f, nblocks, rank)
    dev = weight.device
    gram = gram.to(device=dev, dtype=torch.float64)
    w64 = weight.double()

    padded = F.pad(w64, (0, shape.padded_in - in_f, 0, shape.padded_out - out_f))
    p1, p2, _ = project_factors(padded, shape.w1_shape, shape.w2_shape)

    def crop(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return monarch_to_dense(w1, w2)[:out_f, :in_f]

    def error_of(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return calibration_error(w64, crop(w1, w2), gram, cross, target_gram,
                                 target_cross=target_cross, target_sq=target_sq)

    p_err = error_of(p1, p2)
    if target_cross is not None:
        target = torch.tensor(target_sq, dtype=torch.float64, device=dev).sqrt()  # ‖Y‖
    else:
        ref = gram if target_gram is None else target_gram
        target = ((w64 @ ref) * w64).sum().clamp(min=0).sqrt()  # ‖W X_t‖

    def rel(e: torch.Tensor) -> torch.Tensor:
        return e / target if target > 0 else torch.zeros_like(e)

    def result(w1, w2, err, history) -> CalibratedProjection:
        return CalibratedProjection(
            w1.to(weight.dtype).contiguous(), w2.to(weight.dtype).contiguous(),
            err, rel(err), p_err, rel(p_err), tuple(history),
        )

    mean_diag = float(gram.diagonal().mean()) if in_f else 0.0
    if mean_diag <= 0:  # no signal at all: every M is equally good, keep the projection
        return result(p1, p2, p_err, [])
    # A floor keeps the solves defined at damping=0 (C may be exactly singular).
    lam = max(damping, 1e-9) * mean_diag
    if target_cross is not None:
        targets = (target_cross, target_sq)
    elif cross is not None:  # Y = W X_t: Y Xᵀ = W (X_t Xᵀ), ‖Y‖² = tr(W X_t X_tᵀ Wᵀ)
        targets = (w64 @ cross, float(((w64 @ target_gram) * w64).sum()))
    else:
        targets = None
    prob = _Problem(weight, gram, shape, lam, targets)

    # Best start on f_λ: the Frobenius projection, or the block-whitened one.
    scale = prob.wcw if prob.wcw > 0 else 1.0
    best = None
    for w1, w2 in ((p1, p2), *prob.whitened_starts()):
        g, cr = prob.mid_gram(w1), prob.cross(w1)
        f = prob.objective(w2, g, cr)
        if best is None or f < best[0]:
            best = (f, w1, w2, g, cr)
    f, w1, w2, g, cr = best
    history = [f / scale]
    for _ in range(steps):
        w2 = prob.solve_w2(g, cr)
        w1 = prob.solve_w1(w1, w2, cg_steps)
        g, cr = prob.mid_gram(w1), prob.cross(w1)
        f_new = prob.objective(w2, g, cr)
        history.append(f_new / scale)
        improved = f - f_new
        f = f_new
        if improved <= tol * abs(f):
            break
    err = error_of(w1, w2)
    if err > p_err:  # only rounding (or padded rows of P) can cause this; never return worse
        w1, w2, err = p1, p2, p_err
    return result(w1, w2, err, history)
