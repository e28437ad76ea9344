"""The small-block native multiply against the float64 reference, and when it is used."""

from __future__ import annotations

import os

import pytest
import torch

from monarch_matrices.ops import (
    monarch_multiply,
    monarch_multiply_reference,
    native,
    small_blocks,
    weight_grad,
)

F64 = torch.float64
needs_kernels = pytest.mark.skipif(os.environ.get(native.ENV_SWITCH, "1") == "0",
                                   reason="MONARCH_MATRICES_NATIVE=0")


def _factors(k, q, p, l, s, r, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(k, q, p, generator=gen, dtype=F64) / p**0.5
    w2 = torch.randn(l, s, r, generator=gen, dtype=F64) / r**0.5
    bias = torch.randn(s * l, generator=gen, dtype=F64)
    return w1, w2, bias


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@needs_kernels
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [
    (32, 32, 32, 32, 32, 32),  # the sqrt(n) Monarch of 1024
    (4, 16, 8, 16, 5, 4),      # odd s, r; p narrower than a vector
    (2, 48, 20, 32, 3, 3),     # three vectors of q, two of l
    (1, 16, 3, 16, 7, 1),
])
@pytest.mark.parametrize("tokens", [1, 6, 7, 8, 9, 203])  # tiles of 8 (6 with AVX2), ragged ones
def test_kernel_matches_float64_reference(dtype, tol, shape, tokens):
    k, q, p, l, s, r = shape
    w1, w2, bias = _factors(*shape, seed=tokens)
    x = torch.randn(tokens, k * p, dtype=F64, generator=torch.Generator().manual_seed(1))
    want = monarch_multiply_reference(x, w1, w2) + bias
    for b in (bias, None):
        y = torch.full((tokens, s * l), 7.0, dtype=dtype)
        native.kernels().small_blocks_forward_(
            y, x.to(dtype), w1.float().transpose(1, 2).contiguous(),
            w2.float().permute(1, 2, 0).contiguous(), None if b is None else b.float())
        assert _relative_error(y, want if b is not None else want - bias) < tol


@needs_kernels
def test_kernel_takes_strided_rows_and_keeps_nan():
    w1, w2, bias = _factors(2, 16, 8, 16, 2, 2)
    base = torch.randn(40, 20, dtype=F64)
    x = base[:, 2:18]  # rows 20 apart
    x[3, 5] = float("nan")
    want = monarch_multiply_reference(x, w1, w2) + bias
    for dtype in (torch.float32, torch.bfloat16):
        y = torch.empty(40, 32, dtype=dtype)
        native.kernels().small_blocks_forward_(
            y, x.to(dtype), w1.float().transpose(1, 2).contiguous(),
            w2.float().permute(1, 2, 0).contiguous(), bias.float())
        assert torch.isnan(y[3]).all() and not torch.isnan(y[[0, 4]]).any()
        rows = [i for i in range(40) if i != 3]
        assert _relative_error(y[rows], want[rows]) < 1e-2


@needs_kernels
def test_kernel_refuses_what_it_cannot_do():
    kernels = native.kernels()
    w1t, w2p = torch.randn(2, 8, 16), torch.randn(2, 2, 16)  # k=2 p=8 q=16, s=2 r=2 l=16
    x, y = torch.randn(5, 16), torch.empty(5, 32)
    kernels.small_blocks_forward_(y, x, w1t, w2p)  # fits
    with pytest.raises(RuntimeError, match="multiples of 16"):
        kernels.small_blocks_forward_(y, x, torch.randn(2, 8, 12), torch.randn(2, 2, 12))
    with pytest.raises(RuntimeError, match="must both be float32 or both bfloat16"):
        kernels.small_blocks_forward_(y.half(), x.half(), w1t, w2p)
    with pytest.raises(RuntimeError, match="do not fit"):
        kernels.small_blocks_forward_(y, torch.randn(5, 17), w1t, w2p)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        kernels.small_blocks_forward_(y, x, w1t.double(), w2p)
    with pytest.raises(RuntimeError, match="bias must be"):
        kernels.small_blocks_forward_(y, x, w1t, w2p, torch.randn(31))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multiply_uses_the_kernel_for_small_blocks_in_inference(monkeypatch, dtype):
    w1, w2, bias = _factors(32, 32, 32, 32, 32, 32)
    x = torch.randn(3, 50, 1024, dtype=F64)
    args = [t.to(dtype) for t in (x, w1, w2, bias)]
    assert small_blocks.applies(args[0].reshape(-1, 1024), args[1], args[2])
    calls = []
    real = small_blocks.forward
    monkeypatch.setattr(small_blocks, "forward", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        y = monarch_multiply(*args[:3], args[3])
    assert calls and y.shape == (3, 50, 1024) and y.dtype == dtype
    want = monarch_multiply_reference(x, w1, w2) + bias
    assert _relative_error(y, want) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_when_the_kernel_is_not_used(monkeypatch):
    w1, w2 = torch.randn(32, 32, 32), torch.randn(32, 32, 32)
    x = torch.randn(100, 1024)
    assert not small_blocks.applies(x.half(), w1.half(), w2.half())  # no fp16 kernel
    assert not small_blocks.applies(x[:4], w1, w2)  # too few tokens to pay for the set-up
    bf16_dot = native.bf16_dot()
    # bf16: from 65 tokens, or 64 for inference with the dot-product kernel
    assert not small_blocks.applies(x.bfloat16()[:64], w1.bfloat16(), w2.bfloat16(),
                                    training=True)
    assert small_blocks.applies(x.bfloat16()[:64], w1.bfloat16(), w2.bfloat16()) == bf16_dot
    assert not small_blocks.applies(x.bfloat16()[:63], w1.bfloat16(), w2.bfloat16())
    w64 = torch.randn(16, 64, 64).bfloat16()  # blocks of 64: bf16 inference with the dot kernel
    assert small_blocks.applies(x.bfloat16(), w64, w64) == bf16_dot
    assert not small_blocks.applies_to_training(x.bfloat16(), w64, w64)
    wide = torch.randn(8, 128, 128)  # oneDNN's GEMMs win at 128
    assert not small_blocks.applies(x, wide, torch.randn(8, 128, 128))
    assert not small_blocks.applies(torch.randn(100, 32 * 24), torch.randn(32, 24, 24),
                                    torch.randn(24, 32, 32))  # q = 24, l = 24: not 16-wide
    monkeypatch.setattr(native, "kernels", lambda: None)
    assert not small_blocks.applies(x, w1, w2)
    with torch.inference_mode():  # and the multiply still works, on the chunked path
        y = monarch_multiply(x, w1, w2)
    torch.testing.assert_close(y.double(), monarch_multiply_reference(x.double(), w1.double(),
                                                                      w2.double()),
                               rtol=1e-4, atol=1e-4)


@needs_kernels
def test_monarch_linear_uses_the_kernel(monkeypatch):
    """Parameters, not just plain tensors, go to the kernel (inference)."""
    from monarch_matrices import MonarchLinear

    layer = MonarchLinear(1024, 1024, nblocks=32)
    calls = []
    real = small_blocks.forward
    monkeypatch.setattr(small_blocks, "forward", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 30, 1024)
    with torch.no_grad():
        y = layer(x)
    assert calls
    with torch.no_grad():
        want = monarch_multiply_reference(x.double(), layer.w1.double(), layer.w2.double())
        assert _relative_error(y, want + layer.bias.double()) < 1e-6


@needs_kernels
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(32, 32, 32, 32, 32, 32), (4, 16, 16, 16, 5, 4),
                                   (2, 48, 32, 32, 3, 3)])
@pytest.mark.parametrize("needs", [(1, 1, 1, 1), (1, 0, 0, 0), (0, 1, 0, 1), (0, 0, 1, 0)])
def test_training_matches_float64_reference(monkeypatch, dtype, tol, shape, needs):
    k, q, p, l, s, r = shape
    w1, w2, bias = _factors(*shape, seed=3)
    x = torch.randn(3, 67, k * p, dtype=F64)  # 201 tokens: a ragged last tile
    g = torch.randn(3, 67, s * l, dtype=F64)
    leaves = [t.clone().requires_grad_(bool(n)) for t, n in zip((x, w1, w2, bias), needs)]
    want_y = monarch_multiply_reference(*leaves[:3]) + leaves[3]
    wanted = [t for t in leaves if t.requires_grad]
    want = torch.autograd.grad(want_y, wanted, g)
    low = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in leaves]
    monkeypatch.setitem(small_blocks.MAX_BLOCK, torch.bfloat16, 64)  # the kernel, not the limit
    assert small_blocks.applies_to_training(low[0].reshape(-1, k * p), low[1], low[2])
    calls = []
    real = small_blocks.multiply
    monkeypatch.setattr(small_blocks, "multiply", lambda *a: calls.append(1) or real(*a))
    y = monarch_multiply(*low[:3], low[3])
    assert calls and y.dtype == dtype
    assert _relative_error(y.detach(), want_y.detach()) < tol
    got = torch.autograd.grad(y, [t for t in low if t.requires_grad], g.to(dtype))
    for a, b in zip(got, want):
        assert a.dtype == dtype and a.shape == b.shape
        assert _relative_error(a, b) < tol


wide_tier = pytest.mark.skipif(
    not native.available() or not small_blocks._avx512(),
    reason="the wide-block tier needs the native kernels and AVX-512")


def _wide_case(d, nblocks, tokens, dtype):
    b = d // nblocks
    return (torch.empty(tokens, d, dtype=dtype), torch.empty(nblocks, b, b, dtype=dtype),
            torch.empty(nblocks, b, b, dtype=dtype))


@wide_tier
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_when_wide_blocks_go_to_the_kernel(dtype):
    """Blocks of 128-256 (16 or more of them): inference from 256 (float32) or 1024
    (bf16) tokens; training only up to 128 and under 1 M factor elements."""
    if dtype == torch.bfloat16 and not native.bf16_dot():
        pytest.skip("bf16 wide blocks need the AVX512-BF16 kernel")
    fewest = small_blocks.WIDE_MIN_TOKENS[dtype, False]
    assert small_blocks.applies(*_wide_case(4096, 16, fewest, dtype))  # blocks of 256
    assert not small_blocks.applies(*_wide_case(4096, 16, fewest - 1, dtype))
    assert not small_blocks.applies(*_wide_case(8192, 16, 4096, dtype))  # blocks of 512
    assert not small_blocks.applies(*_wide_case(4096, 4, 4096, dtype))  # l = 4: not 16-wide
    # 2.4 M elements is the most (32 blocks of 192 are 2.36 M), 16 of 320 are too many
    assert small_blocks.applies(*_wide_case(6144, 32, 4096, dtype))
    assert not small_blocks.applies(*_wide_case(5120, 16, 4096, dtype))
    # training: 16 blocks of 128 (0.5 M elements), not 32 of 128 (1 M) nor blocks of 192
    assert small_blocks.applies_to_training(*_wide_case(2048, 16, 1024, dtype))
    assert not small_blocks.applies_to_training(*_wide_case(2048, 16, 1023, dtype))
    assert not small_blocks.applies_to_training(*_wide_case(4096, 32, 4096, dtype))
    assert not small_blocks.applies_to_training(*_wide_case(3072, 16, 4096, dtype))
    assert not small_blocks.applies(*_wide_case(2048, 16, 4096, torch.float16))


@wide_tier
def test_wide_blocks_need_avx512(monkeypatch):
    monkeypatch.setattr(small_blocks, "_avx512", lambda: False)
    assert not small_blocks.applies(*_wide_case(2048, 16, 4096, torch.float32))
    monkeypatch.setattr(native, "bf16_dot", lambda: False)
    assert not small_blocks.applies(*_wide_case(2048, 16, 4096, torch.bfloat16))


@wide_tier
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("grad", [False, True])
def test_wide_blocks_match_float64_reference(monkeypatch, dtype, tol, grad):
    """16 blocks of 128 (in 96 out for w1, so every size differs) through the kernel,
    forward and, with gradients, every input's gradient, against float64."""
    if dtype == torch.bfloat16 and not native.bf16_dot():
        pytest.skip("bf16 wide blocks need the AVX512-BF16 kernel")
    shape = (16, 96, 128, 16, 80, 96)  # k, q, p, l, s, r
    k, q, p, l, s, r = shape
    w1, w2, bias = _factors(*shape, seed=5)
    tokens = small_blocks.WIDE_MIN_TOKENS[dtype, grad] + 3  # a ragged last tile
    x = torch.randn(tokens, k * p, dtype=F64, generator=torch.Generator().manual_seed(6))
    g = torch.randn(tokens, s * l, dtype=F64, generator=torch.Generator().manual_seed(7))
    leaves = [t.clone().requires_grad_(grad) for t in (x, w1, w2, bias)]
    want_y = monarch_multiply_reference(*leaves[:3]) + leaves[3]
    low = [t.detach().to(dtype).requires_grad_(grad) for t in leaves]
    assert small_blocks.applies(low[0], low[1], low[2], training=grad)
    calls = []
    for name in ("forward", "multiply"):
        real = getattr(small_blocks, name)
        monkeypatch.setattr(small_blocks, name,
                            lambda *a, real=real, name=name: calls.append(name) or real(*a))
    with torch.set_grad_enabled(grad):
        y = monarch_multiply(*low[:3], low[3])
    assert calls == (["multiply", "forward"] if grad else ["forward"])  # (multiply runs forward)
    assert _relative_error(y.detach(), want_y.detach()) < tol
    if grad:
        want = torch.autograd.grad(want_y, leaves, g)
        got = torch.autograd.grad(y, low, g.to(dtype))
        for a, b in zip(got, want):
            assert a.dtype == dtype and a.shape == b.shape
            assert _relative_error(a, b) < tol


@needs_kernels
def test_training_needs_p_in_vectors_too():
    w1, w2 = torch.randn(4, 16, 12), torch.randn(16, 5, 4)  # p = 12
    x = torch.randn(100, 48)
    assert small_blocks.applies(x, w1, w2) and not small_blocks.applies_to_training(x, w1, w2)
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
    y = monarch_multiply(*leaves)  # the chunked path, same result
    ref = [t.double().detach().requires_grad_() for t in (x, w1, w2)]
    want = monarch_multiply_reference(*ref)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_backward_kernels_refuse_bad_input():
    kernels = native.kernels()
    g, gx, gh = torch.randn(5, 32), torch.empty(5, 32), torch.empty(5, 32)
    w1, w2q = torch.randn(2, 16, 16), torch.randn(2, 2, 16)
    kernels.small_blocks_grad_x_(gx, gh, g, w2q, w1)  # fits
    with pytest.raises(RuntimeError, match="p and l must be multiples of 16"):
        kernels.small_blocks_grad_x_(torch.empty(5, 24), gh, g, w2q, torch.randn(2, 16, 12))
    with pytest.raises(RuntimeError, match="grad_h must be a contiguous CPU Float"):
        kernels.small_blocks_grad_x_(gx, torch.empty(5, 31), g, w2q, w1)
    with pytest.raises(RuntimeError, match="widths do not fit"):
        kernels.small_blocks_grad_w_(None, None, g, gh, g, gh, 3, 16)
    with pytest.raises(RuntimeError, match="gw1t must be"):
        kernels.small_blocks_grad_w_(torch.zeros(7), None, g, gh, g, gh, 2, 16)
    with pytest.raises(RuntimeError, match="colsum must be a contiguous float64"):
        kernels.small_blocks_grad_w_(None, None, g, gh, g, gh, 2, 16, torch.zeros(32))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [0, 5, 70])  # none, part of a 32-token tile, three tiles
def test_grad_w_kernel_sums_the_bias_gradient_in_float64(dtype, tokens):
    """colsum gets grad y's column sums, alone or beside the factor gradients."""
    k, q, p, l, s, r = 2, 16, 16, 16, 3, 2
    gen = torch.Generator().manual_seed(tokens)
    x, gh, h = (torch.randn(tokens, k * w, generator=gen).to(dtype) for w in (p, q, q))
    g = (torch.randn(tokens, s * l, generator=gen) * 1e3).to(dtype)
    want = g.double().sum(0)
    for factors in (True, False):
        gw1t = torch.zeros(k, p, q) if factors else None
        gw2p = torch.zeros(s, r, l) if factors else None
        colsum = torch.full((s * l,), 0.5, dtype=F64)  # added to, as the gradients are
        native.kernels().small_blocks_grad_w_(gw1t, gw2p, x, gh, g, h, k, l, colsum)
        torch.testing.assert_close(colsum, want + 0.5, rtol=1e-12, atol=1e-9)
        if factors:
            want_w1 = torch.einsum("tam,taj->ajm", gh.double().view(tokens, k, q),
                                   x.double().view(tokens, k, p))
            torch.testing.assert_close(gw1t.double(), want_w1, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_training_gives_equal_bits_on_equal_runs():
    """Per-thread partial sums are added in task order, not in finishing order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(8)  # more tasks than cores: finishing order varies
    try:
        w1, w2, bias = _factors(8, 32, 32, 16, 32, 16)
        x = torch.randn(4096, 256)
        g = torch.randn(4096, 512)
        results = []
        for _ in range(6):
            leaves = [t.float().clone().requires_grad_() for t in (x, w1, w2, bias)]
            monarch_multiply(*leaves[:3], leaves[3]).backward(g)
            results.append(torch.cat([t.grad.flatten() for t in leaves]))
        for r in results[1:]:
            assert torch.equal(r, results[0])
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_frozen_factors_keep_no_middle_activation():
    w1, w2, bias = (t.float() for t in _factors(32, 32, 32, 32, 32, 32))
    x = torch.randn(64, 1024, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        y = monarch_multiply(x, w1, w2, bias)  # only x needs a gradient
    assert (64, 1024) in saved and saved.count((64, 1024)) == 1  # x, no middle
    (gx,) = torch.autograd.grad(y.sum(), x)
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(monarch_multiply_reference(x64, w1.double(), w2.double()).sum(),
                                  x64)
    assert _relative_error(gx, want) < 1e-5


def test_a_bias_on_another_device_is_refused_cleanly():
    w1, w2 = torch.randn(2, 16, 16), torch.randn(16, 2, 2)
    x = torch.randn(16, 32)
    bias = torch.randn(32, device="meta")
    assert not small_blocks.applies(x, w1, w2, bias)
    with torch.no_grad(), pytest.raises((RuntimeError, NotImplementedError)):
        monarch_multiply(x, w1, w2, bias)


needs_bf16_dot = pytest.mark.skipif(
    not native.bf16_dot(),
    reason="native kernels off or not built, or built without AVX512-BF16")


@needs_bf16_dot
@pytest.mark.parametrize("shape", [
    (32, 32, 32, 32, 32, 32),  # the sqrt(n) Monarch of 1024
    (16, 64, 64, 16, 64, 64),  # blocks of 64, which bf16 inference takes here too
    (4, 16, 8, 16, 5, 4),      # odd s
    (2, 48, 20, 32, 3, 3),     # odd r: the last u pairs with zero; three vectors of q
    (1, 16, 2, 16, 7, 1),      # one pair of j, r = 1
])
@pytest.mark.parametrize("tokens", [1, 6, 7, 8, 9, 203])  # tiles of 8 (6 with AVX2), ragged ones
def test_bf16_dot_kernel_matches_float64_reference(shape, tokens):
    k, q, p, l, s, r = shape
    w1, w2, bias = (t.bfloat16() for t in _factors(*shape, seed=tokens))
    x = torch.randn(tokens, k * p, dtype=F64, generator=torch.Generator().manual_seed(2))
    x = x.bfloat16()
    want = monarch_multiply_reference(x.double(), w1.double(), w2.double()) + bias.double()
    for b in (bias, None):
        y = small_blocks.forward(x, w1, w2, b)  # inference, bf16: the dot-product kernel
        assert y.dtype == torch.bfloat16
        assert _relative_error(y, want if b is not None else want - bias.double()) < 1e-2
    # with the middle kept (training): the tile computes through those rows, so y has
    # the same bits, and the middle is x's first factor rounded to bf16
    mid = torch.full((tokens, k * q), float("nan"), dtype=torch.bfloat16)
    kept = small_blocks.forward(x, w1, w2, bias, mid)
    assert torch.equal(kept, small_blocks.forward(x, w1, w2, bias))
    want_mid = torch.einsum("taj,acj->tac", x.double().view(tokens, k, p), w1.double())
    assert _relative_error(mid, want_mid.reshape(tokens, k * q)) < 1e-2
    if p == q:  # x would fit as the middle: refused, it is read while the middle is written
        with pytest.raises(RuntimeError, match="single memory location"):
            small_blocks.forward(x, w1, w2, bias, x)


@needs_bf16_dot
def test_bf16_dot_kernel_is_used_for_bf16_inference_only(monkeypatch):
    kernels = native.kernels()
    calls = []

    class Spy:
        def __getattr__(self, name):
            attr = getattr(kernels, name)
            if name.startswith("small_blocks_forward"):
                return lambda *a: calls.append(name) or attr(*a)
            return attr

    monkeypatch.setattr(native, "kernels", lambda: Spy())
    w1, w2, bias = _factors(32, 32, 32, 32, 32, 32)
    x = torch.randn(100, 1024, dtype=F64)
    with torch.no_grad():
        monarch_multiply(x.bfloat16(), w1.bfloat16(), w2.bfloat16(), bias.bfloat16())
        monarch_multiply(x.float(), w1.float(), w2.float(), bias.float())
    # a bf16 training forward too, keeping the middle for w2's gradient
    w1b, w2b = w1.bfloat16().requires_grad_(), w2.bfloat16().requires_grad_()
    y = monarch_multiply(x.bfloat16(), w1b, w2b, bias.bfloat16())
    y.backward(torch.ones_like(y))
    assert calls == ["small_blocks_forward_dpbf16_", "small_blocks_forward_",
                     "small_blocks_forward_dpbf16_"]
    ref = [t.double().requires_grad_() for t in (w1.bfloat16(), w2.bfloat16())]
    monarch_multiply_reference(x.bfloat16().double(), *ref).sum().backward()
    assert _relative_error(w2b.grad, ref[1].grad) < 1e-2  # from the kept middle
    assert _relative_error(w1b.grad, ref[0].grad) < 1e-2


@needs_bf16_dot
def test_bf16_dot_kernel_refuses_what_it_cannot_do():
    kernels = native.kernels()
    w1, w2, _ = (t.bfloat16() for t in _factors(2, 16, 8, 16, 2, 2))
    w1p, w2p = small_blocks._pack_pairs(w1, w2)
    x, y = torch.randn(3, 16).bfloat16(), torch.empty(3, 32, dtype=torch.bfloat16)
    kernels.small_blocks_forward_dpbf16_(y, x, w1p, w2p)  # fits
    with pytest.raises(RuntimeError, match="bf16 CPU tensors"):
        kernels.small_blocks_forward_dpbf16_(y.float(), x.float(), w1p, w2p)
    with pytest.raises(RuntimeError, match="do not fit"):
        kernels.small_blocks_forward_dpbf16_(y, x[:, :8].contiguous(), w1p, w2p)
    with pytest.raises(RuntimeError, match="packed"):
        kernels.small_blocks_forward_dpbf16_(y, x, w1, w2p)
    with pytest.raises(RuntimeError, match="bias"):
        kernels.small_blocks_forward_dpbf16_(y, x, w1p, w2p, torch.zeros(31))
    with pytest.raises(RuntimeError, match="mid must be"):
        kernels.small_blocks_forward_dpbf16_(y, x, w1p, w2p, None, torch.empty(3, 31).bfloat16())


@needs_bf16_dot
@pytest.mark.parametrize("needs", [(1, 1, 1, 1), (0, 1, 0, 0), (0, 0, 1, 1), (1, 0, 0, 1),
                                   (0, 0, 0, 1), (0, 1, 0, 1), (1, 0, 0, 0)])
def test_bf16_training_backward_takes_the_one_pass_kernel(monkeypatch, needs):
    """bf16 backward: one call of small_blocks_backward_dpbf16_ for any gradient subset
    (no separate weight-gradient pass); several 64-token tiles and a ragged one; every
    gradient against float64."""
    kernels, calls = native.kernels(), []
    real = kernels.small_blocks_backward_dpbf16_
    monkeypatch.setattr(kernels, "small_blocks_backward_dpbf16_",
                        lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(weight_grad, "add_", lambda *a, **kw: pytest.fail("weight_grad used"))
    shape = (32, 32, 32, 32, 32, 32)
    w1, w2, bias = _factors(*shape, seed=5)
    x = torch.randn(217, 1024, dtype=F64)
    g = torch.randn(217, 1024, dtype=F64)
    leaves = [t.clone().requires_grad_(bool(n)) for t, n in zip((x, w1, w2, bias), needs)]
    want_y = monarch_multiply_reference(*leaves[:3]) + leaves[3]
    want = torch.autograd.grad(want_y, [t for t in leaves if t.requires_grad], g)
    low = [t.detach().bfloat16().requires_grad_(t.requires_grad) for t in leaves]
    assert small_blocks.applies_to_training(low[0], low[1], low[2])
    got = torch.autograd.grad(monarch_multiply(*low[:3], low[3]),
                              [t for t in low if t.requires_grad], g.bfloat16())
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16 and _relative_error(a, b) < 1e-2
    assert len(calls) == 1
    gx, gw1, gw2p, colsum = calls[0][:4]  # only what is wanted is computed
    assert [t is not None for t in (gx, gw1, gw2p, colsum)] == [bool(n) for n in needs]


def _backward_dpbf16(shape, tokens, seed, x=True, w1=True, w2=True, bias=True, pad=0):
    """Runs small_blocks_backward_dpbf16_ on random bf16 inputs (with `pad`, every
    matrix a column slice of a wider one: rows further apart than their width);
    returns its outputs and the float64 values they should have (grad h rounded to
    bf16 between the stages)."""
    k, q, p, l, s, r = shape
    f1, f2, _ = (t.bfloat16() for t in _factors(*shape, seed=seed))
    gen = torch.Generator().manual_seed(seed)

    def rows(cols, fill=None):
        if fill is None:
            return torch.randn(tokens, cols + pad, generator=gen).bfloat16()[:, :cols]
        return torch.full((tokens, cols + pad), fill, dtype=torch.bfloat16)[:, :cols]

    xs, h, g = rows(k * p), rows(k * q), rows(s * l)
    gx = rows(k * p, float("nan")) if x else None
    gw1 = torch.full((k, q, p), float("nan")) if w1 else None
    gw2p = torch.full((s, r, l), float("nan")) if w2 else None
    colsum = torch.ones(s * l) if bias else None  # the kernel adds into it
    native.kernels().small_blocks_backward_dpbf16_(
        gx, gw1, gw2p, colsum, g, xs if w1 else None, h if w2 else None,
        *small_blocks._pack_grad_pairs(f1, f2))
    # gh[t, u*l + v] = sum_e g[t, e*l + v] w2[v, e, u], rounded to bf16;
    # gx[t, a*p + j] = sum_c gh[t, a*q + c] w1[a, c, j]
    gh = torch.einsum("tev,veu->tuv", g.double().view(tokens, s, l), f2.double())
    gh = gh.reshape(tokens, k, q).bfloat16().double()
    want = {
        "gx": torch.einsum("tac,acj->taj", gh, f1.double()).reshape(tokens, k * p),
        "gw1": torch.einsum("tac,taj->acj", gh, xs.double().view(tokens, k, p)),
        "gw2p": torch.einsum("tev,tuv->euv", g.double().view(tokens, s, l),
                             h.double().view(tokens, r, l)),
        "colsum": 1 + g.double().sum(0),
    }
    return {"gx": gx, "gw1": gw1, "gw2p": gw2p, "colsum": colsum}, want


@needs_bf16_dot
@pytest.mark.parametrize("shape", [(32, 32, 32, 32, 32, 32), (4, 16, 16, 16, 5, 4),
                                   (2, 48, 32, 32, 3, 3), (1, 16, 16, 16, 1, 1),
                                   (3, 16, 48, 16, 5, 3), (1, 32, 16, 16, 3, 2),
                                   (3, 32, 16, 48, 4, 2)])
@pytest.mark.parametrize("tokens", [1, 13, 64, 67, 131])
@pytest.mark.parametrize("pad", [0, 16])
def test_bf16_dot_backward_kernel_matches_float64(shape, tokens, pad):
    """grad x, both factor gradients and g's column sums from one pass: odd s pairs with
    zero; p of one, two and three vectors, l of three; ragged 8-token and 64-token
    tiles; rows further apart than their width."""
    got, want = _backward_dpbf16(shape, tokens, seed=tokens, pad=pad)
    assert _relative_error(got["gx"], want["gx"]) < 1e-2
    # grad h is rounded to bf16 from float32 sums here, from float64 in want: a tie
    # broken the other way moves w1's gradient by an ulp of bf16
    assert _relative_error(got["gw1"], want["gw1"]) < 1e-3
    for name in ("gw2p", "colsum"):  # float32 sums of exact bf16 products
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5,
                                   atol=1e-4 * tokens**0.5)


@needs_bf16_dot
@pytest.mark.parametrize("wanted", [dict(x=False), dict(w1=False), dict(w2=False, bias=False),
                                    dict(x=False, w1=False), dict(x=False, w2=False),
                                    dict(bias=False), dict(x=False, w1=False, bias=False)])
def test_bf16_dot_backward_kernel_computes_subsets(wanted):
    """Any subset gives the bits of the full call (w1's gradient without grad x, w2's
    without grad h, ...)."""
    shape = (4, 16, 16, 16, 5, 4)
    full, _ = _backward_dpbf16(shape, 131, seed=3)
    part, _ = _backward_dpbf16(shape, 131, seed=3, **wanted)
    for name, t in part.items():
        if t is not None:
            assert torch.equal(t, full[name]), name


@needs_bf16_dot
def test_bf16_dot_backward_gives_equal_bits_on_equal_runs():
    """Per-task sums are added in task order, not in finishing order (8 threads on 2
    cores: the order in which tasks finish varies)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        runs = [_backward_dpbf16((32, 32, 32, 32, 32, 32), 1000, seed=1)[0] for _ in range(4)]
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for name, t in run.items():
            assert torch.equal(t, runs[0][name]), name


@needs_bf16_dot
def test_bf16_dot_backward_kernel_refuses_what_it_cannot_do():
    kernels = native.kernels()
    w1, w2, _ = (t.bfloat16() for t in _factors(2, 16, 16, 16, 2, 2))
    w2g, w1g = small_blocks._pack_grad_pairs(w1, w2)
    g, x, h = (torch.randn(3, 32).bfloat16() for _ in range(3))
    gx = torch.empty(3, 32, dtype=torch.bfloat16)
    gw1, gw2p = torch.empty(2, 16, 16), torch.empty(2, 2, 16)
    run = kernels.small_blocks_backward_dpbf16_
    run(gx, gw1, gw2p, torch.zeros(32), g, x, h, w2g, w1g)  # fits
    with pytest.raises(RuntimeError, match=r"gx must be a bf16 .* got \[3, 32\] Float"):
        run(gx.float(), None, None, None, g, None, None, w2g, w1g)
    with pytest.raises(RuntimeError, match=r"gx must be .*\(3, 32\).* got \[3, 16\]"):
        run(gx[:, :16], None, None, None, g, None, None, w2g, w1g)
    with pytest.raises(RuntimeError, match="bf16 CPU factors"):
        run(gx, None, None, None, g, None, None, w2g.float(), w1g)
    with pytest.raises(RuntimeError, match="g must be a matrix"):
        run(gx, None, None, None, g[0], None, None, w2g, w1g)
    with pytest.raises(RuntimeError, match="single memory location"):  # gx written, x read
        run(x, gw1, None, None, g, x, None, w2g, w1g)
    with pytest.raises(RuntimeError, match="packed"):
        run(gx, None, None, None, g, None, None, w2, w1g)
    with pytest.raises(RuntimeError, match="g must be a bf16"):
        run(gx, None, None, None, g.float(), None, None, w2g, w1g)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        run(gx, None, None, None, g[:, :31], None, None, w2g, w1g)
    with pytest.raises(RuntimeError, match="gw1 must be"):
        run(None, gw1.double(), None, None, g, x, None, w2g, w1g)
    with pytest.raises(RuntimeError, match="gw2p must be"):
        run(None, None, torch.empty(2, 16, 2), None, g, None, h, w2g, w1g)
    with pytest.raises(RuntimeError, match="colsum must be"):
        run(None, None, None, torch.zeros(31), g, None, None, w2g, w1g)
    with pytest.raises(RuntimeError, match="needs x"):
        run(None, gw1, None, None, g, None, None, w2g, w1g)
    with pytest.raises(RuntimeError, match="needs h"):
        run(None, None, gw2p, None, g, None, h[:2], w2g, w1g)
    empty = torch.empty(1, 1, 0, 2, dtype=torch.bfloat16)  # l = 0: refused, not a division
    with pytest.raises(RuntimeError, match="multiples of 16"):
        run(None, None, None, None, g[:, :4], None, None, empty,
            torch.empty(0, 1, 16, 2, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="single memory location"):
        run(torch.empty(1, 32, dtype=torch.bfloat16).expand(3, 32), None, None, None, g, None,
            None, w2g, w1g)
