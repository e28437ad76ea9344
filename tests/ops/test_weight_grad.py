"""The bf16 weight-gradient kernel (``_native/weight_grad_dpbf16.cpp``) and its use in backward."""

from __future__ import annotations

import pytest
import torch

from monarch_matrices.ops import monarch_multiply, monarch_multiply_reference, native, weight_grad
from monarch_matrices.ops import multiply as multiply_module

F64 = torch.float64
needs_bf16_dot = pytest.mark.skipif(
    not native.bf16_dot(),
    reason="native kernels not built with AVX512-BF16",
)


def _operands(blocks, tokens, m, n, seed=0, token_major=False):
    """bf16 ``a (B, T, M)``, ``b (B, T, N)``; token-major: views of ``(T, B, ·)`` buffers."""
    gen = torch.Generator().manual_seed(seed)
    if token_major:
        a = torch.randn(tokens, blocks, m, generator=gen).bfloat16().transpose(0, 1)
        b = torch.randn(tokens, blocks, n, generator=gen).bfloat16().transpose(0, 1)
    else:
        a = torch.randn(blocks, tokens, m, generator=gen).bfloat16()
        b = torch.randn(blocks, tokens, n, generator=gen).bfloat16()
    return a, b


def _reference(a, b):
    """``a[i]ᵀ b[i]`` in float64 from the bf16 values; subnormals flushed as the kernel does."""
    return a.double().transpose(1, 2) @ b.double()


@needs_bf16_dot
@pytest.mark.parametrize(
    ("blocks", "tokens", "m", "n"),
    [(1, 1, 1, 1), (3, 37, 20, 50), (2, 400, 100, 70), (1, 385, 33, 17), (4, 769, 12, 32),
     (16, 382, 256, 256), (2, 64, 130, 97)],
)
@pytest.mark.parametrize("token_major", [False, True])
def test_kernel_matches_float64_reference(blocks, tokens, m, n, token_major):
    """Awkward sizes (odd token counts, rows not a multiple of 12, columns not of 32,
    more than one 384-token pass) and token-major views; both ``=`` and ``+=``."""
    a, b = _operands(blocks, tokens, m, n, token_major=token_major)
    want = _reference(a, b)
    scale = float(want.abs().max()) + 1
    got = torch.full((blocks, m, n), float("nan"))
    weight_grad.add_(got, a, b, first=True)  # overwrites (NaN in c must not survive)
    # float32 sums of exact bf16 products: error ~ tokens * 2^-24 * magnitude
    assert float((got.double() - want).abs().max()) <= 1e-5 * scale * max(tokens, 1) ** 0.5
    start = torch.randn(blocks, m, n)
    acc = start.clone()
    weight_grad.add_(acc, a, b, first=False)
    torch.testing.assert_close(acc.double(), start.double() + want, rtol=0,
                               atol=1e-5 * scale * max(tokens, 1) ** 0.5)


@needs_bf16_dot
def test_kernel_writes_only_its_output_rows_and_columns():
    """``c`` may be a view into a larger buffer: nothing around it changes."""
    a, b = _operands(2, 50, 13, 35)
    big = torch.full((2, 20, 40), 7.0)
    c = big[:, 3:16, 2:37]
    weight_grad.add_(c, a, b, first=True)
    torch.testing.assert_close(c.double(), _reference(a, b), rtol=1e-5, atol=1e-4)
    mask = torch.ones_like(big, dtype=torch.bool)
    mask[:, 3:16, 2:37] = False
    assert bool((big[mask] == 7.0).all())


@needs_bf16_dot
def test_kernel_with_no_tokens_gives_zeros_or_keeps_the_sum():
    a, b = torch.empty(2, 0, 5, dtype=torch.bfloat16), torch.empty(2, 0, 6, dtype=torch.bfloat16)
    c = torch.full((2, 5, 6), 3.0)
    weight_grad.add_(c, a, b, first=False)
    assert bool((c == 3.0).all())
    weight_grad.add_(c, a, b, first=True)
    assert bool((c == 0).all())


@needs_bf16_dot
def test_kernel_bits_do_not_depend_on_the_thread_count():
    """Each element of c has one owner and one order of summation."""
    threads = torch.get_num_threads()
    results = []
    try:
        for shape in ((1, 700, 64, 200), (5, 300, 40, 64)):  # split by columns, by blocks
            a, b = _operands(*shape, seed=1)
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                c = torch.empty(shape[0], shape[2], shape[3])
                weight_grad.add_(c, a, b, first=True)
                results.append((shape, c))
    finally:
        torch.set_num_threads(threads)
    for shape in {s for s, _ in results}:
        same = [c for s, c in results if s == shape]
        assert all(torch.equal(same[0], c) for c in same[1:])


@needs_bf16_dot
def test_kernel_rejects_bad_input():
    a, b = _operands(2, 10, 4, 6)
    kernels = native.kernels()
    with pytest.raises(RuntimeError, match="float32"):
        kernels.weight_grad_dpbf16_(torch.empty(2, 4, 6, dtype=F64), a, b, False)
    with pytest.raises(RuntimeError, match="bf16"):
        kernels.weight_grad_dpbf16_(torch.empty(2, 4, 6), a.float(), b, False)
    with pytest.raises(RuntimeError, match="do not fit"):
        kernels.weight_grad_dpbf16_(torch.empty(2, 4, 7), a, b, False)
    with pytest.raises(RuntimeError, match="do not fit"):
        kernels.weight_grad_dpbf16_(torch.empty(2, 4, 6), a, b[:, :9], False)
    with pytest.raises(RuntimeError, match="unit last stride"):
        kernels.weight_grad_dpbf16_(torch.empty(2, 4, 6), a.transpose(1, 2), b, False)


def test_applies_only_to_plain_bf16_cpu_tensors():
    x = torch.randn(4, 8)
    assert not weight_grad.applies(x)
    assert not weight_grad.applies(x.to(torch.float16))
    assert not weight_grad.applies(torch.empty(4, 8, dtype=torch.bfloat16, device="meta"))
    assert weight_grad.applies(x.bfloat16()) == native.bf16_dot()


@needs_bf16_dot
@pytest.mark.parametrize("needs", [(1, 1, 1), (0, 1, 0), (0, 0, 1), (1, 0, 1)])
def test_bf16_backward_takes_the_kernel_and_matches_float64(monkeypatch, needs):
    """Several chunks (uneven tail): both factor gradients come from the kernel (counted),
    summed in float32 and rounded once, and match the float64 reference."""
    monkeypatch.setattr(multiply_module, "CHUNK_BYTES", 64 * 1024)
    calls = []
    real_add = weight_grad.add_

    def counting_add(acc, a, b, first):
        calls.append((tuple(acc.shape), first))
        real_add(acc, a, b, first)

    monkeypatch.setattr(weight_grad, "add_", counting_add)
    torch.manual_seed(0)
    x = torch.randn(301, 512, dtype=F64)
    w1 = torch.randn(4, 96, 128, dtype=F64) / 11
    w2 = torch.randn(8, 40, 48, dtype=F64) / 7
    bias, g = torch.randn(320, dtype=F64), torch.randn(301, 320, dtype=F64)
    ref = [t.clone().requires_grad_(bool(n)) for t, n in zip((x, w1, w2), needs)]
    ref_y = monarch_multiply_reference(*ref) + bias
    wanted = [t for t in ref if t.requires_grad]
    want = torch.autograd.grad(ref_y, wanted, g)
    low = [t.bfloat16().requires_grad_(bool(n)) for t, n in zip((x, w1, w2), needs)]
    got = torch.autograd.grad(monarch_multiply(*low, bias=bias.bfloat16()),
                              [t for t in low if t.requires_grad], g.bfloat16())
    for a, b in zip(got, want):
        assert float((a.double() - b).norm() / b.norm()) < 1e-2
    chunks = multiply_module.chunk_tokens(301, 384, 320, torch.bfloat16, x.device)
    assert chunks < 301  # several chunks, else the GEMM path keeps its one product
    expected = needs[2] * -(-301 // chunks) + needs[1]  # w2 per chunk, w1 once (one group)
    assert len(calls) == expected
    assert [first for _, first in calls].count(True) == needs[1] + needs[2]


@needs_bf16_dot
def test_kernel_refuses_overlapping_sums():
    """An expanded c would give two work items the same sums to write."""
    a, b = _operands(2, 10, 4, 6)
    with pytest.raises(RuntimeError, match="single memory location"):
        native.kernels().weight_grad_dpbf16_(torch.zeros(1, 4, 6).expand(2, 4, 6), a, b, False)


@needs_bf16_dot
def test_wide_blocks_over_several_passes_keep_their_bits_at_any_thread_count():
    """Sums too large to take all at once (each block over every pass in turn): more
    than one 384-token pass, accumulated, same bits at 1, 2 and 3 threads."""
    a, b = _operands(4, 1000, 256, 256, seed=2, token_major=True)
    want = _reference(a, b)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            c = torch.empty(4, 256, 256)
            weight_grad.add_(c, a, b, first=True)
            results.append(c)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], c) for c in results[1:])
    scale = float(want.abs().max())
    assert float((results[0].double() - want).abs().max()) <= 1e-5 * scale * 1000**0.5


@needs_bf16_dot
@pytest.mark.parametrize("which", ["w1", "w2"])
def test_bf16_backward_with_transposed_factors(monkeypatch, which):
    """Factors that are permuted views (a transposed parameter, or autocast's cast of
    one) keep their strides in empty_like: the float32 sums are allocated contiguous."""
    monkeypatch.setattr(multiply_module, "CHUNK_BYTES", 64 * 1024)
    torch.manual_seed(1)
    x = torch.randn(301, 512, dtype=F64)
    w1 = torch.randn(4, 96, 128, dtype=F64) / 11
    w2 = torch.randn(8, 40, 48, dtype=F64) / 7
    g = torch.randn(301, 320, dtype=F64)
    ref = [t.clone().requires_grad_() for t in (x, w1, w2)]
    want = torch.autograd.grad(monarch_multiply_reference(*ref), ref, g)
    low = [t.bfloat16() for t in (x, w1, w2)]
    i = 1 if which == "w1" else 2
    low[i] = low[i].transpose(1, 2).contiguous().transpose(1, 2)  # same values, permuted strides
    low = [t.requires_grad_() for t in low]
    assert not low[i].is_contiguous()
    got = torch.autograd.grad(monarch_multiply(*low), low, g.bfloat16())
    for a, b in zip(got, want):
        assert float((a.double() - b).norm() / b.norm()) < 1e-2


@needs_bf16_dot
@pytest.mark.parametrize("rank, l", [(3, 8), (5, 64)])  # fused into w1 (q % l == 0), or not
def test_bf16_backward_with_a_lowrank_term(monkeypatch, rank, l):
    """The low-rank term's a rides in w1's gradient when fused: every gradient against
    float64, through the kernel."""
    monkeypatch.setattr(multiply_module, "CHUNK_BYTES", 64 * 1024)
    torch.manual_seed(2)
    k, q, p = 4, 96, 128
    r, s = k * q // l, 40
    x = torch.randn(301, k * p, dtype=F64)
    w1 = torch.randn(k, q, p, dtype=F64) / 11
    w2 = torch.randn(l, s, r, dtype=F64) / 7
    a = torch.randn(rank, k * p, dtype=F64) / 20
    b = torch.randn(s * l, rank, dtype=F64) / 3
    g = torch.randn(301, s * l, dtype=F64)
    ref = [t.clone().requires_grad_() for t in (x, w1, w2, a, b)]
    want_y = monarch_multiply_reference(*ref[:3]) + (ref[0] @ ref[3].t()) @ ref[4].t()
    want = torch.autograd.grad(want_y, ref, g)
    low = [t.bfloat16().requires_grad_() for t in (x, w1, w2, a, b)]
    y = monarch_multiply(*low[:3], lowrank=(low[3], low[4]))
    got = torch.autograd.grad(y, low, g.bfloat16())
    for got_t, want_t in zip(got, want):
        assert float((got_t.double() - want_t).norm() / want_t.norm()) < 2e-2
