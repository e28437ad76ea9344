"""The calibrated projection: never worse than projection, exact where it can be, robust."""

from __future__ import annotations

import pytest
import torch

from monarch_matrices.ops import (
    calibration_error,
    monarch_shape,
    monarch_to_dense,
    project,
    project_calibrated,
)

F64 = torch.float64


def _data(out_f: int, in_f: int, tokens: int, seed: int = 0):
    """A weight and correlated, anisotropic inputs (like a trained layer's)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=gen, dtype=F64)
    scale = torch.logspace(-1, 1, in_f, dtype=F64)[torch.randperm(in_f, generator=gen)]
    X = torch.randn(in_f, tokens, generator=gen, dtype=F64) * scale[:, None]
    X = X + 0.5 * X.mean(0, keepdim=True)  # a shared component couples the input blocks
    return W, X


def _dense(res, out_f: int, in_f: int) -> torch.Tensor:
    return monarch_to_dense(res.w1, res.w2)[:out_f, :in_f]


@pytest.mark.parametrize(
    "out_f, in_f, nblocks, rank",
    [(32, 24, 4, None), (24, 32, 4, None), (30, 22, 4, None), (40, 40, 2, 3), (48, 16, 4, 1)],
)
def test_never_worse_than_projection_and_errors_are_what_they_say(out_f, in_f, nblocks, rank):
    W, X = _data(out_f, in_f, 200)
    C = X @ X.T
    res = project_calibrated(W, C, nblocks, rank, steps=15)
    shape = monarch_shape(in_f, out_f, nblocks, rank)
    assert res.w1.shape == shape.w1_shape and res.w2.shape == shape.w2_shape
    M = _dense(res, out_f, in_f)
    direct = ((W - M) @ X).norm()
    assert torch.isclose(res.error, direct, rtol=1e-9)
    assert torch.isclose(res.relative_error, direct / (W @ X).norm(), rtol=1e-9)
    P = project(W, nblocks, rank)
    assert torch.isclose(res.projection_error, ((W - monarch_to_dense(P.w1, P.w2)[:out_f, :in_f])
                                                @ X).norm(), rtol=1e-9)
    assert res.relative_error <= res.projection_relative_error
    assert res.relative_error < 0.95 * res.projection_relative_error  # and clearly better
    # the damped objective never rises from round to round
    assert all(b <= a * (1 + 1e-10) for a, b in zip(res.history, res.history[1:]))


def test_steps_zero_is_the_best_start_and_more_steps_help():
    W, X = _data(32, 32, 300, seed=1)
    C = X @ X.T
    errors = [float(project_calibrated(W, C, 4, steps=s, tol=0).relative_error)
              for s in (0, 2, 10)]
    assert errors[0] >= errors[1] >= errors[2]


def test_exact_recovery_when_the_weight_is_already_monarch():
    gen = torch.Generator().manual_seed(2)
    w1 = torch.randn(4, 8, 8, generator=gen, dtype=F64)
    w2 = torch.randn(4, 8, 8, generator=gen, dtype=F64)
    W = monarch_to_dense(w1, w2)
    _, X = _data(32, 32, 100, seed=3)
    res = project_calibrated(W, X @ X.T, 4)
    assert res.relative_error < 1e-10
    assert torch.allclose(_dense(res, 32, 32), W, atol=1e-9)


def test_isotropic_inputs_reduce_to_the_frobenius_projection():
    W, _ = _data(24, 16, 1)
    P = project(W, 4)
    res = project_calibrated(W, torch.eye(16, dtype=F64) * 7.0, 4)
    assert torch.isclose(res.error, P.error * 7.0**0.5, rtol=1e-8)


def test_singular_gram_fewer_tokens_than_inputs_and_dead_features():
    W, X = _data(32, 48, 10)  # rank 10 of 48
    X[5] = 0  # a feature that never fires
    C = X @ X.T
    for damping in (0.0, 1e-3, 0.1):
        res = project_calibrated(W, C, 4, damping=damping)
        assert torch.isfinite(res.w1).all() and torch.isfinite(res.w2).all()
        assert res.relative_error <= res.projection_relative_error
    # with damping the unseen directions stay near the projection instead of drifting:
    damped = project_calibrated(W, C, 4, damping=0.1)
    P = project(W, 4)
    assert (_dense(damped, 32, 48) - W).norm() < 2 * P.error


def test_zero_gram_keeps_the_projection():
    W, _ = _data(16, 16, 1)
    res = project_calibrated(W, torch.zeros(16, 16, dtype=F64), 4)
    P = project(W, 4)
    assert torch.equal(res.w1, P.w1) and res.error == 0


def test_deterministic():
    W, X = _data(32, 24, 80, seed=5)
    a = project_calibrated(W, X @ X.T, 4)
    b = project_calibrated(W, X @ X.T, 4)
    assert torch.equal(a.w1, b.w1) and torch.equal(a.w2, b.w2)


def test_float32_weight_gives_float32_factors():
    W, X = _data(16, 16, 50)
    res = project_calibrated(W.float(), (X @ X.T).float(), 4)
    assert res.w1.dtype == torch.float32 and res.error.dtype == F64


def test_targets_from_other_inputs_correct_the_drift():
    W, X = _data(32, 32, 400, seed=6)
    gen = torch.Generator().manual_seed(7)
    X_t = X + 0.3 * torch.randn(X.shape, generator=gen, dtype=F64)  # the dense model's inputs
    cross, target = X_t @ X.T, X_t @ X_t.T
    res = project_calibrated(W, X @ X.T, 4, cross=cross, target_gram=target)
    M = _dense(res, 32, 32)
    assert torch.isclose(res.error, (W @ X_t - M @ X).norm(), rtol=1e-9)
    plain = project_calibrated(W, X @ X.T, 4)
    assert res.error < calibration_error(W, _dense(plain, 32, 32), X @ X.T, cross, target)
    assert res.relative_error <= res.projection_relative_error


@pytest.mark.parametrize("out_f, in_f", [(30, 21), (21, 30)])  # padded unequally
def test_targets_given_directly_match_the_definition_and_the_other_inputs_form(out_f, in_f):
    W, X = _data(out_f, in_f, 300, seed=8)
    gen = torch.Generator().manual_seed(9)
    X_t = X + 0.3 * torch.randn(X.shape, generator=gen, dtype=F64)
    # Y = W X_t written both ways gives the same fit
    via_inputs = project_calibrated(W, X @ X.T, 4, cross=X_t @ X.T, target_gram=X_t @ X_t.T)
    Y = W @ X_t
    direct = project_calibrated(W, X @ X.T, 4, target_cross=Y @ X.T, target_sq=(Y * Y).sum())
    torch.testing.assert_close(_dense(direct, out_f, in_f), _dense(via_inputs, out_f, in_f),
                               rtol=1e-7, atol=1e-9)
    # any Y (a residual stream's drift added): error is ‖Y − M X‖, never worse than W's projection
    drift = 0.3 * torch.randn(out_f, in_f, generator=gen, dtype=F64)  # predictable from X
    Y = Y + drift @ X + 0.5 * torch.randn(Y.shape, generator=gen, dtype=F64)
    res = project_calibrated(W, X @ X.T, 4, target_cross=Y @ X.T, target_sq=(Y * Y).sum())
    M = _dense(res, out_f, in_f)
    assert torch.isclose(res.error, (Y - M @ X).norm(), rtol=1e-9)
    assert torch.isclose(res.relative_error, res.error / Y.norm(), rtol=1e-12)
    P = _dense(project(W, 4), out_f, in_f)
    assert torch.isclose(res.projection_error, (Y - P @ X).norm(), rtol=1e-9)
    assert res.error < res.projection_error
    # the fit follows Y, not W: plain calibration is worse on this objective
    plain = _dense(project_calibrated(W, X @ X.T, 4), out_f, in_f)
    assert res.error < (Y - plain @ X).norm()


def test_targets_that_a_monarch_matrix_reaches_are_recovered():
    W, X = _data(32, 32, 400, seed=10)
    P = project(W, 4)
    M0 = _dense(P, 32, 32)
    Y = M0 @ X  # reachable targets; damping towards W = M0 does not pull away
    res = project_calibrated(M0, X @ X.T, 4, steps=0, target_cross=Y @ X.T,
                             target_sq=(Y * Y).sum())
    assert res.relative_error < 1e-9


@pytest.mark.parametrize(
    "gram, error, match",
    [
        (torch.eye(15, dtype=F64), ValueError, r"shape \(15, 15\).*in_features=16"),
        (torch.full((16, 16), float("nan"), dtype=F64), ValueError, "NaN"),
        (torch.triu(torch.ones(16, 16, dtype=F64)), ValueError, "not symmetric"),
        (-torch.eye(16, dtype=F64), ValueError, "positive semi-definite"),
        (torch.diag(torch.tensor([1.0, -1.0] * 8, dtype=F64)) + 0, ValueError,
         "positive semi-definite"),
        (torch.eye(16, dtype=torch.int64), TypeError, "floating"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_grams_are_refused_clearly(gram, error, match):
    W, _ = _data(16, 16, 1)
    with pytest.raises(error, match=match):
        project_calibrated(W, gram, 4)


def test_indefinite_off_diagonal_gram_is_refused():
    # diagonal blocks fine, but the whole matrix is indefinite
    C = torch.eye(16, dtype=F64)
    C[0, 8] = C[8, 0] = 3.0
    W, _ = _data(16, 16, 1)
    with pytest.raises(ValueError, match="positive semi-definite"):
        project_calibrated(W, C, 4, damping=0.0)


def test_bad_arguments():
    W, X = _data(16, 16, 20)
    C = X @ X.T
    with pytest.raises(ValueError, match="steps"):
        project_calibrated(W, C, 4, steps=-1)
    with pytest.raises(ValueError, match="damping"):
        project_calibrated(W, C, 4, damping=float("nan"))
    with pytest.raises(ValueError, match="together"):
        project_calibrated(W, C, 4, cross=C)
    with pytest.raises(TypeError, match="real"):
        project_calibrated(W.to(torch.complex128), C, 4)
    with pytest.raises(ValueError, match="target_cross and target_sq together"):
        project_calibrated(W, C, 4, target_cross=W @ C)
    with pytest.raises(ValueError, match="not both"):
        project_calibrated(W, C, 4, cross=C, target_gram=C, target_cross=W @ C, target_sq=1.0)
    with pytest.raises(ValueError, match=r"target_cross has shape \(16, 15\).*\(16, 16\)"):
        project_calibrated(W, C, 4, target_cross=W[:, 1:], target_sq=1.0)
    with pytest.raises(ValueError, match="finite"):
        project_calibrated(W, C, 4, target_cross=W @ C, target_sq=float("nan"))
    with pytest.raises(ValueError, match=r"cross has shape \(16, 15\).*X_t Xᵀ"):
        project_calibrated(W, C, 4, cross=C[:, 1:], target_gram=C)
    with pytest.raises(ValueError, match="target_cross has NaN/inf"):
        project_calibrated(W, C, 4, target_cross=(W @ C) * float("nan"), target_sq=1.0)
    with pytest.raises(ValueError, match=r"^cross has NaN/inf"):
        project_calibrated(W, C, 4, cross=C * float("inf"), target_gram=C)
