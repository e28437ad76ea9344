"""fit_lowrank: the best rank-r completion of a Monarch approximation, plain and calibrated."""

from __future__ import annotations

import pytest
import torch

from monarch_matrices.ops import calibration_error, fit_lowrank, monarch_to_dense, project

F64 = torch.float64


def _case(out_f: int = 30, in_f: int = 22, tokens: int = 150, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=gen, dtype=F64)
    P = project(W, 4)
    M = monarch_to_dense(P.w1, P.w2)[:out_f, :in_f]
    scale = torch.logspace(-1, 1, in_f, dtype=F64)
    X = torch.randn(in_f, tokens, generator=gen, dtype=F64) * scale[:, None]
    return W, M, X


def _damped(W, N, C, lam, cross=None, target_gram=None):
    """f_λ(N) = ‖W X_t − N X‖² + λ‖W − N‖², straight from the definition."""
    return calibration_error(W, N, C, cross, target_gram) ** 2 + lam * ((W - N) ** 2).sum()


def test_frobenius_fit_is_the_truncated_svd_of_the_residual():
    W, M, _ = _case()
    fit = fit_lowrank(W, M, 5)
    assert fit.a.shape == (5, 22) and fit.b.shape == (30, 5)
    s = torch.linalg.svdvals(W - M)
    assert torch.allclose(fit.singular_values, s)
    err = (W - M - fit.b @ fit.a).norm()
    assert torch.isclose(err, s[5:].norm(), rtol=1e-9)  # Eckart–Young
    assert torch.allclose(fit.a.norm(dim=1), fit.b.norm(dim=0))  # balanced factors


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_calibrated_fit_is_optimal_on_the_damped_objective(damping):
    W, M, X = _case()
    C = X @ X.T
    lam = damping * float(C.diagonal().mean())
    fit = fit_lowrank(W, M, 4, C, damping=damping)
    best = _damped(W, M + fit.b @ fit.a, C, lam)
    assert best < _damped(W, M, C, lam)
    frob = fit_lowrank(W, M, 4)  # the Frobenius term is worse on the inputs
    assert best < _damped(W, M + frob.b @ frob.a, C, lam)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):  # no nearby rank-4 term does better
        a = fit.a + 1e-3 * torch.randn(fit.a.shape, generator=gen, dtype=F64)
        b = fit.b + 1e-3 * torch.randn(fit.b.shape, generator=gen, dtype=F64)
        assert _damped(W, M + b @ a, C, lam) >= best
    # the remaining error is the singular-value tail of the weighted residual
    assert torch.isclose(best.sqrt(), fit.singular_values[4:].norm(), rtol=1e-8)


def test_calibrated_fit_with_other_targets_matches_the_definition():
    W, M, X = _case(seed=1)
    Xt = X + 0.3 * torch.randn(X.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    C, K, T = X @ X.T, Xt @ X.T, Xt @ Xt.T
    lam = 0.01 * float(C.diagonal().mean())
    fit = fit_lowrank(W, M, 3, C, cross=K, damping=0.01)
    best = _damped(W, M + fit.b @ fit.a, C, lam, K, T)
    assert best < _damped(W, M, C, lam, K, T)
    same = fit_lowrank(W, M, 3, C, damping=0.01)  # fitted as if X_t were X: worse here
    assert best < _damped(W, M + same.b @ same.a, C, lam, K, T)


def test_calibrated_fit_with_targets_given_directly():
    W, M, X = _case(seed=3)
    gen = torch.Generator().manual_seed(4)
    Xt = X + 0.3 * torch.randn(X.shape, generator=gen, dtype=F64)
    C = X @ X.T
    via_inputs = fit_lowrank(W, M, 3, C, cross=Xt @ X.T)
    direct = fit_lowrank(W, M, 3, C, target_cross=W @ Xt @ X.T)
    torch.testing.assert_close(direct.b @ direct.a, via_inputs.b @ via_inputs.a)
    Y = W @ Xt + 0.5 * torch.randn(W.shape[0], X.shape[1], generator=gen, dtype=F64)
    fit = fit_lowrank(W, M, 3, C, target_cross=Y @ X.T, damping=0.0)
    N = M + fit.b @ fit.a
    for other in (M, M + via_inputs.b @ via_inputs.a):  # the best term for Y, at damping 0
        assert (Y - N @ X).norm() < (Y - other @ X).norm()
    with pytest.raises(ValueError, match="not both"):
        fit_lowrank(W, M, 3, C, cross=C, target_cross=W @ C)
    with pytest.raises(ValueError, match=r"target_cross has shape"):
        fit_lowrank(W, M, 3, C, target_cross=C)
    with pytest.raises(ValueError, match=r"^cross has shape .*X_t Xᵀ"):
        fit_lowrank(W, M, 3, C, cross=W @ C)
    with pytest.raises(ValueError, match=r"^cross has NaN/inf"):
        fit_lowrank(W, M, 3, C, cross=C * float("nan"))


def test_singular_gram_needs_damping_and_full_rank_recovers_exactly():
    W, M, X = _case(tokens=5)  # 5 tokens, 22 inputs: C has rank 5
    C = X @ X.T
    with pytest.raises(ValueError, match="positive definite after damping"):
        fit_lowrank(W, M, 2, C, damping=0.0)
    fit = fit_lowrank(W, M, 2, C, damping=1e-3)
    assert torch.isfinite(fit.a).all() and torch.isfinite(fit.b).all()
    full = fit_lowrank(W, M, 22, X @ X.T + torch.eye(22, dtype=F64))
    assert torch.allclose(M + full.b @ full.a, W, atol=1e-9)


def test_dtype_and_bad_input():
    W, M, X = _case()
    fit = fit_lowrank(W.float(), M.float(), 3, (X @ X.T).float())
    assert fit.a.dtype == fit.b.dtype == torch.float32
    with pytest.raises(ValueError, match="rank=0"):
        fit_lowrank(W, M, 0)
    with pytest.raises(ValueError, match="rank=23"):
        fit_lowrank(W, M, 23)
    with pytest.raises(ValueError, match="same"):
        fit_lowrank(W, M[:, :-1], 3)
    with pytest.raises(ValueError, match=r"\(22, 22\)"):
        fit_lowrank(W, M, 3, torch.eye(21, dtype=F64))
    with pytest.raises(ValueError, match="cross needs gram"):
        fit_lowrank(W, M, 3, cross=torch.eye(22, dtype=F64))
    bad = (X @ X.T).clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_lowrank(W, M, 3, bad)


def test_an_all_zero_gram_falls_back_to_the_frobenius_fit():
    W, M, _ = _case()
    zero = torch.zeros(W.shape[1], W.shape[1], dtype=F64)
    fit, plain = fit_lowrank(W, M, 3, zero), fit_lowrank(W, M, 3)
    assert torch.allclose(fit.b @ fit.a, plain.b @ plain.a)
