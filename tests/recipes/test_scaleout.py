"""MonarchLinear under FSDP2 (two CPU processes) and under torch.compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monarch_matrices.nn import MonarchLinear


def test_fsdp2_fully_shard_trains_like_one_process(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2 (torch >= 2.6)")
    out = tmp_path / "fsdp.json"
    worker = Path(__file__).with_name("fsdp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(worker), str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["local_w1_shape"] == [2, 16, 16]  # w1 is (4, 16, 16): 2 blocks per process
    assert report["max_abs_diff"] < 1e-4


def test_torch_compile_matches_eager_in_values_and_gradients():
    # aot_eager runs the whole compile pipeline except code generation (no C++
    # compiler needed): it is where a Python-level op could break.  The
    # multiply's chunk loop causes graph breaks; the results must not change.
    torch.manual_seed(0)
    model = torch.nn.Sequential(MonarchLinear(64, 128, nblocks=4), torch.nn.GELU(),
                                MonarchLinear(128, 60, nblocks=4))
    x = torch.randn(3, 5, 64, requires_grad=True)
    model(x).square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    out_eager = model(x).detach()
    model.zero_grad()
    x.grad = None
    compiled = torch.compile(model, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y.detach(), out_eager)
    for got, want in zip([p.grad for p in model.parameters()] + [x.grad], expected):
        torch.testing.assert_close(got, want)
