"""monarch_multiply with a rank-R term: ``x (M + b a)ᵀ``, fused into the chunked kernel.

Two kernels: when the middle block ``q`` is a multiple of ``l`` the term's ``a``
rides in the first GEMM as extra rows of every ``w1`` block ("fused"), else
it is a separate skinny GEMM per chunk.  Both are compared with the float64
formula on every gradient, with chunks forced small so tails are uneven.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from tests.formula import dense_by_formula

from monarch_matrices.ops import monarch_multiply
from monarch_matrices.ops import multiply as multiply_module

F64 = torch.float64
# (w1 shape, w2 shape): q % l == 0 (fused) and q % l != 0 (separate GEMM)
SHAPES = {"fused": ((4, 6, 5), (3, 7, 8)), "separate": ((3, 4, 5), (6, 2, 2))}


def _case(kind: str, dtype=F64, rank: int = 3, tokens=(2, 5), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    (k, q, p), (l, s, r) = SHAPES[kind]

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return (rand(*tokens, k * p), rand(k, q, p), rand(l, s, r), rand(s * l),
            rand(rank, k * p), rand(s * l, rank))


def _reference(x, w1, w2, bias, a, b):
    return x @ (dense_by_formula(w1, w2) + b @ a).T + bias


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(multiply_module, "CHUNK_BYTES", 1)
    monkeypatch.setattr(multiply_module, "MIN_CHUNK", 3)  # 10 tokens: 3 + 3 + 3 + 1


@pytest.mark.parametrize("kind", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [F64, torch.complex128])
@pytest.mark.parametrize("needs", [(1, 1, 1, 1, 1, 1), (1, 0, 0, 0, 0, 0), (0, 0, 0, 0, 1, 0),
                                   (0, 0, 0, 0, 0, 1), (0, 1, 1, 1, 0, 0), (0, 0, 0, 0, 1, 1),
                                   (1, 0, 0, 0, 1, 1)])
def test_values_and_every_gradient_match_the_formula(small_chunks, kind, dtype, needs):
    inputs = [t.requires_grad_(bool(n)) for t, n in zip(_case(kind, dtype), needs)]
    x, w1, w2, bias, a, b = inputs
    y = monarch_multiply(x, w1, w2, bias, lowrank=(a, b))
    ref = _reference(*inputs)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    wanted = [t for t in inputs if t.requires_grad]
    for got, want in zip(torch.autograd.grad(y, wanted, g), torch.autograd.grad(ref, wanted, g)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_gradcheck(small_chunks, kind):
    inputs = [t.requires_grad_(True) for t in _case(kind, tokens=(4,), rank=2)]

    def f(x, w1, w2, bias, a, b):
        return monarch_multiply(x, w1, w2, bias, lowrank=(a, b))

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("kind", sorted(SHAPES))
@pytest.mark.parametrize("tokens", [1, 64, 65, 300])
def test_inference_paths_and_no_bias(monkeypatch, kind, tokens):
    monkeypatch.setattr(multiply_module, "CHUNK_BYTES", 1)
    monkeypatch.setattr(multiply_module, "MIN_CHUNK", 32)
    x, w1, w2, bias, a, b = _case(kind, tokens=(tokens,))
    for bias_ in (bias, None):
        expected = _reference(x, w1, w2, 0 if bias_ is None else bias_, a, b)
        with torch.no_grad():
            torch.testing.assert_close(monarch_multiply(x, w1, w2, bias_, lowrank=(a, b)),
                                       expected)


def test_saves_the_term_not_the_output():
    x, w1, w2, bias, a, b = (t.requires_grad_(True) for t in _case("fused", tokens=(50,)))
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        monarch_multiply(x, w1, w2, bias, lowrank=(a, b))
    middle = 50 * w1.shape[0] * w1.shape[1]
    factors = sum(t.numel() for t in (w1, w2, a, b))
    assert sum(saved) <= x.numel() + middle + factors + 50 * a.shape[0]


def test_autocast_bfloat16_and_dtype_errors():
    x, w1, w2, bias, a, b = (t.float() for t in _case("fused", tokens=(40,)))
    exact = monarch_multiply(x, w1, w2, bias, lowrank=(a, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = monarch_multiply(x, w1, w2, bias, lowrank=(a, b))
    assert y.dtype == torch.bfloat16
    assert (y.float() - exact).norm() / exact.norm() < 3e-2
    with pytest.raises(TypeError, match=r"lowrank is torch\.float64"):
        monarch_multiply(x, w1, w2, bias, lowrank=(a.double(), b.double()))


@pytest.mark.parametrize("lowrank, exc, match", [
    ((torch.zeros(2, 20),), TypeError, "pair of tensors"),
    ("ab", TypeError, "pair of tensors"),
    ((torch.zeros(2, 19), torch.zeros(21, 2)), ValueError, r"\(R, 20\) and \(21, R\)"),
    ((torch.zeros(2, 20), torch.zeros(21, 3)), ValueError, r"\(R, 20\) and \(21, R\)"),
    ((torch.zeros(20), torch.zeros(21, 1)), ValueError, r"\(R, 20\)"),
])
def test_bad_lowrank(lowrank, exc, match):
    x, w1, w2 = torch.randn(3, 20), torch.randn(4, 6, 5), torch.randn(3, 7, 8)
    with pytest.raises(exc, match=match):
        monarch_multiply(x, w1, w2, lowrank=lowrank)


@pytest.mark.parametrize("kind, calls", [("fused", 2), ("separate", 0)])
def test_kernel_choice_follows_the_middle_block(small_chunks, monkeypatch, kind, calls):
    """``a`` joins the first GEMM (forward and backward) exactly when ``l`` divides ``q``."""
    x, w1, w2, bias, a, b = (t.requires_grad_(True) for t in _case(kind))
    real = multiply_module._with_lowrank_rows
    seen = itertools.count()
    monkeypatch.setattr(multiply_module, "_with_lowrank_rows",
                        lambda *args: (next(seen), real(*args))[1])
    monarch_multiply(x, w1, w2, bias, lowrank=(a, b)).sum().backward()
    assert next(seen) == calls
