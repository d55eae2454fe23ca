"""Where and with what a result was measured: device, versions, date and the exact command.

Every result file the project writes (benchmarks, training runs) carries this stamp, so a number in the
README can be traced back to the run that made it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import os
import platform
import re
import shlex
import sys

import torch

__all__ = ["best_device", "cpu_allocator", "device_name", "device_slug", "environment",
           "keep_freed_cpu_memory"]


# What the process's CPU allocator does with freed memory; part of every stamp (see keep_freed_cpu_memory).
_CPU_ALLOCATOR = "system default"

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
    Returns the setting in words (also stamped on result files by :func:`environment`); on a non-glibc
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


def cpu_allocator() -> str:
    """How this process's CPU allocator treats freed memory: set by :func:`keep_freed_cpu_memory`."""
    return _CPU_ALLOCATOR


def best_device() -> torch.device:
    """The device to measure on: the first CUDA GPU if present, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:  # the model name is far more useful than "x86_64"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    """A folder-safe name for results, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def _command_line() -> str:
    """The command as the user typed it: ``python -m benchmarks.x ...`` rather than a file path."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", sys.argv[0]]
    return " ".join(shlex.quote(a) for a in [*head, *sys.argv[1:]])


def environment(device: torch.device | None = None) -> dict:
    """Device, versions, date and the exact command: the stamp on every result file."""
    device = device or best_device()
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        triton_version = None
    try:
        import torchvision

        torchvision_version = torchvision.__version__
    except Exception:  # noqa: BLE001
        torchvision_version = None
    from .scheduler import has_compiled_scheduler
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "torchvision": torchvision_version,
        "python": platform.python_version(),
        "compiled_scheduler": has_compiled_scheduler(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "cpu_allocator": cpu_allocator(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": _command_line(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    return env
