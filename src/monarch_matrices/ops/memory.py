"""Fresh CPU tensors backed by transparent huge pages, when asked for.

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
"""

from __future__ import annotations

import ctypes
import sys
from functools import cache

import torch

from .native import plain_cpu_tensor, switched_on

__all__ = ["empty_huge", "huge_pages_enabled"]

HUGE_PAGE = 2 * 2**20
MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
# glibc serves requests of at least its mmap threshold (at most 32 MiB, its
# DEFAULT_MMAP_THRESHOLD_MAX) with a private mmap that is unmapped on free, so
# the advice dies with the tensor; smaller blocks may come from the heap, whose
# pages malloc reuses for other objects, and are left alone.
MIN_BYTES = 32 * 2**20


ENV_SWITCH = "MONARCH_MATRICES_HUGE_PAGES"


@cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    if not switched_on(ENV_SWITCH):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def huge_pages_enabled() -> bool:
    """Whether large CPU outputs are advised onto huge pages in this process."""
    return _madvise() is not None


def advise_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """Ask for huge pages under ``t``'s untouched CPU storage; returns ``t``."""
    if not plain_cpu_tensor(t):  # FakeTensor has no memory, a compiled graph no ctypes
        return t
    nbytes = t.untyped_storage().nbytes()
    madvise = _madvise() if nbytes >= MIN_BYTES else None
    if madvise is not None:
        start = t.untyped_storage().data_ptr()
        lo = -(-start // HUGE_PAGE) * HUGE_PAGE
        hi = (start + nbytes) // HUGE_PAGE * HUGE_PAGE
        if hi > lo:
            madvise(lo, hi - lo, MADV_HUGEPAGE)  # a hint: failure changes nothing
    return t


def empty_huge(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """``like.new_empty(shape)``, on huge pages when asked for and a large CPU tensor."""
    return advise_huge_pages(like.new_empty(shape))
