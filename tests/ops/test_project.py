"""The closed-form projection: exact recovery, the slice-SVD error, and no optimizer beats it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monarch_matrices.ops import (
    monarch_shape,
    monarch_to_dense,
    project,
    project_blockdiag,
    project_factors,
    slice_channel_counts,
)

F64 = torch.float64
# (out, in, nblocks, rank): square √n, paper-style b=4, rectangular both ways,
# sizes nblocks does not divide, and explicit ranks.
LAYER_CASES = [
    (16, 16, 4, 1),
    (36, 36, 6, 1),
    (16, 16, 4, None),
    (24, 12, 4, None),
    (12, 24, 4, None),
    (13, 7, 3, None),
    (7, 13, 3, None),
    (10, 10, 4, None),
    (30, 20, 5, 2),
    (9, 14, 2, 3),
]


def _random_monarch(out_f, in_f, nblocks, rank, dtype=F64):
    shape = monarch_shape(in_f, out_f, nblocks, rank)
    w1 = torch.randn(shape.w1_shape, dtype=dtype)
    w2 = torch.randn(shape.w2_shape, dtype=dtype)
    return monarch_to_dense(w1, w2)[:out_f, :in_f]


def _slice_svd_error(weight, nblocks, rank):
    """Optimal error computed independently: zero-pad, cut each slice out, SVD, drop the tail."""
    out_f, in_f = weight.shape
    shape = monarch_shape(in_f, out_f, nblocks, rank)
    (k, q, p), (l, s, _) = shape.w1_shape, shape.w2_shape
    T = F.pad(weight, (0, shape.padded_in - in_f, 0, shape.padded_out - out_f))
    total = 0.0
    for a in range(k):
        for v in range(l):
            block = T[v::l, a * p : (a + 1) * p]  # rows e·l + v, columns a·p + j
            assert block.shape == (s, p)
            channels = sum(1 for t in range(k * q) if t // q == a and t % l == v)
            sigma = torch.linalg.svdvals(block)
            total += float(sigma[channels:].square().sum())
    return total**0.5


@pytest.mark.parametrize(("out_f", "in_f", "nblocks", "rank"), LAYER_CASES)
def test_recovers_a_monarch_matrix(out_f, in_f, nblocks, rank):
    M = _random_monarch(out_f, in_f, nblocks, rank)
    result = project(M, nblocks, rank)
    assert result.relative_error < 1e-10
    dense = monarch_to_dense(result.w1, result.w2)[:out_f, :in_f]
    assert (dense - M).norm() / M.norm() < 1e-10


def test_recovers_a_complex_monarch_matrix():
    shape = monarch_shape(12, 12, 3)
    w1 = torch.randn(shape.w1_shape, dtype=torch.complex128)
    w2 = torch.randn(shape.w2_shape, dtype=torch.complex128)
    M = monarch_to_dense(w1, w2)
    result = project(M, 3)
    assert result.w1.dtype == torch.complex128
    assert result.relative_error < 1e-10


@pytest.mark.parametrize(("out_f", "in_f", "nblocks", "rank"), LAYER_CASES)
def test_error_is_root_sum_square_of_discarded_singular_values(out_f, in_f, nblocks, rank):
    W = torch.randn(out_f, in_f, dtype=F64)
    result = project(W, nblocks, rank)
    achieved = (W - monarch_to_dense(result.w1, result.w2)[:out_f, :in_f]).norm()
    expected = _slice_svd_error(W, nblocks, rank)
    assert float(result.error) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert float(achieved) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert float(result.relative_error) == pytest.approx(expected / float(W.norm()), rel=1e-10)


def _adam_error(W, nblocks, rank, seed, steps=2000):
    out_f, in_f = W.shape
    shape = monarch_shape(in_f, out_f, nblocks, rank)
    g = torch.Generator().manual_seed(seed)
    w1 = (0.5 * torch.randn(shape.w1_shape, generator=g, dtype=F64)).requires_grad_()
    w2 = (0.5 * torch.randn(shape.w2_shape, generator=g, dtype=F64)).requires_grad_()
    opt = torch.optim.Adam([w1, w2], lr=2e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        loss = (W - monarch_to_dense(w1, w2)[:out_f, :in_f]).square().sum()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return float((W - monarch_to_dense(w1, w2)[:out_f, :in_f]).norm())


@pytest.mark.parametrize(
    ("out_f", "in_f", "nblocks", "rank"),
    [(16, 16, 4, 1), (12, 24, 4, None), (24, 12, 4, None), (13, 7, 3, None)],
)
def test_no_adam_run_beats_the_projection(out_f, in_f, nblocks, rank):
    W = torch.randn(out_f, in_f, dtype=F64)
    optimum = float(project(W, nblocks, rank).error)
    adam = [_adam_error(W, nblocks, rank, seed) for seed in range(3)]
    assert min(adam) >= optimum * (1 - 1e-6)
    # and the optimizer gets close, so the comparison is meaningful
    assert min(adam) <= optimum * 1.5


@pytest.mark.parametrize(("out_f", "in_f", "nblocks"), [(13, 7, 3), (7, 13, 3), (10, 10, 4)])
def test_refinement_never_increases_the_error(out_f, in_f, nblocks):
    W = torch.randn(out_f, in_f, dtype=F64)
    padded = project(W, nblocks, refine_steps=0)
    refined = project(W, nblocks, refine_steps=10)
    assert refined.error <= padded.error
    # the zero-padded projection is already optimal (docs/math.md): a fixed point
    assert float(refined.error) == pytest.approx(float(padded.error), rel=1e-12)


def test_project_factors_matches_layer_projection_when_divisible():
    W = torch.randn(16, 8, dtype=F64)
    shape = monarch_shape(8, 16, 4)
    w1, w2, discarded = project_factors(W, shape.w1_shape, shape.w2_shape)
    result = project(W, 4)
    torch.testing.assert_close(monarch_to_dense(w1, w2), monarch_to_dense(result.w1, result.w2))
    assert float(discarded.sqrt()) == pytest.approx(float(result.error), rel=1e-10)


def test_singular_values_split_evenly():
    W = torch.randn(16, 16, dtype=F64)
    result = project(W, 4, rank=1)
    # rank-1 slices: each w1 row and its w2 column carry √σ each, so equal norms
    shape = monarch_shape(16, 16, 4, 1)
    (k, q, _), (l, _, _) = shape.w1_shape, shape.w2_shape
    row_norms = result.w1.reshape(k * q, -1).norm(dim=1)
    t = torch.arange(k * q)
    col_norms = result.w2[t % l, :, t // l].norm(dim=1)
    torch.testing.assert_close(row_norms, col_norms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_keeps_dtype_and_computes_in_float64(dtype):
    W = torch.randn(24, 16).to(dtype)
    result = project(W, 4)
    assert result.w1.dtype == dtype and result.w2.dtype == dtype
    exact = project(W.to(F64), 4)
    assert float(result.error) == pytest.approx(float(exact.error), rel=1e-9)


def test_slice_channel_counts_by_brute_force():
    for k, q, l in [(4, 4, 4), (3, 5, 5), (2, 6, 4), (5, 3, 3), (4, 8, 8)]:
        counts = torch.zeros(k, l, dtype=torch.long)
        for t in range(k * q):
            counts[t // q, t % l] += 1
        assert torch.equal(slice_channel_counts(k, q, l), counts)


def test_blockdiag_projection_keeps_diagonal_blocks():
    W = torch.randn(10, 7, dtype=F64)
    result = project_blockdiag(W, 3)
    assert result.w.shape == (3, 4, 3)
    P = F.pad(W, (0, 2, 0, 2))
    for i in range(3):
        torch.testing.assert_close(result.w[i], P[4 * i : 4 * i + 4, 3 * i : 3 * i + 3])
    mask = torch.block_diag(*[torch.ones(4, 3)] * 3)[:10, :7].bool()
    assert float(result.error) == pytest.approx(float(W[~mask].norm()), rel=1e-12)


@pytest.mark.parametrize(
    ("weight", "kwargs", "exc", "match"),
    [
        (torch.randn(8), {}, ValueError, "2-D"),
        (torch.randn(2, 8, 8), {}, ValueError, "2-D"),
        (torch.full((8, 8), float("nan")), {}, ValueError, "NaN"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), {"nblocks": 1}, ValueError, "NaN/inf"),
        (torch.randn(8, 8), {"nblocks": 0}, ValueError, "nblocks=0"),
        (torch.randn(8, 3), {"nblocks": 5}, ValueError, "does not fit in_features=3"),
        (torch.randn(2, 8), {"nblocks": 4}, ValueError, "does not fit out_features=2"),
        (torch.randn(8, 8), {"nblocks": 2, "rank": 5}, ValueError, "rank=5"),
        (torch.randn(8, 8), {"nblocks": 2.0}, TypeError, "nblocks must be an int"),
        (torch.ones(8, 8, dtype=torch.long), {}, TypeError, "floating"),
        ([[1.0]], {}, TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(weight, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        project(weight, **kwargs)
