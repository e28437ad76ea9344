"""Fresh CPU memory without page faults: reuse freed memory, or huge pages when asked.

A large CPU tensor comes from a fresh ``mmap``, and the first write to each 4
KiB page takes a page fault that zero-fills it: for an 8192x3072 float32
output that costs about 20 ms, as much as a third of a dense 768->3072
forward and about a third of a Monarch one (docs/speed.md).  Advising the
kernel to back the buffer with 2 MiB pages (``madvise(MADV_HUGEPAGE)``, what
PyTorch does for every tensor when ``THP_MEM_ALLOC_ENABLE=1``) takes 512x
fewer faults and usually cuts that cost 3-5x, but not always: on a VM whose
free memory is handed back to the host (virtio-balloon free-page reporting),
a huge page can come from memory the host must fault in again, and about one
first touch in three after a large dense op stalled for 90-200 ms instead
of 3 ms.  So it is opt-in: ``MONARCH_MATRICES_HUGE_PAGES=1`` in the
environment turns it on.  The advice is only a hint: it changes no value, is
skipped off Linux, off the CPU and for small tensors, and needs the system's
THP mode to be ``madvise`` or ``always``.  Only buffers of 32 MiB and more
are advised (see ``MIN_BYTES``).

The other way round the faults is not to hand large blocks back to the kernel
at all.  :func:`retain_freed_memory` tells glibc's malloc to serve them from
its heap and keep what is freed for the next request, as PyTorch's GPU caching
allocator does on CUDA: a training step's 32 MiB buffers are then faulted in
once per process instead of once per step.  It is a process-wide setting (the
process's memory stays near its peak), so the library never makes it on its
own; the ``monarch-matrices`` commands make it at start-up (our programs own
their process) unless ``MONARCH_MATRICES_RETAIN_MEMORY=0``.  On a machine
without glibc it does nothing; ``LD_PRELOAD`` of jemalloc or tcmalloc, the
usual PyTorch CPU advice, has much the same effect.
"""

from __future__ import annotations

import ctypes
import sys
from functools import cache

import torch

from .native import plain_cpu_tensor, switched_off, switched_on

__all__ = ["empty_huge", "freed_memory_retained", "huge_pages_enabled", "huge_pages_requested",
           "retain_freed_memory", "retain_freed_memory_unless_switched_off"]

HUGE_PAGE = 2 * 2**20
MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
# glibc serves requests of at least its mmap threshold (at most 32 MiB, its
# DEFAULT_MMAP_THRESHOLD_MAX) with a private mmap that is unmapped on free, so
# the advice dies with the tensor; smaller blocks may come from the heap, whose
# pages malloc reuses for other objects, and are left alone.
MIN_BYTES = 32 * 2**20


ENV_SWITCH = "MONARCH_MATRICES_HUGE_PAGES"
RETAIN_ENV = "MONARCH_MATRICES_RETAIN_MEMORY"

# mallopt(3) parameters, <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# below this, requests come from the heap (the default puts everything from
# 128 KiB to 32 MiB up to a threshold that moves, and all above, in fresh mmaps);
# older glibc refuses more than its DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB on 64-bit,
# which is then used instead (blocks above it stay fresh mmaps)
RETAIN_MMAP_THRESHOLD = 2**30
_MMAP_THRESHOLD_MAX_OLD = 32 * 2**20
# free memory at the heap's top kept rather than returned: the most an int holds
RETAIN_TRIM_THRESHOLD = 2**31 - 1
_retained = False


@cache
def _libc():
    """The process's C library (with errno), or ``None`` off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _glibc_mallopt():
    """glibc's ``mallopt``, or ``None`` (another libc, or not Linux)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "gnu_get_libc_version"):  # musl's does nothing
        return None
    fn = libc.mallopt
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def retain_freed_memory() -> bool:
    """Make this process's malloc keep freed memory for reuse; ``True`` if it did.

    Large CPU tensors then come from memory the process already touched, with
    no page faults: a fresh 32 MiB buffer costs about 11 ms of faults and
    zero-filling on a 2-core VM, a fifth to a third of a Monarch training step
    at 4096 features (docs/speed.md, item 10).  Process-wide and not undone:
    the process keeps about its peak memory.  Same as starting Python with
    ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=2147483647``.
    Does nothing (``False``) without glibc.  Idempotent.
    """
    global _retained
    if _retained:
        return True
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    ok = (any(mallopt(_M_MMAP_THRESHOLD, v) == 1
              for v in (RETAIN_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX_OLD))
          and mallopt(_M_TRIM_THRESHOLD, RETAIN_TRIM_THRESHOLD) == 1)
    _retained = ok
    return ok


def retain_freed_memory_unless_switched_off() -> bool:
    """:func:`retain_freed_memory` unless ``MONARCH_MATRICES_RETAIN_MEMORY=0``.

    What a program that owns its process calls at start-up: the
    ``monarch-matrices`` commands and ``scripts/recipe_step_times.py``.
    """
    return False if switched_off(RETAIN_ENV) else retain_freed_memory()


def freed_memory_retained() -> bool:
    """Whether :func:`retain_freed_memory` took effect in this process."""
    return _retained


@cache
def _madvise():
    libc = _libc() if switched_on(ENV_SWITCH) else None
    fn = getattr(libc, "madvise", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def huge_pages_requested() -> bool:
    """Whether ``MONARCH_MATRICES_HUGE_PAGES`` asks for huge pages (and madvise exists)."""
    return _madvise() is not None


def huge_pages_enabled() -> bool:
    """Whether large CPU outputs are advised onto huge pages in this process.

    Asked for and freed memory not retained: retained memory is reused heap
    memory, which is never advised (see :func:`advise_huge_pages`).
    """
    return huge_pages_requested() and not _retained


def advise_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """Ask for huge pages under ``t``'s untouched CPU storage; returns ``t``."""
    if not plain_cpu_tensor(t):  # FakeTensor has no memory, a compiled graph no ctypes
        return t
    nbytes = t.untyped_storage().nbytes()
    # retained memory is heap memory, reused by later requests and touched
    # already: advice would outlive the tensor and buy nothing
    madvise = _madvise() if nbytes >= MIN_BYTES and not _retained else None
    if madvise is not None:
        lo, hi = huge_page_span(t)
        if hi > lo:
            madvise(lo, hi - lo, MADV_HUGEPAGE)  # a hint: failure changes nothing
    return t


def huge_page_span(t: torch.Tensor) -> tuple[int, int]:
    """The addresses ``[lo, hi)`` of the whole 2 MiB pages inside ``t``'s storage:
    the range :func:`advise_huge_pages` advises (empty when ``hi <= lo``)."""
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    return -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE


def empty_huge(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """``like.new_empty(shape)``, on huge pages when asked for and a large CPU tensor."""
    return advise_huge_pages(like.new_empty(shape))
