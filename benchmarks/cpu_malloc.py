"""The benchmarks' CPU allocator setting (``--cpu-malloc``): glibc malloc that keeps freed memory for reuse.

A benchmark-only helper: the library never changes the process's allocator. The setting chosen here is
stamped on every result file as ``cpu_allocator`` (:func:`benchmarks.common.environment` passes
:func:`cpu_allocator` to :func:`sdepth_ext.environment.environment`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["cpu_allocator", "keep_freed_cpu_memory"]

# What this process's CPU allocator does with freed memory, once keep_freed_cpu_memory() ran; None: untouched
# (the stamp then describes the process as it is, see sdepth_ext.environment.default_cpu_allocator).
_CPU_ALLOCATOR: str | None = None

# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_cpu_memory() -> str:
    """Make glibc's malloc keep freed memory for reuse rather than hand it back to the kernel; process-wide.

    PyTorch's CPU tensors come straight from ``malloc``. With glibc's defaults, a freed block of more than
    a few MB can go back to the kernel (``munmap``, or a trim of the heap top), and the next allocation of
    that size page-faults every 4 KiB page in again, zero-filled by the kernel. How often depends on the
    history of sizes freed before. Measured on the 2-core CI machine, cifar_resnet(110) at batch 32, glibc
    defaults, one process: ~9,900 page faults per plain train step, ~4,500 per row-mode step, ~1 per
    batch-mode step; with this setting 0, ~800-1,100 and ~1, and plain steps 5-11% faster in two runs.
    PyTorch's CPU tuning guide fixes this with jemalloc or tcmalloc; two ``mallopt`` calls do the same here:
    no ``mmap`` for large blocks (they come from the heap and are reused) and no heap trimming. The process
    keeps its peak memory. CUDA memory is untouched (PyTorch caches it itself).

    Called by the benchmark entry points (``--cpu-malloc keep``, their default), never by the library.
    Returns the setting in words (also stamped on result files as ``cpu_allocator``); on a non-glibc
    system nothing changes.
    """
    global _CPU_ALLOCATOR
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:  # already a reusing allocator: leave it alone
        _CPU_ALLOCATOR = f"LD_PRELOAD={preload}"
        return _CPU_ALLOCATOR
    libc_name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(libc_name).mallopt if libc_name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        _CPU_ALLOCATOR = "system default (no glibc mallopt on this system)"
        return _CPU_ALLOCATOR
    trim = 2**31 - 1  # mallopt takes a C int
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, trim) != 1:
        raise RuntimeError("keep_freed_cpu_memory: glibc mallopt refused M_MMAP_MAX=0 / M_TRIM_THRESHOLD")
    _CPU_ALLOCATOR = "glibc malloc keeping freed memory (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)"
    return _CPU_ALLOCATOR


def cpu_allocator() -> str | None:
    """The setting :func:`keep_freed_cpu_memory` applied in this process, or None if it never ran."""
    return _CPU_ALLOCATOR
