"""Two processes under torchrun (DDP, gloo on CPU) train exactly what one process trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.recipes.helpers import COMMON, LM_TINY, VISION_TINY, train


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "monarch_matrices.cli", "train", *args, *COMMON]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_two_process_lm_with_s2d_matches_one_process(tmp_path, corpus):
    args = ["--data", str(corpus), "--steps", "20", "--densify-at", "0.5", *LM_TINY]
    one = train("lm", tmp_path / "one", *args)
    result = torchrun("lm", "--out", str(tmp_path / "two"), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["command"].startswith("monarch-matrices train lm --out")
    # each process takes half of the same global batch; gradients are averaged
    for (s1, v1), (s2, v2) in zip(one["history"]["val loss"], two["history"]["val loss"]):
        assert s1 == s2 and abs(v1 - v2) < 1e-4
    assert two["densified"]["layers"] == one["densified"]["layers"]


def test_batch_must_split_over_processes(tmp_path):
    result = torchrun("vision", "--out", str(tmp_path / "odd"), "--steps", "2",
                      *VISION_TINY, "--batch-size", "33")
    assert result.returncode != 0 and "does not split over 2 processes" in result.stderr
