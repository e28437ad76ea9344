"""The Monarch multiply for small blocks, in one pass (``_native/small_blocks.cpp``).

With blocks of 32-64 the two batched GEMMs have inner and outer dims of 32-64,
which the BLAS runs at a fraction of its speed, and the stride permutations cost
as much again.  The native kernel computes a tile of 8 tokens (6 without
AVX-512) through both factors with the middle activation in L1, the permutations
folded into its indexing.  Measured on a 2-core AMD EPYC (inference, against the
chunked path): float32 2.0-3.4x faster for blocks of 32-64 from 8 tokens up,
1.2x at 128, slower on a single token (the weights are re-laid out on every
call); bf16, which the kernel computes in float32, 1.15-1.6x faster for blocks
of 32 from 64 tokens up and slower for wider blocks, where oneDNN's bf16 GEMMs
win.  Hence the limits below.  Training runs the same way
(:class:`_SmallBlocksMultiply`: backward is the two stages in the other order
and one pass that sums both weight gradients and, in float64, the bias's), which
also needs ``p`` to be a multiple of 16.  The bf16 forward on CPUs with
AVX512-BF16 takes ``_native/small_blocks_dpbf16.cpp`` instead: the same tiles
with pairs of bf16 products per instruction, the middle rounded to bf16 between
the factors as the bf16 GEMMs round it; 1.7-2.1x faster than the float32-FMA
kernel on the sqrt(n) Monarch of 1024, weights packed on every call included.
Its backward is one pass over the tokens (``small_blocks_backward_dpbf16_``), 64 at a
time: ``grad h`` and ``grad x`` by the two dot-product stages in the other order
(``grad h`` rounded to bf16 between them, as the chunked path's bf16 GEMMs round
it), then both factor gradients and the bias's from those 64 rows of ``grad y``,
``h``, ``grad h`` and ``x`` while they are in cache, in pairs of tokens, the next 64
rows fetched meanwhile.  As three passes (the weight gradients from a stored ``grad
h``) the same backward was 1.24x slower, and 1.10-1.16x slower without the fetching
ahead.  Sums are per task, added in task order: equal runs give equal bits, thread
counts may differ in the last bits.
"""

from __future__ import annotations

import functools

import torch

from . import native
from .permute import column_sum_dtype

# widest block (any of p, q, r, s) the kernel takes, and fewest tokens, per dtype
# (wider ones only in the tier of WIDE_* below)
MAX_BLOCK = {torch.float32: 64, torch.bfloat16: 32}
MIN_TOKENS = {torch.float32: 8, torch.bfloat16: 65}
# bf16 inference with the dot-product kernel (AVX512-BF16, p even), measured against
# the chunked path at 1024 features: blocks of 64 at 8192 tokens 4.5x over nn.Linear
# (chunked 2.9x), a tie at 256; sqrt(n) blocks of 32 at 64 tokens 1.9x (1.0x), at 16
# tokens 0.67x (0.84x: packing the weights on every call dominates)
DOT_MAX_BLOCK, DOT_MIN_TOKENS = 64, 64
LANES = 16  # the kernel's vectors: q and l must be multiples of this

# Wider blocks, where the kernels run as fast as oneDNN's GEMMs or faster and save the
# chunked path's permutation passes and copies (docs/speed.md item 26).  Measured on
# the Zen 4 VM (AVX-512 with BF16), paired against the chunked path, 16 and 32 blocks
# of 64-256 at 256, 1024 and 4096 tokens:
# - inference, blocks up to 256 and factors up to 2.4 M elements: bf16 1.15-2.5x from
#   1024 tokens (0.68-1.0x at 256: packing the weights on every call), float32
#   1.06-1.73x from 256 tokens (1.0x at 256 tokens with 8-9 MiB of factors);
# - training, blocks up to 128 and factors under 1 M elements: bf16 1.16-1.65x, float32
#   1.06-1.35x at 1024 and 4096 tokens; beyond that the backward's per-task float32
#   weight-gradient sums outgrow L2 (0.78-1.03x: blocks of 192-256, or 128 with 1 M
#   elements).
# Only on CPUs with AVX-512 (float32) or AVX512-BF16 (bf16): the AVX2 build's 6-token
# tiles were measured slower than oneDNN from 128-wide blocks (1.2x at 128, Zen 1).
WIDE_MAX_BLOCK = {False: 256, True: 128}  # by training
WIDE_MAX_FACTOR_ELEMENTS = {False: 5 * 2**19, True: 2**20 - 1}  # w1 + w2, by training
WIDE_MIN_TOKENS = {(torch.float32, False): 256, (torch.float32, True): 1024,
                   (torch.bfloat16, False): 1024, (torch.bfloat16, True): 1024}


def _bf16_dot(x: torch.Tensor, w1: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and w1.shape[2] % 2 == 0 and native.bf16_dot()


@functools.cache
def _avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _wide(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, training: bool) -> bool:
    """Whether blocks wider than ``MAX_BLOCK`` / ``DOT_MAX_BLOCK`` go to the kernel too."""
    dtype = x.dtype
    if dtype == torch.bfloat16:
        if not _bf16_dot(x, w1):
            return False
    elif dtype != torch.float32 or not _avx512():
        return False
    return (max(*w1.shape[1:], *w2.shape[1:]) <= WIDE_MAX_BLOCK[training]
            and w1.numel() + w2.numel() <= WIDE_MAX_FACTOR_ELEMENTS[training]
            and x.shape[0] >= WIDE_MIN_TOKENS[dtype, training])


def applies(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
            bias: torch.Tensor | None = None, training: bool = False) -> bool:
    """Whether :func:`forward` takes this multiply (and is faster than the chunked path)."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    dtype = x.dtype
    if dtype not in MAX_BLOCK or not native.plain_cpu_tensor(x):  # (before any kernel probe)
        return False
    if not (w1.dtype == w2.dtype == dtype and q % LANES == 0 and l % LANES == 0
            and all(native.plain_cpu_tensor(t)
                    for t in (x, w1, w2, *(() if bias is None else (bias,))))
            and native.kernels() is not None):
        return False
    widest, fewest = MAX_BLOCK[dtype], MIN_TOKENS[dtype]
    if not training and _bf16_dot(x, w1):
        widest, fewest = DOT_MAX_BLOCK, DOT_MIN_TOKENS
    return (max(p, q, r, s) <= widest and x.shape[0] >= fewest) or _wide(x, w1, w2, training)


def applies_to_training(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                        bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`multiply` takes this multiply with gradients (``p`` 16-wide too)."""
    return applies(x, w1, w2, bias, training=True) and w1.shape[2] % LANES == 0


def forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None,
            mid: torch.Tensor | None = None) -> torch.Tensor:
    """``x Mᵀ (+ bias)`` for a 2-D contiguous ``x`` where :func:`applies` holds (no
    autograd); an ``(N, k·q)`` ``mid`` in ``x``'s dtype also receives the middle activation."""
    kernels = native.kernels()
    assert kernels is not None
    l, s, _ = w2.shape
    y = x.new_empty(x.shape[0], s * l)
    if _bf16_dot(x, w1):  # pairs of bf16 products (AVX512-BF16)
        w1p, w2p = _pack_pairs(w1.detach(), w2.detach())
        b = None if bias is None else bias.detach().float().contiguous()
        kernels.small_blocks_forward_dpbf16_(y, x, w1p, w2p, b, mid)
        return y
    w1t = w1.detach().float().transpose(1, 2).contiguous()  # (k, p, q): outputs contiguous
    w2p = w2.detach().float().permute(1, 2, 0).contiguous()  # (s, r, l): blocks contiguous
    b = None if bias is None else bias.detach().float().contiguous()
    kernels.small_blocks_forward_(y, x, w1t, w2p, b, mid)
    return y


def _pack_pairs(w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors as ``small_blocks_dpbf16.cpp`` reads them: ``w1p[a, j/2, c, i] =
    w1[a, c, j + i]`` and ``w2p[e, u/2, v, i] = w2[v, e, u + i]`` (an odd last ``u``
    paired with zero), so that each 32-bit lane holds the two terms of one product pair."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    w1p = w1.reshape(k, q, p // 2, 2).permute(0, 2, 1, 3).contiguous()
    w2e = torch.nn.functional.pad(w2, (0, r % 2))
    w2p = w2e.reshape(l, s, (r + 1) // 2, 2).permute(1, 2, 0, 3).contiguous()
    return w1p, w2p


def _pack_grad_pairs(w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors as backward's stages read them, in pairs along their sums:
    ``w2g[u, e/2, v, i] = w2[v, e + i, u]`` (an odd last ``e`` paired with zero) and
    ``w1g[a, c/2, j, i] = w1[a, c + i, j]``."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    w2e = torch.nn.functional.pad(w2, (0, 0, 0, s % 2))  # (l, s rounded up, r)
    w2g = w2e.reshape(l, (s + 1) // 2, 2, r).permute(3, 1, 0, 2).contiguous()
    w1g = w1.reshape(k, q // 2, 2, p).permute(0, 1, 3, 2).contiguous()
    return w2g, w1g


class _SmallBlocksMultiply(torch.autograd.Function):
    """``y = x Mᵀ (+ bias)`` through the kernels; saves ``x`` and, when ``w2`` needs a
    gradient, the middle activation (as the chunked path does).  Asked only for
    ``w1``'s gradient, the float32 backward computes ``grad x`` too: it comes with
    ``grad h`` (the bf16 one keeps ``grad h`` per tile and skips it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        keep = ctx.needs_input_grad[2]
        mid = x.new_empty(x.shape[0], w1.shape[0] * w1.shape[1]) if keep else None
        y = forward(x, w1, w2, bias, mid)
        ctx.save_for_backward(x, w1, w2, mid)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, w1, w2, mid = ctx.saved_tensors
        need_x, need_w1, need_w2, need_bias = ctx.needs_input_grad
        g = grad_y.contiguous()
        if _bf16_dot(x, w1):  # pairs of bf16 products (AVX512-BF16), one pass
            return _backward_bf16_dot(x, g, mid, w1, w2, need_x, need_w1, need_w2, need_bias)
        kernels = native.kernels()
        assert kernels is not None
        k, q, p = w1.shape
        l, s, r = w2.shape
        grad_x = grad_w1 = grad_w2 = grad_bias = None
        gh = None
        if need_x or need_w1:  # grad h (and grad x) by the two stages in the other order
            gx = torch.empty_like(x)
            gh = x.new_empty(x.shape[0], k * q)
            w2q = w2.detach().float().permute(2, 1, 0).contiguous()  # (r, s, l)
            kernels.small_blocks_grad_x_(gx, gh, g, w2q, w1.detach().float().contiguous())
            grad_x = gx if need_x else None
        if need_w1 or need_w2:
            gw1t = x.new_zeros(k, p, q, dtype=torch.float32) if need_w1 else None
            gw2p = x.new_zeros(s, r, l, dtype=torch.float32) if need_w2 else None
            # the bias gradient too, in float64, while the kernel reads grad y
            colsum = g.new_zeros(s * l, dtype=torch.float64) if need_bias else None
            # an (N, k·q) stand-in for whichever of grad h and h is not needed
            gh_or = mid if gh is None else gh
            kernels.small_blocks_grad_w_(gw1t, gw2p, x, gh_or, g, gh_or if mid is None else mid,
                                         k, l, colsum)
            grad_bias = None if colsum is None else colsum.to(g.dtype)
            if need_w1:
                grad_w1 = gw1t.transpose(1, 2).to(w1.dtype).contiguous()
            if need_w2:
                grad_w2 = gw2p.permute(2, 0, 1).to(w2.dtype).contiguous()
        if need_bias and grad_bias is None:  # (no factor gradient wanted)
            grad_bias = g.sum(0, dtype=column_sum_dtype(g.dtype)).to(g.dtype)
        return grad_x, grad_w1, grad_w2, grad_bias


def _backward_bf16_dot(
    x: torch.Tensor, g: torch.Tensor, mid: torch.Tensor | None, w1: torch.Tensor,
    w2: torch.Tensor, need_x: bool, need_w1: bool, need_w2: bool, need_bias: bool,
) -> tuple[torch.Tensor | None, ...]:
    """bf16 ``(grad x, grad w1, grad w2, grad bias)`` by ``small_blocks_backward_dpbf16_``:
    one pass over the tokens, 64 at a time, ``grad h`` kept in the task's own rows and
    both factor gradients summed (in float32) while that tile is in cache."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    gx = torch.empty_like(x) if need_x else None
    gw1 = x.new_empty(k, q, p, dtype=torch.float32) if need_w1 else None
    gw2p = x.new_empty(s, r, l, dtype=torch.float32) if need_w2 else None
    colsum = g.new_zeros(s * l, dtype=column_sum_dtype(g.dtype)) if need_bias else None
    w2g, w1g = _pack_grad_pairs(w1.detach(), w2.detach())
    native.kernels().small_blocks_backward_dpbf16_(
        gx, gw1, gw2p, colsum, g, x if need_w1 else None, mid if need_w2 else None, w2g, w1g)
    return (gx,
            None if gw1 is None else gw1.to(x.dtype),
            None if gw2p is None else gw2p.permute(2, 0, 1).to(x.dtype).contiguous(),  # [v, e, u]
            None if colsum is None else colsum.to(g.dtype))


def multiply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    """``x Mᵀ (+ bias)`` with autograd, where :func:`applies_to_training` holds."""
    return _SmallBlocksMultiply.apply(x, w1, w2, bias)
