"""factor_mm_star: recover the factors of M₁·M₂* and refuse the cases it cannot handle."""

from __future__ import annotations

import pytest
import torch

from monarch_matrices.nn import MonarchProduct
from monarch_matrices.ops import factor_mm_star, mm_star_factors, product_to_dense

F64, C128 = torch.float64, torch.complex128


def _random_mm_star(b: int, dtype: torch.dtype) -> torch.Tensor:
    w1a, w2a, w1b, w2b = (torch.randn(b, b, b, dtype=dtype) for _ in range(4))
    return product_to_dense(mm_star_factors(w1a, w2a, w1b, w2b))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("dtype", [F64, C128])
@pytest.mark.parametrize("b", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_products_are_recovered(b, dtype, seed):
    torch.manual_seed(seed)
    m = _random_mm_star(b, dtype)
    product = factor_mm_star(m, nblocks=b)
    assert product.degree == 2 and product.in_index is None and product.out_index is None
    assert product.dtype == dtype  # real products get real factors
    (ones, k), (r, l) = product.factors
    assert ones.shape == (b * b, 1, 1) and k.shape == r.shape == l.shape == (b, b, b)
    assert _rel(product.to_dense(), m) < 1e-8


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F64, C128])
def test_large_random_product(dtype):
    m = _random_mm_star(32, dtype)  # n = 1024
    assert _rel(factor_mm_star(m, nblocks=32).to_dense(), m) < 1e-8


def test_factors_are_not_the_originals_but_reproduce_m():
    # The documented ambiguity: permutation and diagonal scalings are free.
    w = [torch.randn(4, 4, 4, dtype=F64) for _ in range(4)]
    original = mm_star_factors(*w)
    m = product_to_dense(original)
    recovered = factor_mm_star(m, nblocks=4)
    assert not torch.allclose(recovered.factors[1][1], original[1][1])
    assert _rel(recovered.to_dense(), m) < 1e-10
    # rescaling one block column of K and the matching R entries leaves M unchanged
    (ones, k), (r, l) = recovered.factors
    scale = torch.rand(4, dtype=F64) + 0.5
    k2 = k.clone()
    k2[1] = scale[:, None] * k[1]
    r2 = r.clone()
    r2[:, :, 1] = r[:, :, 1] / scale[:, None]  # R[j][i, 1] = Δ_{i1}[j] absorbs 1/scale[j]
    torch.testing.assert_close(product_to_dense([(ones, k2), (r2, l)]), m)


def test_real_circulant_needs_complex_factors():
    n, b = 16, 4
    kernel = torch.randn(n, dtype=F64)
    idx = (torch.arange(n)[:, None] - torch.arange(n)[None, :]) % n
    m = kernel[idx]  # C[i, j] = k[(i - j) mod n]
    product = factor_mm_star(m, nblocks=b)
    assert product.dtype == C128
    assert _rel(product.to_dense(), m.to(C128)) < 1e-10


def test_float32_input_gives_float32_factors():
    m = _random_mm_star(4, F64).float()
    product = factor_mm_star(m, nblocks=4)
    assert product.dtype == torch.float32
    assert _rel(product.to_dense().double(), m.double()) < 1e-4


def test_result_wraps_into_a_trainable_module():
    m = _random_mm_star(3, F64)
    module = MonarchProduct.from_factors(factor_mm_star(m, nblocks=3))
    assert _rel(module.to_dense().detach(), m) < 1e-8
    module.to_dense().abs().sum().backward()
    assert all(p.grad is not None for p in module.parameters())


def test_input_requiring_grad_is_treated_as_constant():
    m = _random_mm_star(3, F64).requires_grad_()
    product = factor_mm_star(m, nblocks=3)
    assert not any(w.requires_grad for f in product.factors for w in f)


@pytest.mark.parametrize(
    ("m", "nblocks", "error", "match"),
    [
        (torch.randn(12, 12), 3, ValueError, "perfect square"),
        (torch.randn(16, 16), 2, ValueError, "use nblocks=4"),
        (torch.randn(16, 16), 0, ValueError, "nblocks=0"),
        (torch.randn(16, 16), 4.0, TypeError, "nblocks must be an int"),
        (torch.randn(16, 8), 4, ValueError, "square 2-D"),
        (torch.arange(16).reshape(4, 4), 2, TypeError, "floating or complex"),
        ([[1.0]], 1, TypeError, "torch.Tensor"),
        (torch.full((4, 4), float("nan")), 2, ValueError, "NaN"),
    ],
)
def test_bad_arguments_are_named(m, nblocks, error, match):
    with pytest.raises(error, match=match):
        factor_mm_star(m, nblocks)


def test_singular_blocks_are_reported():
    # The identity is M·I* but every off-diagonal block of Q·I·Q is zero.
    with pytest.raises(ValueError, match="singular"):
        factor_mm_star(torch.eye(16, dtype=F64), nblocks=4)


def test_matrix_outside_mm_star_is_reported():
    with pytest.raises(ValueError, match="not \\(numerically\\) in MM\\*"):
        factor_mm_star(torch.randn(16, 16, dtype=F64), nblocks=4)


def test_degenerate_diagonal_factor_is_reported():
    # R[j][i, i'] independent of j: every Δ_{ii'} is a multiple of I, so the block
    # system says nothing about L_0 (repeated eigenvalues).
    b = 4
    r = torch.randn(b, b, dtype=F64).expand(b, b, b).clone()
    k, l = torch.randn(b, b, b, dtype=F64), torch.randn(b, b, b, dtype=F64)
    m = product_to_dense([(torch.ones(b * b, 1, 1, dtype=F64), k), (r, l)])
    with pytest.raises(ValueError, match="repeated eigenvalues"):
        factor_mm_star(m, nblocks=b)


def test_sweeps_argument():
    m = _random_mm_star(4, F64)
    assert _rel(factor_mm_star(m, 4, sweeps=0).to_dense(), m) < 1e-6
    with pytest.raises(ValueError, match="sweeps"):
        factor_mm_star(m, 4, sweeps=-1)
