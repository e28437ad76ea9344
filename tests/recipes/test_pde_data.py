"""The pseudo-spectral solvers against exact solutions and conservation laws."""

from __future__ import annotations

import math

import pytest
import torch

from monarch_matrices.recipes.pde_data import (
    burgers_dataset,
    burgers_solve,
    energy_2d,
    enstrophy_2d,
    fno_forcing,
    grf_1d,
    grf_2d,
    navier_stokes_dataset,
    navier_stokes_solve,
    vorticity_advection,
)

PI2 = 2 * math.pi


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny FFTs: a second thread only adds contention on a busy machine (conftest restores it)
    torch.set_num_threads(1)


def grid(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float64) / n


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- Burgers


def test_burgers_matches_the_cole_hopf_solution():
    # u = -2ν φ_x / φ with φ = A + e^{-4π²νt} cos 2πx solving the heat equation:
    # an exact, fully nonlinear Burgers solution with steep gradients for A near 1
    nu, a, t = 0.05, 1.5, 0.5
    x = grid(128)

    def exact(time: float) -> torch.Tensor:
        e = math.exp(-4 * math.pi**2 * nu * time)
        return 4 * math.pi * nu * e * torch.sin(PI2 * x) / (a + e * torch.cos(PI2 * x))

    u = burgers_solve(exact(0.0), nu, t)
    assert rel(u, exact(t)) < 1e-7


def test_burgers_small_amplitude_is_the_heat_equation():
    # at amplitude 1e-8 the nonlinear term is 1e-8 of the viscous one
    nu, t, n = 0.02, 0.7, 64
    u0 = 1e-8 * grf_1d(3, n, torch.Generator().manual_seed(1))
    k = torch.fft.rfftfreq(n, 1 / n, dtype=torch.float64)
    heat = torch.fft.irfft(torch.fft.rfft(u0) * torch.exp(-nu * (PI2 * k) ** 2 * t), n=n)
    assert rel(burgers_solve(u0, nu, t), heat) < 1e-6


def test_burgers_conserves_the_mean_and_dissipates_energy():
    u0 = grf_1d(4, 128, torch.Generator().manual_seed(2)) + 0.3
    u1 = burgers_solve(u0, 0.01, 0.2)
    u2 = burgers_solve(u1, 0.01, 0.2)
    torch.testing.assert_close(u2.mean(-1), u0.mean(-1), rtol=0, atol=1e-12)
    e0, e1, e2 = ((u - u.mean(-1, keepdim=True)).pow(2).mean(-1) for u in (u0, u1, u2))
    assert bool((e1 < e0).all() and (e2 < e1).all())


def test_burgers_inviscid_conserves_energy_before_shocks():
    # ν = 0 and a short time (no shock yet): the dealiased scheme keeps ∫u² to RK4 accuracy
    x = grid(128)
    u0 = 0.2 * torch.sin(PI2 * x) + 0.1 * torch.cos(2 * PI2 * x)
    u = burgers_solve(u0, 0.0, 0.1)
    assert abs(float(u.pow(2).mean() / u0.pow(2).mean()) - 1) < 1e-9


def test_grf_has_the_prescribed_variance():
    n, samples = 64, 4000
    u = grf_1d(samples, n, torch.Generator().manual_seed(3))
    k = torch.fft.fftfreq(n, 1 / n, dtype=torch.float64)
    lam = 625 * (PI2**2 * k**2 + 25) ** -2
    lam[0] = 0
    assert abs(float(u.var()) / float(lam.sum()) - 1) < 0.05
    assert abs(float(u.mean(-1).abs().max())) < 1e-12  # mean zero per sample
    w = grf_2d(2, 16, torch.Generator().manual_seed(3))
    assert w.shape == (2, 16, 16) and abs(float(w.mean(dim=(-2, -1)).abs().max())) < 1e-12


# --------------------------------------------------------------------------- Navier–Stokes


def test_nonlinear_term_matches_an_analytic_jacobian():
    # ψ = sin 2πx + cos 4πy: u·∇ω = 96π⁴ cos 2πx sin 4πy (sign and scale of every term)
    x = grid(32)
    xx, yy = x[:, None], x[None, :]
    w = 4 * math.pi**2 * torch.sin(PI2 * xx) + 16 * math.pi**2 * torch.cos(2 * PI2 * yy)
    exact = 96 * math.pi**4 * torch.cos(PI2 * xx) * torch.sin(2 * PI2 * yy)
    torch.testing.assert_close(vorticity_advection(torch.fft.rfft2(w), 32), exact)


def test_taylor_green_vortices_decay_exactly():
    # eigenfunctions of Δ on one shell (|k|² = 5·4π²) have u·∇ω ≡ 0: pure viscous decay
    nu, t, x = 0.01, 1.0, grid(32)
    xx, yy = x[:, None], x[None, :]
    w0 = 3 * torch.sin(PI2 * xx) * torch.sin(2 * PI2 * yy) \
        + 2 * torch.cos(2 * PI2 * xx) * torch.cos(PI2 * yy)
    w = navier_stokes_solve(w0, nu, t)
    exact = w0 * math.exp(-nu * 20 * math.pi**2 * t)
    assert rel(w, exact) < 1e-10


def test_navier_stokes_small_amplitude_is_the_heat_equation():
    nu, t, n = 0.005, 0.5, 32
    w0 = 1e-8 * grf_2d(2, n, torch.Generator().manual_seed(4))
    k = torch.fft.fftfreq(n, 1 / n, dtype=torch.float64)
    k2 = (PI2 * k[:, None]) ** 2 + (PI2 * k[None, :]) ** 2
    heat = torch.fft.ifft2(torch.fft.fft2(w0) * torch.exp(-nu * k2 * t)).real
    assert rel(navier_stokes_solve(w0, nu, t), heat) < 1e-6


def test_the_fno_forcing_balances_its_steady_state():
    # ω_s = f / (8π²ν) solves ν Δω + f = 0 and is an eigenfunction (u·∇ω = 0): steady
    nu, n = 0.01, 32
    f = fno_forcing(n)
    w_s = f / (8 * math.pi**2 * nu)
    w = navier_stokes_solve(w_s, nu, 2.0, forcing=f)
    assert rel(w, w_s) < 1e-10


def test_euler_conserves_energy_enstrophy_and_circulation():
    w0 = grf_2d(2, 32, torch.Generator().manual_seed(5))
    w = navier_stokes_solve(w0, 0.0, 0.5)
    assert rel(w, w0) > 0.05  # the flow really moved
    for quantity in (energy_2d, enstrophy_2d):
        ratio = quantity(w) / quantity(w0)
        assert float((ratio - 1).abs().max()) < 1e-7, quantity.__name__
    assert float(w.mean(dim=(-2, -1)).abs().max()) < 1e-12


def test_viscosity_dissipates_enstrophy():
    w0 = grf_2d(2, 32, torch.Generator().manual_seed(6))
    w = navier_stokes_solve(w0, 1e-3, 0.5)
    assert bool((enstrophy_2d(w) < enstrophy_2d(w0)).all())


# --------------------------------------------------------------------------- data sets and errors


def test_datasets_are_deterministic_float32_pairs():
    a = burgers_dataset(3, 32, torch.Generator().manual_seed(7))
    b = burgers_dataset(3, 32, torch.Generator().manual_seed(7))
    assert a[0].shape == a[1].shape == (3, 32) and a[0].dtype == torch.float32
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    w0, w1 = navier_stokes_dataset(2, 16, torch.Generator().manual_seed(7), t_final=0.05,
                                   oversample=2)
    assert w0.shape == w1.shape == (2, 16, 16) and not torch.equal(w0, w1)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: burgers_solve(torch.zeros(7), 0.1, 1.0), "even number"),
        (lambda: burgers_solve(torch.zeros(8), -0.1, 1.0), "nu=-0.1"),
        (lambda: burgers_solve(torch.zeros(8), 0.1, float("nan")), "t_final"),
        (lambda: navier_stokes_solve(torch.zeros(8, 6), 0.1, 1.0), "square grid"),
        (lambda: navier_stokes_solve(torch.zeros(8, 8), 0.1, 1.0, forcing=torch.zeros(4, 4)),
         "forcing must be"),
        (lambda: burgers_dataset(0, 32, torch.Generator()), "samples >= 1"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, match):
    with pytest.raises(ValueError, match=match):
        call()
