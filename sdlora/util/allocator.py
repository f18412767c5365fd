"""CPU training: keep freed activation memory in the process instead of handing it back to the kernel.

glibc's malloc serves large blocks with fresh mappings and trims the heap top as soon as enough is free,
so every step of a CPU training run gives its activations back to the kernel and faults them in again,
zero-filled, on the next step. On SD 1.5 shapes (benchmarks/train_speed.py, 256 px, 2 cores) that churn
was about a quarter of the step (11 M page faults and 35 s of system time in 18 steps). Raising the mmap and
trim thresholds makes the heap behave like the CUDA caching allocator: the peak is kept and reused. The
process's resident size then stays at its peak instead of falling between steps.

Only glibc on Linux, only for CPU training; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
KEEP = 1 << 30  # blocks up to 1 GiB come from the heap; up to 1 GiB free at the heap top is kept
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps


def keep_freed_cpu_memory() -> bool:
    """Set glibc's thresholds (once per process; later calls are harmless). True if they were set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(opt, val) == 1 for opt, val in
               ((M_MMAP_THRESHOLD, KEEP), (M_TRIM_THRESHOLD, KEEP), (M_TOP_PAD, TOP_PAD)))
