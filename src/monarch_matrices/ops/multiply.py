"""The Monarch multiply: two batched GEMMs with a stride permutation between them.

The fast path processes the tokens in chunks sized so that one chunk's middle
activation and output stay in the L2 cache: the two permutations (the middle
stride permutation and the output interleave) are then copies between cache
lines, not extra passes over memory, and the output is written to memory once.
Backward runs the same way and accumulates the factor gradients chunk by chunk
(in bf16/fp16, ``w1``'s from groups of chunks: see ``GRAD_W1_GROUP_BYTES``) and
the bias gradient while it reads each chunk of the output gradient.
On CPU the permutations (and the bias) run in the optional C++ kernels of
:mod:`~monarch_matrices.ops.permute` when they are built (and a few tokens or
small blocks take the one-pass kernels of :mod:`~monarch_matrices.ops.few_tokens`
and :mod:`~monarch_matrices.ops.small_blocks`, which sum in float32 and round
once), and the output may be allocated on huge pages
(:mod:`~monarch_matrices.ops.memory`); the permutation kernels and huge pages
change no result.  On accelerators the whole batch is one chunk.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.autograd.forward_ad as fwAD

from . import few_tokens, small_blocks, weight_grad
from .memory import empty_huge
from .permute import column_sum_dtype, deinterleave_, interleave_
from .reference import monarch_multiply_bmm
from .shapes import check_factors

__all__ = ["monarch_multiply", "monarch_to_dense"]

# Bytes of middle activation + output one chunk may use in bf16/fp16 (about one
# core's L2 and a half on the 2-core machines this was tuned on; the effect is flat
# nearby).  Dtypes of 4 bytes and more take WIDE_CHUNK_FACTOR times as many bytes,
# so that a float32 chunk has as many tokens as a bf16 one (see chunk_tokens).
CHUNK_BYTES = 6 * 2**20
WIDE_CHUNK_FACTOR = 2
LARGE_FACTOR_BYTES = 12 * 2**20  # factors beyond this take larger chunks (chunk_tokens)
MAX_CHUNK_BYTES = 32 * 2**20
MIN_CHUNK = 64
# Below this many tokens (inference only) the plain two-bmm path is faster: the
# chunked kernel's strided GEMM outputs cost more than they save on tiny batches.
SMALL_BATCH = 64
# In bf16/fp16, backward keeps the gradient of the middle activation for up to this
# many bytes of tokens and takes w1's gradient from all of them in one GEMM per
# block: a long inner dimension, rounded once, instead of a short GEMM and a float32
# accumulation pass per chunk (training steps 1.02-1.11x faster on the bench's
# large cases; float32, which accumulates in place, gained nothing clear: 0.99-1.04x).
# The whole batch fits for most layers; beyond it, groups of chunks.
GRAD_W1_GROUP_BYTES = 64 * 2**20
# The middle permutation runs block by block (see _permute_by_block) only in rows of
# at least this many bytes: shorter ones cost more than the GEMMs' better output gains.
MIN_BLOCK_ROW_BYTES = 128


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or ``None``."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    except RuntimeError:  # a device type autocast does not know, e.g. "meta"
        return None


def chunk_tokens(
    n_tokens: int, middle: int, out: int, dtype: torch.dtype, device: torch.device,
    weight_bytes: int = 0,
) -> int:
    """How many tokens to process at a time (all of them off the CPU).

    Chunks of about ``CHUNK_BYTES`` (``WIDE_CHUNK_FACTOR`` times that for float32 and
    wider: the same tokens as bf16, whose GEMMs then run as long: 768-token float32
    chunks instead of 384 at 768->3072 were 1.01-1.04x faster forward and training,
    at 4096->4096 in 16 blocks 1.03-1.05x forward and 1.07-1.15x training, 3072->768
    1.04x forward, on the Zen 1 VM, paired), or, for factors (``weight_bytes``) of more
    than ``LARGE_FACTOR_BYTES``, as many bytes as the factors up to
    ``MAX_CHUNK_BYTES``: every chunk reads the factors again (and backward adds
    into their gradients again), which for factors beyond the caches costs more
    than permutations out of L2 save (4096->4096 at ``nblocks=4``, paired:
    float32 1.08-1.32x faster forward, 1.08-1.22x training; bf16 1.03-1.08x;
    factors of 8 MiB and less gained nothing or lost).
    """
    if device.type != "cpu":
        return max(n_tokens, 1)
    element_size = torch.empty((), dtype=dtype).element_size()
    per_token = (middle + out) * element_size
    budget = CHUNK_BYTES * (WIDE_CHUNK_FACTOR if element_size >= 4 else 1)
    if weight_bytes > LARGE_FACTOR_BYTES:
        budget = max(budget, min(weight_bytes, MAX_CHUNK_BYTES))
    chunk = max(MIN_CHUNK, budget // per_token // MIN_CHUNK * MIN_CHUNK)
    return max(1, min(n_tokens, chunk))


# A permutation kernel writes (or reads) the l blocks of a block-major buffer as l
# streams, one block stride apart.  When that stride is a multiple of 4 KiB they
# all map to the same L1 sets, and more streams than the cache has ways (16 or
# 32 against 8-12) evict each other: 10x slower copies, measured.
_SET_SPAN = 4096  # bytes of memory that map onto distinct L1 sets
_CACHE_LINE = 64


def _streams_per_set(blocks: int, stride_bytes: int) -> int:
    """How many of ``blocks`` streams ``stride_bytes`` apart start in one L1 set."""
    distinct = _SET_SPAN // math.gcd(stride_bytes % _SET_SPAN or _SET_SPAN, _SET_SPAN)
    return -(-blocks // distinct)


def _block_stride(rows: int, cols: int, element_size: int) -> int:
    """Elements between the blocks of a block-major ``(·, rows, cols)`` buffer that
    spreads over the L1 sets: ``rows·cols`` rounded up to 4 KiB, plus one cache line."""
    nbytes = -(-rows * cols * element_size // _SET_SPAN) * _SET_SPAN + _CACHE_LINE
    return -(-nbytes // element_size)


def _chunk_stride(blocks: int, n: int, cols: int, element_size: int) -> int:
    """Elements between the blocks of one chunk's block-major ``(blocks, n, cols)``.

    Block-major, so that every GEMM reads a stack of row-major matrices; ``n·cols``,
    one contiguous tensor, where the blocks do not crowd into one L1 set: a CPU
    ``bmm`` in bf16/fp16 reads only that as it is and copies anything else first,
    padded or sliced stacks included (a float32 ``bmm`` takes any batch stride).
    Else :func:`_block_stride`, for the permutation kernels' sake.
    """
    if _streams_per_set(blocks, n * cols * element_size) <= 4:
        return n * cols
    return _block_stride(n, cols, element_size)


def _block_major_outputs(t: torch.Tensor) -> bool:
    """Whether the chunked GEMMs write block-major chunks, ``(k, n, q)`` / ``(l, n, s)``,
    that the permutations read in place, rather than strided views of token-major
    ``(n, k, q)`` / ``(n, l, s)`` buffers.

    Block-major, a GEMM writes whole contiguous blocks; token-major, each block's
    rows ``k·q`` apart, 1.1x slower in float32 at 256-wide blocks (forward on the
    Zen 1 VM, paired: 0.94-0.95x of the time at 3072->768 and 4096 at 4 blocks,
    0.97-0.99x at 768->3072).  On CPU in bf16/fp16 the token-major views stay: there
    block-major chunks measured 0.93-1.01x as fast forward (AVX512-BF16 VM).
    """
    return not (t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16))


def _permute_by_block(q: int, l: int, element_size: int) -> bool:
    """Whether the middle stride permutation runs block by block on a block-major
    ``(k, n, q)``, in rows of ``q/l`` elements, rather than over whole tokens.

    Only where ``q/l`` elements make rows of ``MIN_BLOCK_ROW_BYTES``: with 16 floats
    (16 blocks of 256) the block-major forward was 1.01-1.03x slower.
    """
    return q % l == 0 and q // l * element_size >= MIN_BLOCK_ROW_BYTES


def _chunk_buffer(like: torch.Tensor, blocks: int, n_tokens: int, chunk: int, cols: int,
                  reused: bool = False) -> torch.Tensor:
    """Flat storage for every chunk's ``(blocks, n, cols)``, one chunk after another,
    or with ``reused`` room for any one of them (:func:`_chunk_of` cuts them out)."""
    esize = like.element_size()
    full, last = divmod(n_tokens, chunk)
    slots = [_chunk_stride(blocks, chunk, cols, esize)] * min(full, 1 if reused else full)
    if last:
        slots.append(_chunk_stride(blocks, last, cols, esize))
    return like.new_empty(blocks * (max(slots, default=0) if reused else sum(slots)))


def _chunk_scratch(like: torch.Tensor, blocks: int, n_tokens: int, chunk: int, cols: int,
                   block_major: bool) -> torch.Tensor:
    """Room for one chunk's ``(blocks, n, cols)`` at a time: block-major (a reused
    :func:`_chunk_buffer`) or token-major ``(chunk, blocks, cols)``; see :func:`_scratch_of`."""
    if block_major:
        return _chunk_buffer(like, blocks, n_tokens, chunk, cols, reused=True)
    return like.new_empty(chunk, blocks, cols)


def _scratch_of(scratch: torch.Tensor, n: int, chunk: int, blocks: int, cols: int) -> torch.Tensor:
    """The ``(blocks, n, cols)`` of an ``n``-token chunk in a :func:`_chunk_scratch`,
    whichever its layout (token-major ones are 3-D, block-major ones flat)."""
    if scratch.dim() == 3:
        return scratch[:n].transpose(0, 1)
    return _chunk_of(scratch, 0, n, chunk, blocks, cols)


def _chunk_of(flat: torch.Tensor, start: int, n: int, chunk: int, blocks: int,
              cols: int) -> torch.Tensor:
    """The ``(blocks, n, cols)`` of the chunk at token ``start`` in a :func:`_chunk_buffer`."""
    esize = flat.element_size()
    offset = start // chunk * blocks * _chunk_stride(blocks, chunk, cols, esize)
    stride = _chunk_stride(blocks, n, cols, esize)
    slot = flat[offset : offset + blocks * stride].view(blocks, stride)
    return slot[:, : n * cols].view(blocks, n, cols)


def _forward_chunks(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    bias: torch.Tensor | None,
    keep_middle: bool,
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
    keep_lowrank: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, int, torch.Tensor | None]:
    """Chunked forward on a 2-D contiguous ``x``: ``(y, middle or None, chunk, t or None)``.

    ``middle[v, b, u] = h[b, u·l + v]`` is the permuted middle activation, kept
    for the whole batch only when asked (backward needs it for ``w2``'s gradient).
    It is stored block-major, ``(l, tokens, r)``, so that every GEMM reads it as
    a stack of row-major matrices: a bf16 ``bmm`` copies any other layout first.
    With ``lowrank = (a, b)`` each chunk also adds ``(x aᵀ) bᵀ`` to its output
    while that is still in cache; ``t = x aᵀ`` is kept when asked (for ``b``'s
    gradient).
    """
    k, q, p = w1.shape
    l, s, r = w2.shape
    n_tokens = x.shape[0]
    y = empty_huge(x, n_tokens, s * l)  # huge pages if asked for (memory.py)
    chunk = chunk_tokens(n_tokens, k * q, s * l, x.dtype, x.device,
                         weight_bytes=(w1.numel() + w2.numel()) * x.element_size())
    esize = x.element_size()
    if (n_tokens > chunk > 2 and _streams_per_set(l, chunk * s * esize) > 4
            and _streams_per_set(l, (chunk - 2) * s * esize) <= 4):
        # so that backward's output gradient, (l, chunk, s), can be contiguous (see
        # there): 16 bf16 blocks of 256 at 382 tokens, as fast per token as 384
        chunk -= 2
    # block-major, each chunk's (l, n, r) in one piece (see _chunk_stride), all of
    # them when kept for backward, else one chunk's worth reused
    mid = _chunk_buffer(x, l, n_tokens, chunk, r, reused=not keep_middle)
    fused = lowrank is not None and q % l == 0
    if fused:  # a rides in the first GEMM, as R extra rows of every w1 block
        w1 = _with_lowrank_rows(w1, lowrank[0])
    qf = w1.shape[1]
    # z block-major, (l, n, s), where that pays (_block_major_outputs), and h too
    # where its permutation can run block by block (_permute_by_block)
    z_blocks = _block_major_outputs(x)
    h_blocks = z_blocks and _permute_by_block(q, l, esize)
    h = _chunk_scratch(x, k, n_tokens, chunk, qf, h_blocks)
    z = _chunk_scratch(x, l, n_tokens, chunk, s, z_blocks)
    w1t, w2t = w1.transpose(1, 2), w2.transpose(1, 2)
    # a CPU bmm in bf16/fp16 first copies x's strided blocks; with wide blocks one
    # mm per block reads them in place (3072->768 chunk 1.35x faster; a tie at
    # 1024-wide blocks, slower at 192-256: measured)
    blockwise = (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
                 and p >= 512 and n_tokens > SMALL_BATCH)  # few tokens: calls cost more
    # the bias in z's (l, s) layout, for the PyTorch fallback of interleave_ (which
    # adds it to z in cache); the native kernel adds it while interleaving
    bias_ls = None if bias is None else bias.view(s, l).t().contiguous()
    t = b_ls = None
    if lowrank is not None:
        # b in z's layout, b_ls[v, R, e] = b[e·l + v, R]
        rank = lowrank[0].shape[0]
        b_ls = lowrank[1].t().reshape(rank, s, l).permute(2, 0, 1).contiguous()
        t = x.new_empty(n_tokens if keep_lowrank else chunk, rank)
    for start in range(0, n_tokens, chunk):
        n = min(chunk, n_tokens - start)
        xc = x[start : start + n].view(n, k, p)
        hk = _scratch_of(h, n, chunk, k, qf)  # (k, n, qf)
        hc = hk.transpose(0, 1)  # (n, k, qf)
        zk = _scratch_of(z, n, chunk, l, s)  # (l, n, s)
        mc = _chunk_of(mid, start if keep_middle else 0, n, chunk, l, r)  # (l, n, r)
        if blockwise:  # x's blocks in place, not copied by bmm (see above)
            for i in range(k):
                torch.mm(xc[:, i], w1t[i], out=hk[i])
        else:
            torch.bmm(xc.transpose(0, 1), w1t, out=hk)  # (k, n, qf)
        tc = None if t is None else t[start : start + n] if keep_lowrank else t[:n]
        if fused or h_blocks:
            # the stride permutation block by block: with c = c1·l + v,
            # middle[b, v, a·(q/l) + c1] = h[b, a, c1·l + v]
            deinterleave_(mc.view(l, n, k, q // l).permute(1, 2, 0, 3),
                          hc[:, :, :q].unflatten(2, (q // l, l)))
            if fused:
                torch.sum(hk[:, :, q:], dim=0, out=tc)  # x aᵀ = Σ over input blocks
        else:  # whole tokens: h token-major (n, k·q) = (n, r, l)
            deinterleave_(mc.transpose(0, 1).unsqueeze(1), hc.view(n, 1, r, l))
        if tc is not None and not fused:
            torch.mm(x[start : start + n], lowrank[0].t(), out=tc)  # (n, R)
        torch.bmm(mc, w2t, out=zk)  # (l, n, s)
        if tc is not None:
            # the term after the Monarch part: an accumulating batched GEMM into a
            # padded zk (see _chunk_stride) runs one matrix at a time, 1.7x slower
            # per matrix in float32 than torch.bmm, which costs little at rank R
            zk.baddbmm_(tc.expand(l, n, tc.shape[1]), b_ls)
        # y[b, e·l + v] = z[v, b, e] (+ bias): the output interleave
        interleave_(y[start : start + n].view(n, 1, s, l), zk.transpose(0, 1).unsqueeze(1),
                    bias, bias_ls)
    return y, (mid if keep_middle else None), chunk, (t if keep_lowrank else None)


def _with_lowrank_rows(w1: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``(k, q + R, p)``: each block of ``w1`` followed by ``a``'s columns for that block."""
    k, _, p = w1.shape
    return torch.cat([w1, a.reshape(a.shape[0], k, p).transpose(0, 1)], dim=1)


class _MonarchMultiply(torch.autograd.Function):
    """``y = x (M + b a)ᵀ (+ bias)`` for a 2-D ``x``; ``a``, ``b`` optional (low-rank term).

    Saves ``x``, the permuted middle activation and (for ``b``'s gradient) ``x aᵀ``.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
    ) -> torch.Tensor:
        lowrank = None if a is None else (a, b)
        y, mid, chunk, t = _forward_chunks(
            x, w1, w2, bias, keep_middle=ctx.needs_input_grad[2], lowrank=lowrank,
            keep_lowrank=lowrank is not None and ctx.needs_input_grad[5],
        )
        ctx.save_for_backward(x, w1, w2, mid, a, b, t)
        ctx.chunk = chunk
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, w1, w2, mid, a, b, t = ctx.saved_tensors
        need_x, need_w1, need_w2, need_bias, need_a, need_b = ctx.needs_input_grad
        k, q, p = w1.shape
        l, s, r = w2.shape
        n_tokens, chunk = x.shape[0], ctx.chunk
        grad_y = grad_y.contiguous()
        # the low-rank term: y += t bᵀ with t = x aᵀ, so with gt = g b̄ (the gradient of t)
        # grad b = gᵀ t̄, grad a = gtᵀ x̄, grad x += gt ā; per chunk while g is in cache,
        # in the layouts (R first) that MKL's skinny GEMMs run fastest in.  When fused,
        # a is part of the first factor (R more rows per block) and so is gt of its gradient
        lowrank = a is not None
        fused = lowrank and q % l == 0
        w1f = _with_lowrank_rows(w1, a) if fused else w1
        qf = w1f.shape[1]
        grad_x = torch.empty_like(x) if need_x else None
        # factor gradients sum over chunks: in float32 for bf16/fp16, so they are
        # rounded once at the end, as one GEMM over all tokens would round them
        # (with one chunk, as on accelerators, the GEMM already is that)
        low = x.dtype in (torch.bfloat16, torch.float16) and n_tokens > chunk
        # a CPU bmm in bf16/fp16 copies operands that are not stacks of row-major
        # matrices (x's and grad h's blocks are strided); grad w1 one mm per block
        # reads them in place: 1.2-1.8x faster, measured (a float32 bmm is faster)
        blockwise = (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
                     and n_tokens > SMALL_BATCH)  # few tokens: the copies are cheaper than calls
        acc = torch.float32 if low else x.dtype
        # bf16 on CPUs with AVX512-BF16: both factor gradients from one native kernel that
        # adds each chunk's products straight into the float32 sums (weight_grad.py)
        native_grad_w = low and weight_grad.applies(x)
        # the first chunk writes them, later ones add (zero-filling them first cost
        # 0.35 ms of a 0.88 ms 8-token step); no tokens: zeros
        # (contiguous, whatever the factors' strides: the native kernel writes rows)
        new = torch.zeros_like if n_tokens == 0 else torch.empty_like
        contiguous = torch.contiguous_format
        grad_w2 = new(w2, dtype=acc, memory_format=contiguous) if need_w2 else None
        grad_w1f = (new(w1f, dtype=acc, memory_format=contiguous)
                    if need_w1 or (fused and need_a) else None)
        grad_a = new(a, dtype=acc) if need_a and not fused else None
        grad_bt = new(b.t(), dtype=acc, memory_format=torch.contiguous_format) if need_b else None
        scratch: dict[str, torch.Tensor] = {}  # per-chunk products when acc is wider
        gtt = grad_y.new_empty(a.shape[0], chunk) if lowrank else None  # (R, n)
        bct = b.conj().t().contiguous() if lowrank else None  # (R, s·l)
        # complex: the gradient of A @ B is (G Bᴴ, Aᴴ G); conj() is a free view
        w1c, w2c = w1f.conj(), w2.conj()
        esize = grad_y.element_size()
        gz = _chunk_buffer(grad_y, l, n_tokens, chunk, s, reused=True)  # each chunk's (l, n, s)
        m_blocks = _block_major_outputs(grad_y)  # grad m (l, n, r) block-major, as z in forward
        gm = _chunk_scratch(grad_y, l, n_tokens, chunk, r, m_blocks)
        # grad h for a group of chunks: w1's gradient is one GEMM per group (see above)
        group = chunk
        if grad_w1f is not None and low:
            fit = GRAD_W1_GROUP_BYTES // (k * qf * esize) // chunk * chunk
            group = min(n_tokens, max(chunk, fit))
        # block-major (k, group, qf) as in forward (the native bf16 kernel reads the
        # token-major one), else (group, k, qf); ghk below is a chunk's (k, n, qf) view
        h_blocks = m_blocks and _permute_by_block(q, l, esize) and not native_grad_w
        gh = grad_y.new_empty((k, group, qf) if h_blocks else (group, k, qf))
        # the bias gradient, summed while each chunk of grad_y is read for gz (one pass
        # over grad_y fewer); in float64 for float32, float32 for bf16/fp16
        gbias = grad_y.new_zeros(s * l, dtype=column_sum_dtype(grad_y.dtype)) if need_bias else None
        need_h = need_x or grad_w1f is not None
        for start in range(0, n_tokens, chunk):
            n = min(chunk, n_tokens - start)
            rows = slice(start, start + n)
            group_start = start // group * group
            rows_in_group = slice(start - group_start, start - group_start + n)
            gmk = _scratch_of(gm, n, chunk, l, r)  # (l, n, r)
            ghk = gh[:, rows_in_group] if h_blocks else gh[rows_in_group].transpose(0, 1)
            ghc = ghk.transpose(0, 1)  # (n, k, qf)
            # block-major (l, n, s), laid out as _chunk_stride says: a bf16 bmm reads
            # it, transposed or not, without a copy (grad w2 2x faster than token-major)
            gzc = _chunk_of(gz, 0, n, chunk, l, s)
            deinterleave_(gzc.transpose(0, 1).unsqueeze(1), grad_y[rows].view(n, 1, s, l), gbias)
            if lowrank:
                gtc = gtt[:, :n]
                torch.mm(bct, grad_y[rows].t(), out=gtc)  # (R, s·l) @ (s·l, n)
                if need_b:
                    _add_product_(grad_bt, t[rows].conj().t(), grad_y[rows], scratch, "b", start)
                if grad_a is not None:
                    _add_product_(grad_a, gtc, x[rows].conj(), scratch, "a", start)  # (R,n)@(n,k·p)
            if need_w2:
                mc = _chunk_of(mid, start, n, chunk, l, r).conj()  # (l, n, r)
                if native_grad_w:
                    weight_grad.add_(grad_w2, gzc, mc, first=start == 0)
                else:  # (l, s, n) @ (l, n, r)
                    _add_product_(grad_w2, gzc.transpose(1, 2), mc, scratch, "w2", start)
            if not need_h:
                continue
            torch.bmm(gzc, w2c, out=gmk)  # (l, n, r)
            # the inverse stride permutation, block by block or over whole tokens
            if fused or h_blocks:
                interleave_(ghc[:, :, :q].unflatten(2, (q // l, l)),
                            gmk.view(l, n, k, q // l).permute(1, 2, 0, 3))
                if fused:  # every block's a gets all of gt, after its q rows
                    ghc[:, :, q:].copy_(gtc.t().unsqueeze(1))
            else:
                interleave_(ghc.view(n, 1, r, l), gmk.transpose(0, 1).unsqueeze(1))
            if need_x:
                gxc = grad_x[rows].view(n, k, p).transpose(0, 1)
                torch.bmm(ghk, w1c, out=gxc)  # (k, n, p)
                if lowrank and not fused:
                    grad_x[rows].addmm_(gtc.t(), a.conj())  # (n, R) @ (R, k·p)
            end = start + n
            if grad_w1f is not None and (end - group_start == group or end == n_tokens):
                gn = end - group_start
                xg = x[group_start:end].view(gn, k, p).transpose(0, 1).conj()  # (k, gn, p)
                ghg = gh[:, :gn] if h_blocks else gh[:gn].transpose(0, 1)  # (k, gn, qf)
                if native_grad_w:
                    weight_grad.add_(grad_w1f, ghg, xg, first=group_start == 0)
                else:  # (k, qf, gn) @ (k, gn, p)
                    _add_product_(grad_w1f, ghg.transpose(1, 2), xg, scratch, "w1",
                                  group_start, per_block=blockwise)
        grad_w1 = None
        if grad_w1f is not None:
            grad_w1 = grad_w1f[:, :q] if fused else grad_w1f
            if fused and need_a:
                grad_a = grad_w1f[:, q:].transpose(0, 1).reshape(a.shape)
            grad_w1 = grad_w1.contiguous() if need_w1 else None
        grad_bias = None if gbias is None else gbias.to(grad_y.dtype)
        grad_b = None if grad_bt is None else grad_bt.t().contiguous()
        grads = (grad_w1, grad_w2, grad_a, grad_b)
        grad_w1, grad_w2, grad_a, grad_b = (None if g is None else g.to(x.dtype) for g in grads)
        return grad_x, grad_w1, grad_w2, grad_bias, grad_a, grad_b


def _add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  scratch: dict[str, torch.Tensor], key: str, start: int,
                  per_block: bool = False) -> None:
    """``acc += a @ b`` (2-D or batched), or ``acc = a @ b`` for the first chunk
    (``start == 0``); a wider ``acc`` takes the product rounded once.

    ``scratch[key]`` holds that product between chunks (allocated on first use).
    ``per_block`` multiplies a batch one matrix at a time (see the caller).
    """
    first = start == 0
    if a.dim() == 2 or not per_block:
        mul = torch.mm if a.dim() == 2 else torch.bmm
        if first and acc.dtype == a.dtype:
            mul(a, b, out=acc)
        elif acc.dtype == a.dtype:
            (acc.addmm_ if a.dim() == 2 else acc.baddbmm_)(a, b)
        else:
            if key not in scratch:
                scratch[key] = acc.new_empty(acc.shape, dtype=a.dtype)
            mul(a, b, out=scratch[key])
            (acc.copy_ if first else acc.add_)(scratch[key])
        return
    for i in range(a.shape[0]):
        if first and acc.dtype == a.dtype:
            torch.mm(a[i], b[i], out=acc[i])
        elif acc.dtype == a.dtype:
            acc[i].addmm_(a[i], b[i])
        else:
            if key not in scratch:
                scratch[key] = acc.new_empty(acc.shape[1:], dtype=a.dtype)
            torch.mm(a[i], b[i], out=scratch[key])
            (acc[i].copy_ if first else acc[i].add_)(scratch[key])


def monarch_multiply(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    bias: torch.Tensor | None = None,
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Multiply ``x`` by the Monarch matrix with factors ``w1``, ``w2``: ``y = x @ M.T``.

    Args:
        x: ``(*, k·p)``: any number of leading dims, including none or zero-size.
        w1: ``(k, q, p)``: the first block-diagonal factor.
        w2: ``(l, s, r)``: the second block-diagonal factor, with ``k·q = l·r``.
        bias: optional ``(s·l,)``, added in the pass that writes the output.
        lowrank: optional ``(a, b)``, ``a`` of shape ``(R, k·p)`` and ``b`` of shape
            ``(s·l, R)``: computes ``y = x (M + b a)ᵀ`` instead, the rank-``R`` term
            added chunk by chunk while the output is in cache (two skinny GEMMs
            on their own would each make a pass over the whole output).

    Returns:
        ``(*, s·l)``, computed as::

            h[a·q + c] = Σ_j w1[a, c, j] · x[a·p + j]
            y[e·l + v] = Σ_u w2[v, e, u] · h[u·l + v]

    A custom autograd function: it saves only ``x`` and the middle activation
    (the latter only when ``w2`` needs a gradient; for 1-8 tokens on CPU, a
    float32 copy of it, a few KiB), skips the gradients nobody asked for, and
    supports real and complex dtypes; without any gradient to track it skips
    autograd altogether.  Under ``torch.func`` transforms or forward-mode AD it
    runs the plain two-``bmm`` ops, which those see through.  Under autocast the inputs
    are cast to the autocast dtype, as for ``nn.Linear``.  It is differentiable
    once; for higher-order derivatives use
    :func:`~monarch_matrices.ops.monarch_multiply_reference`.

    >>> w1, w2 = torch.randn(2, 3, 4), torch.randn(3, 5, 2)
    >>> monarch_multiply(torch.randn(7, 8), w1, w2).shape
    torch.Size([7, 15])
    """
    check_factors(w1, w2)
    k, q, p = w1.shape
    l, s, r = w2.shape
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != k * p:
        raise ValueError(
            f"x has last dim {tuple(x.shape)[-1:] or '()'} but the Monarch factors expect "
            f"k*p = {k}*{p} = {k * p} input features"
        )
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (s * l,)):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must have shape ({s * l},) = (s*l,), got {shape}")
    a = b = None
    if lowrank is not None:
        a, b = _check_lowrank(lowrank, k * p, s * l)
    cast = _autocast_dtype(x.device.type)
    extra = [t for t in (bias, a, b) if t is not None]
    if cast is not None and x.is_floating_point() and x.dtype != torch.float64:
        x, w1, w2 = x.to(cast), w1.to(cast), w2.to(cast)
        bias, a, b = (None if t is None else t.to(cast) for t in (bias, a, b))
    elif not (x.dtype == w1.dtype == w2.dtype) or any(t.dtype != x.dtype for t in extra):
        raise TypeError(
            f"dtypes differ: x is {x.dtype}, w1 is {w1.dtype}, w2 is {w2.dtype}"
            + ("" if bias is None else f", bias is {bias.dtype}")
            + ("" if a is None else f", lowrank is {a.dtype}/{b.dtype}")
            + "; cast them to one dtype or run under torch.autocast"
        )
    batch_shape = x.shape[:-1]
    if _transformed(x, w1, w2, *extra):  # vmap, jvp, forward-mode AD: plain ops only
        y = monarch_multiply_bmm(x.reshape(-1, k * p), w1, w2)
        y = y if bias is None else y + bias
        y = y if a is None else y + (x.reshape(-1, k * p) @ a.t()) @ b.t()
        return y.reshape(*batch_shape, s * l)
    x2 = x.reshape(-1, k * p).contiguous()
    tensors = [x2, w1, w2, *(t for t in (bias, a, b) if t is not None)]
    training = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if a is None and few_tokens.applies(x2, w1, w2, bias, training):  # 1-8 tokens
        y = few_tokens.multiply(x2, w1, w2, bias)  # (cast above; no op in it autocasts)
    elif not training:
        if a is None and small_blocks.applies(x2, w1, w2, bias):
            y = small_blocks.forward(x2, w1, w2, bias)  # one pass, in L1 (small_blocks.py)
        elif slow_low_precision_gemm(x2):
            y = _in_float32(x2, w1, w2, bias, a, b)
        elif x2.shape[0] <= SMALL_BATCH:
            y = monarch_multiply_bmm(x2, w1, w2)
            y = y if bias is None else y + bias
            y = y if a is None else y + (x2 @ a.t()) @ b.t()
        else:
            lr = None if a is None else (a, b)
            y = _forward_chunks(x2, w1, w2, bias, keep_middle=False, lowrank=lr)[0]
    elif a is None and small_blocks.applies_to_training(x2, w1, w2, bias):
        with torch.autocast(x.device.type, enabled=False):  # (a no-op without autocast)
            y = small_blocks.multiply(x2, w1, w2, bias)
    elif slow_low_precision_gemm(x2):
        y = _in_float32(x2, w1, w2, bias, a, b)
    elif cast is not None:
        with torch.autocast(x.device.type, enabled=False):
            y = _MonarchMultiply.apply(x2, w1, w2, bias, a, b)
    else:
        y = _MonarchMultiply.apply(x2, w1, w2, bias, a, b)
    return y.reshape(*batch_shape, s * l)


def slow_low_precision_gemm(x: torch.Tensor) -> bool:
    """Whether ``x`` is bf16/fp16 on a CPU without a fast GEMM for it.

    Without AVX-512 (bf16) or AVX512-FP16/AMX-FP16 (fp16) PyTorch's CPU GEMMs in
    those dtypes are several times slower than in float32: on a Zen 1 EPYC (AVX2)
    8192 tokens of 768->3072 took 4.9 s in bf16 against 0.83-0.91 s cast to
    float32 and back (measured).  The multiply then runs in float32 and is rounded once,
    which is also more accurate; the small-block and few-token kernels, which
    compute in float32 anyway, are taken first.
    """
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return not _fast_cpu_gemm(x.dtype)


@functools.cache
def _fast_cpu_gemm(dtype: torch.dtype) -> bool:
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a torch without the probe: assume fast, as before
        return True


def _in_float32(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None,
                a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """The multiply in float32, rounded once to ``x``'s dtype (see
    :func:`slow_low_precision_gemm`); differentiable, gradients in the inputs' dtypes.
    Training saves a float32 copy of ``x``."""
    with torch.autocast(x.device.type, enabled=False):  # else the float32 inputs are cast back
        xf, w1f, w2f, bf, af, bbf = (None if t is None else t.float()
                                     for t in (x, w1, w2, bias, a, b))
        y = monarch_multiply(xf, w1f, w2f, bf, lowrank=None if a is None else (af, bbf))
    return y.to(x.dtype)


def _transformed(*tensors: torch.Tensor) -> bool:
    """Whether any input is seen through a functorch transform (``vmap``, ``grad``,
    ``jvp``) or carries a forward-mode tangent: then only the plain differentiable
    ops see the transform; the native kernels would read raw memory and the
    custom autograd function would drop the tangent."""
    if torch.compiler.is_compiling():  # Dynamo handles transforms itself (and the native
        return False                    # paths are skipped there: native.plain_cpu_tensor)
    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    dual_level = getattr(fwAD, "_current_level", 0)  # -1 outside any dual_level()
    for t in tensors:
        if wrapped is not None and wrapped(t):
            return True
        if dual_level >= 0 and fwAD.unpack_dual(t).tangent is not None:
            return True
    return False


def _check_lowrank(lowrank: object, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` of a rank-R term for a ``n_in → n_out`` multiply, or a clear error."""
    if not (isinstance(lowrank, (tuple, list)) and len(lowrank) == 2
            and all(isinstance(t, torch.Tensor) for t in lowrank)):
        raise TypeError("lowrank must be a pair of tensors (a, b)")
    a, b = lowrank
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != n_in or b.shape[0] != n_out \
            or a.shape[0] != b.shape[1]:
        raise ValueError(
            f"lowrank a {tuple(a.shape)} and b {tuple(b.shape)} must be (R, {n_in}) and "
            f"({n_out}, R) for this multiply"
        )
    return a, b


def monarch_to_dense(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The ``(s·l, k·p)`` matrix ``M`` with ``monarch_multiply(x, w1, w2) == x @ M.T``.

    Differentiable in ``w1`` and ``w2`` (to any order); one multiply of the identity.

    >>> w1 = torch.randn(2, 3, 4, dtype=torch.float64)
    >>> w2 = torch.randn(3, 5, 2, dtype=torch.float64)
    >>> x = torch.randn(6, 8, dtype=torch.float64)
    >>> torch.allclose(monarch_multiply(x, w1, w2), x @ monarch_to_dense(w1, w2).T)
    True
    """
    check_factors(w1, w2)
    k, _, p = w1.shape
    eye = torch.eye(k * p, dtype=w1.dtype, device=w1.device)
    return monarch_multiply_bmm(eye, w1, w2).T
