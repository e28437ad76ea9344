"""Helpers for the recipe tests: tiny configurations, run in-process through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from monarch_matrices.cli import main

LM_TINY = ["--n-layer", "2", "--n-embd", "64", "--n-head", "2", "--block-size", "32",
           "--batch-size", "8", "--eval-every", "10", "--eval-batches", "2"]
VISION_TINY = ["--dim", "32", "--depth", "2", "--heads", "2", "--batch-size", "32", "--lr", "5e-3",
               "--eval-every", "20", "--eval-samples", "100"]
COMMON = ["--threads", "1", "--no-progress"]


def train(recipe: str, out: Path, *args: str) -> dict:
    """Run ``monarch-matrices train RECIPE --out OUT ARGS`` and return its metrics."""
    rc = main(["train", recipe, "--out", str(out), *COMMON, *args])
    assert rc == 0
    return json.loads((out / "metrics.json").read_text())
