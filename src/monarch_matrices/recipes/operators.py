"""Fourier neural operators whose Fourier transforms are either fixed (FFT) or learnable (Monarch).

The FNO (Li et al., 2021) mixes channels in Fourier space: transform, keep the
lowest ``modes`` frequencies, multiply by learned complex weights, transform
back.  The Monarch paper's neural operator keeps everything but makes the
transforms themselves learnable: each forward and inverse DFT becomes a
:class:`~monarch_matrices.nn.MonarchProduct` initialized to the exact DFT
(:func:`monarch_matrices.transforms.dft`), so training starts from the FNO and
may move away from it.  Both share one network, :class:`NeuralOperator`; the
only difference is the ``transform`` object its spectral layers use.

Conventions (those of ``torch.fft.rfft`` / ``rfftn``): a real signal of length
``n`` keeps frequencies ``0 … modes-1``; in 2-D the first axis also keeps the
negative frequencies ``n-modes … n-1``, so a 2-D spectrum is ``(2·modes, modes)``.
At initialization the Monarch transforms reproduce ``rfft``/``irfft`` to
float32 rounding (tested), so the two networks differ only by what training
does to the transforms.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.product import MonarchProduct
from ..transforms import dft

__all__ = [
    "FourierTransform1d",
    "FourierTransform2d",
    "MonarchTransform1d",
    "MonarchTransform2d",
    "NeuralOperator",
    "SpectralConv",
    "count_parameters",
    "make_transform",
    "relative_l2",
]

Transform = Literal["fft", "monarch"]
TRANSFORMS: tuple[str, ...] = ("fft", "monarch")


def count_parameters(module: nn.Module) -> int:
    """Real parameters: a complex entry counts twice (it is two numbers to learn and store)."""
    return sum(p.numel() * (2 if p.is_complex() else 1) for p in module.parameters())


def _check_modes(n: int, modes: int, dims: int) -> None:
    limit = n // 2
    if not (isinstance(modes, int) and 1 <= modes <= limit):
        raise ValueError(
            f"modes={modes!r} does not fit a grid of {n} points per side in {dims}-D; "
            f"use 1 <= modes <= {limit}"
        )


def _hermitian_fold(y: torch.Tensor) -> torch.Tensor:
    """Halve frequency 0 so that ``2·Re(ifft(z))`` equals ``irfft(y)`` (no Nyquist term)."""
    return torch.cat([0.5 * y[..., :1], y[..., 1:]], dim=-1)


# --------------------------------------------------------------------------- transforms


class FourierTransform1d(nn.Module):
    """``rfft`` to the lowest ``modes`` frequencies and ``irfft`` back: no parameters."""

    def __init__(self, n: int, modes: int) -> None:
        super().__init__()
        _check_modes(n, modes, 1)
        self.n, self.modes = n, modes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x)[..., : self.modes]  # (*, n) -> (*, modes)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft(y, n=self.n)  # zero-pads the missing frequencies


class MonarchTransform1d(nn.Module):
    """The two DFTs of :class:`FourierTransform1d` as learnable Monarch products.

    ``forward`` is ``dft(n)`` with its output cropped to ``modes``; ``inverse``
    is ``dft(n, inverse=True)`` reading ``modes`` inputs (the rest are zeros,
    folded into its input gather), and ``2·Re`` of it with frequency 0 halved
    is exactly ``irfft``.
    """

    def __init__(self, n: int, modes: int) -> None:
        super().__init__()
        _check_modes(n, modes, 1)
        self.n, self.modes = n, modes
        keep = torch.arange(modes)
        self.fwd = _monarch_dft(n, inverse=False, keep_out=keep)
        self.inv = _monarch_dft(n, inverse=True, keep_in=keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fwd(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return 2 * self.inv(_hermitian_fold(y)).real


class FourierTransform2d(nn.Module):
    """``rfft2`` to the ``(2·modes, modes)`` lowest frequencies and ``irfft2`` back."""

    def __init__(self, n: int, modes: int) -> None:
        super().__init__()
        _check_modes(n, modes, 2)
        self.n, self.modes = n, modes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.modes
        y = torch.fft.rfft2(x)  # (*, n, n//2+1)
        return torch.cat([y[..., :m, :m], y[..., -m:, :m]], dim=-2)  # (*, 2m, m)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        m, n = self.modes, self.n
        full = y.new_zeros(*y.shape[:-2], n, n // 2 + 1)
        full[..., :m, :m] = y[..., :m, :]
        full[..., -m:, :m] = y[..., m:, :]
        return torch.fft.irfft2(full, s=(n, n))


class MonarchTransform2d(nn.Module):
    """The 2-D transforms as learnable Monarch DFTs, one per axis and direction.

    The FFT route is separable (rows, then columns), and so is this one: four
    ``dft(n)`` products, each ``O(n^1.5)`` per line.  (The one-factor Kronecker
    form ``transforms.dft2`` would hold ``2n³`` parameters per transform, which
    at ``n = 64`` is more than the whole FNO.)
    """

    def __init__(self, n: int, modes: int) -> None:
        super().__init__()
        _check_modes(n, modes, 2)
        self.n, self.modes = n, modes
        cols = torch.arange(modes)
        rows = torch.cat([torch.arange(modes), torch.arange(n - modes, n)])
        self.fwd_cols = _monarch_dft(n, inverse=False, keep_out=cols)
        self.fwd_rows = _monarch_dft(n, inverse=False, keep_out=rows)
        self.inv_rows = _monarch_dft(n, inverse=True, keep_in=rows)
        self.inv_cols = _monarch_dft(n, inverse=True, keep_in=cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fwd_cols(x)  # (*, n, m): along the last axis
        return self.fwd_rows(y.transpose(-1, -2)).transpose(-1, -2)  # (*, 2m, m)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        z = self.inv_rows(y.transpose(-1, -2)).transpose(-1, -2)  # (*, n, m)
        return 2 * self.inv_cols(_hermitian_fold(z)).real  # (*, n, n)


def _monarch_dft(
    n: int, *, inverse: bool, keep_out: torch.Tensor | None = None,
    keep_in: torch.Tensor | None = None,
) -> MonarchProduct:
    """``dft(n)`` (complex64) restricted to the outputs ``keep_out`` or the inputs ``keep_in``.

    Only the kept frequencies matter, so the factor entries that produce only
    dropped outputs (rows of ``w2``) or read only zero inputs (columns of ``w1``)
    are removed: they would never change the result and never receive a
    gradient.  The function and its training are those of the full factor;
    the parameter count and the work are not inflated by dead entries.
    """
    full = dft(n, inverse=inverse, dtype=torch.complex64).to_factors()
    ((w1, w2),) = full.factors
    in_index = full.in_index  # position a·p + j of the first factor reads x[in_index[a·p + j]]
    in_features, out_index = n, None
    if keep_in is not None:
        lookup = torch.full((n,), -1, dtype=torch.int64)
        lookup[keep_in] = torch.arange(keep_in.numel())
        k, _, p = w1.shape
        reads = lookup[in_index].reshape(k, p)  # (block a, column j) -> kept input or -1
        cols = torch.nonzero((reads >= 0).any(0)).flatten()  # columns some block needs
        w1, in_index = w1[:, :, cols], reads[:, cols].reshape(-1)
        in_features = keep_in.numel()
    if keep_out is not None:
        l = w2.shape[0]
        rows = torch.unique(keep_out // l)  # output e·l + v comes from row e of block v
        position = torch.full((w2.shape[1],), -1, dtype=torch.int64)
        position[rows] = torch.arange(rows.numel())
        w2, out_index = w2[:, rows, :], position[keep_out // l] * l + keep_out % l
    return MonarchProduct.from_factors([(w1.contiguous(), w2.contiguous())], in_index,
                                       out_index, in_features)


def make_transform(dims: int, n: int, modes: int, transform: Transform) -> nn.Module:
    """The transform pair a spectral layer uses (``"fft"`` or ``"monarch"``)."""
    table = {
        (1, "fft"): FourierTransform1d, (1, "monarch"): MonarchTransform1d,
        (2, "fft"): FourierTransform2d, (2, "monarch"): MonarchTransform2d,
    }
    if (dims, transform) not in table:
        raise ValueError(f"no transform for dims={dims!r}, transform={transform!r}; "
                         f"use dims 1 or 2 and one of {TRANSFORMS}")
    return table[dims, transform](n, modes)


# --------------------------------------------------------------------------- network


class SpectralConv(nn.Module):
    """``x ↦ T⁻¹(W · T x)``: channel mixing of the lowest frequencies (the FNO's Fourier layer).

    Shape: ``(B, C_in, *grid)`` → ``(B, C_out, *grid)`` with ``grid`` ``(n,)`` or ``(n, n)``.
    The weights are initialized as in the FNO code, uniform in ``[0, 1/(C_in·C_out))``
    for real and imaginary parts, so the layer starts as a small perturbation.
    """

    def __init__(
        self, dims: int, n: int, in_channels: int, out_channels: int, modes: int,
        transform: Transform = "fft",
    ) -> None:
        super().__init__()
        self.transform = make_transform(dims, n, modes, transform)
        spectrum = (modes,) if dims == 1 else (2 * modes, modes)
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels, *spectrum,
                                               dtype=torch.complex64))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        scale = 1 / (self.weight.shape[0] * self.weight.shape[1])
        self.weight.copy_(torch.complex(torch.rand(self.weight.shape),
                                        torch.rand(self.weight.shape)) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.transform(x)  # (B, C_in, *spectrum), complex
        y = torch.einsum("bi...,io...->bo...", y, self.weight)  # (B, C_out, *spectrum)
        return self.transform.inverse(y)


class NeuralOperator(nn.Module):
    """A Fourier neural operator on a periodic 1-D or 2-D grid (FNO or its Monarch variant).

    Lift ``(field, coordinates)`` to ``width`` channels, apply ``layers`` Fourier
    layers ``σ(K x + W x)`` (``K`` spectral, ``W`` a 1×1 convolution; no ``σ``
    after the last), project back with a two-layer MLP: the architecture of
    the FNO papers' ``fourier_1d.py``/``fourier_2d.py``.

    Args:
        dims: 1 (input ``(B, n)``) or 2 (input ``(B, n, n)``).
        n: grid points per side.
        width: channels inside the network.
        modes: frequencies kept per axis (``<= n // 2``).
        layers: number of Fourier layers.
        transform: ``"fft"`` (the FNO) or ``"monarch"`` (learnable DFTs).

    Shape: ``(B, n)`` → ``(B, n)`` or ``(B, n, n)`` → ``(B, n, n)``.

    >>> net = NeuralOperator(1, 32, width=8, modes=4, layers=2, transform="monarch")
    >>> net(torch.randn(3, 32)).shape
    torch.Size([3, 32])
    """

    def __init__(
        self, dims: int, n: int, *, width: int = 32, modes: int = 16, layers: int = 4,
        transform: Transform = "fft", hidden: int = 128,
    ) -> None:
        super().__init__()
        if dims not in (1, 2):
            raise ValueError(f"dims={dims!r}; a neural operator here is 1-D or 2-D")
        if transform not in TRANSFORMS:
            raise ValueError(f"transform={transform!r} is not one of {TRANSFORMS}")
        for name, value in (("n", n), ("width", width), ("layers", layers), ("hidden", hidden)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        _check_modes(n, modes, dims)
        self.dims, self.n = dims, n
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.lift = nn.Linear(1 + dims, width)
        self.spectral = nn.ModuleList(
            SpectralConv(dims, n, width, width, modes, transform) for _ in range(layers)
        )
        self.pointwise = nn.ModuleList(conv(width, width, 1) for _ in range(layers))
        self.proj1 = nn.Linear(width, hidden)
        self.proj2 = nn.Linear(hidden, 1)
        grid = torch.arange(n, dtype=torch.float32) / n
        coords = grid[:, None] if dims == 1 else torch.stack(
            torch.meshgrid(grid, grid, indexing="ij"), dim=-1)
        self.register_buffer("coords", coords, persistent=False)  # (*grid, dims)

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        grid = tuple(field.shape[1:])
        if field.dim() != self.dims + 1 or grid != (self.n,) * self.dims:
            expect = ", ".join(["B"] + [str(self.n)] * self.dims)
            raise ValueError(f"expected input ({expect}), got {tuple(field.shape)}")
        coords = self.coords.expand(field.shape[0], *self.coords.shape)
        x = self.lift(torch.cat([field.unsqueeze(-1), coords], dim=-1))  # (B, *grid, width)
        x = x.movedim(-1, 1)  # (B, width, *grid)
        for i, (spec, point) in enumerate(zip(self.spectral, self.pointwise)):
            x = spec(x) + point(x)
            if i < len(self.spectral) - 1:
                x = F.gelu(x)
        x = F.gelu(self.proj1(x.movedim(1, -1)))  # (B, *grid, hidden)
        return self.proj2(x).squeeze(-1)

    def monarch_parameters(self) -> list[nn.Parameter]:
        """The factors of the learnable transforms (empty for the FFT network)."""
        return [p for m in self.modules() if isinstance(m, MonarchProduct) for p in m.parameters()]


def relative_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``‖pred − target‖ / ‖target‖`` over the grid (the FNO papers' metric)."""
    diff = (pred - target).flatten(1).norm(dim=1)
    return diff / target.flatten(1).norm(dim=1).clamp_min(torch.finfo(target.dtype).tiny)
