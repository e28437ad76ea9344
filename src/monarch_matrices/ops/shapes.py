"""Shape bookkeeping shared by every part of the library.

The index convention (see ``docs/math.md``): ``w1`` has shape ``(k, q, p)`` — k blocks
of q×p — and ``w2`` has shape ``(l, s, r)`` — l blocks of s×r — with ``k·p = n_in`` and
``k·q = l·r`` (the middle width).  A layer with ``in_features``, ``out_features`` and
``nblocks = b`` pads its input to ``b·ceil(in/b)`` and cuts its output to
``out_features``; :func:`monarch_shape` turns those three numbers into factor shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["MonarchShape", "check_factors", "monarch_shape", "slice_channel_counts"]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1")
    return value


@dataclass(frozen=True)
class MonarchShape:
    """Factor shapes of a Monarch layer ``in_features → out_features``.

    Attributes:
        in_features, out_features: the layer's (unpadded) sizes.
        nblocks: number of blocks ``b`` in each factor (``k = l = b``).
        in_block, out_block: ``ceil(in/b)`` and ``ceil(out/b)``.
        middle_block: ``q = r``, the width of one block of the middle activation.
        rank: channels per slice when ``middle_block`` is a multiple of ``nblocks``
            (the slice rank), else ``None`` (slices then differ by one in rank).
    """

    in_features: int
    out_features: int
    nblocks: int
    in_block: int
    out_block: int
    middle_block: int

    @property
    def w1_shape(self) -> tuple[int, int, int]:
        """``(k, q, p)``."""
        return (self.nblocks, self.middle_block, self.in_block)

    @property
    def w2_shape(self) -> tuple[int, int, int]:
        """``(l, s, r)``."""
        return (self.nblocks, self.out_block, self.middle_block)

    @property
    def padded_in(self) -> int:
        return self.nblocks * self.in_block

    @property
    def padded_out(self) -> int:
        return self.nblocks * self.out_block

    @property
    def middle_features(self) -> int:
        return self.nblocks * self.middle_block

    @property
    def rank(self) -> int | None:
        q, b = self.middle_block, self.nblocks
        return q // b if q % b == 0 else None

    @property
    def num_params(self) -> int:
        """Parameters of the two factors (no bias)."""
        return math.prod(self.w1_shape) + math.prod(self.w2_shape)

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features


def monarch_shape(
    in_features: int, out_features: int, nblocks: int = 4, rank: int | None = None
) -> MonarchShape:
    """Factor shapes for a Monarch layer, validating every argument.

    By default the middle width is ``b·min(ceil(in/b), ceil(out/b))`` — the
    paper's choice, which for ``in = out = m²`` and ``b = m`` is the square
    Monarch matrix ``P L Pᵀ R``.  ``rank=ρ`` instead sets the middle block to
    ``ρ·b`` so that every slice (see ``docs/math.md``) holds exactly ρ channels:
    ``rank=1, nblocks=√n`` is the paper's square Monarch, larger ranks are more
    expressive.  ``rank`` may not exceed ``min(ceil(in/b), ceil(out/b))``, the
    largest rank a slice can have.

    >>> s = monarch_shape(768, 3072, nblocks=4)
    >>> s.w1_shape, s.w2_shape, s.rank
    ((4, 192, 192), (4, 768, 192), 48)
    >>> monarch_shape(16, 16, nblocks=4, rank=1).w1_shape
    (4, 4, 4)
    """
    _check_positive_int("in_features", in_features)
    _check_positive_int("out_features", out_features)
    _check_positive_int("nblocks", nblocks)
    limit = min(in_features, out_features)
    if nblocks > limit:
        which = "in_features" if in_features <= out_features else "out_features"
        raise ValueError(
            f"nblocks={nblocks} does not fit {which}={limit}; use 1 <= nblocks <= {limit}"
        )
    ib = -(-in_features // nblocks)
    ob = -(-out_features // nblocks)
    if rank is None:
        q = min(ib, ob)
    else:
        _check_positive_int("rank", rank)
        max_rank = min(ib, ob)
        if rank > max_rank:
            raise ValueError(
                f"rank={rank} is more than a slice can hold for in_features={in_features}, "
                f"out_features={out_features}, nblocks={nblocks}; use 1 <= rank <= {max_rank}"
            )
        q = rank * nblocks
    return MonarchShape(in_features, out_features, nblocks, ib, ob, q)


def check_factors(w1: torch.Tensor, w2: torch.Tensor) -> None:
    """Raise a ``ValueError`` naming the problem unless ``(w1, w2)`` are Monarch factors."""
    for name, w in (("w1", w1), ("w2", w2)):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
        if w.dim() != 3:
            raise ValueError(
                f"{name} must be 3-D (blocks, rows, cols), got shape {tuple(w.shape)}"
            )
    k, q, _ = w1.shape
    l, _, r = w2.shape
    if k * q != l * r:
        raise ValueError(
            f"middle widths differ: w1 {tuple(w1.shape)} gives k*q={k * q} but "
            f"w2 {tuple(w2.shape)} gives l*r={l * r}; they must be equal"
        )
    if w1.device != w2.device:
        raise ValueError(f"w1 is on {w1.device} but w2 is on {w2.device}")


def slice_channel_counts(
    k: int, q: int, l: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """How many middle channels touch each slice ``(a, v)``: a ``(k, l)`` int64 tensor.

    Channel ``t = a·q + c`` belongs to slice ``(a, t mod l)``; in block ``a`` those
    are the ``c ≡ c0 (mod l)`` with ``c0 = (v - a·q) mod l``, i.e. ``ceil((q - c0)/l)``
    of them.  The count bounds the rank of the slice.

    >>> slice_channel_counts(2, 3, 2).tolist()
    [[2, 1], [1, 2]]
    """
    a = torch.arange(k, device=device)[:, None]
    v = torch.arange(l, device=device)[None, :]
    c0 = (v - a * q) % l
    return torch.div(q - c0 + l - 1, l, rounding_mode="floor").clamp(min=0)
