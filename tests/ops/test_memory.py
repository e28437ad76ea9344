"""Retaining freed memory (ops.memory): fewer page faults, and only when asked.

The setting is process-wide, so every check that makes it runs in a fresh
subprocess (conftest.py keeps the suite's own process at the default).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from monarch_matrices.ops import memory


@functools.cache
def _can_retain() -> bool:
    """Whether a fresh process here can retain freed memory (glibc that takes the setting)."""
    probe = "from monarch_matrices.ops import memory; print(memory.retain_freed_memory())"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    return done.stdout.strip() == "True"


def _thp_always() -> bool:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[always]" in text


glibc_only = pytest.mark.skipif("not _can_retain()", reason="needs glibc's mallopt")

# faults taken by each of 10 fills of a fresh 64 MiB tensor, each freed before the next
_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from monarch_matrices.ops import memory
    if sys.argv[1] == "retain":
        assert memory.retain_freed_memory() and memory.retain_freed_memory()
        assert memory.freed_memory_retained()
    else:
        assert not memory.freed_memory_retained()
    faults = []
    for i in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(16 * 2**20).fill_(float(i))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        assert float(t[-1]) == i
        del t
    print(*faults)
""")


def _faults(mode: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                          text=True, check=True, timeout=120)
    return [int(v) for v in done.stdout.split()]


@glibc_only
def test_retained_memory_is_reused_without_page_faults():
    pages = 64 * 2**20 // 4096  # 16384 pages of 4 KiB
    if not _thp_always():  # (under THP "always" a fresh mmap faults in 2 MiB at a time)
        # by default every fill is a fresh mmap, faulted in page by page
        assert min(_faults("default")[5:]) > pages // 2
    # retained: the heap grows once or twice (a small allocation can split a freed
    # block), then the freed blocks come back already touched
    assert sum(_faults("retain")[5:]) < pages // 4


def test_the_suite_itself_runs_with_the_default_malloc():
    assert os.environ[memory.RETAIN_ENV] == "0"
    assert not memory.freed_memory_retained()


def test_without_glibc_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(memory, "_glibc_mallopt", lambda: None)
    assert memory.retain_freed_memory() is False
    assert not memory.freed_memory_retained()


def test_huge_page_advice_is_skipped_on_retained_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_madvise", lambda: lambda *a: calls.append(a))
    memory.empty_huge(torch.ones(1), memory.MIN_BYTES // 4)
    assert len(calls) == 1  # advised when memory comes fresh from mmap
    assert memory.huge_pages_enabled()
    monkeypatch.setattr(memory, "_retained", True)
    memory.empty_huge(torch.ones(1), memory.MIN_BYTES // 4)
    assert len(calls) == 1  # heap memory: no advice
    assert memory.huge_pages_requested() and not memory.huge_pages_enabled()


@glibc_only
@pytest.mark.parametrize(("value", "shown"), [(None, "freed_memory: retained"),
                                              ("0", "freed_memory: not retained")])
def test_the_cli_retains_freed_memory_unless_told_not_to(value, shown):
    env = {k: v for k, v in os.environ.items() if k != memory.RETAIN_ENV}
    if value is not None:
        env[memory.RETAIN_ENV] = value
    done = subprocess.run(
        [sys.executable, "-m", "monarch_matrices.cli", "bench", "--cases", "small1-fc1",
         "--dtype", "float32", "--mode", "forward", "--repeats", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert shown in done.stdout
