"""Pseudo-spectral solvers that make the PDE recipe's data: 1-D Burgers, 2-D Navier–Stokes.

The setups are those of the FNO papers (Li et al., 2021), scaled down so that a
data set is made in seconds on a CPU:

* **Burgers** on the periodic interval ``[0, 1)``: ``u_t + u u_x = ν u_xx`` with
  ``u₀ ~ N(0, 625(-Δ + 25 I)^-2)``; the operator to learn is ``u₀ ↦ u(·, T)``.
* **Navier–Stokes** in vorticity form on the periodic square ``[0, 1)²``:
  ``ω_t + u·∇ω = ν Δω + f``, ``u = (ψ_y, -ψ_x)``, ``-Δψ = ω``, with
  ``ω₀ ~ N(0, 7³(-Δ + 49 I)^-2.5)`` and the FNO forcing
  ``f = 0.1 (sin 2π(x+y) + cos 2π(x+y))``; the operator is ``ω₀ ↦ ω(·, T)``.

Both solvers work on Fourier coefficients (``torch.fft``), treat the stiff
viscous term exactly with an integrating factor and the nonlinear term with
classical RK4 (Lawson's IF-RK4), and remove aliasing with the 2/3 rule.  Every
function is pure: tensors in, tensors out, randomness only through an explicit
``torch.Generator``.  Grids are ``x_j = j / n``; 2-D fields are indexed
``[..., i, j] = field(x_i, y_j)``.  Computation is in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "burgers_dataset",
    "burgers_solve",
    "energy_2d",
    "enstrophy_2d",
    "fno_forcing",
    "grf_1d",
    "grf_2d",
    "navier_stokes_dataset",
    "navier_stokes_solve",
    "vorticity_advection",
]

F64 = torch.float64
TWO_PI = 2 * math.pi


# --------------------------------------------------------------------------- checks


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} must be a finite number {bound}")
    return float(value)


def _check_grid(name: str, field: torch.Tensor, dims: int) -> int:
    if not isinstance(field, torch.Tensor) or field.dim() < dims:
        shape = tuple(field.shape) if isinstance(field, torch.Tensor) else type(field).__name__
        raise ValueError(f"{name} must have at least {dims} grid dims, got {shape}")
    n = field.shape[-1]
    if dims == 2 and field.shape[-2] != n:
        raise ValueError(f"{name} must be on a square grid, got {tuple(field.shape[-2:])}")
    if n < 4 or n % 2:
        raise ValueError(f"{name} has {n} points per side; use an even number >= 4")
    if field.is_complex() or not bool(torch.isfinite(field).all()):
        raise ValueError(f"{name} must be real and finite")
    return n


def _steps(t_final: float, dt: float) -> tuple[int, float]:
    """Whole number of steps that lands exactly on ``t_final`` with a step ``<= dt``."""
    steps = max(1, math.ceil(t_final / dt - 1e-9))
    return steps, t_final / steps


# --------------------------------------------------------------------------- wavenumbers


def _wavenumbers_1d(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(2π k, dealias mask)`` for ``rfft`` coefficients of ``n`` points on ``[0, 1)``."""
    k = torch.arange(n // 2 + 1, dtype=F64, device=device)
    return TWO_PI * k, (k <= n / 3).to(F64)  # 2/3 rule: keep |k| <= n/3


def _wavenumbers_2d(
    n: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(2π kx, 2π ky, dealias mask)`` broadcastable to ``rfft2`` coefficients ``(n, n//2+1)``."""
    kx = torch.fft.fftfreq(n, 1 / n, dtype=F64, device=device)[:, None]
    ky = torch.arange(n // 2 + 1, dtype=F64, device=device)[None, :]
    mask = ((kx.abs() <= n / 3) & (ky <= n / 3)).to(F64)
    return TWO_PI * kx, TWO_PI * ky, mask


def _if_rk4(
    v: torch.Tensor, linear: torch.Tensor, nonlinear: Callable[[torch.Tensor], torch.Tensor],
    dt: float, steps: int,
) -> torch.Tensor:
    """Integrate ``v' = L v + N(v)`` (``L`` diagonal) by Lawson's integrating-factor RK4.

    The linear part is exact, so the step is limited by the nonlinear term
    alone (a CFL condition), not by the viscous ``ν k²``.
    """
    e_half = torch.exp(linear * (dt / 2))
    e_full = e_half * e_half
    for _ in range(steps):
        k1 = nonlinear(v)
        k2 = nonlinear(e_half * (v + (dt / 2) * k1))
        k3 = nonlinear(e_half * v + (dt / 2) * k2)
        k4 = nonlinear(e_full * v + dt * e_half * k3)
        v = e_full * v + (dt / 6) * (e_full * k1 + 2 * e_half * (k2 + k3) + k4)
    return v


# --------------------------------------------------------------------------- random fields


def _grf(
    shape: tuple[int, ...], batch: int, sqrt_spectrum: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Real, periodic, mean-zero Gaussian field with coefficient std ``sqrt_spectrum``.

    White noise transformed with ``norm="ortho"`` has unit-variance, Hermitian
    Fourier coefficients; scaling them and transforming back with
    ``norm="forward"`` gives ``Σ_k √λ_k ζ_k e^{2πik·x}`` on the grid.
    """
    dims = tuple(range(-len(shape), 0))
    noise = torch.randn((batch, *shape), generator=generator, dtype=F64)
    coeffs = torch.fft.fftn(noise, dim=dims, norm="ortho") * sqrt_spectrum
    return torch.fft.ifftn(coeffs, dim=dims, norm="forward").real


def grf_1d(
    batch: int, n: int, generator: torch.Generator, *, scale: float = 625.0, tau: float = 5.0,
    alpha: float = 2.0,
) -> torch.Tensor:
    """``(batch, n)`` samples of ``N(0, scale·(-Δ + τ² I)^-α)`` on ``[0, 1)``, mean zero.

    The defaults are the FNO Burgers initial condition ``N(0, 625(-Δ + 25 I)^-2)``.
    """
    k = torch.fft.fftfreq(n, 1 / n, dtype=F64)
    lam = scale * (TWO_PI**2 * k**2 + tau**2) ** -alpha
    lam[0] = 0.0
    return _grf((n,), batch, lam.sqrt(), generator)


def grf_2d(
    batch: int, n: int, generator: torch.Generator, *, scale: float = 7.0**3, tau: float = 7.0,
    alpha: float = 2.5,
) -> torch.Tensor:
    """``(batch, n, n)`` samples of ``N(0, scale·(-Δ + τ² I)^-α)`` on ``[0, 1)²``, mean zero.

    The defaults are the FNO Navier–Stokes initial vorticity (``7^{3/2}`` is the
    coefficient *std* in the FNO code, hence ``scale = 7³``).
    """
    k = torch.fft.fftfreq(n, 1 / n, dtype=F64)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    lam = scale * (TWO_PI**2 * k2 + tau**2) ** -alpha
    lam[0, 0] = 0.0
    return _grf((n, n), batch, lam.sqrt(), generator)


def fno_forcing(n: int) -> torch.Tensor:
    """The FNO forcing ``0.1 (sin 2π(x+y) + cos 2π(x+y))`` on an ``n × n`` grid."""
    x = torch.arange(n, dtype=F64) / n
    s = TWO_PI * (x[:, None] + x[None, :])
    return 0.1 * (torch.sin(s) + torch.cos(s))


# --------------------------------------------------------------------------- Burgers


def burgers_solve(
    u0: torch.Tensor, nu: float, t_final: float, *, dt: float | None = None, cfl: float = 0.5
) -> torch.Tensor:
    """Solve ``u_t + u u_x = ν u_xx`` on periodic ``[0, 1)`` from ``u0`` ``(*, n)`` to ``t_final``.

    ``dt`` defaults to ``cfl · dx / max|u0|`` (capped at 0.01): Burgers obeys a
    maximum principle, so the initial speed bounds every later one.  Returns
    ``u(·, t_final)`` in float64 with the shape of ``u0``.

    A tiny sine wave only diffuses (the heat equation limit):

    >>> wave = 1e-9 * torch.sin(2 * math.pi * torch.arange(64, dtype=torch.float64) / 64)
    >>> u = burgers_solve(wave, nu=0.1, t_final=0.5)
    >>> bool(torch.allclose(u, wave * math.exp(-0.1 * 4 * math.pi**2 * 0.5)))
    True
    """
    n = _check_grid("u0", u0, 1)
    nu = _check_positive("nu", nu, allow_zero=True)
    t_final = _check_positive("t_final", t_final, allow_zero=True)
    if t_final == 0:
        return u0.to(F64).clone()
    if dt is None:
        speed = float(u0.abs().max())
        dt = min(0.01, cfl / n / speed) if speed > 0 else 0.01
    steps, dt = _steps(t_final, _check_positive("dt", dt))
    k, mask = _wavenumbers_1d(n, u0.device)

    def nonlinear(u_hat: torch.Tensor) -> torch.Tensor:
        u = torch.fft.irfft(u_hat * mask, n=n)
        return -0.5j * k * mask * torch.fft.rfft(u * u)  # -(u²/2)_x

    u_hat = _if_rk4(torch.fft.rfft(u0.to(F64)), -nu * k**2, nonlinear, dt, steps)
    return torch.fft.irfft(u_hat, n=n)


def burgers_dataset(
    samples: int, n: int, generator: torch.Generator, *, nu: float = 0.1, t_final: float = 1.0,
    oversample: int = 2, chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u0, u(T))`` pairs, each ``(samples, n)`` float32, for the Burgers operator.

    Initial conditions are drawn and solved on an ``oversample``-times finer grid
    and both fields are then subsampled, as the FNO data were.
    """
    if samples < 1 or n < 4 or oversample < 1:
        raise ValueError(f"need samples >= 1, n >= 4, oversample >= 1; got {samples}, {n}, "
                         f"{oversample}")
    fine = n * oversample
    u0 = grf_1d(samples, fine, generator)
    u_t = torch.cat([burgers_solve(c, nu, t_final) for c in u0.split(chunk)])
    return u0[:, ::oversample].float(), u_t[:, ::oversample].float()


# --------------------------------------------------------------------------- Navier–Stokes


def vorticity_advection(w_hat: torch.Tensor, n: int) -> torch.Tensor:
    """``u·∇ω`` on the grid, from ``rfft2`` coefficients of ``ω`` (no dealiasing).

    With the stream function ``ψ̂ = ω̂ / |k|²``: ``u = ψ_y``, ``v = -ψ_x``.

    For ``ψ = sin 2πx + cos 4πy`` it is ``96π⁴ cos 2πx sin 4πy``:

    >>> t = 2 * math.pi * torch.arange(16, dtype=torch.float64) / 16
    >>> x, y = t[:, None], t[None, :]
    >>> w = 4 * math.pi**2 * torch.sin(x) + 16 * math.pi**2 * torch.cos(2 * y)
    >>> exact = 96 * math.pi**4 * torch.cos(x) * torch.sin(2 * y)
    >>> bool(torch.allclose(vorticity_advection(torch.fft.rfft2(w), 16), exact))
    True
    """
    kx, ky, _ = _wavenumbers_2d(n, w_hat.device)
    k2 = kx**2 + ky**2
    k2[0, 0] = 1.0  # the mean of ψ is arbitrary; ω̂₀ = 0 for periodic flow anyway
    psi_hat = w_hat / k2
    grid = (n, n)
    u = torch.fft.irfft2(1j * ky * psi_hat, s=grid)
    v = torch.fft.irfft2(-1j * kx * psi_hat, s=grid)
    w_x = torch.fft.irfft2(1j * kx * w_hat, s=grid)
    w_y = torch.fft.irfft2(1j * ky * w_hat, s=grid)
    return u * w_x + v * w_y


def navier_stokes_solve(
    w0: torch.Tensor, nu: float, t_final: float, *, forcing: torch.Tensor | None = None,
    dt: float | None = None, cfl: float = 0.5,
) -> torch.Tensor:
    """Solve 2-D incompressible Navier–Stokes (vorticity form) on ``[0, 1)²`` to ``t_final``.

    ``w0`` is ``(*, n, n)``; ``forcing`` an ``(n, n)`` field (default none).  ``dt``
    defaults to ``cfl · dx / max|u0|`` capped at 0.01.  Returns ``ω(·, t_final)``
    in float64.  ``ν = 0`` with no forcing is the Euler equation, whose energy
    and enstrophy the dealiased scheme conserves (tests check that).
    """
    n = _check_grid("w0", w0, 2)
    nu = _check_positive("nu", nu, allow_zero=True)
    t_final = _check_positive("t_final", t_final, allow_zero=True)
    if t_final == 0:
        return w0.to(F64).clone()
    w0 = w0.to(F64)
    kx, ky, mask = _wavenumbers_2d(n, w0.device)
    f_hat = 0.0
    if forcing is not None:
        if forcing.shape != (n, n):
            raise ValueError(f"forcing must be ({n}, {n}) like w0's grid, got "
                             f"{tuple(forcing.shape)}")
        f_hat = torch.fft.rfft2(forcing.to(device=w0.device, dtype=F64))
    w_hat = torch.fft.rfft2(w0)
    if dt is None:
        speed = float(_speed(w_hat, n).max())
        dt = min(0.01, cfl / n / speed) if speed > 0 else 0.01
    steps, dt = _steps(t_final, _check_positive("dt", dt))

    def nonlinear(v_hat: torch.Tensor) -> torch.Tensor:
        return f_hat - mask * torch.fft.rfft2(vorticity_advection(v_hat * mask, n))

    w_hat = _if_rk4(w_hat, -nu * (kx**2 + ky**2), nonlinear, dt, steps)
    return torch.fft.irfft2(w_hat, s=(n, n))


def _speed(w_hat: torch.Tensor, n: int) -> torch.Tensor:
    """Largest ``|u| + |v|`` per sample (a CFL bound)."""
    kx, ky, _ = _wavenumbers_2d(n, w_hat.device)
    k2 = kx**2 + ky**2
    k2[0, 0] = 1.0
    psi_hat = w_hat / k2
    u = torch.fft.irfft2(1j * ky * psi_hat, s=(n, n))
    v = torch.fft.irfft2(-1j * kx * psi_hat, s=(n, n))
    return (u.abs() + v.abs()).flatten(-2).amax(-1)


def energy_2d(w: torch.Tensor) -> torch.Tensor:
    """Kinetic energy ``½∫|u|²`` per sample, from the vorticity ``(*, n, n)``."""
    n = w.shape[-1]
    kx, ky, _ = _wavenumbers_2d(n, w.device)
    k2 = kx**2 + ky**2
    k2[0, 0] = math.inf
    return _parseval(torch.fft.rfft2(w.to(F64)) / k2.sqrt(), n)


def enstrophy_2d(w: torch.Tensor) -> torch.Tensor:
    """Enstrophy ``½∫ω²`` per sample."""
    return 0.5 * (w.to(F64) ** 2).flatten(-2).mean(-1)


def _parseval(c_hat: torch.Tensor, n: int) -> torch.Tensor:
    """``½∫|c|²`` from ``rfft2`` coefficients (the half spectrum counts twice)."""
    weight = torch.full((n // 2 + 1,), 2.0, dtype=F64, device=c_hat.device)
    weight[0] = 1.0
    weight[-1] = 1.0  # Nyquist column (n even) appears once
    return 0.5 * (c_hat.abs() ** 2 * weight).sum((-2, -1)) / n**4


def navier_stokes_dataset(
    samples: int, n: int, generator: torch.Generator, *, nu: float = 1e-3, t_final: float = 2.0,
    oversample: int = 1, chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ω0, ω(T))`` pairs, each ``(samples, n, n)`` float32, with the FNO forcing."""
    if samples < 1 or n < 4 or oversample < 1:
        raise ValueError(f"need samples >= 1, n >= 4, oversample >= 1; got {samples}, {n}, "
                         f"{oversample}")
    fine = n * oversample
    w0 = grf_2d(samples, fine, generator)
    f = fno_forcing(fine)
    w_t = torch.cat([navier_stokes_solve(c, nu, t_final, forcing=f) for c in w0.split(chunk)])
    sub = (slice(None), slice(None, None, oversample), slice(None, None, oversample))
    return w0[sub].float(), w_t[sub].float()
