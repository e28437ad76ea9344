"""Simulated multi-coil MRI: phantoms, coil sensitivities, Cartesian masks, k-space, SENSE.

Everything the MRI recipe needs to make its data and its baseline, as pure
functions (randomness only through an explicit ``torch.Generator``):

* :func:`shepp_logan` (scikit-image's bundled phantom, resized) and
  :func:`ellipse_phantom` (random Shepp–Logan-like ellipse sums), images in
  ``[0, 1]``;
* :func:`coil_sensitivities`: smooth maps of coils on a ring around the object,
  normalized so ``Σ_c |S_c|² = 1`` (the usual SENSE convention);
* :func:`cartesian_mask`: phase-encoding lines, a fully sampled centre plus
  random lines, ``n / R`` lines in all for acceleration ``R``;
* :func:`simulate_kspace`: ``y_c = M ⊙ (F(S_c x) + ε)``, ``F`` the unitary 2-D DFT;
* :func:`sense_reconstruct`: SENSE as regularized least squares,
  ``argmin_x Σ_c ‖M ⊙ F(S_c x) − y_c‖² + λ‖x‖²``, by conjugate gradients on the
  normal equations.  The transform ``F`` and its adjoint are arguments, which
  is how mSENSE swaps in a learnable Monarch matrix.

Images are ``(n, n)`` (or batched ``(B, n, n)``); k-space is in FFT order (low
frequencies at index 0), masks select rows (phase encodes) of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "cartesian_mask",
    "coil_sensitivities",
    "conjugate_gradient",
    "ellipse_phantom",
    "fft2c",
    "ifft2c",
    "sense_adjoint",
    "sense_forward",
    "sense_reconstruct",
    "shepp_logan",
    "simulate_kspace",
]

Transform = Callable[[torch.Tensor], torch.Tensor]


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Unitary 2-D DFT over the last two dims (norm="ortho": ``‖F x‖ = ‖x‖``)."""
    return torch.fft.fft2(x, norm="ortho")


def ifft2c(y: torch.Tensor) -> torch.Tensor:
    """Its inverse, which is also its adjoint."""
    return torch.fft.ifft2(y, norm="ortho")


def _check_size(n: int) -> int:
    if not (isinstance(n, int) and n >= 8):
        raise ValueError(f"image size n={n!r} must be an int >= 8")
    return n


# --------------------------------------------------------------------------- phantoms


def shepp_logan(n: int) -> torch.Tensor:
    """scikit-image's Shepp–Logan phantom resized to ``(n, n)`` (anti-aliased), max 1."""
    try:
        from skimage.data import shepp_logan_phantom
        from skimage.transform import resize
    except ImportError as e:
        raise ImportError("the MRI phantoms need scikit-image: pip install scikit-image") from e
    image = resize(shepp_logan_phantom(), (_check_size(n), n), anti_aliasing=True, order=1)
    image = torch.as_tensor(image, dtype=torch.float32).clamp_min(0)
    return image / image.max()


def _ellipses(
    n: int, params: torch.Tensor, supersample: int
) -> torch.Tensor:
    """Sum of ellipses ``(intensity, cx, cy, a, b, angle)`` on ``[-1, 1]²``, area-averaged."""
    m = n * supersample
    t = (torch.arange(m, dtype=torch.float64) + 0.5) / m * 2 - 1
    yy, xx = torch.meshgrid(-t, t, indexing="ij")  # row 0 at the top, as an image is shown
    image = torch.zeros(m, m, dtype=torch.float64)
    for value, cx, cy, a, b, angle in params.tolist():
        c, s = math.cos(angle), math.sin(angle)
        u = (xx - cx) * c + (yy - cy) * s
        v = -(xx - cx) * s + (yy - cy) * c
        image += value * ((u / a) ** 2 + (v / b) ** 2 <= 1)
    pooled = image.reshape(n, supersample, n, supersample).mean((1, 3))
    return pooled.clamp(0, None).float()


def ellipse_phantom(n: int, generator: torch.Generator, supersample: int = 4) -> torch.Tensor:
    """A random Shepp–Logan-like phantom ``(n, n)`` in ``[0, 1]``.

    A bright skull ring (outer ellipse 1.0 minus an inner one 0.8), then 4–10
    random ellipses inside the brain with intensities in ``[-0.15, 0.45]``; edges
    are area-averaged over ``supersample²`` sub-pixels, as a real voxel would be.
    """
    _check_size(n)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))

    a, b = uniform(0.62, 0.78), uniform(0.78, 0.92)
    cx, cy, angle = uniform(-0.04, 0.04), uniform(-0.04, 0.04), uniform(-0.25, 0.25)
    skull = uniform(0.04, 0.07)
    rows = [(1.0, cx, cy, a, b, angle), (-0.8, cx, cy, a - skull, b - skull, angle)]
    count = int(torch.randint(4, 11, (), generator=generator))
    for _ in range(count):
        r, phi = 0.65 * math.sqrt(uniform(0, 1)), uniform(0, 2 * math.pi)
        ea, eb = uniform(0.04, 0.28), uniform(0.04, 0.28)
        value = uniform(-0.15, 0.45)
        rows.append((value, cx + r * (a - skull) * math.cos(phi),
                     cy + r * (b - skull) * math.sin(phi), ea, eb, uniform(0, math.pi)))
    image = _ellipses(n, torch.tensor(rows, dtype=torch.float64), supersample)
    return (image / image.max()).clamp(0, 1)


# --------------------------------------------------------------------------- acquisition


def coil_sensitivities(n: int, coils: int = 8, *, radius: float = 1.3, width: float = 0.9,
                       phase: float = 1.5) -> torch.Tensor:
    """``(coils, n, n)`` complex64 maps of coils evenly spaced on a ring of ``radius``.

    Magnitude: a Gaussian of the distance to the coil (``width``, in units of
    the half field of view); phase: a smooth linear ramp along the coil's axis
    plus a per-coil offset.  Normalized so ``Σ_c |S_c|² = 1`` at every pixel.
    """
    _check_size(n)
    if not (isinstance(coils, int) and coils >= 1):
        raise ValueError(f"coils={coils!r} must be an int >= 1")
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 - 1
    yy, xx = torch.meshgrid(-t, t, indexing="ij")
    maps = []
    for c in range(coils):
        theta = 2 * math.pi * c / coils
        px, py = radius * math.cos(theta), radius * math.sin(theta)
        mag = torch.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * width**2))
        ramp = phase * (xx * math.cos(theta) + yy * math.sin(theta)) + theta
        maps.append(torch.polar(mag, ramp))
    s = torch.stack(maps)
    s = s / (s.abs() ** 2).sum(0).sqrt()
    return s.to(torch.complex64)


def cartesian_mask(
    n: int, acceleration: float, generator: torch.Generator, *, center_fraction: float = 0.08
) -> torch.Tensor:
    """``(n, 1)`` 0/1 float mask of sampled phase-encoding rows, in FFT order.

    ``round(n · center_fraction)`` central rows are always sampled (low
    frequencies carry most of the energy, and SENSE needs them for contrast);
    the rest of the ``round(n / acceleration)`` rows are drawn uniformly.
    """
    _check_size(n)
    if not (isinstance(acceleration, (int, float)) and 1 <= acceleration <= n):
        raise ValueError(f"acceleration={acceleration!r} must be a number in [1, {n}]")
    total = max(1, round(n / acceleration))
    center = min(total, max(1, round(n * center_fraction)))
    centered = torch.zeros(n)
    lo = n // 2 - center // 2
    centered[lo : lo + center] = 1
    others = torch.nonzero(centered == 0).flatten()
    pick = others[torch.randperm(others.numel(), generator=generator)[: total - center]]
    centered[pick] = 1
    return torch.fft.ifftshift(centered)[:, None]  # (n, 1): broadcasts over columns


def sense_forward(
    x: torch.Tensor, sens: torch.Tensor, mask: torch.Tensor, transform: Transform = fft2c
) -> torch.Tensor:
    """``E x = M ⊙ F(S x)``: image ``(*, n, n)`` → k-space ``(*, coils, n, n)``."""
    return mask * transform(sens * x.unsqueeze(-3))


def sense_adjoint(
    y: torch.Tensor, sens: torch.Tensor, mask: torch.Tensor, adjoint: Transform = ifft2c
) -> torch.Tensor:
    """``E* y = Σ_c S_c* F*(M ⊙ y_c)``: k-space ``(*, coils, n, n)`` → image ``(*, n, n)``."""
    return (sens.conj() * adjoint(mask * y)).sum(-3)


def simulate_kspace(
    image: torch.Tensor, sens: torch.Tensor, mask: torch.Tensor, noise: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Measured k-space ``M ⊙ (F(S x) + ε)``, ``ε`` complex Gaussian with std ``noise`` per entry.

    With the unitary DFT the noise has the same std in image space, so
    ``noise`` reads as a fraction of the phantom's peak of 1.
    """
    if noise < 0:
        raise ValueError(f"noise={noise!r} must be >= 0")
    clean = fft2c(sens * image.to(sens.dtype).unsqueeze(-3))
    eps = torch.randn(*clean.shape, 2, generator=generator) * (noise / math.sqrt(2))
    return mask * (clean + torch.view_as_complex(eps))


# --------------------------------------------------------------------------- reconstruction


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample ``<a, b>`` over the image dims: ``(*, n, n)`` → ``(*, 1, 1)``."""
    return (a.conj() * b).sum((-2, -1), keepdim=True)


def conjugate_gradient(
    apply: Transform, rhs: torch.Tensor, iters: int
) -> torch.Tensor:
    """``iters`` CG steps for ``A x = rhs`` from ``x = 0`` (``A`` Hermitian positive definite).

    Batched over leading dims, and differentiable (mSENSE trains through it).
    A fixed, small number of iterations is itself a regularizer, as in SENSE
    practice.
    """
    if not (isinstance(iters, int) and iters >= 1):
        raise ValueError(f"iters={iters!r} must be an int >= 1")
    x = torch.zeros_like(rhs)
    r, p = rhs, rhs
    rs = _dot(r, r).real
    tiny = torch.finfo(rs.dtype).tiny
    for _ in range(iters):
        ap = apply(p)
        alpha = rs / _dot(p, ap).real.clamp_min(tiny)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = _dot(r, r).real
        p = r + (rs_new / rs.clamp_min(tiny)) * p
        rs = rs_new
    return x


def sense_reconstruct(
    kspace: torch.Tensor, sens: torch.Tensor, mask: torch.Tensor, *, lam: float, iters: int,
    transform: Transform = fft2c, adjoint: Transform = ifft2c,
) -> torch.Tensor:
    """SENSE: ``(E*E + λI) x = E* y`` by ``iters`` CG steps; complex image ``(*, n, n)``.

    ``transform``/``adjoint`` default to the unitary DFT; mSENSE passes a learnable
    Monarch matrix and its conjugate transpose.
    """
    if lam < 0:
        raise ValueError(f"lam={lam!r} must be >= 0")

    def normal(x: torch.Tensor) -> torch.Tensor:
        return sense_adjoint(sense_forward(x, sens, mask, transform), sens, mask, adjoint) + lam * x

    return conjugate_gradient(normal, sense_adjoint(kspace, sens, mask, adjoint), iters)
