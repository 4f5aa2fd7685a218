"""Make the big temporary buffers of a merge cheap to allocate.

Every temporary tensor of a merge is tens to hundreds of megabytes. glibc serves those with fresh
``mmap`` pages that the kernel faults in 4 KB at a time and zeroes, which was measured at 3–4× the cost of
the arithmetic itself (an fp32 subtraction of 32M entries: 284 ms allocating, 64 ms into a preallocated
buffer). Two remedies, both process-wide, so only the CLI applies them:

- PyTorch's own switch ``THP_MEM_ALLOC_ENABLE=1`` asks for transparent huge pages on large CPU
  allocations: 512× fewer faults (the same subtraction: 94 ms).
- glibc's mmap threshold is raised to its maximum (32 MB) and trimming deferred, so buffers below that
  size are reused from the heap instead of being returned to the kernel and faulted in again.

Peak memory is unchanged: it is bounded by the jobs in flight.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_GLIBC_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # HEAP_MAX_SIZE / 2 on 64-bit; larger values are refused


def enable_huge_pages() -> None:
    """Must run before torch's first large allocation; a value the user set is kept."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def one_blas_thread() -> None:
    """Must run before numpy is imported; a value the user set is kept.

    The executor already runs one job per core, and numpy's OpenBLAS would start a spinning thread per
    core for every ΔW product besides: on 2 cores an adapter transfer took 7.0 s that way and 4.4 s with
    one BLAS thread per worker.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def reuse_large_buffers() -> bool:
    """Best effort, glibc only; returns whether the allocator accepted the settings."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MAX_MMAP_THRESHOLD) == 1
        return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, 128 << 20) == 1)
    except (OSError, AttributeError):
        return False
