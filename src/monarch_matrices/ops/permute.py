"""The Monarch multiply's stride permutations: native kernels where they apply, else ``copy_``.

Both take 4-D views ``(n1, n2, ., .)`` (tokens, blocks) and swap the last two
dims into a destination that already exists; the native kernels
(:mod:`~monarch_matrices.ops.native`) and the PyTorch fallback give identical
results.
"""

from __future__ import annotations

import torch

from . import native

# dtypes the kernels take (complex and integers use copy_)
NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _native_for(t: torch.Tensor):
    if t.dtype not in NATIVE_DTYPES or not native.plain_cpu_tensor(t):
        return None
    return native.kernels()


def interleave_(
    dst: torch.Tensor,
    src: torch.Tensor,
    bias: torch.Tensor | None = None,
    bias_src: torch.Tensor | None = None,
) -> None:
    """``dst[i, j, e, v] = src[i, j, v, e] (+ bias[e·l + v])``.

    ``dst``'s last two dims must be contiguous, ``src``'s rows too.  The
    fallback adds ``bias_src`` (the bias in ``src``'s ``(l, m)`` layout) to
    ``src`` in place first, so ``src`` must be scratch when a bias is given.
    """
    kernels = _native_for(src)
    if kernels is not None:
        kernels.interleave_(dst, src, None if bias is None else bias.contiguous())
        return
    if bias is not None:
        src.add_(bias_src)
    dst.copy_(src.transpose(2, 3))


def column_sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulator :func:`deinterleave_`'s column sum takes for a source dtype."""
    if dtype.is_complex:
        return torch.complex128
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def deinterleave_(dst: torch.Tensor, src: torch.Tensor, colsum: torch.Tensor | None = None) -> None:
    """``dst[i, j, v, e] = src[i, j, e, v]``: ``src``'s last two dims contiguous, ``dst``'s rows.

    With ``colsum`` (``l·m`` elements of :func:`column_sum_dtype`) also adds
    ``src`` summed over its first two dims, flattened as ``e·l + v``: a bias
    gradient taken in the same pass (the native kernel sums each row while it
    is in L1).
    """
    kernels = _native_for(src)
    if kernels is not None and (colsum is None or native.plain_cpu_tensor(colsum)):
        kernels.deinterleave_(dst, src, colsum)
        return
    dst.copy_(src.transpose(2, 3))
    if colsum is not None:
        colsum.add_(src.sum(dim=(0, 1), dtype=colsum.dtype).view(colsum.shape))
