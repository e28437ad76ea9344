"""Exact transforms as Monarch products: degree, parameters, error, and speed.

For each transform of ``monarch_matrices.transforms`` this measures, side by
side in one process:

* the Monarch-p degree and the parameter count, against the dense matrix's;
* the error of the Monarch form: its dense matrix built in complex128/float64
  against the numpy / scipy / torch reference (``err64``), and the error of the
  timed single-precision forward pass against a float64 reference (``err32``);
* the time of ``y = x Mᵀ`` for a batch of vectors with the Monarch form, with
  the dense matrix (one GEMM) and with the ``torch.fft`` route where one exists
  (FFT, FFT-based DCT/DST and convolutions).  Timings are medians over
  interleaved repeats (each repeat times every method once, in turn), so load
  on the shared machine hits all of them alike; only the ratios are meaningful.
  One thread by default: with two threads on a busy two-core machine every
  multi-threaded kernel pays milliseconds of wake-up latency, which swamps
  sub-millisecond calls.

Usage::

    .venv/bin/python benchmarks/transforms.py            # n = 1024 and 4096, batch 64, 1 thread
    .venv/bin/python benchmarks/transforms.py --n 256 1024 --json out.json
    .venv/bin/python benchmarks/transforms.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.fft
import scipy.linalg
import torch

from monarch_matrices import transforms
from monarch_matrices.nn import MonarchProduct

C64, C128, F64 = torch.complex64, torch.complex128, torch.float64


@dataclass
class Case:
    name: str
    build: Callable[[torch.dtype], MonarchProduct]  # the Monarch form in a given dtype
    reference: Callable[[], torch.Tensor]  # the exact matrix, float64 / complex128
    fft: Callable[[torch.Tensor], torch.Tensor] | None  # the torch.fft route, if any
    complex_factors: bool = True
    real_input: bool = True  # the transform is applied to real signals


@dataclass
class Row:
    transform: str
    n: int
    degree: int
    params: int
    dense_params: int
    err64: float
    err32: float
    t_monarch_ms: float
    t_dense_ms: float
    t_fft_ms: float | None
    dense_over_monarch: float
    fft_over_monarch: float | None


# --------------------------------------------------------------------------- torch.fft routes


def _dct_fft(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II by one complex FFT of the reordered signal (Makhoul)."""
    n = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    k = torch.arange(n, device=x.device)
    phase = torch.exp(-1j * math.pi * k / (2 * n)).to(
        torch.complex64 if x.dtype == torch.float32 else C128
    )
    y = 2 * (torch.fft.fft(v) * phase).real
    scale = torch.full((n,), math.sqrt(1 / (2 * n)), dtype=x.dtype)
    scale[0] = math.sqrt(1 / (4 * n))
    return y * scale


def _dst_fft(x: torch.Tensor) -> torch.Tensor:
    sign = 1 - 2 * (torch.arange(x.shape[-1]) % 2).to(x.dtype)
    return _dct_fft(x * sign).flip(-1)


# --------------------------------------------------------------------------- cases


def cases(n: int) -> list[Case]:
    """The transforms at size ``n`` (a power of 4, so every one of them applies)."""
    side = math.isqrt(n)
    if side * side != n or n & (n - 1):
        raise SystemExit(f"--n {n}: use a power of 4 (e.g. 256, 1024, 4096)")
    gen = torch.Generator().manual_seed(0)
    kernel = torch.randn(n, generator=gen, dtype=F64)
    taps = kernel[: n // 4]
    a = torch.randn(side, side, generator=gen, dtype=F64)
    b = torch.randn(side, side, generator=gen, dtype=F64)
    kernel_rfft = torch.fft.rfft(kernel.float())
    taps_rfft = torch.fft.rfft(taps.float(), 2 * n)

    def eye(dtype=F64):
        return torch.eye(n, dtype=dtype)

    def toeplitz() -> torch.Tensor:
        lag = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # i - j
        padded = torch.cat([taps, torch.zeros(n - taps.numel(), dtype=F64)])
        return torch.where((lag >= 0) & (lag < taps.numel()), padded[lag.clamp(0, n - 1)], 0.0)

    def fft2(x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft2(x.reshape(*x.shape[:-1], side, side)).reshape(x.shape)

    return [
        Case(
            "dft",
            lambda d: transforms.dft(n, dtype=d),
            lambda: torch.fft.fft(eye(C128), dim=0),
            torch.fft.fft,
            real_input=False,
        ),
        Case(
            "dft2",
            lambda d: transforms.dft2(side, side, dtype=d),
            lambda: fft2(eye(C128)).T,  # row i of fft2(eye) is the image of basis vector i
            fft2,
            real_input=False,
        ),
        Case(
            "hadamard",
            lambda d: transforms.hadamard(n, dtype=d),
            lambda: torch.from_numpy(scipy.linalg.hadamard(n).astype(np.float64)),
            None,
            complex_factors=False,
        ),
        Case(
            "dct2",
            lambda d: transforms.dct2(n, dtype=d),
            lambda: torch.from_numpy(scipy.fft.dct(np.eye(n), norm="ortho", axis=0)),
            _dct_fft,
        ),
        Case(
            "dst2",
            lambda d: transforms.dst2(n, dtype=d),
            lambda: torch.from_numpy(scipy.fft.dst(np.eye(n), norm="ortho", axis=0)),
            _dst_fft,
        ),
        Case(
            "circulant",
            lambda d: transforms.circulant(kernel, dtype=d),
            lambda: torch.from_numpy(scipy.linalg.circulant(kernel.numpy())),
            lambda x: torch.fft.irfft(kernel_rfft * torch.fft.rfft(x), n),
        ),
        Case(
            "toeplitz (causal, K=n/4)",
            lambda d: transforms.toeplitz(taps, n, dtype=d),
            toeplitz,
            lambda x: torch.fft.irfft(torch.fft.rfft(x, 2 * n) * taps_rfft, 2 * n)[..., :n],
        ),
        Case(
            "kronecker",
            lambda d: transforms.kronecker(a, b, dtype=d),
            lambda: torch.kron(a, b),
            None,
            complex_factors=False,
        ),
    ]


# --------------------------------------------------------------------------- measuring


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(C128), b.to(C128)
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _median_ms(fns: dict[str, Callable[[], object]], repeats: int, inner: int) -> dict[str, float]:
    """Median time per call of each function, timed in interleaved rounds."""
    for fn in fns.values():  # warm up
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


@torch.no_grad()
def measure(case: Case, n: int, batch: int, repeats: int, inner: int) -> Row:
    reference = case.reference()
    exact = case.build(C128 if case.complex_factors else F64)
    err64 = _rel(exact.to_dense(), reference)
    del exact
    module = case.build(C64 if case.complex_factors else torch.float32)
    gen = torch.Generator().manual_seed(1)
    x64 = torch.randn(batch, n, generator=gen, dtype=F64)
    if not case.real_input:
        x64 = torch.complex(x64, torch.randn(batch, n, generator=gen, dtype=F64))
    x = x64.to(C64 if x64.is_complex() else torch.float32)
    y_ref = x64.to(C128) @ reference.to(C128).T
    err32 = _rel(module(x), y_ref)
    # the dense baseline multiplies in the matrix's own field: a real GEMM for real
    # transforms (DCT, convolutions), even where the Monarch factors are complex
    dense_dtype = C64 if (reference.is_complex() or x.is_complex()) else torch.float32
    dense_t = reference.to(dense_dtype).T.contiguous()
    x_dense = x.to(dense_dtype)
    fns: dict[str, Callable[[], object]] = {
        "monarch": lambda: module(x),
        "dense": lambda: x_dense @ dense_t,
    }
    if case.fft is not None:
        fns["fft"] = lambda: case.fft(x)
    t = _median_ms(fns, repeats, inner)
    t_fft = t.get("fft")
    return Row(
        transform=case.name,
        n=n,
        degree=module.degree,
        params=module.num_params,
        dense_params=reference.numel(),
        err64=err64,
        err32=err32,
        t_monarch_ms=t["monarch"],
        t_dense_ms=t["dense"],
        t_fft_ms=t_fft,
        dense_over_monarch=t["dense"] / t["monarch"],
        fft_over_monarch=None if t_fft is None else t_fft / t["monarch"],
    )


def table(rows: list[Row], batch: int) -> str:
    head = (
        "| transform | n | Monarch-p degree | params (Monarch / dense) | err64 | err32 "
        "| Monarch ms | dense ms | torch.fft ms | speedup vs dense | vs torch.fft |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        fft = "—" if r.t_fft_ms is None else f"{r.t_fft_ms:.3f}"
        vs_fft = "—" if r.fft_over_monarch is None else f"{r.fft_over_monarch:.2f}×"
        lines.append(
            f"| {r.transform} | {r.n} | {r.degree} | {r.params:,} / {r.dense_params:,} "
            f"({r.params / r.dense_params:.3f}) | {r.err64:.1e} | {r.err32:.1e} "
            f"| {r.t_monarch_ms:.3f} | {r.t_dense_ms:.3f} | {fft} "
            f"| {r.dense_over_monarch:.2f}× | {vs_fft} |"
        )
    return (
        "\n".join(lines)
        + f"\n\nbatch = {batch} vectors per call, {torch.get_num_threads()} thread(s); "
        + "speedup = other time / Monarch time."
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n", type=int, nargs="+", default=[1024, 4096], help="transform sizes, powers of 4"
    )
    parser.add_argument("--batch", type=int, default=64, help="vectors per call")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--inner", type=int, default=5, help="calls per timing sample")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)"
    )
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/transforms.json"))
    parser.add_argument("--quick", action="store_true", help="n=256, 5 rounds: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.n, args.repeats, args.inner = [256], 5, 2
    torch.set_num_threads(args.threads)
    rows = [
        measure(case, n, args.batch, args.repeats, args.inner) for n in args.n for case in cases(n)
    ]
    print(table(rows, args.batch))
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "sizes": args.n,
        "batch": args.batch,
        "repeats": args.repeats,
        "inner": args.inner,
        "dtype": "complex64 (float32 for real-factor transforms)",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
