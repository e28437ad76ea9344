"""Classical fast transforms as exact, trainable Monarch products.

Every function returns an :class:`~monarch_matrices.nn.MonarchProduct` whose
``to_dense()`` is the transform's matrix (to rounding) and whose factors are
ordinary parameters, so the transform is a starting point that training may
move away from — the paper's point that Monarch products *contain* these
transforms, made concrete.

How each is built (``n = n1·n2``, ``ω_m = e^{∓2πi/m}``):

* ``dft``: Cooley–Tukey.  Reading the input in the order ``x[j·n1 + a]`` (a
  fixed input gather), output ``e·n2 + v`` of one Monarch factor with
  ``w1[a, v, j] = ω_{n2}^{vj}`` and ``w2[v, e, a] = ω_{n1}^{ea}·ω_n^{va}`` is
  exactly the DFT: one factor (degree 1) for any ``n``.
* ``dft2`` / ``hadamard`` / ``kronecker``: ``A ⊗ B`` *is* one Monarch factor
  (``w1`` = copies of ``B``, ``w2`` = copies of ``A``; no gathers), and the 2-D DFT
  is ``F_{n1} ⊗ F_{n2}``, the Walsh–Hadamard matrix ``H_{n1} ⊗ H_{n2}``.
* ``dct2`` / ``dst2``: a length-``2n`` DFT of the even (DCT) or odd (DST)
  extension of ``x``, with a phase per output row folded into ``w2``.  The
  extension is an input gather, the unused half of the outputs is dropped from
  ``w2``; the result is exactly real although the factors are complex.
* ``circulant``: ``C = F⁻¹ diag(F k) F``.  Splitting ``F`` as ``n1·n2`` and ``F⁻¹`` as
  ``n2·n1`` makes the permutations between them cancel, leaving two plain
  Monarch factors — the class MM* — with ``F⁻¹``'s first block-diagonal, the
  eigenvalues and ``F``'s second block-diagonal merged into one.
* ``toeplitz``: linear convolution is a circulant of size ``N ≥ n + K - 1`` on the
  zero-padded input, cropped: the same two factors plus a padding gather and an
  output crop.

Complex transforms default to the complex dtype matching
``torch.get_default_dtype()``; pass ``dtype=torch.complex128`` for exactness
tests.  Factors are computed in float64/complex128 and then cast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .nn.product import MonarchProduct
from .ops.product import ProductFactors

__all__ = ["circulant", "dct2", "dft", "dft2", "dst2", "hadamard", "kronecker", "toeplitz"]

C128 = torch.complex128
_NORMS = (None, "backward", "ortho", "forward")


# --------------------------------------------------------------------------- checks


def _check_size(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def _check_norm(norm: object) -> str:
    if norm not in _NORMS:
        raise ValueError(f"norm={norm!r} is not one of {_NORMS}")
    return "backward" if norm is None else str(norm)


def _complex_dtype(dtype: torch.dtype | None, what: str) -> torch.dtype:
    if dtype is None:
        return C128 if torch.get_default_dtype() == torch.float64 else torch.complex64
    if not dtype.is_complex:
        raise TypeError(
            f"{what} has complex factors; dtype must be complex (torch.complex64 or "
            f"torch.complex128), got {dtype}"
        )
    return dtype


def _as_vector(name: str, value: object) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(t.shape)}")
    if not (t.is_floating_point() or t.is_complex()):
        t = t.to(torch.get_default_dtype())
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has NaN/inf entries")
    return t.detach()


def _as_matrix(name: str, value: object) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.dim() != 2 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D matrix, got shape {tuple(t.shape)}")
    if not (t.is_floating_point() or t.is_complex()):
        t = t.to(torch.get_default_dtype())
    return t


def _module(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device | str | None,
    in_index: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    in_features: int | None = None,
) -> MonarchProduct:
    cast = [(w1.to(device, dtype), w2.to(device, dtype)) for w1, w2 in factors]
    return MonarchProduct.from_factors(
        ProductFactors(tuple(cast), in_index, out_index, in_features)
    )


# --------------------------------------------------------------------------- building blocks


def _split(n: int) -> int:
    """The largest divisor of ``n`` not above ``√n``: the most balanced ``n = n1·n2``."""
    for d in range(math.isqrt(n), 0, -1):
        if n % d == 0:
            return d
    return 1


def _root(m: int, k: torch.Tensor, sign: int) -> torch.Tensor:
    """``exp(sign·2πi·k/m)``, reducing ``k mod m`` first so large exponents stay exact."""
    angle = (k % m).to(torch.float64) * (sign * 2 * math.pi / m)
    return torch.polar(torch.ones_like(angle), angle)


def _norm_exponent(norm: str, inverse: bool) -> float:
    """``α`` with scale ``n^-α``, as in ``torch.fft`` (forward, backward, ortho)."""
    if norm == "ortho":
        return 0.5
    return 1.0 if (norm == "forward") != inverse else 0.0


def _dft_factor(n: int, n1: int, inverse: bool, alpha: float):
    """``(in_index, w1, w2)`` with ``Mon(w1, w2)(x[in_index]) = n^-α · F_n x``."""
    n2 = n // n1
    sign = 1 if inverse else -1
    a, e = torch.arange(n1), torch.arange(n1)
    v, j = torch.arange(n2), torch.arange(n2)
    # scale n^-α split as n2^-α into w1 and n1^-α into w2: unitary blocks for "ortho"
    block1 = _root(n2, v[:, None] * j[None, :], sign) * n2**-alpha  # (v, j)
    w1 = block1.expand(n1, n2, n2).clone()  # w1[a, v, j] = ω_{n2}^{vj}
    twiddle = _root(n, v[:, None] * a[None, :], sign)  # (v, a): ω_n^{va}
    w2 = _root(n1, e[:, None] * a[None, :], sign)[None] * twiddle[:, None, :] * n1**-alpha
    in_index = (j[None, :] * n1 + a[:, None]).reshape(-1)  # position a·n2 + j reads j·n1 + a
    return in_index, w1, w2


def _dft_matrix(n: int, inverse: bool, alpha: float) -> torch.Tensor:
    k = torch.arange(n)
    return _root(n, k[:, None] * k[None, :], 1 if inverse else -1) * n**-alpha


def _kron_factor(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A ⊗ B`` as one Monarch factor: ``M[e·qb + v, i·pb + j] = A[e, i]·B[v, j]``."""
    (sa, ra), (qb, pb) = a.shape, b.shape
    w1 = b.expand(ra, qb, pb).clone()  # k = ra blocks of B
    w2 = a.expand(qb, sa, ra).clone()  # l = qb blocks of A
    return w1, w2


def _sylvester(m: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _circulant_factors(kernel: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Two factors (application order) with product ``C[i, j] = kernel[(i - j) mod n]``.

    ``F = Mon(w1F, w2F)·P`` with split ``n1·n2`` and ``F⁻¹ = Mon(w1G, w2G)·P⁻¹``
    with split ``n2·n1`` (its input permutation is the inverse of ``F``'s), so

        C = F⁻¹ D F = [Mon(w1G · D' · w2F, w2G)] · [Mon(1, w1F)]

    where ``D'`` is ``diag(F k)`` in the order of ``F``'s middle stride.
    """
    n = kernel.numel()
    n1 = _split(n)
    n2 = n // n1
    eig = torch.fft.fft(kernel.to(C128))  # diag(F k)
    _, w1f, w2f = _dft_factor(n, n1, inverse=False, alpha=0.0)  # (n1, n2, n2), (n2, n1, n1)
    _, w1g, w2g = _dft_factor(n, n2, inverse=True, alpha=1.0)  # (n2, n1, n1), (n1, n2, n2)
    d = eig.reshape(n1, n2).T  # d[v, i] = eig[i·n2 + v]
    middle = w1g * d[:, None, :] @ w2f  # (n2, n1, n1): w1G[v] · diag(d[v]) · w2F[v]
    ones = torch.ones(n, 1, 1, dtype=C128)
    return (ones, w1f), (middle, w2g)


# --------------------------------------------------------------------------- transforms


def dft(
    n: int,
    inverse: bool = False,
    norm: str | None = None,
    *,
    n1: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MonarchProduct:
    """The ``n``-point DFT (or inverse) as one Monarch factor plus an input permutation.

    Matches ``torch.fft.fft`` / ``torch.fft.ifft`` with the same ``norm``
    (``None``/``"backward"``, ``"ortho"``, ``"forward"``) for any ``n``.

    Args:
        n: transform length, any ``n >= 1``.
        inverse: build ``ifft`` instead of ``fft``.
        norm: normalization, as in ``torch.fft``.
        n1: a divisor of ``n``: ``w1`` gets ``n1`` blocks of size ``n2 = n/n1`` and
            ``w2`` gets ``n2`` blocks of size ``n1``.  Default: the divisor nearest
            ``√n`` from below (``O(n^1.5)`` work; a prime ``n`` falls back to one
            dense block).

    >>> f = dft(12, dtype=torch.complex128)
    >>> x = torch.randn(3, 12, dtype=torch.complex128)
    >>> torch.allclose(f(x), torch.fft.fft(x))
    True
    """
    _check_size("n", n)
    alpha = _norm_exponent(_check_norm(norm), bool(inverse))
    if n1 is None:
        n1 = _split(n)
    _check_size("n1", n1)
    if n % n1:
        raise ValueError(f"n1={n1} does not divide n={n}; pick a divisor of {n}")
    in_index, w1, w2 = _dft_factor(n, n1, bool(inverse), alpha)
    return _module([(w1, w2)], _complex_dtype(dtype, "dft"), device, in_index)


def dft2(
    n1: int,
    n2: int,
    inverse: bool = False,
    norm: str | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MonarchProduct:
    """The 2-D DFT of ``(n1, n2)`` images flattened row-major: one Monarch factor, no gathers.

    ``F_{n1} ⊗ F_{n2}`` — exactly the two passes of an FFT layer over rows and
    columns.  Matches ``torch.fft.fft2`` / ``ifft2`` with the same ``norm`` on
    ``x.reshape(*, n1, n2)``.

    >>> f = dft2(4, 6, dtype=torch.complex128)
    >>> x = torch.randn(2, 4, 6, dtype=torch.complex128)
    >>> torch.allclose(f(x.reshape(2, 24)).reshape(2, 4, 6), torch.fft.fft2(x))
    True
    """
    _check_size("n1", n1)
    _check_size("n2", n2)
    alpha = _norm_exponent(_check_norm(norm), bool(inverse))
    w1, w2 = _kron_factor(
        _dft_matrix(n1, bool(inverse), alpha), _dft_matrix(n2, bool(inverse), alpha)
    )
    return _module([(w1, w2)], _complex_dtype(dtype, "dft2"), device)


def hadamard(
    n: int,
    normalized: bool = False,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MonarchProduct:
    """The Walsh–Hadamard matrix (Sylvester order, ``scipy.linalg.hadamard``) as one factor.

    ``H_n = H_{n1} ⊗ H_{n2}`` with ``n1·n2 = n`` balanced.  ``normalized`` scales by
    ``1/√n`` (an orthogonal matrix).  Real; default dtype ``torch.get_default_dtype()``.

    >>> hadamard(4).to_dense().detach()
    tensor([[ 1.,  1.,  1.,  1.],
            [ 1., -1.,  1., -1.],
            [ 1.,  1., -1., -1.],
            [ 1., -1., -1.,  1.]])
    """
    _check_size("n", n)
    if n & (n - 1):
        raise ValueError(
            f"n={n} is not a power of two; the Walsh–Hadamard matrix exists here for "
            f"n = 2^k, e.g. {1 << (n.bit_length() - 1)} or {1 << n.bit_length()}"
        )
    k = n.bit_length() - 1
    n1, n2 = 1 << (k // 2), 1 << (k - k // 2)
    h1, h2 = _sylvester(n1), _sylvester(n2)
    if normalized:
        h1, h2 = h1 / math.sqrt(n1), h2 / math.sqrt(n2)
    w1, w2 = _kron_factor(h1, h2)
    return _module([(w1, w2)], dtype or torch.get_default_dtype(), device)


def _dct_pieces(n: int, norm: str):
    """``(in_index, w1, w2)`` of the DCT-II via a length-``2n`` DFT of the even extension.

    ``2·Σ_j x_j cos(πk(2j+1)/2n) = e^{-iπk/2n} · (F_{2n} [x, reversed x])_k``; the
    phase and scipy's normalization scale output row ``k`` of ``w2``, and only
    rows ``k < n`` are kept (``2n = N1·N2`` with ``N1`` even, so they are the
    first ``N1/2`` rows of every block).
    """
    d = max(
        (d for d in range(1, n + 1) if n % d == 0), key=lambda d: -abs(2 * d - math.sqrt(2 * n))
    )
    big_n, n1 = 2 * n, 2 * d
    idx, w1, w2 = _dft_factor(big_n, n1, inverse=False, alpha=0.0)
    extension = torch.cat([torch.arange(n), torch.arange(n - 1, -1, -1)])  # even extension
    in_index = extension[idx]
    n2 = big_n // n1
    out = torch.arange(n1)[:, None] * n2 + torch.arange(n2)[None, :]  # out[e, v] = e·n2 + v
    if norm == "ortho":
        scale = torch.full((big_n,), 1 / math.sqrt(2 * n), dtype=torch.float64)
        scale[0] = 1 / math.sqrt(4 * n)
    else:
        scale = torch.full((big_n,), 1 / (2 * n) if norm == "forward" else 1.0, dtype=torch.float64)
    phase = _root(4 * n, out, -1) * scale[out]  # e^{-iπk/2n} = ω_{4n}^k, times the norm
    w2 = (w2 * phase.T[:, :, None])[:, : n1 // 2, :]  # w2[v, e, :] scaled by row e·n2 + v
    return in_index, w1, w2


def dct2(
    n: int,
    norm: str | None = "ortho",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MonarchProduct:
    """The DCT-II (``scipy.fft.dct(x, type=2, norm=norm)``) as one factor plus an input gather.

    Default ``norm="ortho"`` (an orthogonal matrix); ``None``/``"backward"`` and
    ``"forward"`` follow scipy.  The factors are complex (they are a DFT's) but
    the product is real: take ``.real`` of the output for real input.

    >>> import numpy as np
    >>> c = dct2(6, dtype=torch.complex128).to_dense()
    >>> bool(c.imag.abs().max() < 1e-12)
    True
    """
    _check_size("n", n)
    in_index, w1, w2 = _dct_pieces(n, _check_norm(norm))
    return _module([(w1, w2)], _complex_dtype(dtype, "dct2"), device, in_index, None, n)


def dst2(
    n: int,
    norm: str | None = "ortho",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MonarchProduct:
    """The DST-II (``scipy.fft.dst(x, type=2, norm=norm)``): the DCT-II with flips.

    ``DST[k, j] = (-1)^j · DCT[n-1-k, j]`` for every scipy normalization, so this
    is :func:`dct2`'s factor with input signs folded into ``w1`` and a reversing
    output gather.
    """
    _check_size("n", n)
    in_index, w1, w2 = _dct_pieces(n, _check_norm(norm))
    sign = 1.0 - 2.0 * (in_index % 2).to(torch.float64)  # (-1)^j for the input each column reads
    w1 = w1 * sign.reshape(w1.shape[0], 1, w1.shape[2])
    out_index = torch.arange(n - 1, -1, -1)
    return _module([(w1, w2)], _complex_dtype(dtype, "dst2"), device, in_index, out_index, n)


def circulant(
    kernel: torch.Tensor | Sequence[float],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MonarchProduct:
    """Circular convolution with ``kernel`` as an MM* product ``F⁻¹ diag(F k) F`` (degree 2).

    The matrix is ``C[i, j] = kernel[(i - j) mod n]`` (``scipy.linalg.circulant``),
    so ``C x = ifft(fft(kernel) · fft(x))``.  Any ``n = len(kernel)``.  The factors
    are complex; for a real kernel the product is real up to rounding.
    Default dtype: the complex dtype matching ``kernel``'s precision.
    """
    k = _as_vector("kernel", kernel)
    dtype = _complex_dtype(dtype if dtype is not None else _complex_of(k.dtype), "circulant")
    return _module(_circulant_factors(k.cpu()), dtype, device or k.device)


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_complex:
        return dtype
    return C128 if dtype == torch.float64 else torch.complex64


def toeplitz(
    kernel: torch.Tensor | Sequence[float],
    n: int,
    mode: str = "causal",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MonarchProduct:
    """Linear convolution with ``kernel`` on length-``n`` inputs: a padded, cropped circulant.

    ``mode="causal"``: the ``n×n`` lower-triangular Toeplitz matrix
    ``T[i, j] = kernel[i - j]`` (``0 <= i - j < K``), i.e. ``np.convolve(x, kernel)[:n]``
    — the long convolution of sequence models; requires ``K = len(kernel) <= n``.
    ``mode="full"``: all ``n + K - 1`` outputs, ``np.convolve(x, kernel)``.

    Built as the degree-2 :func:`circulant` of size ``N >= n + K - 1`` (chosen as
    ``N1·N2`` with ``N1 ≈ √N``, so no wrap-around reaches the kept outputs) with an
    input gather that zero-pads and an output gather that crops.
    """
    k = _as_vector("kernel", kernel)
    _check_size("n", n)
    if mode not in ("causal", "full"):
        raise ValueError(f"mode={mode!r} is not 'causal' or 'full'")
    taps = k.numel()
    if mode == "causal" and taps > n:
        raise ValueError(
            f"kernel has {taps} taps but n={n}: a causal convolution of length n uses at "
            f"most n taps; shorten the kernel to {n} or use mode='full'"
        )
    need = n + taps - 1
    n1 = math.isqrt(need - 1) + 1 if need > 1 else 1  # ⌈√need⌉
    big_n = n1 * -(-need // n1)
    padded = torch.cat([k.to("cpu", C128), torch.zeros(big_n - taps, dtype=C128)])
    in_index = torch.cat([torch.arange(n), torch.full((big_n - n,), -1)])
    n_out = n if mode == "causal" else need
    dtype = _complex_dtype(dtype if dtype is not None else _complex_of(k.dtype), "toeplitz")
    return _module(
        _circulant_factors(padded), dtype, device or k.device, in_index, torch.arange(n_out), n
    )


def kronecker(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MonarchProduct:
    """``A ⊗ B`` (``torch.kron``) as one Monarch factor: ``w1`` = copies of B, ``w2`` of A.

    Any shapes: ``A`` is ``(sa, ra)``, ``B`` is ``(qb, pb)``, the product maps
    ``ra·pb → sa·qb``.  Default dtype: ``A``'s and ``B``'s promoted; device: ``A``'s.

    >>> a, b = torch.randn(2, 3), torch.randn(4, 5)
    >>> torch.allclose(kronecker(a, b).to_dense(), torch.kron(a, b))
    True
    """
    a, b = _as_matrix("a", a), _as_matrix("b", b)
    if dtype is None:
        dtype = torch.promote_types(a.dtype, b.dtype)
    if (a.is_complex() or b.is_complex()) and not dtype.is_complex:
        raise TypeError(f"a or b is complex but dtype={dtype} is real; pass a complex dtype")
    work = C128 if dtype.is_complex else torch.float64
    w1, w2 = _kron_factor(a.detach().to("cpu", work), b.detach().to("cpu", work))
    return _module([(w1, w2)], dtype, device or a.device)
