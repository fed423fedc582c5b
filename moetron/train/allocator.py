"""Keep freed host memory in the process (glibc, Linux).

glibc serves each allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps
it when freed, so every training step gets new zeroed pages from the kernel for its large
activations and gradients and faults them in one 4 KiB page at a time. A training step frees and
re-allocates the same sizes every time: keeping freed blocks in the heap lets the next step reuse
them. Measured on a 2-core Xeon, `small` preset, 8 x 256 tokens: forward+backward 1.38 s -> 1.16 s.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


@functools.cache
def retain_freed_memory() -> bool:
    """Serve every allocation from the heap and never give its free top back to the kernel: the
    process's memory stays at its high-water mark. True where the allocator took the settings.
    Process-wide and idempotent; for long-running jobs with a steady working set (training)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
