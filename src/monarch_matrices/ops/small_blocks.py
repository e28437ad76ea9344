"""The Monarch multiply for small blocks, in one pass (``_native/small_blocks.cpp``).

With blocks of 32-64 the two batched GEMMs have inner and outer dims of 32-64,
which the BLAS runs at a fraction of its speed, and the stride permutations
cost as much again.  The native kernel computes a tile of 8 tokens through both
factors with the middle activation in L1, the permutations folded into its
indexing.  Measured on a 2-core AMD EPYC (inference, against the chunked path):
float32 2.0-3.4x faster for blocks of 32-64 from 8 tokens up, 1.2x at 128,
slower on a single token (the weights are re-laid out on every call); bf16,
which the kernel computes in float32, 1.15-1.6x faster for blocks of 32 from 64
tokens up and slower for wider blocks, where oneDNN's bf16 GEMMs win.  Hence
the limits below.  Forward only: training takes the chunked path.
"""

from __future__ import annotations

import torch

from . import native

# widest block (any of p, q, r, s) the kernel takes, and fewest tokens, per dtype
MAX_BLOCK = {torch.float32: 64, torch.bfloat16: 32}
MIN_TOKENS = {torch.float32: 8, torch.bfloat16: 65}
LANES = 16  # the kernel's vectors: q and l must be multiples of this


def applies(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether :func:`forward` takes this multiply (and is faster than the chunked path)."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    dtype = x.dtype
    return (dtype in MAX_BLOCK and w1.dtype == w2.dtype == dtype
            and max(p, q, r, s) <= MAX_BLOCK[dtype] and x.shape[0] >= MIN_TOKENS[dtype]
            and q % LANES == 0 and l % LANES == 0
            # parameters too (detach() drops nn.Parameter, keeps FakeTensor & co.)
            and all(native.plain_cpu_tensor(t.detach()) for t in (x, w1, w2))
            and native.kernels() is not None)


def forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """``x Mᵀ (+ bias)`` for a 2-D contiguous ``x`` where :func:`applies` holds."""
    kernels = native.kernels()
    assert kernels is not None
    l, s, _ = w2.shape
    y = x.new_empty(x.shape[0], s * l)
    w1t = w1.detach().float().transpose(1, 2).contiguous()  # (k, p, q): outputs contiguous
    w2p = w2.detach().float().permute(1, 2, 0).contiguous()  # (s, r, l): blocks contiguous
    b = None if bias is None else bias.detach().float().contiguous()
    kernels.small_blocks_forward_(y, x, w1t, w2p, b)
    return y
