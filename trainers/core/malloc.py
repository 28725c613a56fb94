"""glibc malloc thresholds pinned for a training process (``trainer.steady_malloc``).

A training step allocates and frees the same large activation buffers over and over. With glibc's dynamic
defaults, whether a freed buffer is kept for reuse or handed back to the OS (and faulted in again, page by
page, at the next step) depends on the process's allocation history: tens of thousands of page faults per
step, a few percent of a CPU step, different from run to run for reasons unrelated to the model. Pinning the
mmap threshold (32 MiB: smaller blocks come from the heap) and the trim threshold (up to 1 GiB of freed heap
kept) makes freed activations be reused, as jemalloc and tcmalloc do; the process keeps its peak heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

MMAP_THRESHOLD = 1 << 25  # 32 MiB, the largest glibc accepts on 64-bit
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap instead of handing it back to the OS
MALLOC_ENV = {  # the same settings for a child process, through glibc's environment variables
    "GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}",
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def steady_malloc() -> bool:
    """Pin glibc's mmap and trim thresholds in this process (``mallopt``); False where that does not apply
    (not Linux, not glibc, or glibc refused)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
