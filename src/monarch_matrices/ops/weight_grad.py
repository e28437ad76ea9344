"""bf16 factor gradients summed in float32 by one kernel (``_native/weight_grad_dpbf16.cpp``).

Both factor gradients of a Monarch layer are, block by block, a product whose
sum runs over the tokens: ``grad w2[v] = gzᵀ mid`` and ``grad w1[a] = ghᵀ x``.
On CPU in bf16 the chunked backward took them from oneDNN, which reads those
token-major operands transposed and ran them at 400-600 GFLOP/s on the 2-core
AMD EPYC VM (a dense GEMM: 700-800), and every chunk's product, rounded to
bf16, took another pass to add it into the float32 sum (docs/speed.md, item 8).
On CPUs with AVX512-BF16 the native kernel packs pairs of tokens while they
are in cache and adds the products straight into the float32 sum: rounded
once at the end, not once per chunk, and with the same bits at any thread count.
"""

from __future__ import annotations

import torch

from . import native


def applies(x: torch.Tensor) -> bool:
    """Whether :func:`add_` takes the factor gradients of a bf16 multiply of ``x``."""
    if x.dtype != torch.bfloat16 or not native.plain_cpu_tensor(x):  # before any kernel probe
        return False
    return native.bf16_dot()


def add_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``acc[i] += a[i]ᵀ b[i]`` (``=`` when ``first``), summed in float32.

    ``acc`` is ``(B, M, N)`` float32, ``a`` ``(B, T, M)`` and ``b`` ``(B, T, N)`` bf16,
    each with a unit last stride (views of token-major buffers are fine).
    """
    kernels = native.kernels()
    assert kernels is not None
    kernels.weight_grad_dpbf16_(acc, a, b, not first)
