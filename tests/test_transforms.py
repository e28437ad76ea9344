"""Exact transforms as Monarch products, each against a numpy / scipy / torch reference."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monarch_matrices import transforms
from monarch_matrices.nn import MonarchProduct

F64, C128 = torch.float64, torch.complex128
RTOL = 1e-10
NORMS = [None, "ortho", "forward"]


def _rel(actual: torch.Tensor, expected: object) -> float:
    expected = torch.as_tensor(expected).to(C128)
    actual = actual.detach().to(C128)
    assert actual.shape == expected.shape
    return float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected))


def _convolve_matrix(kernel: np.ndarray, n: int, n_out: int) -> np.ndarray:
    eye = np.eye(n)
    return np.stack([np.convolve(eye[:, j], kernel)[:n_out] for j in range(n)], axis=1)


# --------------------------------------------------------------------------- DFT


@pytest.mark.parametrize("n", [1, 2, 3, 6, 7, 8, 12, 16, 30, 64, 97, 100])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("norm", NORMS)
def test_dft_matrix(n, inverse, norm):
    f = transforms.dft(n, inverse, norm, dtype=C128)
    ref = (torch.fft.ifft if inverse else torch.fft.fft)(torch.eye(n, dtype=C128), dim=0, norm=norm)
    assert _rel(f.to_dense(), ref) < RTOL
    assert f.degree == 1


@pytest.mark.parametrize("n1", [1, 2, 3, 4, 6, 12])
def test_dft_any_split_and_batched_forward(n1):
    f = transforms.dft(12, n1=n1, dtype=C128)
    x = torch.randn(2, 5, 12, dtype=C128)
    assert _rel(f(x), torch.fft.fft(x)) < RTOL
    assert f.w1[0].shape == (n1, 12 // n1, 12 // n1)


def test_dft_of_real_signal_and_default_dtype():
    f = transforms.dft(8)
    assert f.w1[0].dtype == torch.complex64
    x = torch.randn(3, 8)
    torch.testing.assert_close(f(x), torch.fft.fft(x), rtol=1e-5, atol=1e-5)


def test_dft_is_fast_sized():
    f = transforms.dft(1024, dtype=C128)  # 32 blocks of 32: O(n^1.5) parameters
    assert f.num_params == 2 * 1024 * 32
    x = torch.randn(4, 1024, dtype=C128)
    assert _rel(f(x), torch.fft.fft(x)) < RTOL


@pytest.mark.parametrize(("n1", "n2"), [(1, 1), (2, 3), (4, 4), (5, 7), (8, 6)])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("norm", NORMS)
def test_dft2_on_images(n1, n2, inverse, norm):
    f = transforms.dft2(n1, n2, inverse, norm, dtype=C128)
    x = torch.randn(3, n1, n2, dtype=C128)
    ref = (torch.fft.ifft2 if inverse else torch.fft.fft2)(x, norm=norm)
    assert _rel(f(x.reshape(3, -1)).reshape(3, n1, n2), ref) < RTOL
    assert f.degree == 1 and f.in_index is None and f.out_index is None


# --------------------------------------------------------------------------- Hadamard, DCT, DST


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 128])
def test_hadamard(n):
    h = transforms.hadamard(n, dtype=F64)
    assert _rel(h.to_dense(), scipy.linalg.hadamard(n)) < RTOL
    hn = transforms.hadamard(n, normalized=True, dtype=F64).to_dense().detach()
    torch.testing.assert_close(hn @ hn.T, torch.eye(n, dtype=F64))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 8, 12, 15, 16, 31, 64])
@pytest.mark.parametrize("norm", NORMS)
def test_dct2_and_dst2(n, norm):
    eye = np.eye(n)
    dct = transforms.dct2(n, norm, dtype=C128)
    dst = transforms.dst2(n, norm, dtype=C128)
    assert _rel(dct.to_dense(), scipy.fft.dct(eye, type=2, norm=norm, axis=0)) < RTOL
    assert _rel(dst.to_dense(), scipy.fft.dst(eye, type=2, norm=norm, axis=0)) < RTOL


def test_dct2_default_is_orthogonal_and_real_on_real_signals():
    x = torch.randn(4, 12, dtype=F64)
    with torch.no_grad():
        y = transforms.dct2(12, dtype=C128)(x)
    assert float(y.imag.abs().max()) < 1e-12
    np.testing.assert_allclose(y.real.numpy(), scipy.fft.dct(x.numpy(), norm="ortho"))


# --------------------------------------------------------------------------- convolutions


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 8, 12, 16, 30, 49])
@pytest.mark.parametrize("dtype", [F64, C128])
def test_circulant(n, dtype):
    kernel = torch.randn(n, dtype=dtype)
    c = transforms.circulant(kernel)
    assert c.degree == 2 and c.in_index is None and c.out_index is None  # MM*, no gathers
    assert _rel(c.to_dense(), scipy.linalg.circulant(kernel.numpy())) < RTOL
    x = torch.randn(3, n, dtype=dtype)
    conv = torch.fft.ifft(torch.fft.fft(kernel) * torch.fft.fft(x))
    assert _rel(c(x), conv) < RTOL


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), data=st.data())
def test_toeplitz_causal_and_full(n, data):
    taps = data.draw(st.integers(1, n))
    kernel = torch.randn(taps, dtype=F64)
    causal = transforms.toeplitz(kernel, n, dtype=C128)
    full = transforms.toeplitz(kernel, n, mode="full", dtype=C128)
    assert _rel(causal.to_dense(), _convolve_matrix(kernel.numpy(), n, n)) < RTOL
    assert _rel(full.to_dense(), _convolve_matrix(kernel.numpy(), n, n + taps - 1)) < RTOL
    assert causal.degree == 2


def test_toeplitz_full_allows_long_kernels():
    kernel = torch.randn(9, dtype=F64)
    t = transforms.toeplitz(kernel, 4, mode="full")
    assert _rel(t.to_dense(), _convolve_matrix(kernel.numpy(), 4, 12)) < RTOL


# --------------------------------------------------------------------------- Kronecker


@pytest.mark.parametrize(
    ("sa", "ra", "qb", "pb"), [(1, 1, 1, 1), (2, 3, 4, 5), (3, 3, 3, 3), (5, 2, 1, 4)]
)
@pytest.mark.parametrize("dtype", [F64, C128])
def test_kronecker(sa, ra, qb, pb, dtype):
    a, b = torch.randn(sa, ra, dtype=dtype), torch.randn(qb, pb, dtype=dtype)
    k = transforms.kronecker(a, b)
    assert _rel(k.to_dense(), torch.kron(a, b)) < RTOL
    assert k.w1[0].dtype == dtype and k.degree == 1


# --------------------------------------------------------------------------- trainable


@pytest.mark.parametrize(
    "build",
    [
        lambda: transforms.dft(12, dtype=C128),
        lambda: transforms.dft2(3, 4, dtype=C128),
        lambda: transforms.hadamard(16, dtype=F64),
        lambda: transforms.dct2(10, dtype=C128),
        lambda: transforms.dst2(10, dtype=C128),
        lambda: transforms.circulant(torch.randn(10, dtype=F64)),
        lambda: transforms.toeplitz(torch.randn(3, dtype=F64), 10),
        lambda: transforms.kronecker(torch.randn(2, 3, dtype=F64), torch.randn(3, 2, dtype=F64)),
    ],
)
def test_every_transform_is_a_trainable_module(build):
    module = build()
    assert isinstance(module, MonarchProduct)
    assert all(p.requires_grad for p in module.parameters())
    before = module.to_dense().detach().clone()
    x = torch.randn(5, module.in_features, dtype=module.w1[0].dtype)
    module(x).abs().pow(2).sum().backward()
    with torch.no_grad():
        for p in module.parameters():
            p -= 1e-3 * p.grad
    assert not torch.allclose(module.to_dense().detach(), before)
    state = module.state_dict()
    clone = build()
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.to_dense().detach(), module.to_dense().detach())


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: transforms.dft(0), ValueError, "n=0"),
        (lambda: transforms.dft(12.0), TypeError, "n must be an int"),
        (lambda: transforms.dft(12, n1=5), ValueError, "n1=5 does not divide n=12"),
        (lambda: transforms.dft(8, norm="unit"), ValueError, "norm='unit'"),
        (lambda: transforms.dft(8, dtype=torch.float32), TypeError, "must be complex"),
        (lambda: transforms.dft2(0, 3), ValueError, "n1=0"),
        (lambda: transforms.hadamard(12), ValueError, "not a power of two.*8 or 16"),
        (lambda: transforms.hadamard(0), ValueError, "n=0"),
        (lambda: transforms.dct2(0), ValueError, "n=0"),
        (lambda: transforms.dst2(4, norm="bad"), ValueError, "norm='bad'"),
        (lambda: transforms.circulant(torch.randn(2, 2)), ValueError, "1-D"),
        (lambda: transforms.circulant(torch.tensor([1.0, float("inf")])), ValueError, "NaN/inf"),
        (lambda: transforms.toeplitz(torch.randn(5), 4), ValueError, "5 taps but n=4"),
        (lambda: transforms.toeplitz(torch.randn(2), 4, mode="same"), ValueError, "mode='same'"),
        (lambda: transforms.kronecker(torch.randn(3), torch.randn(2, 2)), ValueError, "2-D"),
        (
            lambda: transforms.kronecker(
                torch.randn(2, 2, dtype=C128), torch.randn(2, 2), dtype=F64
            ),
            TypeError,
            "complex",
        ),
    ],
)
def test_errors_name_the_problem(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_top_level_routes():
    import monarch_matrices

    assert monarch_matrices.transforms.dft is transforms.dft
    assert monarch_matrices.MonarchProduct is MonarchProduct
    assert callable(monarch_matrices.factor_mm_star)
