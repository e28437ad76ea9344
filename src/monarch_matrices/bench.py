"""``monarch-matrices bench``: Monarch vs ``nn.Linear`` speed, measured side by side.

For each case (tokens, in → out, nblocks) and dtype, three implementations run
interleaved in one process, on the same input, repeated after a warm-up:
``nn.Linear``; the *reference* path (the paper's two-``bmm`` multiply with
explicit permutation copies, :func:`~monarch_matrices.ops.monarch_multiply_bmm`);
and :class:`~monarch_matrices.nn.MonarchLinear`.  Forward alone, and a training
step (forward + backward for the input and every parameter).  Each figure is a
median of per-repeat *ratios*, so machine noise that hits both sides of a pair
cancels.  "Ideal" is dense parameters / Monarch parameters: the speedup at
equal FLOP efficiency.  Results are printed as a table and written as JSON and
a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .nn import MonarchLinear
from .ops import memory, monarch_multiply_bmm

__all__ = ["CASES", "BenchCase", "add_arguments", "main", "run", "run_case"]


@dataclass(frozen=True)
class BenchCase:
    """One layer shape to time."""

    name: str
    tokens: int
    in_features: int
    out_features: int
    nblocks: int
    rank: int | None = None

    @property
    def large(self) -> bool:
        """Large batch with nblocks <= 16: the cases the speed targets are stated for."""
        return self.tokens >= 4096 and self.nblocks <= 16


CASES: dict[str, BenchCase] = {
    c.name: c
    for c in [
        BenchCase("gpt2-fc1", 8192, 768, 3072, 4),
        BenchCase("gpt2-fc2", 8192, 3072, 768, 4),
        BenchCase("sq4096-b4", 4096, 4096, 4096, 4),
        BenchCase("sq4096-b16", 4096, 4096, 4096, 16),
        BenchCase("sqrt-1024", 8192, 1024, 1024, 32, rank=1),
        BenchCase("small1-4096", 1, 4096, 4096, 4),
        BenchCase("small8-4096", 8, 4096, 4096, 4),
        BenchCase("small1-fc1", 1, 768, 3072, 4),
        BenchCase("small8-fc1", 8, 768, 3072, 4),
    ]
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class CaseResult:
    case: str
    dtype: str
    mode: str
    tokens: int
    shape: list[int]
    nblocks: int
    ideal: float
    speedup: float  # nn.Linear time / MonarchLinear time (median of paired ratios)
    speedup_reference: float  # nn.Linear time / reference-path time
    over_reference: float  # reference time / MonarchLinear time
    fraction_of_ideal: float = field(init=False)
    large: bool = False

    def __post_init__(self) -> None:
        self.fraction_of_ideal = self.speedup / self.ideal


class _ReferenceLinear(nn.Module):
    """The same parameters as a MonarchLinear, multiplied by the reference path."""

    def __init__(self, layer: MonarchLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.layer
        y = monarch_multiply_bmm(nn.functional.pad(x, (0, m.padded_in - m.in_features)), m.w1, m.w2)
        return y[..., : m.out_features] + m.bias


def _step(
    module: nn.Module, x: torch.Tensor, grad: torch.Tensor, train: bool
) -> Callable[[], None]:
    if not train:

        def forward() -> None:
            with torch.inference_mode():
                module(x)

        return forward

    params = list(module.parameters())

    def train_step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        module(x).backward(grad)

    return train_step


def _time_interleaved(fns: Sequence[Callable[[], None]], repeats: int) -> list[list[float]]:
    """Per-repeat seconds for each function, run in turn (A B C A B C ...)."""
    for fn in fns:  # warm-up: allocator, thread pool, caches
        for _ in range(2):
            fn()
    # small problems: repeat each call enough to last ~5 ms, so timer noise is negligible
    t0 = time.perf_counter()
    fns[0]()
    single = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, min(1000, int(5e-3 / single)))
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            out.append((time.perf_counter() - t0) / inner)
    return samples


def run_case(case: BenchCase, dtype: torch.dtype, train: bool, repeats: int) -> CaseResult:
    """Time nn.Linear, the reference path and MonarchLinear on one case."""
    torch.manual_seed(0)
    linear = nn.Linear(case.in_features, case.out_features, dtype=dtype)
    monarch = MonarchLinear(
        case.in_features, case.out_features, nblocks=case.nblocks, rank=case.rank, dtype=dtype
    )
    reference = _ReferenceLinear(monarch)
    x = torch.randn(case.tokens, case.in_features, dtype=dtype, requires_grad=train)
    grad = torch.randn(case.tokens, case.out_features, dtype=dtype)
    fns = [_step(m, x, grad, train) for m in (linear, reference, monarch)]
    dense_t, ref_t, mon_t = _time_interleaved(fns, repeats)

    def ratio(a: list[float], b: list[float]) -> float:
        return statistics.median(x / y for x, y in zip(a, b))

    return CaseResult(
        case=case.name,
        dtype=str(dtype).removeprefix("torch."),
        mode="train" if train else "forward",
        tokens=case.tokens,
        shape=[case.in_features, case.out_features],
        nblocks=case.nblocks,
        ideal=monarch.ideal_speedup,
        speedup=ratio(dense_t, mon_t),
        speedup_reference=ratio(dense_t, ref_t),
        over_reference=ratio(ref_t, mon_t),
        large=case.large,
    )


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summarize(results: Sequence[CaseResult]) -> dict[str, float]:
    """The figures the speed targets are stated in."""
    out: dict[str, float] = {}
    for dtype in sorted({r.dtype for r in results}):
        for mode in ("forward", "train"):
            large = [r for r in results if r.dtype == dtype and r.mode == mode and r.large]
            if large:
                fracs = [r.fraction_of_ideal for r in large]
                out[f"{dtype}/{mode}/large_geomean_fraction_of_ideal"] = _geomean(fracs)
                out[f"{dtype}/{mode}/large_min_fraction_of_ideal"] = min(fracs)
        per_dtype = [r for r in results if r.dtype == dtype]
        if per_dtype:
            out[f"{dtype}/geomean_over_reference"] = _geomean([r.over_reference for r in per_dtype])
        small = [r for r in per_dtype if r.tokens <= 8]
        if small:
            out[f"{dtype}/small_min_speedup"] = min(r.speedup for r in small)
    return out


def format_table(results: Sequence[CaseResult]) -> str:
    head = (
        f"{'case':12} {'dtype':8} {'mode':7} {'tokens':>6} {'in->out':>10} {'b':>3} "
        f"{'speedup':>8} {'ideal':>6} {'of ideal':>8} {'ref':>6} {'vs ref':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.case:12} {r.dtype:8} {r.mode:7} {r.tokens:>6} "
            f"{f'{r.shape[0]}->{r.shape[1]}':>10} {r.nblocks:>3} {r.speedup:>7.2f}x "
            f"{r.ideal:>6.2f} {r.fraction_of_ideal:>8.2f} {r.speedup_reference:>5.2f}x "
            f"{r.over_reference:>6.2f}x"
        )
    return "\n".join(lines)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def plot(results: Sequence[CaseResult], path: Path) -> None:
    """Bar chart: achieved speedup next to the ideal, per case, dtype and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.dtype, r.mode) for r in results})
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 3.2 * len(groups)), squeeze=False)
    for ax, (dtype, mode) in zip(axes[:, 0], groups):
        rows = [r for r in results if (r.dtype, r.mode) == (dtype, mode)]
        xs = range(len(rows))
        ax.bar([i - 0.27 for i in xs], [r.ideal for r in rows], 0.27, label="ideal", color="#ccc")
        ax.bar(xs, [r.speedup for r in rows], 0.27, label="MonarchLinear", color="#1f77b4")
        ax.bar(
            [i + 0.27 for i in xs],
            [r.speedup_reference for r in rows],
            0.27,
            label="reference (2×bmm)",
            color="#ff7f0e",
        )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs), [r.case for r in rows], rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("speedup over nn.Linear")
        ax.set_title(f"{dtype}, {mode}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=sorted(CASES),
        default=list(CASES),
        metavar="CASE",
        help=f"cases to run (default all: {', '.join(CASES)})",
    )
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=list(DTYPES))
    parser.add_argument(
        "--mode", nargs="+", choices=["forward", "train"], default=["forward", "train"]
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per case")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for bench.json and bench.png (default: print only)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite files in --out")


def _setup() -> dict[str, str]:
    """What changes the Monarch figures besides the machine: kernels and allocator."""
    from .ops import native

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return {
        "native_kernels": native.status(),
        "huge_pages": ("on (madvise for large outputs)" if memory.huge_pages_enabled()
                       else "asked for, unused (freed memory is retained)"
                       if memory.huge_pages_requested()
                       else f"off ({memory.ENV_SWITCH}=1 turns them on)"),
        "freed_memory": ("retained (glibc mallopt)" if memory.freed_memory_retained()
                         else "not retained (default malloc)"),
        "system_thp": thp.read_text().strip() if thp.exists() else "n/a",
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
        "LD_PRELOAD": os.environ.get("LD_PRELOAD", "unset"),
    }


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; ``ValueError`` for bad arguments."""
    if args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    targets: list[Path] = []
    if args.out is not None:
        targets = [args.out / "bench.json", args.out / "bench.png"]
        existing = [str(p) for p in targets if p.exists()]
        if existing and not args.force:
            raise ValueError(f"{', '.join(existing)} exists; pass --force to overwrite")
        args.out.mkdir(parents=True, exist_ok=True)

    jobs = [(CASES[c], d, m) for d in args.dtype for m in args.mode for c in args.cases]
    try:
        from tqdm import tqdm

        progress = tqdm(jobs, desc="bench", unit="case", leave=False)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        progress = jobs
    results = []
    for case, dtype, mode in progress:
        results.append(run_case(case, DTYPES[dtype], mode == "train", args.repeats))
    print(format_table(results))
    summary = summarize(results)
    print()
    for key, value in summary.items():
        print(f"{key:48} {value:.3f}")
    print(
        f"\n{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}; medians of {args.repeats} paired ratios"
    )
    setup = _setup()
    print("; ".join(f"{k}: {v}" for k, v in setup.items()))
    if args.out is not None:
        payload = {
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                **setup,
            },
            "repeats": args.repeats,
            "summary": summary,
            "results": [asdict(r) for r in results],
        }

        def write_json(tmp: str) -> None:
            Path(tmp).write_text(json.dumps(payload, indent=2))

        _atomic_write(targets[0], write_json)
        plot(results, targets[1])
        print(f"wrote {targets[0]} and {targets[1]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monarch-matrices bench", description=__doc__)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    raise SystemExit(main())
