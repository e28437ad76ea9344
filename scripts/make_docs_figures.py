"""Draw the figures of ``docs/math.md``: the structure of a Monarch matrix and one slice.

    python scripts/make_docs_figures.py               # writes docs/figures/*.png
    python scripts/make_docs_figures.py --out /tmp/f  # somewhere else

Every index in the pictures comes from the library itself (``monarch_shape``,
``monarch_to_dense``, ``blockdiag_to_dense``, ``slice_channel_counts``): the two
stride permutations are read off by multiplying probe factors, and the script
checks that the pieces it draws multiply back to ``monarch_to_dense``.  If the
library's convention changed, the figures would follow it (or the check would
stop the script with an error); nothing here restates the convention.

Only matplotlib's Agg canvas is used (no pyplot, no display), and each PNG is
written to a temporary file next to its destination and then renamed into place.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from monarch_matrices.ops import (
    MonarchShape,
    blockdiag_to_dense,
    monarch_shape,
    monarch_to_dense,
    slice_channel_counts,
)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "figures"
STRUCTURE_PNG = "monarch_structure.png"
SLICE_PNG = "monarch_slice.png"

# (label, in_features, out_features, nblocks, rank) for the rows of the structure figure.
EXAMPLES = [
    (
        "in = out = 16, nblocks = 4 (default width = rank 1: the square Monarch P L Pᵀ R)",
        16,
        16,
        4,
        None,
    ),
    ("in = out = 16, nblocks = 4, rank = 2", 16, 16, 4, 2),
    (
        "in = 10, out = 14, nblocks = 4 (padded; middle block 3 < 4, so some slices are empty)",
        10,
        14,
        4,
        None,
    ),
]
# The slice figure: which example (index into EXAMPLES) and which slice (a, v).
SLICE_EXAMPLE, SLICE_A, SLICE_V = 1, 1, 2

_BACKGROUND = np.ones(3)
_FREE = np.array(to_rgb("0.82"))
_PERM = np.array(to_rgb("0.15"))


def _palette(n: int) -> np.ndarray:
    """``n`` distinguishable colours, one per slice."""
    from matplotlib import colormaps

    base = colormaps["tab20"].colors
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))  # dark shades first
    return np.array([base[order[i % 20]][:3] for i in range(n)])


@dataclass
class Anatomy:
    """The pieces of ``M = P_out · B2 · P_mid · B1`` for one shape, all from the library."""

    shape: MonarchShape
    w1: torch.Tensor  # (k, q, p)
    w2: torch.Tensor  # (l, s, r)
    b1: torch.Tensor  # blockdiag(w1): (k·q, k·p)
    b2: torch.Tensor  # blockdiag(w2): (l·s, l·r)
    p_mid: torch.Tensor  # (l·r, k·q) permutation: channel t -> column of B2
    p_out: torch.Tensor  # (s·l, l·s) permutation: row of B2 -> output row of M
    dense: torch.Tensor  # monarch_to_dense(w1, w2): (s·l, k·p), padded
    channel_block: torch.Tensor  # (k·q,) input block a of channel t
    channel_residue: torch.Tensor  # (k·q,) block v of B2 that channel t feeds
    channel_position: torch.Tensor  # (k·q,) column u inside that block
    row_residue: torch.Tensor  # (s·l,) block v of B2 that output row i comes from
    row_position: torch.Tensor  # (s·l,) row e inside that block


def _permutation_from_columns(index: torch.Tensor, size: int) -> torch.Tensor:
    perm = torch.zeros(size, size, dtype=torch.float64)
    perm[index, torch.arange(size)] = 1.0
    return perm


def anatomy(
    in_features: int, out_features: int, nblocks: int, rank: int | None, seed: int = 0
) -> Anatomy:
    """Random factors of the given layer shape and the permutations between them.

    The permutations are measured, not restated: with ``w1`` made of identity
    blocks the first factor disappears, and ``w2`` filled with numbered entries
    makes each entry of ``monarch_to_dense`` name the entry of ``w2`` it came from.
    """
    shape = monarch_shape(in_features, out_features, nblocks, rank)
    k, q, p = shape.w1_shape
    l, s, r = shape.w2_shape
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(k, q, p, generator=gen, dtype=torch.float64)
    w2 = torch.randn(l, s, r, generator=gen, dtype=torch.float64)

    eye = torch.eye(q, dtype=torch.float64).expand(k, q, q)
    # Number each column (v, u) of blockdiag(w2): probe[t] = 1 + index of t's column.
    col_ids = torch.arange(1, l * r + 1, dtype=torch.float64).reshape(l, 1, r)
    probe = monarch_to_dense(eye, col_ids)  # (l, k·q); one nonzero per column
    b2_col = probe.sum(0).round().long() - 1  # (k·q,)
    if sorted(b2_col.tolist()) != list(range(l * r)):
        raise RuntimeError("probing the middle permutation did not give a permutation")
    p_mid = _permutation_from_columns(b2_col, l * r)

    # Number each row (v, e) of blockdiag(w2): every nonzero of output row i is 1 + its row.
    row_ids = torch.arange(1, l * s + 1, dtype=torch.float64).reshape(l, s, 1).expand(l, s, r)
    probe = monarch_to_dense(eye, row_ids)  # (s·l, k·q)
    b2_row = probe.amax(1).round().long() - 1  # (s·l,)
    if sorted(b2_row.tolist()) != list(range(l * s)):
        raise RuntimeError("probing the output permutation did not give a permutation")
    p_out = torch.zeros(s * l, l * s, dtype=torch.float64)
    p_out[torch.arange(s * l), b2_row] = 1.0

    b1, b2 = blockdiag_to_dense(w1), blockdiag_to_dense(w2)
    dense = monarch_to_dense(w1, w2)
    if not torch.allclose(p_out @ b2 @ p_mid @ b1, dense, atol=1e-12):
        raise RuntimeError("P_out · B2 · P_mid · B1 does not reproduce monarch_to_dense")

    t = torch.arange(k * q)
    return Anatomy(
        shape,
        w1,
        w2,
        b1,
        b2,
        p_mid,
        p_out,
        dense,
        channel_block=t // q,  # rows of blockdiag(w1) come in blocks of q
        channel_residue=b2_col // r,  # columns of blockdiag(w2) come in blocks of r
        channel_position=b2_col % r,
        row_residue=b2_row // s,  # rows of blockdiag(w2) come in blocks of s
        row_position=b2_row % s,
    )


def slice_channels(an: Anatomy, a: int, v: int) -> torch.Tensor:
    """The middle channels that touch slice ``(a, v)``, in increasing order."""
    hit = (an.channel_block == a) & (an.channel_residue == v)
    return torch.nonzero(hit).flatten()


def slice_rows(an: Anatomy, v: int) -> torch.Tensor:
    """Rows of ``M`` in slice ``(·, v)``, ordered by their row ``e`` inside block ``v``."""
    rows = torch.nonzero(an.row_residue == v).flatten()
    return rows[torch.argsort(an.row_position[rows])]


def _check_slices(an: Anatomy) -> None:
    """Each slice is the sum of its channels' rank-one terms; counts match the library."""
    k, q, p = an.shape.w1_shape
    l = an.shape.nblocks
    counts = slice_channel_counts(k, q, l)
    for a in range(k):
        for v in range(l):
            chans = slice_channels(an, a, v)
            if len(chans) != int(counts[a, v]):
                raise RuntimeError(
                    f"slice ({a}, {v}) has {len(chans)} channels but slice_channel_counts "
                    f"says {int(counts[a, v])}"
                )
            block = an.dense[slice_rows(an, v)][:, a * p : (a + 1) * p]
            total = torch.zeros_like(block)
            for t in chans.tolist():
                total += torch.outer(_w2_column(an, t), _w1_row(an, t))
            if not torch.allclose(block, total, atol=1e-12):
                raise RuntimeError(f"slice ({a}, {v}) is not the sum of its channels")


def _w1_row(an: Anatomy, t: int) -> torch.Tensor:
    q = an.shape.middle_block
    return an.w1[t // q, t % q, :]


def _w2_column(an: Anatomy, t: int) -> torch.Tensor:
    return an.w2[int(an.channel_residue[t]), :, int(an.channel_position[t])]


# ---------------------------------------------------------------------------- drawing


def _slice_of_channel(an: Anatomy) -> torch.Tensor:
    return an.channel_block * an.shape.nblocks + an.channel_residue


def _rgb(mask: torch.Tensor, colour_index: torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """An RGB image: entries where ``mask`` holds get ``palette[colour_index]``, others white."""
    img = np.tile(_BACKGROUND, (*mask.shape, 1))
    m = mask.numpy()
    img[m] = palette[colour_index.numpy()[m]]
    return img


def _shade_free(img: np.ndarray, rows: slice | None = None, cols: slice | None = None) -> None:
    """Blend the padded (free) rows or columns towards grey."""
    if rows is not None:
        img[rows] = 0.45 * img[rows] + 0.55 * _FREE
    if cols is not None:
        img[:, cols] = 0.45 * img[:, cols] + 0.55 * _FREE


def _show(ax, img: np.ndarray, title: str, block_rows: int = 0, block_cols: int = 0) -> None:
    ax.imshow(img, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    h, w = img.shape[:2]
    for y in range(block_rows, h, block_rows or h):
        ax.axhline(y - 0.5, color="0.6", lw=0.5)
    for x in range(block_cols, w, block_cols or w):
        ax.axvline(x - 0.5, color="0.6", lw=0.5)
    ax.set_xlabel(f"{h}×{w}", fontsize=8)


def _draw_structure_row(subfig, label: str, an: Anatomy) -> None:
    sh = an.shape
    k, q, p = sh.w1_shape
    l, s, r = sh.w2_shape
    palette = _palette(k * l)
    sid = _slice_of_channel(an)  # (k·q,) slice of each channel

    # blockdiag(w1): row t belongs to channel t.
    b1_mask = blockdiag_to_dense(torch.ones_like(an.w1)) != 0
    b1_img = _rgb(b1_mask, sid[:, None].expand_as(b1_mask), palette)
    # blockdiag(w2): column v·r + u belongs to the channel P_mid sends there.
    chan_of_col = an.p_mid.argmax(1)  # (l·r,)
    b2_mask = blockdiag_to_dense(torch.ones_like(an.w2)) != 0
    b2_img = _rgb(b2_mask, sid[chan_of_col][None, :].expand_as(b2_mask), palette)
    # P_mid: the one entry of column t has channel t's colour.
    pm_mask = an.p_mid != 0
    pm_img = _rgb(pm_mask, sid[None, :].expand_as(pm_mask), palette)
    po_img = np.tile(_BACKGROUND, (*an.p_out.shape, 1))
    po_img[an.p_out.numpy() != 0] = _PERM
    # M: entry (i, col) lies in slice (col div p, residue of row i); structural zeros
    # (slices with no channel) are where the all-ones factors give 0.
    counts = monarch_to_dense(torch.ones_like(an.w1), torch.ones_like(an.w2))
    m_sid = (torch.arange(k * p) // p)[None, :] * l + an.row_residue[:, None]
    m_img = _rgb(counts != 0, m_sid, palette)

    if sh.padded_in > sh.in_features:
        free = slice(sh.in_features, None)
        _shade_free(b1_img, cols=free)
        _shade_free(m_img, cols=free)
    if sh.padded_out > sh.out_features:
        free = slice(sh.out_features, None)
        _shade_free(po_img, rows=free)
        _shade_free(m_img, rows=free)

    panels = [
        (po_img, "P_out", 0, 0),
        (b2_img, f"B2 = blockdiag(w2)\nw2: {tuple(an.w2.shape)}", s, r),
        (pm_img, "P_mid", 0, 0),
        (b1_img, f"B1 = blockdiag(w1)\nw1: {tuple(an.w1.shape)}", q, p),
        (m_img, "M = P_out·B2·P_mid·B1\n(colour = slice)", 0, p),
    ]
    widths = [img.shape[1] for img, *_ in panels]
    axes = subfig.subplots(1, len(panels), gridspec_kw={"width_ratios": widths})
    for ax, (img, title, br, bc) in zip(axes, panels):
        _show(ax, img, title, br, bc)
    subfig.suptitle(label, fontsize=10, fontweight="bold")


def draw_structure(anatomies: list[tuple[str, Anatomy]]) -> Figure:
    fig = Figure(figsize=(13, 4.0 * len(anatomies)), layout="constrained")
    FigureCanvasAgg(fig)
    subfigs = fig.subfigures(len(anatomies), 1, hspace=0.04)
    for subfig, (label, an) in zip(np.atleast_1d(subfigs), anatomies):
        _draw_structure_row(subfig, label, an)
    return fig


def draw_slice(an: Anatomy, a: int, v: int) -> Figure:
    """Where slice (a, v) sits in M, the slice itself, and its rank-one channel terms."""
    k, q, p = an.shape.w1_shape
    l = an.shape.nblocks
    chans = slice_channels(an, a, v).tolist()
    rows = slice_rows(an, v)
    block = an.dense[rows][:, a * p : (a + 1) * p]
    terms = [torch.outer(_w2_column(an, t), _w1_row(an, t)) for t in chans]
    lim = float(max(x.abs().max() for x in [block, *terms]))

    fig = Figure(figsize=(3.0 * (2 + len(terms)), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 + len(terms))

    where = np.tile(_BACKGROUND, (*an.dense.shape, 1))
    where[:] = 0.9
    colour = _palette(k * l)[a * l + v]
    for i in rows.tolist():
        where[i, a * p : (a + 1) * p] = colour
    _show(axes[0], where, f"slice (a={a}, v={v}) inside M", 0, p)

    titles = [f"the slice ({block.shape[0]}×{block.shape[1]}, {len(chans)} channels)"]
    for n, t in enumerate(chans):
        sign = "=" if n == 0 else "+"
        titles.append(
            f"{sign} channel t={t}:\nw2[{v},:,{int(an.channel_position[t])}]"
            f" ⊗ w1[{t // q},{t % q},:]"
        )
    im = None
    for n, (ax, img, title) in enumerate(zip(axes[1:], [block, *terms], titles)):
        im = ax.imshow(img.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("column j  (input a·p + j)", fontsize=8)
        if n == 0:
            ax.set_ylabel("row e  (output e·l + v)", fontsize=8)
    fig.colorbar(im, ax=axes[1:], shrink=0.8, label="value")
    return fig


# ---------------------------------------------------------------------------- output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save_atomic(fig: Figure, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            # No software/date metadata, so re-running gives identical bytes.
            fig.savefig(fh, format="png", dpi=130, metadata={"Software": None})
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_figures(out_dir: Path) -> list[Path]:
    """Draw both figures into ``out_dir`` (created if needed); return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    anatomies = []
    for label, in_f, out_f, b, rank in EXAMPLES:
        an = anatomy(in_f, out_f, b, rank)
        _check_slices(an)
        anatomies.append((label, an))
    written = []
    for name, fig in [
        (STRUCTURE_PNG, draw_structure(anatomies)),
        (SLICE_PNG, draw_slice(anatomies[SLICE_EXAMPLE][1], SLICE_A, SLICE_V)),
    ]:
        path = out_dir / name
        _save_atomic(fig, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder for the PNGs (default: {DEFAULT_OUT})",
    )
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    for path in make_figures(args.out):
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
