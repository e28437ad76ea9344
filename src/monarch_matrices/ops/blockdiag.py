"""Block-diagonal matrices: one Monarch factor on its own (the paper's sparse baseline)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .project import _check_dense
from .shapes import monarch_shape

__all__ = ["BlockdiagProjection", "blockdiag_multiply", "blockdiag_to_dense", "project_blockdiag"]


class BlockdiagProjection(NamedTuple):
    """Result of :func:`project_blockdiag`: the blocks and the error they achieve."""

    w: torch.Tensor
    error: torch.Tensor
    relative_error: torch.Tensor


def _check_blocks(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 3:
        raise ValueError(f"w must be 3-D (blocks, rows, cols), got shape {tuple(w.shape)}")


def blockdiag_multiply(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``y = x @ B.T`` for the block-diagonal ``B`` with blocks ``w``: ``(*, k·p) → (*, k·q)``.

    >>> blockdiag_multiply(torch.randn(5, 6), torch.randn(2, 4, 3)).shape
    torch.Size([5, 8])
    """
    _check_blocks(w)
    k, q, p = w.shape
    if x.dim() == 0 or x.shape[-1] != k * p:
        raise ValueError(
            f"x has last dim {tuple(x.shape)[-1:] or '()'} but the blocks expect "
            f"k*p = {k}*{p} = {k * p} input features"
        )
    batch_shape = x.shape[:-1]
    y = torch.bmm(x.reshape(-1, k, p).transpose(0, 1), w.transpose(1, 2))  # (k, B, q)
    return y.transpose(0, 1).reshape(*batch_shape, k * q)


def blockdiag_to_dense(w: torch.Tensor) -> torch.Tensor:
    """The ``(k·q, k·p)`` block-diagonal matrix with blocks ``w``."""
    _check_blocks(w)
    return torch.block_diag(*w.unbind(0)) if w.shape[0] else w.new_zeros(0, 0)


def project_blockdiag(weight: torch.Tensor, nblocks: int = 4) -> BlockdiagProjection:
    """Nearest block-diagonal layer weight to a dense ``(out, in)`` matrix.

    Keeping the diagonal blocks and dropping the rest is optimal in Frobenius
    norm (the entries are independent).  Sizes not divisible by ``nblocks`` are
    zero-padded, as in :class:`~monarch_matrices.nn.BlockdiagLinear`.
    """
    _check_dense(weight)
    out_f, in_f = weight.shape
    shape = monarch_shape(in_f, out_f, nblocks)
    b, ib, ob = shape.nblocks, shape.in_block, shape.out_block
    padded = F.pad(weight, (0, b * ib - in_f, 0, b * ob - out_f))
    idx = torch.arange(b, device=weight.device)
    w = padded.reshape(b, ob, b, ib)[idx, :, idx, :]  # (b, ob, ib)
    target = weight.to(torch.complex128 if weight.is_complex() else torch.float64)
    err = (target - blockdiag_to_dense(w.to(target.dtype))[:out_f, :in_f]).norm()
    norm = target.norm()
    rel = err / norm if norm > 0 else torch.zeros_like(err)
    return BlockdiagProjection(w.contiguous(), err, rel)
