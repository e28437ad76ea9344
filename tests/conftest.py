"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch

from monarch_matrices.ops import multiply as multiply_module

# The CLI makes glibc keep freed memory (ops.memory.retain_freed_memory), a
# process-wide change; commands run in-process here must not make it for the
# whole suite (the huge-page tests need fresh mmaps).  test_memory.py runs it
# in subprocesses.
os.environ["MONARCH_MATRICES_RETAIN_MEMORY"] = "0"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _low_precision_gemms_fast(monkeypatch) -> None:
    """Test the bf16/fp16 chunked path on every machine: where the CPU has no fast GEMM
    in those dtypes the multiply would run in float32 instead (a test of that detour
    sets ``_fast_cpu_gemm`` itself), and the bf16 path would go untested there."""
    monkeypatch.setattr(multiply_module, "_fast_cpu_gemm", lambda dtype: True)
