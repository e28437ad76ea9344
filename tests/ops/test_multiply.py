"""monarch_multiply and monarch_to_dense against the formula, in every dtype, with gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.formula import dense_by_formula, factor_shapes, multiply_by_loops

from monarch_matrices.ops import (
    monarch_multiply,
    monarch_multiply_bmm,
    monarch_multiply_reference,
    monarch_to_dense,
)
from monarch_matrices.ops import multiply as multiply_module

F64 = torch.float64


def _factors(shapes, dtype=F64):
    (k, q, p), (l, s, r) = shapes
    return torch.randn(k, q, p, dtype=dtype), torch.randn(l, s, r, dtype=dtype)


@settings(max_examples=40, deadline=None)
@given(shapes=factor_shapes(), batch=st.lists(st.integers(0, 3), max_size=2))
def test_multiply_matches_dense_and_formula(shapes, batch):
    w1, w2 = _factors(shapes)
    k, _, p = w1.shape
    x = torch.randn(*batch, k * p, dtype=F64)
    y = monarch_multiply(x, w1, w2)
    M = dense_by_formula(w1, w2)
    torch.testing.assert_close(monarch_to_dense(w1, w2), M)
    torch.testing.assert_close(y, x @ M.T)
    torch.testing.assert_close(monarch_multiply_reference(x, w1, w2), y)
    torch.testing.assert_close(monarch_multiply_bmm(x, w1, w2), y)
    assert y.shape == (*batch, M.shape[0])


@settings(max_examples=15, deadline=None)
@given(shapes=factor_shapes(max_block=3, max_blocks=3))
def test_multiply_matches_scalar_loops(shapes):
    w1, w2 = _factors(shapes)
    x = torch.randn(w1.shape[0] * w1.shape[2], dtype=F64)
    torch.testing.assert_close(monarch_multiply(x, w1, w2), multiply_by_loops(x, w1, w2))


def test_zero_size_batch_forward_and_backward():
    w1 = torch.randn(3, 4, 2, dtype=F64, requires_grad=True)
    w2 = torch.randn(2, 5, 6, dtype=F64, requires_grad=True)
    x = torch.randn(0, 7, 6, dtype=F64, requires_grad=True)
    y = monarch_multiply(x, w1, w2)
    assert y.shape == (0, 7, 10)
    y.sum().backward()
    assert torch.count_nonzero(w1.grad) == 0 and x.grad.shape == x.shape


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)],
)
def test_low_precision_close_to_float64(dtype, rtol):
    shapes = ((4, 24, 16), (6, 12, 16))
    w1, w2 = _factors(shapes)
    x = torch.randn(5, 3, 64, dtype=F64)
    exact = monarch_multiply(x, w1, w2)
    y = monarch_multiply(x.to(dtype), w1.to(dtype), w2.to(dtype))
    assert y.dtype == dtype
    err = (y.to(F64) - exact).norm() / exact.norm()
    assert err < rtol


def test_complex64_matches_complex128():
    w1 = torch.randn(3, 4, 5, dtype=torch.complex128)
    w2 = torch.randn(2, 3, 6, dtype=torch.complex128)
    x = torch.randn(4, 15, dtype=torch.complex128)
    exact = x @ dense_by_formula(w1, w2).T
    torch.testing.assert_close(monarch_multiply(x, w1, w2), exact)
    y = monarch_multiply(x.to(torch.complex64), w1.to(torch.complex64), w2.to(torch.complex64))
    torch.testing.assert_close(y.to(torch.complex128), exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_gradcheck(dtype):
    w1 = torch.randn(3, 4, 2, dtype=dtype, requires_grad=True)
    w2 = torch.randn(2, 5, 6, dtype=dtype, requires_grad=True)
    x = torch.randn(2, 3, 6, dtype=dtype, requires_grad=True)
    assert torch.autograd.gradcheck(monarch_multiply, (x, w1, w2))
    assert torch.autograd.gradcheck(monarch_to_dense, (w1, w2))
    # higher order: the plain-ops paths
    assert torch.autograd.gradgradcheck(monarch_multiply_bmm, (x, w1, w2))
    assert torch.autograd.gradgradcheck(monarch_multiply_reference, (x, w1, w2))
    assert torch.autograd.gradgradcheck(monarch_to_dense, (w1, w2))


def test_fast_path_refuses_double_backward_clearly():
    w1 = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    w2 = torch.randn(3, 5, 2, dtype=F64, requires_grad=True)
    x = torch.randn(4, 8, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(monarch_multiply(x, w1, w2).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable"):
        g.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("needs", [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)])
def test_chunked_path_matches_reference(monkeypatch, dtype, needs):
    """Force chunks of 3 tokens (uneven tail) and compare values and every gradient."""
    monkeypatch.setattr(multiply_module, "CHUNK_BYTES", 1)
    monkeypatch.setattr(multiply_module, "MIN_CHUNK", 3)
    assert multiply_module.chunk_tokens(10, 4, 4, dtype, torch.device("cpu")) == 3
    x = torch.randn(2, 5, 20, dtype=dtype)
    w1, w2 = torch.randn(4, 6, 5, dtype=dtype), torch.randn(3, 7, 8, dtype=dtype)
    inputs = [t.requires_grad_(bool(n)) for t, n in zip((x, w1, w2), needs)]
    g = torch.randn(2, 5, 21, dtype=dtype)
    y = monarch_multiply(*inputs)
    ref = monarch_multiply_reference(*inputs)
    torch.testing.assert_close(y, ref)
    wanted = [t for t in inputs if t.requires_grad]
    for a, b in zip(torch.autograd.grad(y, wanted, g), torch.autograd.grad(ref, wanted, g)):
        torch.testing.assert_close(a, b)


def test_middle_permutation_by_block_where_rows_are_long_enough():
    by_block = multiply_module._permute_by_block
    assert by_block(192, 4, 4)  # 768->3072 float32: rows of 48 floats
    assert not by_block(256, 16, 4)  # 16 blocks of 256: rows of 16 floats, too short
    assert by_block(256, 16, 8)  # the same in float64: 128 bytes
    assert not by_block(6, 4, 8)  # q % l != 0: whole tokens only
    # bf16/fp16 CPU GEMMs keep writing token-major views; elsewhere block-major
    outputs = multiply_module._block_major_outputs
    assert outputs(torch.empty(1)) and outputs(torch.empty(1, dtype=torch.complex64))
    assert not outputs(torch.empty(1, dtype=torch.bfloat16))
    assert not outputs(torch.empty(1, dtype=torch.float16))
    assert outputs(torch.empty(1, dtype=torch.bfloat16, device="meta"))


@pytest.mark.parametrize("by_block", [True, False])
@pytest.mark.parametrize("lowrank", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_block_and_token_major_middles_match_reference(monkeypatch, by_block, lowrank, dtype):
    """Both layouts of the first GEMM's output (and of its gradient), forced either
    way, with the fused low-rank term or without, in chunks of 3 with a tail."""
    monkeypatch.setattr(multiply_module, "CHUNK_BYTES", 1)
    monkeypatch.setattr(multiply_module, "MIN_CHUNK", 3)
    monkeypatch.setattr(multiply_module, "MIN_BLOCK_ROW_BYTES", 0 if by_block else 10**9)
    gen = torch.Generator().manual_seed(1)
    k, q, p, l, s = 2, 8, 6, 4, 5
    shapes = [(10, k * p), (k, q, p), (l, s, k * q // l), (s * l,)]
    if lowrank:
        shapes += [(3, k * p), (s * l, 3)]
    leaves = [torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_() for shape in shapes]
    x, w1, w2, bias, *ab = leaves
    y = monarch_multiply(x, w1, w2, bias, lowrank=tuple(ab) if ab else None)
    ref = monarch_multiply_reference(x, w1, w2) + bias
    if lowrank:
        ref = ref + x @ (ab[1] @ ab[0]).T
    torch.testing.assert_close(y, ref)
    g = torch.randn(10, s * l, generator=gen, dtype=dtype)
    for got, want in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(monarch_multiply(x, w1, w2, bias, lowrank=tuple(ab) or None),
                                   ref.detach())


def test_chunk_buffers_spread_over_the_cache_sets():
    # l streams a multiple of 4 KiB apart share one L1 set; the padded block
    # stride (4 KiB multiple plus a cache line) spreads them
    assert multiply_module._streams_per_set(16, 384 * 256 * 2) == 16
    assert multiply_module._streams_per_set(16, 383 * 256 * 2) == 2
    assert multiply_module._streams_per_set(4, 4096) == 4
    x = torch.randn(3, dtype=torch.bfloat16)
    # chunks of 384 and a tail of 101 tokens: the full chunks' blocks would crowd
    # (padded), the tail's do not (one contiguous tensor, as a bf16 bmm wants)
    flat = multiply_module._chunk_buffer(x, 16, 3 * 384 + 101, 384, 256)
    chunks = [multiply_module._chunk_of(flat, start, n, 384, 16, 256)
              for start, n in ((0, 384), (384, 384), (768, 384), (1152, 101))]
    for c in chunks[:3]:
        assert c.shape == (16, 384, 256) and c.stride()[1:] == (256, 1)
        assert multiply_module._streams_per_set(16, c.stride(0) * 2) == 1
        assert c[0].is_contiguous() and not c.is_contiguous()
    assert chunks[3].shape == (16, 101, 256) and chunks[3].is_contiguous()
    flat.zero_()  # (the padding between blocks is never written)
    for c in chunks:  # every chunk in its own part of the buffer
        c.add_(1)
    assert flat.max() == 1 and flat.float().sum() == 16 * 256 * (3 * 384 + 101)
    # reused: room for the largest one chunk at a time
    one = multiply_module._chunk_buffer(x, 16, 3 * 384 + 101, 384, 256, reused=True)
    assert one.numel() == 16 * chunks[0].stride(0)
    tail = multiply_module._chunk_of(one, 0, 101, 384, 16, 256)
    assert tail.is_contiguous() and tail.data_ptr() == one.data_ptr()


@pytest.mark.parametrize("tokens", [256, 255])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_gradient_layouts_for_many_blocks(tokens, dtype):
    """16 blocks: the output gradient's contiguous block-major layout (255 tokens)
    and its padded one (256 tokens: 16 streams 64 KiB apart) give the reference's
    gradients."""
    torch.manual_seed(0)
    x = torch.randn(tokens, 512, dtype=torch.float64)
    w1 = torch.randn(16, 32, 32, dtype=torch.float64) / 6
    w2 = torch.randn(16, 32, 32, dtype=torch.float64) / 6
    g = torch.randn(tokens, 512, dtype=torch.float64)
    want = torch.autograd.grad(monarch_multiply_reference(x.requires_grad_(), w1.requires_grad_(),
                                                          w2.requires_grad_()), (x, w1, w2), g)
    inputs = [t.detach().to(dtype).requires_grad_() for t in (x, w1, w2)]
    got = torch.autograd.grad(monarch_multiply(*inputs), inputs, g.to(dtype))
    for a, b in zip(got, want):
        if dtype == torch.float64:
            torch.testing.assert_close(a, b)
        else:  # a few bf16 roundings of each term: relative error well under 1%
            assert float((a.double() - b).norm() / b.norm()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wide_blocks_in_low_precision_match_float64(monkeypatch, dtype):
    """bf16/fp16 on the CPU multiply wide blocks of x one mm at a time, and every
    grad w1 that way: values and gradients against the float64 reference."""
    monkeypatch.setattr(multiply_module, "CHUNK_BYTES", 64 * 1024)  # several chunks
    torch.manual_seed(0)
    x = torch.randn(2, 150, 1024, dtype=torch.float64)
    w1 = torch.randn(2, 64, 512, dtype=torch.float64) / 23  # p = 512: blockwise
    w2 = torch.randn(4, 96, 32, dtype=torch.float64) / 6
    bias, g = torch.randn(384, dtype=torch.float64), torch.randn(2, 150, 384, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in (x, w1, w2, bias)]
    want_y = monarch_multiply_reference(*ref[:3]) + ref[3]
    want = torch.autograd.grad(want_y, ref, g)
    low = [t.to(dtype).requires_grad_() for t in (x, w1, w2, bias)]
    y = monarch_multiply(*low)
    got = torch.autograd.grad(y, low, g.to(dtype))
    for a, b in zip((y, *got), (want_y, *want)):
        assert float((a.detach().double() - b.detach()).norm() / b.detach().norm()) < 1e-2


def test_chunks_step_off_the_cache_set_aliasing(monkeypatch):
    """16 bf16 blocks of 32: 64-token chunks would put each chunk's output
    gradient blocks 4 KiB apart, so chunks are 62 tokens, and stay exact."""
    monkeypatch.setattr(multiply_module, "CHUNK_BYTES", 64 * 1024 * 2)
    x = torch.randn(300, 512, dtype=torch.bfloat16)
    w1 = torch.randn(16, 32, 32, dtype=torch.bfloat16) / 6
    w2 = torch.randn(16, 32, 32, dtype=torch.bfloat16) / 6
    assert multiply_module.chunk_tokens(300, 512, 512, torch.bfloat16, x.device) == 64
    assert multiply_module._forward_chunks(x, w1, w2, None, keep_middle=True)[2] == 62
    ref = [t.double().requires_grad_() for t in (x, w1, w2)]
    g = torch.randn(300, 512, dtype=torch.float64)
    want = torch.autograd.grad(monarch_multiply_reference(*ref), ref, g)
    low = [t.clone().requires_grad_() for t in (x, w1, w2)]
    got = torch.autograd.grad(monarch_multiply(*low), low, g.bfloat16())
    for a, b in zip(got, want):
        assert float((a.double() - b).norm() / b.norm()) < 1e-2


def test_chunk_size_follows_cache_budget():
    cpu = torch.device("cpu")
    chunk = multiply_module.chunk_tokens(8192, 768, 3072, torch.bfloat16, cpu)
    assert chunk % multiply_module.MIN_CHUNK == 0
    assert chunk * (768 + 3072) * 2 <= multiply_module.CHUNK_BYTES
    assert (chunk + multiply_module.MIN_CHUNK) * (768 + 3072) * 2 > multiply_module.CHUNK_BYTES
    assert multiply_module.chunk_tokens(8192, 768, 3072, torch.float16, cpu) == chunk
    # float32 and wider take WIDE_CHUNK_FACTOR times the bytes: as many tokens as bf16
    assert multiply_module.WIDE_CHUNK_FACTOR == 2
    assert multiply_module.chunk_tokens(8192, 768, 3072, torch.float32, cpu) == chunk
    assert multiply_module.chunk_tokens(8192, 768, 3072, torch.float64, cpu) == chunk // 2
    assert multiply_module.chunk_tokens(5, 768, 3072, torch.float32, cpu) == 5
    assert multiply_module.chunk_tokens(0, 768, 3072, torch.float32, cpu) == 1
    meta = torch.device("meta")
    assert multiply_module.chunk_tokens(8192, 768, 3072, torch.float32, meta) == 8192


def test_large_factors_take_larger_chunks():
    """Factors beyond LARGE_FACTOR_BYTES set the chunk's budget (up to MAX_CHUNK_BYTES):
    each chunk re-reads them; smaller ones leave it at the dtype's budget."""
    cpu, mib = torch.device("cpu"), 2**20
    base = multiply_module.chunk_tokens(4096, 4096, 4096, torch.float32, cpu)
    assert base == 2 * multiply_module.CHUNK_BYTES // (8192 * 4) // 64 * 64
    small = multiply_module.chunk_tokens(4096, 4096, 4096, torch.float32, cpu, 8 * mib)
    assert small == base
    large = multiply_module.chunk_tokens(4096, 4096, 4096, torch.float32, cpu, 16 * mib)
    assert large == 16 * mib // (8192 * 4) // 64 * 64 > base
    capped = multiply_module.chunk_tokens(4096, 4096, 4096, torch.float32, cpu, 1024 * mib)
    assert capped == multiply_module.MAX_CHUNK_BYTES // (8192 * 4) // 64 * 64
    assert multiply_module.chunk_tokens(3, 4, 4, torch.float32, cpu, 1024 * mib) == 3  # all


def test_gradients_match_dense_autograd():
    w1 = torch.randn(4, 3, 5, dtype=F64, requires_grad=True)
    w2 = torch.randn(6, 7, 2, dtype=F64, requires_grad=True)
    x = torch.randn(9, 20, dtype=F64, requires_grad=True)
    g = torch.randn(9, 42, dtype=F64)
    grads = torch.autograd.grad(monarch_multiply(x, w1, w2), (x, w1, w2), g)
    ref = torch.autograd.grad(x @ dense_by_formula(w1, w2).T, (x, w1, w2), g)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


def test_respects_requires_grad():
    w1 = torch.randn(2, 3, 4, requires_grad=True)
    w2 = torch.randn(3, 5, 2)
    x = torch.randn(6, 8)
    monarch_multiply(x, w1, w2).sum().backward()
    assert w1.grad is not None and w2.grad is None and x.grad is None


def test_saves_only_input_middle_activation_and_factors():
    k, q, p, l, s, r = 4, 6, 5, 3, 7, 8
    w1 = torch.randn(k, q, p, requires_grad=True)
    w2 = torch.randn(l, s, r, requires_grad=True)
    x = torch.randn(10, 11, k * p, requires_grad=True)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        monarch_multiply(x, w1, w2)
    middle = 110 * k * q
    assert sum(saved) <= x.numel() + w1.numel() + w2.numel() + middle


def test_autocast_bfloat16():
    w1, w2 = torch.randn(4, 8, 8), torch.randn(4, 8, 8)
    x = torch.randn(16, 32)
    exact = monarch_multiply(x, w1, w2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = monarch_multiply(x, w1, w2)
    assert y.dtype == torch.bfloat16
    assert (y.float() - exact).norm() / exact.norm() < 3e-2


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((torch.randn(5, 7), torch.randn(2, 3, 4), torch.randn(3, 5, 2)), ValueError, "last dim"),
        ((torch.randn(5, 8), torch.randn(2, 3, 4), torch.randn(3, 5, 3)), ValueError, "middle"),
        (
            (torch.randn(5, 8), torch.randn(8, 8), torch.randn(3, 5, 2)),
            ValueError,
            "w1 must be 3-D",
        ),
        (
            (torch.randn(5, 8), torch.randn(2, 3, 4), torch.randn(6, 5)),
            ValueError,
            "w2 must be 3-D",
        ),
        ((torch.tensor(1.0), torch.randn(2, 3, 4), torch.randn(3, 5, 2)), ValueError, "last dim"),
        (
            (torch.randn(5, 8, dtype=F64), torch.randn(2, 3, 4), torch.randn(3, 5, 2)),
            TypeError,
            "dtypes differ",
        ),
        (([1.0] * 8, torch.randn(2, 3, 4), torch.randn(3, 5, 2)), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        monarch_multiply(*args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_fused_bias_values_and_gradients(monkeypatch, dtype):
    monkeypatch.setattr(multiply_module, "CHUNK_BYTES", 1)
    monkeypatch.setattr(multiply_module, "MIN_CHUNK", 4)
    x = torch.randn(3, 5, 12, dtype=dtype, requires_grad=True)
    w1 = torch.randn(3, 4, 4, dtype=dtype, requires_grad=True)
    w2 = torch.randn(2, 5, 6, dtype=dtype, requires_grad=True)
    bias = torch.randn(10, dtype=dtype, requires_grad=True)
    y = monarch_multiply(x, w1, w2, bias)
    ref = monarch_multiply_reference(x, w1, w2) + bias
    torch.testing.assert_close(y, ref)
    with torch.no_grad():
        torch.testing.assert_close(monarch_multiply(x, w1, w2, bias), ref)
    g = torch.randn_like(ref)
    inputs = (x, w1, w2, bias)
    for a, b in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda b: monarch_multiply(x, w1, w2, b), (bias,))


@pytest.mark.parametrize(
    ("bias", "exc", "match"),
    [
        (torch.randn(14), ValueError, r"bias must have shape \(15,\)"),
        (torch.randn(15, 1), ValueError, "bias must have shape"),
        ([0.0] * 15, ValueError, "bias must have shape"),
        (torch.randn(15, dtype=F64), TypeError, "bias is torch.float64"),
    ],
)
def test_bad_bias(bias, exc, match):
    with pytest.raises(exc, match=match):
        monarch_multiply(torch.randn(2, 8), torch.randn(2, 3, 4), torch.randn(3, 5, 2), bias)


@pytest.mark.parametrize("tokens", [1, 64, 65, 300])
def test_inference_paths_match_reference(monkeypatch, tokens):
    """No-grad calls take the two-bmm path up to SMALL_BATCH tokens, the chunked kernel above."""
    monkeypatch.setattr(multiply_module, "CHUNK_BYTES", 1)
    monkeypatch.setattr(multiply_module, "MIN_CHUNK", 32)
    x = torch.randn(tokens, 12, dtype=F64)
    w1, w2 = torch.randn(3, 4, 4, dtype=F64), torch.randn(2, 5, 6, dtype=F64)
    bias = torch.randn(10, dtype=F64)
    expected = monarch_multiply_reference(x, w1, w2) + bias
    torch.testing.assert_close(monarch_multiply(x, w1, w2, bias), expected)
    with torch.inference_mode():
        torch.testing.assert_close(monarch_multiply(x, w1, w2, bias), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w1_group", [1, 5, None])  # chunks per grad-w1 GEMM; None: all
def test_low_precision_factor_gradients_are_summed_over_chunks_in_float32(
        monkeypatch, dtype, w1_group):
    """Many chunks must not cost weight-gradient accuracy against one GEMM over all tokens."""
    gen = torch.Generator().manual_seed(0)
    k, q, p, l, s = 4, 32, 32, 4, 64
    r = k * q // l
    if w1_group is not None:  # grad h of 64-token chunks, (q + 3) columns per block at most
        group_bytes = w1_group * 64 * k * (q + 3) * 2
        monkeypatch.setattr(multiply_module, "GRAD_W1_GROUP_BYTES", group_bytes)
    x = torch.randn(4096, k * p, generator=gen, dtype=F64)
    w1 = torch.randn(k, q, p, generator=gen, dtype=F64) / p**0.5
    w2 = torch.randn(l, s, r, generator=gen, dtype=F64) / r**0.5
    a = torch.randn(3, k * p, generator=gen, dtype=F64) / (k * p) ** 0.5
    b = torch.randn(s * l, 3, generator=gen, dtype=F64)
    g = torch.randn(4096, s * l, generator=gen, dtype=F64)
    monkeypatch.setattr(multiply_module, "CHUNK_BYTES", 64 * (q * k + s * l) * 2)  # 64 chunks

    def grads(dt, fn, lowrank):
        leaves = [t.detach().to(dt).requires_grad_() for t in (w1, w2, a, b)]
        lr = tuple(leaves[2:]) if lowrank else None
        y = fn(x.to(dt), leaves[0], leaves[1], lowrank=lr) if fn is monarch_multiply else (
            fn(x.to(dt), leaves[0], leaves[1])
            + ((x.to(dt) @ leaves[2].t()) @ leaves[3].t() if lowrank else 0))
        y.backward(g.to(dt))
        return [t.grad.double() for t in leaves[: 4 if lowrank else 2]]

    for lowrank in (False, True):
        exact = grads(F64, monarch_multiply_reference, lowrank)
        ours = grads(dtype, monarch_multiply, lowrank)
        one_gemm = grads(dtype, monarch_multiply_reference, lowrank)  # unchunked, same dtype
        for mine, theirs, want in zip(ours, one_gemm, exact):
            err, ref = (mine - want).norm() / want.norm(), (theirs - want).norm() / want.norm()
            assert err <= 1.25 * ref, (lowrank, float(err), float(ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [5, 300])  # the plain path and the chunked one
@pytest.mark.parametrize("lowrank", [False, True])
def test_slow_low_precision_gemm_runs_in_float32_and_rounds_once(monkeypatch, dtype, tokens,
                                                                 lowrank):
    """Where the CPU has no fast bf16/fp16 GEMM the multiply runs in float32: its output
    is the float32 result rounded once, and gradients come back in the inputs' dtype."""
    monkeypatch.setattr(multiply_module, "_fast_cpu_gemm", lambda dtype: False)
    gen = torch.Generator().manual_seed(tokens)
    k, q, p, l, s, r = 3, 10, 7, 5, 4, 6  # awkward: nothing a multiple of anything
    w1 = torch.randn(k, q, p, generator=gen).to(dtype).requires_grad_()
    w2 = torch.randn(l, s, r, generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(s * l, generator=gen).to(dtype).requires_grad_()
    x = torch.randn(2, tokens, k * p, generator=gen).to(dtype).requires_grad_()
    lr = None
    if lowrank:
        lr = (torch.randn(2, k * p, generator=gen).to(dtype).requires_grad_(),
              torch.randn(s * l, 2, generator=gen).to(dtype).requires_grad_())
    leaves = [x, w1, w2, bias, *(lr or ())]
    assert multiply_module.slow_low_precision_gemm(x.detach())
    y = monarch_multiply(x, w1, w2, bias, lowrank=lr)
    f32 = [t.detach().float().requires_grad_() for t in leaves]
    want = monarch_multiply(*f32[:4], lowrank=None if lr is None else (f32[4], f32[5]))
    assert y.dtype == dtype and torch.equal(y, want.to(dtype))
    g = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(g)
    want.backward(g.float())
    for leaf, ref in zip(leaves, f32):
        assert leaf.grad.dtype == dtype
        torch.testing.assert_close(leaf.grad, ref.grad.to(dtype), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=dtype):  # float32 inputs cast to dtype, then float32 inside
        y_auto = monarch_multiply(*f32[:4], lowrank=None if lr is None else (f32[4], f32[5]))
    assert y_auto.dtype == dtype


def test_fast_gemm_dtypes_and_devices_take_the_usual_paths():
    x = torch.zeros(3, 4)
    assert not multiply_module.slow_low_precision_gemm(x)
    assert not multiply_module.slow_low_precision_gemm(x.to(torch.complex64))
    assert not multiply_module.slow_low_precision_gemm(x.to("meta", torch.bfloat16))
