"""The few-token native multiply against the float64 reference, and when it is used."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.formula import factor_shapes

from monarch_matrices.ops import few_tokens, monarch_multiply, monarch_multiply_reference, native

F64 = torch.float64
needs_kernels = pytest.mark.skipif(os.environ.get(native.ENV_SWITCH, "1") == "0",
                                   reason="MONARCH_MATRICES_NATIVE=0")
SHAPES = [
    (4, 48, 48, 4, 192, 48),  # a 768-wide GPT-2 MLP layer, shrunk
    (3, 7, 5, 7, 9, 3),       # nothing a multiple of a vector: every tail path
    (2, 40, 33, 4, 17, 20),   # one whole vector and a tail per row
    (1, 16, 16, 1, 16, 16),   # one block
]


def _inputs(shape, tokens, seed):
    k, q, p, l, s, r = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k * p, generator=gen, dtype=F64)
    w1 = torch.randn(k, q, p, generator=gen, dtype=F64) / p**0.5
    w2 = torch.randn(l, s, r, generator=gen, dtype=F64) / r**0.5
    bias = torch.randn(s * l, generator=gen, dtype=F64)
    grad = torch.randn(tokens, s * l, generator=gen, dtype=F64)
    return x, w1, w2, bias, grad


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).norm() / want.detach().norm())


@needs_kernels
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 7, 8, 9, 16])  # one and two register groups of 8
def test_forward_and_every_gradient_match_float64(dtype, tol, shape, tokens):
    x, w1, w2, bias, grad = _inputs(shape, tokens, seed=tokens)
    # the reference sees the inputs as rounded to dtype, so only the kernel's error counts
    ref = [t.to(dtype).double().requires_grad_() for t in (x, w1, w2, bias)]
    want = monarch_multiply_reference(ref[0], ref[1], ref[2]) + ref[3]
    want.backward(grad.to(dtype).double())
    got = [t.to(dtype).requires_grad_() for t in (x, w1, w2, bias)]
    y = few_tokens.multiply(*got)
    y.backward(grad.to(dtype))
    assert y.dtype == dtype
    assert _relative_error(y, want) < tol
    for g, r in zip(got, ref):
        assert g.grad.dtype == dtype and g.grad.shape == r.shape
        assert _relative_error(g.grad, r.grad) < tol


@needs_kernels
@pytest.mark.parametrize("wanted", [(True, False, False, False), (False, True, False, False),
                                    (False, False, True, True), (True, True, False, False)])
def test_only_the_gradients_asked_for(wanted):
    x, w1, w2, bias, grad = _inputs(SHAPES[2], 3, seed=4)
    tensors = [t.float().requires_grad_(want) for t, want in zip((x, w1, w2, bias), wanted)]
    few_tokens.multiply(*tensors).backward(grad.float())
    ref = [t.double().requires_grad_(want) for t, want in zip((x, w1, w2, bias), wanted)]
    (monarch_multiply_reference(ref[0], ref[1], ref[2]) + ref[3]).backward(grad)
    for t, r, want in zip(tensors, ref, wanted):
        assert (t.grad is not None) == want
        if want:
            assert _relative_error(t.grad, r.grad) < 1e-6


@needs_kernels
def test_without_bias_and_without_autograd():
    x, w1, w2, _, _ = _inputs(SHAPES[0], 4, seed=2)
    want = monarch_multiply_reference(x, w1, w2)
    with torch.no_grad():
        y = few_tokens.multiply(x.float(), w1.float(), w2.float(), None)
    assert not y.requires_grad
    assert _relative_error(y, want) < 1e-6


# (k, q, p, l, s, r) whose rows split over 3 threads (ranges of 40 and 35) start
# mid-block in both stages: 40 % 3, 40 % 30 and 35 % 3 are not 0
ODD_SPLIT = (4, 30, 9, 3, 35, 40)


@needs_kernels
@pytest.mark.parametrize("shape", [SHAPES[0], ODD_SPLIT])
def test_results_do_not_depend_on_the_thread_count(shape):
    """Every sum has one owner and a fixed order: equal bits at 1 and 3 threads, and
    ranges of rows that start inside a block are indexed right."""
    x, w1, w2, bias, grad = _inputs(shape, 8, seed=3)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            got = [t.to(torch.bfloat16).requires_grad_() for t in (x, w1, w2, bias)]
            y = few_tokens.multiply(*got)
            y.backward(grad.to(torch.bfloat16))
            results.append([y.detach(), *(t.grad for t in got)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    ref = [t.to(torch.bfloat16).double() for t in (x, w1, w2, bias)]
    want = monarch_multiply_reference(ref[0], ref[1], ref[2]) + ref[3]
    assert _relative_error(results[1][0], want) < 1e-2


@needs_kernels
def test_monarch_multiply_takes_it_for_few_tokens_only(monkeypatch):
    calls = []
    real = few_tokens.multiply
    monkeypatch.setattr(few_tokens, "multiply", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    x, w1, w2, bias, _ = _inputs(SHAPES[0], 12, seed=5)
    w1f, w2f, bf = (t.float() for t in (w1, w2, bias))
    for tokens in (1, 8, 9, 12):
        xf = x[:tokens].float().requires_grad_()
        y = monarch_multiply(xf, w1f, w2f, bf)
        y.sum().backward()
        want = monarch_multiply_reference(x[:tokens], w1, w2) + bias
        assert _relative_error(y, want) < 1e-6
    assert calls == [1, 8]  # 9 and 12 tokens take the GEMM paths
    calls.clear()
    for dtype, tokens in [(torch.float32, 8), (torch.bfloat16, 4), (torch.bfloat16, 5)]:
        with torch.no_grad():  # inference: bf16 beyond 4 tokens only with AVX512-BF16
            monarch_multiply(x[:tokens].to(dtype), w1.to(dtype), w2.to(dtype))
    assert calls == [8, 4, 5] if native.bf16_dot() else [8, 4]
    assert not few_tokens.applies(x[:2].half(), w1.half(), w2.half())  # fp16: not covered
    assert not few_tokens.applies(x[:2].double(), w1, w2)
    wide = torch.zeros(1, 1024, 16)  # a 1024-wide block: the GEMM paths are faster
    assert not few_tokens.applies(torch.zeros(2, 16), wide, torch.zeros(1, 16, 1024))
    assert not few_tokens.applies(x[:0].float(), w1f, w2f)  # no tokens


@needs_kernels
def test_monarch_multiply_with_few_tokens_under_autocast():
    x, w1, w2, bias, _ = _inputs(SHAPES[0], 3, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = monarch_multiply(x.float(), w1.float(), w2.float(), bias.float())
    assert y.dtype == torch.bfloat16
    assert _relative_error(y, monarch_multiply_reference(x, w1, w2) + bias) < 1e-2


@needs_kernels
def test_kernel_refuses_bad_input():
    kernels = native.kernels()
    x, w1, w2, _, _ = (t.float() for t in _inputs(SHAPES[2], 17, seed=7))
    k, q, p, l, s, r = SHAPES[2]
    y, mid = torch.empty(17, s * l), torch.empty(17, l * r)
    with pytest.raises(RuntimeError, match="N <= 16"):
        kernels.few_tokens_forward_(y, mid, x, w1, w2)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.few_tokens_forward_(y[:2].double(), mid[:2], x[:2].double(), w1.double(),
                                    w2.double())
    with pytest.raises(RuntimeError, match="x's dtype"):
        kernels.few_tokens_forward_(y[:2], mid[:2], x[:2], w1.bfloat16(), w2)
    with pytest.raises(RuntimeError, match="do not fit"):
        kernels.few_tokens_forward_(y[:2], mid[:2], x[:2, :-1].contiguous(), w1, w2)
    with pytest.raises(RuntimeError, match="mid must be"):
        kernels.few_tokens_forward_(y[:2], mid[:1], x[:2], w1, w2)
    with pytest.raises(RuntimeError, match="gw1 must be"):
        kernels.few_tokens_backward_(y[:2], x[:2], w1, w2, mid[:2], gw1=torch.empty(3))


@pytest.mark.parametrize("tokens", [3, 100])  # the few-token kernel and the chunked path
def test_torch_func_transforms_and_forward_ad_see_through_monarch_multiply(tokens):
    """vmap, grad, jvp and forward-mode AD take the plain ops (no native memory reads,
    no custom autograd function that would drop a tangent)."""
    import torch.autograd.forward_ad as fwAD

    x, w1, w2, bias, _ = (t.float() for t in _inputs(SHAPES[2], tokens, seed=8))
    tx = torch.randn_like(x)
    want = monarch_multiply_reference(x.double(), w1.double(), w2.double()) + bias.double()
    want_t = monarch_multiply_reference(tx.double(), w1.double(), w2.double())
    with fwAD.dual_level():
        y = monarch_multiply(fwAD.make_dual(x, tx), w1, w2, bias)
        primal, tangent = fwAD.unpack_dual(y)
    assert tangent is not None
    assert _relative_error(primal, want) < 1e-6 and _relative_error(tangent, want_t) < 1e-6
    _, jvp_out = torch.func.jvp(lambda xx: monarch_multiply(xx, w1, w2, bias), (x,), (tx,))
    assert _relative_error(jvp_out, want_t) < 1e-6
    per_token = torch.func.vmap(lambda xi: monarch_multiply(xi[None], w1, w2, bias)[0])(x)
    assert _relative_error(per_token, want) < 1e-6
    g = torch.func.grad(lambda w: monarch_multiply(x, w, w2, bias).sum())(w1)
    w1r = w1.double().requires_grad_()
    (monarch_multiply_reference(x.double(), w1r, w2.double())).sum().backward()
    assert _relative_error(g, w1r.grad) < 1e-5


def test_negated_views_and_an_empty_middle():
    x, w1, w2, bias, _ = (t.float() for t in _inputs(SHAPES[2], 3, seed=9))
    neg = torch._neg_view(x)  # memory holds x, the view means -x
    assert neg.is_neg()
    want = monarch_multiply_reference(-x.double(), w1.double(), w2.double()) + bias.double()
    assert _relative_error(monarch_multiply(neg, w1, w2, bias), want) < 1e-6
    # k*q = l*r = 0: the output is the bias
    y = monarch_multiply(torch.randn(2, 8), torch.randn(2, 0, 4), torch.randn(1, 3, 0),
                         torch.arange(3.0))
    assert torch.equal(y, torch.arange(3.0).expand(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiles_without_graph_breaks_for_a_few_tokens(dtype):
    """Under Dynamo the kernels are never probed (no loading, no pybind calls traced):
    the few-token multiply compiles as one graph of plain ops."""
    x, w1, w2, bias, _ = (t.to(dtype) for t in _inputs(SHAPES[0], 6, seed=10))
    f = torch.compile(lambda xx: monarch_multiply(xx, w1, w2, bias), backend="eager",
                      fullgraph=True)
    with torch.no_grad():
        got = f(x)
    want = monarch_multiply_reference(x.double(), w1.double(), w2.double()) + bias.double()
    assert _relative_error(got, want) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_meta_tensors_take_the_plain_ops():
    x = torch.empty(3, 4 * 48, device="meta")
    y = monarch_multiply(x, torch.empty(4, 48, 48, device="meta"),
                         torch.empty(4, 192, 48, device="meta"))
    assert y.shape == (3, 768) and y.device.type == "meta"


@settings(max_examples=30, deadline=None)
@given(shapes=factor_shapes(max_block=40, max_blocks=5), tokens=st.integers(1, 10),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), bias=st.booleans(),
       train=st.booleans())
def test_monarch_multiply_around_the_few_token_limit(shapes, tokens, dtype, bias, train):
    """Random awkward shapes, 1-10 tokens (both sides of the limit), either dtype, with
    and without gradients: whichever path takes it, the float64 reference's result."""
    (k, q, p), (l, s, r) = shapes
    gen = torch.Generator().manual_seed(tokens)
    inputs = [torch.randn(tokens, k * p, generator=gen, dtype=F64),
              torch.randn(k, q, p, generator=gen, dtype=F64) / p**0.5,
              torch.randn(l, s, r, generator=gen, dtype=F64) / r**0.5,
              torch.randn(s * l, generator=gen, dtype=F64) if bias else None]
    got = [None if t is None else t.to(dtype).requires_grad_(train) for t in inputs]
    ref = [None if t is None else t.to(dtype).double().requires_grad_(train) for t in inputs]
    y = monarch_multiply(*got)
    want = monarch_multiply_reference(*ref[:3]) + (0 if ref[3] is None else ref[3])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert y.dtype == dtype and _relative_error(y, want) < tol
    if train:
        grad = torch.randn(want.shape, generator=gen, dtype=F64)
        y.backward(grad.to(dtype))
        want.backward(grad.to(dtype).double())
        for g, r_ in zip(got, ref):
            if g is not None:
                assert _relative_error(g.grad, r_.grad) < tol
