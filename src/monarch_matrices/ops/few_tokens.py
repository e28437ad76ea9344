"""The Monarch multiply for a few tokens (1-16), forward and backward (``_native/few_tokens.cpp``).

With a handful of tokens each GEMM of a Monarch multiply is a matrix-vector
product bound by reading the weights once, but every CPU GEMM call has a fixed
cost (about 20-30 us in bf16 with oneDNN, however small), and a training step
makes six of them plus a dozen small tensor ops.  A bf16 training step of a
768->3072 layer at 1-8 tokens then ran at 0.88-1.10x of ``nn.Linear``'s
speed (the bench, 2026-12-03).  The native kernel makes one pass over each
weight per pass of the multiply, the tokens' activations in L1, the
permutations folded into its indexing, and sums in float32 in a fixed order:
the bits do not depend on the thread count, but (as with a BLAS) they may on
how many tokens share the call, which sets how a dot product is split.
"""

from __future__ import annotations

import torch

from . import native

# Where the kernel is used (it takes up to 16 tokens).  Measured on a 2-core AMD
# EPYC against the other paths, in speedup over nn.Linear, forward / training:
# float32 at 1-8 tokens 2.3-5.3x / 2.6-7.2x (chunked or small-block path 1.7-2.9x
# / 1.6-3.1x); bf16 at 1 token 2.0-3.6x / 2.4-2.9x (1.0-2.0x / 0.7-1.1x), at 8
# tokens 1.4-2.3x / 1.6-2.2x (0.8-1.0x / 0.7-1.1x).  The bf16 forward needs the
# AVX512-BF16 dot products for that at 8 tokens: without them (float32 FMAs on
# widened weights) it was slower than the plain two-bmm path there, so bf16
# inference then stops at 4 tokens.  From 16 tokens, and with blocks of 1024
# (whose weight rows it walks in 64-column strips), the GEMM paths are as fast or
# faster.  On a Zen 4 EPYC the bf16 forward at 8 tokens of 768->3072 was slower than
# nn.Linear (0.87x) until the lanes of all tokens' sums were added together (1.78x,
# the two-bmm path 1.17x; docs/speed.md item 24).
MAX_TOKENS = {torch.float32: 8, torch.bfloat16: 8}
BF16_INFERENCE_WITHOUT_DOT = 4
MAX_BLOCK = 768


def applies(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
            bias: torch.Tensor | None = None, training: bool = False) -> bool:
    """Whether :func:`multiply` takes this multiply (and is faster than the GEMM paths):
    1-8 tokens (bf16 inference 1-4 without AVX512-BF16), float32 or bf16, blocks up to
    768 wide, on CPU."""
    if x.dtype not in MAX_TOKENS or not 0 < x.shape[0] <= MAX_TOKENS[x.dtype]:
        return False
    if not native.plain_cpu_tensor(x):  # before loading the kernels: not under compile
        return False                     # or on another device
    kernels = native.kernels()
    if (not training and x.dtype == torch.bfloat16 and x.shape[0] > BF16_INFERENCE_WITHOUT_DOT
            and not native.bf16_dot()):
        return False
    return (kernels is not None
            and 0 < min(*w1.shape, *w2.shape) and max(*w1.shape[1:], *w2.shape[1:]) <= MAX_BLOCK
            and w1.dtype == w2.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype)
            and all(native.plain_cpu_tensor(t)
                    for t in (w1, w2, *(() if bias is None else (bias,)))))


def _forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
             bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    kernels = native.kernels()
    assert kernels is not None
    l, s, r = w2.shape
    y = x.new_empty(x.shape[0], s * l)
    mid = x.new_empty(x.shape[0], l * r, dtype=torch.float32)
    b = None if bias is None else bias.detach().float().contiguous()
    kernels.few_tokens_forward_(y, mid, x, w1.detach().contiguous(), w2.detach().contiguous(), b)
    return y, mid


class _FewTokensMultiply(torch.autograd.Function):
    """``y = x Mᵀ (+ bias)`` through the kernel; saves ``x`` and the float32 middle
    activation (a few KiB), and computes only the gradients asked for."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        y, mid = _forward(x, w1, w2, bias)
        ctx.save_for_backward(x, w1, w2, mid)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, w1, w2, mid = ctx.saved_tensors
        need_x, need_w1, need_w2, need_bias = ctx.needs_input_grad
        kernels = native.kernels()
        assert kernels is not None
        gx = torch.empty_like(x) if need_x else None
        gw1 = torch.empty_like(w1, memory_format=torch.contiguous_format) if need_w1 else None
        gw2 = torch.empty_like(w2, memory_format=torch.contiguous_format) if need_w2 else None
        gb = x.new_empty(w2.shape[0] * w2.shape[1]) if need_bias else None
        kernels.few_tokens_backward_(grad_y.contiguous(), x, w1.detach().contiguous(),
                                     w2.detach().contiguous(), mid, gx, gw1, gw2, gb)
        return gx, gw1, gw2, gb


def multiply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    """``x Mᵀ (+ bias)`` for a 2-D contiguous ``x`` where :func:`applies` holds, with
    autograd when any input needs a gradient."""
    tensors = (x, w1, w2, *(() if bias is None else (bias,)))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _FewTokensMultiply.apply(x, w1, w2, bias)
    return _forward(x, w1, w2, bias)[0]
