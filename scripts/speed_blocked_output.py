"""How fast would the forward be if the output stayed in block-major order (no interleave)?

Measures the lever docs/speed.md calls "absorbing the output permutation into
the next layer": a layer whose output order is free (an MLP's first layer,
q/k/v trained from scratch) could skip the interleaving copy and let each
block's GEMM write its own columns of the output (``addmm`` into a column
slice, bias included).  The result equals the standard output up to a fixed
permutation (checked below).  A measurement, not a library feature: dense vs
MonarchLinear vs this variant, medians of paired ratios::

    python scripts/speed_blocked_output.py --dtype bfloat16 --shape 768 3072 --nblocks 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from monarch_matrices.nn import MonarchLinear
from monarch_matrices.ops.multiply import chunk_tokens


def blocked_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                    bias_blocked: torch.Tensor) -> torch.Tensor:
    """``y[:, v·s + e] = (M x)[e·l + v] + b``: the Monarch output, block-major."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    n_tokens = x.shape[0]
    y = x.new_empty(n_tokens, s * l)
    chunk = chunk_tokens(n_tokens, k * q, s * l, x.dtype, x.device)
    h, mid = x.new_empty(chunk, k, q), x.new_empty(chunk, l, r)
    w1t, w2t = w1.transpose(1, 2), w2.transpose(1, 2)
    for start in range(0, n_tokens, chunk):
        n = min(chunk, n_tokens - start)
        xc, hc, mc = x[start : start + n].view(n, k, p), h[:n], mid[:n]
        torch.bmm(xc.transpose(0, 1), w1t, out=hc.transpose(0, 1))
        mc.copy_(hc.view(n, r, l).transpose(1, 2))
        yc = y[start : start + n]
        for v in range(l):  # each block writes its columns: no interleaving pass
            torch.addmm(bias_blocked[v * s : (v + 1) * s], mc[:, v], w2t[v],
                         out=yc[:, v * s : (v + 1) * s])
    return y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--shape", type=int, nargs=2, default=(768, 3072), metavar=("IN", "OUT"))
    parser.add_argument("--nblocks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    fin, fout = args.shape
    x = torch.randn(args.tokens, fin, dtype=dtype)
    dense = torch.nn.Linear(fin, fout, dtype=dtype)
    monarch = MonarchLinear(fin, fout, nblocks=args.nblocks, dtype=dtype)
    w1, w2 = monarch.w1.detach(), monarch.w2.detach()
    l, s, _ = w2.shape
    to_standard = torch.arange(s * l).view(s, l).t().reshape(-1)  # v·s + e -> e·l + v
    bias_blocked = monarch.bias.detach()[to_standard]

    fns = {"dense": lambda: dense(x), "monarch": lambda: monarch(x),
           "blocked": lambda: blocked_forward(x, w1, w2, bias_blocked)}
    with torch.no_grad():
        error = (fns["blocked"]().double() - fns["monarch"]()[:, to_standard].double()).abs().max()
        for f in fns.values():
            for _ in range(3):
                f()
        ratios: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.repeats):
            seconds = {}
            for name, f in fns.items():
                start = time.perf_counter()
                f()
                seconds[name] = time.perf_counter() - start
            for name in fns:
                ratios[name].append(seconds["dense"] / seconds[name])
    print(f"{args.dtype} {fin}->{fout} nblocks={args.nblocks} tokens={args.tokens}: "
          f"ideal {monarch.ideal_speedup:.2f}x; max |blocked - monarch| {float(error):.1e}")
    for name, values in ratios.items():
        print(f"  {name:8s} speedup over nn.Linear {statistics.median(values):.2f}x")


if __name__ == "__main__":
    main()
