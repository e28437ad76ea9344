"""The optional C++ permutation kernels and the huge-page buffers, against plain PyTorch.

``make`` builds the kernels, so they must be loaded here unless the run turns
them off with ``MONARCH_MATRICES_NATIVE=0``; every kernel result must equal
the ``copy_``/``add_`` path bit for bit, and so must whole multiplies (but for
the bias gradient, a column sum the kernel adds up in another order).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from monarch_matrices.ops import memory, monarch_multiply, native, permute
from monarch_matrices.ops import multiply as multiply_module

DISABLED = os.environ.get(native.ENV_SWITCH, "1") == "0"
needs_kernels = pytest.mark.skipif(DISABLED, reason="MONARCH_MATRICES_NATIVE=0")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view, so NaNs compare by their bits."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.fixture
def kernels():
    module = native.kernels()
    assert module is not None, f"native kernels not loaded: {native.status()}"
    return module


def test_the_kernels_are_built_and_loaded():
    if DISABLED:
        assert native.kernels() is None and "disabled" in native.status()
    else:
        assert native.available(), native.status()


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("l", [1, 2, 3, 4, 5, 8, 16, 32, 64])
@pytest.mark.parametrize("m", [13, 75])  # 75: whole vectors of 8 to 32 lanes, and a tail
def test_interleave_matches_copy_and_add(kernels, dtype, l, m):
    gen = torch.Generator().manual_seed(l * 100 + m)
    n1, n2 = 5, 3
    # src rows of m with a gap between them and between the (i, j) blocks
    base = torch.randn(n1, n2 + 1, l, m + 3, generator=gen).to(dtype)
    src = base[:, 1:, :, 2 : 2 + m]
    bias = torch.randn(m * l, generator=gen).to(dtype)
    if dtype in (torch.bfloat16, torch.float16, torch.float32):
        bias[3] = float("nan")
        bias[4] = float("inf")
    for b in (None, bias):
        dst = torch.full((n1, n2, m, l), 7.0, dtype=dtype)
        kernels.interleave_(dst, src, b)
        want = src.transpose(2, 3).clone()
        if b is not None:
            want = (src.clone() + b.view(m, l).t()).transpose(2, 3)
        want = want.contiguous()
        # PyTorch's own bf16 add rounds a NaN to 0x7FC0 in its scalar loop but to
        # 0xFFFF in its vector loop (from 32 elements on): NaNs compare by place
        nan = want.isnan()
        assert torch.equal(dst.isnan(), nan)
        assert torch.equal(_bits(dst)[~nan], _bits(want)[~nan])


def _bf16_round_to_nearest_even(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 bits as c10::BFloat16 rounds a scalar: integer arithmetic, NaN -> 0x7FC0."""
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    rounded = torch.where(x.isnan(), torch.full_like(rounded, 0x7FC0), rounded)
    return rounded.to(torch.int32).to(torch.int16)  # low 16 bits, two's complement


@needs_kernels
@pytest.mark.parametrize("m", [5, 64, 77])  # the vector loop (32 at a time) and its tail
def test_interleave_bf16_bias_rounds_every_value_as_c10(kernels, m):
    """Subnormal sums, NaN, infinities and overflow included: the kernel's hardware
    rounding hands those to the exact path, so its bits equal c10::BFloat16's."""
    l = 4
    gen = torch.Generator().manual_seed(m)
    src = torch.randn(3, 1, l, m, generator=gen).to(torch.bfloat16)
    bias = torch.randn(m * l, generator=gen).to(torch.bfloat16)
    specials = torch.tensor([1e-39, -3e-39, 1e-45, float("nan"), float("inf"), -float("inf"),
                             3e38, 0.0]).to(torch.bfloat16)
    flat_src = src.view(-1)
    for at in (0, 40, flat_src.numel() - 9):  # one in the first 32, some later
        flat_src[at : at + len(specials)] = specials
    bias[7:9] = torch.tensor([3e38, -0.0]).to(torch.bfloat16)  # 3e38 + 3e38 overflows
    dst = torch.empty(3, 1, m, l, dtype=torch.bfloat16)
    kernels.interleave_(dst, src, bias)
    exact = src.float() + bias.float().view(m, l).t()  # exact in float32
    want = _bf16_round_to_nearest_even(exact.transpose(2, 3).contiguous())
    assert torch.equal(_bits(dst), want)


@needs_kernels
@pytest.mark.parametrize("dtype", [*DTYPES, torch.complex64])
@pytest.mark.parametrize("l", [1, 2, 4, 7, 8, 16, 32, 40])
@pytest.mark.parametrize("m", [11, 75])  # 75: whole vectors of 8 to 32 lanes, and a tail
def test_deinterleave_matches_copy(kernels, dtype, l, m):
    n1, n2 = 4, 3
    src = torch.randn(n1, n2, m, l, dtype=torch.float64).to(dtype)
    if dtype == torch.complex64:  # a copy: any 2-, 4- or 8-byte element will do
        src = src + 1j * torch.randn(src.shape)
    base = torch.zeros(n1, n2, l + 1, m + 5, dtype=dtype)
    dst = base[:, :, 1:, 3 : 3 + m]  # rows of m, strided
    kernels.deinterleave_(dst, src)
    want = src.transpose(2, 3).contiguous()
    assert torch.equal(dst, want) if dtype.is_complex else torch.equal(_bits(dst), _bits(want))
    outside = torch.ones_like(base, dtype=torch.bool)
    outside[:, :, 1:, 3 : 3 + m] = False
    assert (base[outside] == 0).all()  # nothing written outside dst, on any side


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("l", [1, 4, 7, 8, 16])
@pytest.mark.parametrize("n1", [1, 3, 4, 9, 130])  # rows in groups of 4 and the rest
def test_deinterleave_column_sum(kernels, dtype, l, n1):
    gen = torch.Generator().manual_seed(n1 * 100 + l)
    n2, m = 2, 43  # whole vectors of 8 to 32 lanes, and a tail
    src = torch.randn(n1, n2, m, l, generator=gen).to(dtype)
    dst = torch.empty(n1, n2, l, m, dtype=dtype)
    start = torch.randn(m * l, generator=gen)
    colsum = start.to(permute.column_sum_dtype(dtype), copy=True)
    kernels.deinterleave_(dst, src, colsum)
    assert torch.equal(_bits(dst), _bits(src.transpose(2, 3).contiguous()))  # still the copy
    want = start.double() + src.double().sum(dim=(0, 1)).reshape(-1)  # flattened as e·l + v
    tol = 1e-12 if colsum.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(colsum.double(), want, rtol=tol, atol=tol * n1 * n2)


@needs_kernels
def test_deinterleave_column_sum_refuses_a_wrong_accumulator(kernels):
    src = torch.randn(3, 1, 5, 4, dtype=torch.bfloat16)
    dst = torch.empty(3, 1, 4, 5, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="sum must be a contiguous CPU Float tensor of 20"):
        kernels.deinterleave_(dst, src, torch.zeros(20, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="of 20 elements"):
        kernels.deinterleave_(dst, src, torch.zeros(19))
    with pytest.raises(RuntimeError, match="Double tensor"):
        kernels.deinterleave_(dst.float(), src.float(), torch.zeros(20))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64])
def test_permute_deinterleave_column_sum_with_and_without_kernels(monkeypatch, dtype):
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(37, 1, 6, 4, generator=gen).to(dtype)
    if dtype.is_complex:
        src = src + 1j * torch.randn(src.shape, generator=gen)
    want = src.to(torch.complex128 if dtype.is_complex else torch.float64).sum(dim=(0, 1))
    results = []
    for native_path in (True, False):
        if not native_path:
            _without_kernels(monkeypatch)
        colsum = torch.zeros(24, dtype=permute.column_sum_dtype(dtype))
        dst = torch.empty(37, 1, 4, 6, dtype=dtype)
        permute.deinterleave_(dst, src, colsum)
        assert torch.equal(dst, src.transpose(2, 3).contiguous())
        results.append(colsum)
    for colsum in results:
        torch.testing.assert_close(colsum.to(want.dtype), want.reshape(-1), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_kernels_refuse_bad_views(kernels):
    src = torch.randn(2, 1, 4, 6)
    with pytest.raises(RuntimeError, match="last two dims swapped"):
        kernels.interleave_(torch.empty(2, 1, 4, 6), src)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        kernels.interleave_(torch.empty(2, 1, 6, 4, dtype=torch.float64), src)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        kernels.interleave_(torch.empty(2, 1, 4, 6).transpose(2, 3), src)
    with pytest.raises(RuntimeError, match="bias must be"):
        kernels.interleave_(torch.empty(2, 1, 6, 4), src, torch.randn(23))
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        z = torch.randn(2, 1, 6, 4, dtype=torch.complex128)
        kernels.deinterleave_(torch.empty(2, 1, 4, 6, dtype=torch.complex128), z)
    with pytest.raises(RuntimeError, match="4-D"):
        kernels.deinterleave_(torch.empty(4, 6), torch.empty(6, 4))


def _without_kernels(monkeypatch):
    monkeypatch.setattr(permute, "_native_for", lambda t: None)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lowrank", [None, "fused", "separate"])
@pytest.mark.parametrize("by_block", [False, True])
def test_multiply_and_gradients_equal_the_pytorch_path_bit_for_bit(monkeypatch, dtype, lowrank,
                                                                   by_block):
    # the middle permutation block by block (rows of q/l) or over whole tokens
    monkeypatch.setattr(multiply_module, "MIN_BLOCK_ROW_BYTES", 0 if by_block else 10**9)
    gen = torch.Generator().manual_seed(0)
    k, q, p, l, s = 4, 8, 6, 4, 5  # q % l == 0: the fused low-rank path
    if lowrank == "separate":
        q = 6
    r = k * q // l
    tensors = [torch.randn(*shape, generator=gen).to(dtype)
               for shape in ((300, k * p), (k, q, p), (l, s, r), (s * l,))]
    if lowrank is not None:
        tensors += [torch.randn(3, k * p, generator=gen).to(dtype),
                    torch.randn(s * l, 3, generator=gen).to(dtype)]
    g = torch.randn(300, s * l, generator=gen).to(dtype)
    monkeypatch.setattr(multiply_module, "CHUNK_BYTES", 4096)  # several chunks

    def run():
        leaves = [t.clone().requires_grad_() for t in tensors]
        x, w1, w2, bias, *ab = leaves
        y = monarch_multiply(x, w1, w2, bias, lowrank=tuple(ab) if ab else None)
        y.backward(g)
        with torch.no_grad():  # the inference path too
            y_inf = monarch_multiply(x, w1, w2, bias, lowrank=tuple(ab) if ab else None)
        return [y.detach(), y_inf, *(t.grad for t in leaves)]

    fast = run()
    _without_kernels(monkeypatch)
    slow = run()
    for i, (a, b) in enumerate(zip(fast, slow)):
        if i == 5:  # the bias gradient: the same float32/float64 sum, added in another order
            torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float32 else 0.01, atol=0)
        else:
            assert torch.equal(a, b)


def test_status_and_switch(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    native._load.cache_clear()
    try:
        assert native.kernels() is None and not native.available()
        assert "disabled" in native.status()
        y = monarch_multiply(torch.randn(100, 8), torch.randn(2, 4, 4), torch.randn(2, 4, 4))
        assert y.shape == (100, 8)
    finally:
        monkeypatch.undo()
        native._load.cache_clear()


def test_missing_build_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV_DIR, str(tmp_path))
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    native._load.cache_clear()
    try:
        assert native.kernels() is None
        assert "monarch-matrices native build" in native.status()
    finally:
        monkeypatch.undo()
        native._load.cache_clear()


def test_the_build_name_follows_the_source_and_flags():
    assert native.module_name() != native.module_name(native.PORTABLE_FLAGS)
    assert native.module_name().startswith("monarch_native_")


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "none"
    return text.split("[", 1)[1].split("]", 1)[0]


def _advised(t: torch.Tensor) -> list[bool]:
    """For each mapping over ``t``'s whole 2 MiB pages, whether it carries the
    ``hg`` VmFlag (madvise(MADV_HUGEPAGE) given), from /proc/self/smaps."""
    lo, hi = memory.huge_page_span(t)
    advised, inside = [], False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start < hi and end > lo
        elif inside and line.startswith("VmFlags:"):
            advised.append("hg" in line.split()[1:])
    return advised


def test_biases_of_any_layout_and_fake_tensors_work():
    x, w1, w2 = torch.randn(100, 8), torch.randn(2, 4, 4), torch.randn(2, 8, 4)  # 8 -> 16
    dense = torch.randn(16, 3)
    want = monarch_multiply(x, w1, w2, dense[:, 1].contiguous())
    for bias in (dense[:, 1], torch.randn(32)[::2], torch.randn(1).expand(16)):
        y = monarch_multiply(x, w1, w2, bias)  # strided and expanded views of a bias
        assert torch.allclose(y, monarch_multiply(x, w1, w2, bias.contiguous()))
    assert torch.allclose(monarch_multiply(x, w1, w2, dense[:, 1]), want)

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # no memory behind them: the kernels and madvise must stay away
        xs = torch.randn(8192, 1024)
        y = monarch_multiply(xs, torch.randn(4, 256, 256), torch.randn(4, 256, 256),
                             torch.randn(1024))
        assert y.shape == (8192, 1024)
        t = memory.empty_huge(xs, 8192, 4096)
        assert t.shape == (8192, 4096)


@pytest.fixture
def huge_pages_on(monkeypatch):
    monkeypatch.setenv(memory.ENV_SWITCH, "1")
    memory._madvise.cache_clear()
    yield
    monkeypatch.undo()
    memory._madvise.cache_clear()


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"),
                    reason="transparent huge pages are off on this system")
def test_large_buffers_get_huge_pages_when_asked(huge_pages_on):
    assert memory.huge_pages_enabled()
    t = memory.empty_huge(torch.ones(1), 16 * 2**20)  # 64 MiB of float32
    lo, hi = memory.huge_page_span(t)
    assert hi - lo >= 30 * memory.HUGE_PAGE
    # the advice is what we control: the kernel marks the advised range "hg"
    # (VM_HUGEPAGE).  Whether 2 MiB pages then back it is the kernel's choice:
    # with none free it falls back to small pages (CI, stop 26), so the
    # AnonHugePages count is not asserted.
    advised = _advised(t)
    assert advised and all(advised), advised
    assert not any(_advised(torch.empty(16 * 2**20)))
    t.fill_(1.0)
    assert float(t.sum()) == 16 * 2**20


@pytest.mark.parametrize("value", [None, "0", "off", "2"])
def test_huge_pages_are_opt_in(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(memory.ENV_SWITCH, raising=False)
    else:
        monkeypatch.setenv(memory.ENV_SWITCH, value)
    memory._madvise.cache_clear()
    try:
        assert not memory.huge_pages_enabled()  # so advise_huge_pages never calls madvise
        t = memory.empty_huge(torch.ones(1), 16 * 2**20)
        assert t.shape == (16 * 2**20,)
        assert not any(_advised(t))  # never advised
    finally:
        monkeypatch.undo()
        memory._madvise.cache_clear()


def test_cli_native_status(capsys):
    from monarch_matrices.cli import main

    assert main(["native", "status"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("native kernels: ")
    if native.available():  # and says whether the bf16 kernels have dot products
        assert "bf16 dot products (AVX512-BF16): " in out


@needs_kernels
def test_bias_gradient_is_equal_on_equal_runs():
    """The column sum's per-task partials are added in task order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(8)  # more tasks than cores: finishing order varies
    try:
        gen = torch.Generator().manual_seed(0)
        x, g = torch.randn(4096, 256, generator=gen), torch.randn(4096, 512, generator=gen)
        w1, w2 = torch.randn(4, 64, 64, generator=gen), torch.randn(4, 128, 64, generator=gen)
        grads = []
        for _ in range(6):
            bias = torch.zeros(512, requires_grad=True)
            monarch_multiply(x, w1, w2, bias).backward(g)
            grads.append(bias.grad)
        for grad in grads[1:]:
            assert torch.equal(grad, grads[0])
        torch.testing.assert_close(grads[0].double(), g.double().sum(0), rtol=1e-6, atol=1e-6)
    finally:
        torch.set_num_threads(threads)
