"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch

# The CLI makes glibc keep freed memory (ops.memory.retain_freed_memory), a
# process-wide change; commands run in-process here must not make it for the
# whole suite (the huge-page tests need fresh mmaps).  test_memory.py runs it
# in subprocesses.
os.environ["MONARCH_MATRICES_RETAIN_MEMORY"] = "0"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
