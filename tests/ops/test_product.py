"""Monarch products: multiply and dense form against explicit dense chains, gradients, M*."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.formula import dense_by_formula, factor_shapes

from monarch_matrices.ops import (
    ProductFactors,
    adjoint_factors,
    check_product,
    mm_star_factors,
    monarch_to_dense,
    product_multiply,
    product_to_dense,
    product_to_dense_reference,
)

F64, C128 = torch.float64, torch.complex128


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def chains(draw, max_degree: int = 3):
    """Shapes of 1..max_degree chained factors with awkward (rectangular, k ≠ l) blocks."""
    width = draw(st.integers(1, 12))
    shapes = []
    for _ in range(draw(st.integers(1, max_degree))):
        k = draw(st.sampled_from(_divisors(width)))
        q = draw(st.integers(1, 4))
        l = draw(st.sampled_from(_divisors(k * q)))
        s = draw(st.integers(1, 4))
        shapes.append(((k, q, width // k), (l, s, k * q // l)))
        width = s * l
    return shapes


def _make(shapes, dtype=F64, requires_grad=False):
    return [
        (
            torch.randn(*s1, dtype=dtype, requires_grad=requires_grad),
            torch.randn(*s2, dtype=dtype, requires_grad=requires_grad),
        )
        for s1, s2 in shapes
    ]


def _dense_chain(factors):
    """The product written with the index-convention formula of tests/formula.py."""
    m = None
    for w1, w2 in factors:
        d = dense_by_formula(w1, w2)
        m = d if m is None else d @ m
    return m


@settings(max_examples=40, deadline=None)
@given(shapes=chains(), dtype=st.sampled_from([F64, C128]), batch=st.integers(0, 3))
def test_multiply_and_dense_match_formula_chain(shapes, dtype, batch):
    factors = _make(shapes, dtype)
    m = _dense_chain(factors)
    n_in = m.shape[1]
    x = torch.randn(batch, n_in, dtype=dtype)
    torch.testing.assert_close(product_multiply(x, factors), x @ m.T)
    torch.testing.assert_close(product_to_dense(factors), m)
    torch.testing.assert_close(product_to_dense_reference(factors), m)


@settings(max_examples=30, deadline=None)
@given(shapes=chains(), data=st.data())
def test_index_maps_gather_pad_and_crop(shapes, data):
    factors = _make(shapes)
    m = _dense_chain(factors)
    n_first, n_last = m.shape[1], m.shape[0]
    n_in = data.draw(st.integers(1, 8))
    in_index = torch.tensor(
        data.draw(st.lists(st.integers(-1, n_in - 1), min_size=n_first, max_size=n_first))
    )
    out_index = torch.tensor(
        data.draw(st.lists(st.integers(0, n_last - 1), max_size=6)), dtype=torch.int64
    )
    x = torch.randn(3, n_in, dtype=F64)
    padded = torch.cat([x, torch.zeros(3, 1, dtype=F64)], 1)
    xs = padded[:, torch.where(in_index < 0, n_in, in_index)]
    expected = (xs @ m.T)[:, out_index]
    torch.testing.assert_close(product_multiply(x, factors, in_index, out_index), expected)
    dense = product_to_dense(factors, in_index, out_index, in_features=n_in)
    torch.testing.assert_close(x @ dense.T, expected)
    ref = product_to_dense_reference(factors, in_index, out_index, in_features=n_in)
    torch.testing.assert_close(ref, dense)


@pytest.mark.parametrize("dtype", [F64, C128])
def test_gradcheck_through_factors_input_and_index_maps(dtype):
    shapes = [((2, 3, 3), (3, 2, 2)), ((3, 2, 2), (2, 4, 3)), ((1, 8, 8), (4, 1, 2))]
    factors = _make(shapes, dtype, requires_grad=True)
    in_index = torch.tensor([4, 0, -1, 1, 2, 3])
    out_index = torch.tensor([3, 0, 0, 1])
    x = torch.randn(2, 5, dtype=dtype, requires_grad=True)
    flat = [w for f in factors for w in f]

    def fn(x, *ws):
        pairs = list(zip(ws[0::2], ws[1::2]))
        return product_multiply(x, pairs, in_index, out_index)

    assert torch.autograd.gradcheck(fn, (x, *flat))


def test_real_input_is_promoted_to_complex_factors():
    factors = _make([((2, 2, 2), (2, 2, 2))], C128)
    x = torch.randn(3, 4, dtype=F64)
    y = product_multiply(x, factors)
    assert y.dtype == C128
    torch.testing.assert_close(y, x.to(C128) @ product_to_dense(factors).T)


def test_zero_size_and_unbatched_inputs():
    factors = _make([((2, 3, 2), (3, 2, 2))])
    assert product_multiply(torch.randn(0, 4, dtype=F64), factors).shape == (0, 6)
    assert product_multiply(torch.randn(4, dtype=F64), factors).shape == (6,)


@settings(max_examples=30, deadline=None)
@given(shapes=factor_shapes())
def test_adjoint_factors_give_the_conjugate_transpose(shapes):
    (k, q, p), (l, s, r) = shapes
    w1, w2 = torch.randn(k, q, p, dtype=C128), torch.randn(l, s, r, dtype=C128)
    adj = adjoint_factors(w1, w2)
    torch.testing.assert_close(product_to_dense(adj), monarch_to_dense(w1, w2).mH)


@settings(max_examples=30, deadline=None)
@given(b=factor_shapes(), data=st.data())
def test_mm_star_factors_merge_into_two_factors(b, data):
    (kb, qb, pb), (lb, sb, rb) = b
    # M_a shares M_b's input blocks (k, p), so the middle block-diagonals merge
    qa = data.draw(st.integers(1, 4))
    la = data.draw(st.sampled_from(_divisors(kb * qa)))
    sa = data.draw(st.integers(1, 4))
    wa = torch.randn(kb, qa, pb, dtype=C128), torch.randn(la, sa, kb * qa // la, dtype=C128)
    wb = torch.randn(kb, qb, pb, dtype=C128), torch.randn(lb, sb, rb, dtype=C128)
    product = mm_star_factors(*wa, *wb)
    assert len(product) == 2
    expected = monarch_to_dense(*wa) @ monarch_to_dense(*wb).mH
    torch.testing.assert_close(product_to_dense(product), expected)


def test_mm_star_with_different_block_structure_keeps_three_factors():
    wa = torch.randn(2, 3, 6), torch.randn(3, 4, 2)
    wb = torch.randn(3, 2, 4), torch.randn(2, 5, 3)
    product = mm_star_factors(*wa, *wb)
    assert len(product) == 3
    expected = monarch_to_dense(*wa) @ monarch_to_dense(*wb).mH
    torch.testing.assert_close(product_to_dense(product), expected)


def test_product_factors_value():
    factors = _make([((2, 2, 3), (2, 2, 2)), ((2, 2, 2), (4, 3, 1))])
    in_index = torch.tensor([0, 1, 2, 3, -1, -1])
    pf = ProductFactors(factors, in_index, torch.tensor([2, 0]))
    assert (pf.in_features, pf.out_features, pf.degree) == (4, 2, 2)
    assert pf.num_params == 12 + 8 + 8 + 12
    x = torch.randn(5, 4, dtype=F64)
    torch.testing.assert_close(pf.multiply(x), x @ pf.to_dense().T)
    assert ProductFactors(factors, in_index, in_features=7).in_features == 7
    with pytest.raises(ValueError, match=r"expects input \(\*, 4\)"):
        pf.multiply(torch.randn(5, 6, dtype=F64))


@pytest.mark.parametrize(
    ("factors", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "at least one factor"),
        (torch.randn(2, 2, 2), {}, TypeError, "sequence of"),
        ([(torch.randn(2, 2, 2),)], {}, TypeError, r"factors\[0\] must be a pair"),
        (
            [
                (torch.randn(2, 2, 2), torch.randn(2, 2, 2)),
                (torch.randn(3, 1, 1), torch.ones(3, 1, 1)),
            ],
            {},
            ValueError,
            "must chain",
        ),
        (
            [(torch.randn(2, 2, 2), torch.randn(2, 2, 2, dtype=F64))],
            {},
            TypeError,
            "share one dtype",
        ),
        (
            [(torch.randn(2, 2, 2), torch.randn(2, 2, 2))],
            {"in_index": torch.arange(3)},
            ValueError,
            "has 3 entries",
        ),
        (
            [(torch.randn(2, 2, 2), torch.randn(2, 2, 2))],
            {"in_index": torch.tensor([0, 1, -2, 0])},
            ValueError,
            ">= -1",
        ),
        (
            [(torch.randn(2, 2, 2), torch.randn(2, 2, 2))],
            {"in_index": torch.arange(4.0)},
            TypeError,
            "int64",
        ),
        (
            [(torch.randn(2, 2, 2), torch.randn(2, 2, 2))],
            {"out_index": torch.tensor([4])},
            ValueError,
            "only 4",
        ),
        (
            [(torch.randn(2, 2, 2), torch.randn(2, 2, 2))],
            {"in_features": 5},
            ValueError,
            "in_features=5",
        ),
    ],
)
def test_check_product_names_the_problem(factors, kwargs, error, match):
    with pytest.raises(error, match=match):
        check_product(factors, **kwargs)


def test_multiply_rejects_bad_input():
    factors = [(torch.randn(2, 2, 2), torch.randn(2, 2, 2))]
    with pytest.raises(ValueError, match="input features"):
        product_multiply(torch.randn(3, 5), factors)
    with pytest.raises(ValueError, match="x has last dim 2"):
        product_multiply(torch.randn(3, 2), factors, in_index=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        product_multiply([1.0, 2.0], factors)
