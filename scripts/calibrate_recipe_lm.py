"""Calibrated conversion of the LM recipe's trained dense model: validation perplexity.

Takes the folder of a finished dense ``monarch-matrices train lm --layers dense``
run, rebuilds its model from ``checkpoint.pt``, converts the MLP layers (fc1,
fc2 of every block) to Monarch at ``--nblocks`` and reports validation
perplexity on the recipe's own validation batches (the last 10% of the text):

- dense (the trained model),
- projection alone (the nearest Monarch matrix to each weight),
- calibrated projection (sequential, targets from the dense model) on
  ``--windows`` windows of *training* text.

Usage::

    monarch-matrices train lm --layers dense --out out/lm-dense
    python scripts/calibrate_recipe_lm.py out/lm-dense [--windows 512] [--targets mlp]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch


def main() -> int:
    from monarch_matrices.convert import monarchify
    from monarch_matrices.recipes.common import Dist
    from monarch_matrices.recipes.data import CharTokenizer, load_text
    from monarch_matrices.recipes.lm import build_model, evaluate, get_batch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="folder of a finished dense `train lm` run")
    parser.add_argument("--nblocks", type=int, default=4)
    parser.add_argument("--targets", default="mlp",
                        help="'mlp' (fc1, fc2), 'attention' (qkv, proj) or 'all' (default mlp)")
    parser.add_argument("--windows", type=int, default=512,
                        help="calibration windows of training text (default 512)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    for name in ("metrics.json", "checkpoint.pt"):
        if not (args.run / name).is_file():
            raise SystemExit(f"{args.run / name} does not exist: give the --out folder of a "
                             "finished `monarch-matrices train lm --layers dense` run")
    metrics = json.loads((args.run / "metrics.json").read_text())
    run = argparse.Namespace(**metrics["options"])
    if run.layers != "dense" or not metrics["finished"]:
        raise SystemExit(f"{args.run} is not a finished --layers dense run")
    ckpt = torch.load(args.run / "checkpoint.pt", map_location="cpu", weights_only=True)
    text, source = load_text(run.data)
    tok = CharTokenizer.from_text(text)
    data = tok.encode(text).to(torch.int32)
    n_val = len(data) // 10
    train_data, val_data = data[:-n_val], data[-n_val:]
    dense = build_model(run, tok.vocab_size, "dense")
    dense.load_state_dict(ckpt["model"])
    dense.eval()
    dist = Dist()

    names = {"mlp": r".*mlp\.fc[12]$", "attention": r".*attn\.(qkv|proj)$",
             "all": r".*(mlp\.fc[12]|attn\.(qkv|proj))$"}[args.targets]
    gen = torch.Generator().manual_seed(0)
    x, _ = get_batch(train_data, args.windows, run.block_size, gen)
    batches = list(x.split(32))  # the model takes token ids: model(batch) -> logits

    def val(model) -> float:
        return evaluate(model, val_data, run, dist)

    rows = [("dense", val(dense), 0.0)]
    for label, calibration in (("projection", None), ("calibrated", batches)):
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        monarchify(model, args.nblocks, targets=names, calibration=calibration)
        rows.append((label, val(model), time.perf_counter() - start))
    base = rows[0][1]
    print(f"{source}: {metrics['model']}; Monarch in {args.targets} at nblocks={args.nblocks}; "
          f"{args.windows} calibration windows of {run.block_size} characters")
    print(f"{'model':12s} {'val loss':>9s} {'perplexity':>11s} {'vs dense':>9s} {'convert s':>10s}")
    for label, loss, seconds in rows:
        print(f"{label:12s} {loss:9.4f} {math.exp(loss):11.3f} {math.exp(loss - base):8.3f}x "
              f"{seconds:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
