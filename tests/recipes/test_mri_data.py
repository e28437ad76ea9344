"""Simulated MRI: phantoms, coils, masks, the SENSE operator and its solver."""

from __future__ import annotations

import pytest
import torch

from monarch_matrices.recipes.mri_data import (
    cartesian_mask,
    coil_sensitivities,
    conjugate_gradient,
    ellipse_phantom,
    fft2c,
    ifft2c,
    sense_adjoint,
    sense_forward,
    sense_reconstruct,
    shepp_logan,
    simulate_kspace,
)

pytest.importorskip("skimage")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_phantoms_are_images_in_unit_range():
    sl = shepp_logan(32)
    assert sl.shape == (32, 32) and float(sl.min()) >= 0 and float(sl.max()) == 1
    a, b = ellipse_phantom(32, gen(1)), ellipse_phantom(32, gen(1))
    assert torch.equal(a, b) and float(a.max()) == 1 and float(a.min()) >= 0
    assert not torch.equal(a, ellipse_phantom(32, gen(2)))
    assert float(a[0, 0]) == 0 and float(a[16, 16]) > 0  # black corner, object in the middle


def test_coil_maps_are_smooth_and_normalized():
    s = coil_sensitivities(32, 6)
    assert s.shape == (6, 32, 32) and s.dtype == torch.complex64
    torch.testing.assert_close((s.abs() ** 2).sum(0), torch.ones(32, 32))
    assert float((s[:, 1:] - s[:, :-1]).abs().max()) < 0.2  # no jumps between neighbours


@pytest.mark.parametrize("accel", [1, 2, 3, 4])
def test_masks_sample_n_over_r_rows_with_the_centre(accel):
    n = 64
    m = cartesian_mask(n, accel, gen())
    assert m.shape == (n, 1) and int(m.sum()) == round(n / accel)
    centre = torch.fft.fftshift(m.flatten())[n // 2 - 2 : n // 2 + 3]
    assert bool((centre == 1).all())
    assert torch.equal(m, cartesian_mask(n, accel, gen()))


def test_the_dft_is_unitary_and_sense_adjoint_is_the_adjoint():
    x = torch.randn(2, 16, 16, dtype=torch.complex64)
    torch.testing.assert_close(ifft2c(fft2c(x)), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fft2c(x).norm(), x.norm())
    s, m = coil_sensitivities(16, 4), cartesian_mask(16, 2, gen())
    y = torch.randn(2, 4, 16, 16, dtype=torch.complex64)
    lhs = (sense_forward(x, s, m).conj() * y).sum()
    rhs = (x.conj() * sense_adjoint(y, s, m)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-3)


def test_fully_sampled_noiseless_sense_is_exact():
    # R = 1 and Σ|S|² = 1 make E*E the identity: CG is exact after one step
    x = shepp_logan(32)
    s, m = coil_sensitivities(32, 4), cartesian_mask(32, 1, gen())
    k = simulate_kspace(x, s, m, noise=0.0, generator=gen())
    recon = sense_reconstruct(k, s, m, lam=0.0, iters=3)
    torch.testing.assert_close(recon.real, x, rtol=0, atol=1e-5)


def test_undersampled_sense_beats_zero_filling():
    x = ellipse_phantom(32, gen(3))
    s, m = coil_sensitivities(32, 8), cartesian_mask(32, 2, gen(4))
    k = simulate_kspace(x, s, m, noise=0.0, generator=gen(5))
    zero = sense_reconstruct(k, s, m, lam=0.0, iters=1)
    sense = sense_reconstruct(k, s, m, lam=0.0, iters=30)
    assert float((sense.abs() - x).norm()) < 0.3 * float((zero.abs() - x).norm())


def test_noise_has_the_requested_std():
    x = torch.zeros(32, 32)
    s, m = coil_sensitivities(32, 2), cartesian_mask(32, 1, gen())
    k = simulate_kspace(x, s, m, noise=0.05, generator=gen(6))
    assert abs(float(k.abs().pow(2).mean().sqrt()) / 0.05 - 1) < 0.05


def test_conjugate_gradient_solves_a_hermitian_system():
    a = torch.randn(16, 16, dtype=torch.complex128)
    h = a @ a.mH + 16 * torch.eye(16, dtype=torch.complex128)
    b = torch.randn(3, 4, 4, dtype=torch.complex128)

    def apply(v: torch.Tensor) -> torch.Tensor:
        return (v.reshape(3, 16) @ h.T).reshape(3, 4, 4)

    x = conjugate_gradient(apply, b, iters=16)
    torch.testing.assert_close(apply(x), b)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"acceleration=0\.5"):
        cartesian_mask(32, 0.5, gen())
    with pytest.raises(ValueError, match="n=4"):
        ellipse_phantom(4, gen())
    with pytest.raises(ValueError, match="iters=0"):
        conjugate_gradient(lambda v: v, torch.ones(2, 2), 0)
