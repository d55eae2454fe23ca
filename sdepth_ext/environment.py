"""Where and with what a result was measured: device, versions, date and the exact command.

Every result file the project writes (benchmarks, training runs) carries this stamp, so a number in the
README can be traced back to the run that made it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import sys

import torch

from .grads import DEFAULT_DROPPED_GRADS
from .scheduler import has_compiled_scheduler

__all__ = ["best_device", "default_cpu_allocator", "device_name", "device_slug", "environment"]


def default_cpu_allocator() -> str:
    """The CPU allocator as the process found it: a reusing allocator preloaded, or the system's default.

    The library never changes the allocator; a program that does (the benchmarks' ``--cpu-malloc keep``)
    passes its own description to :func:`environment` instead.
    """
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return f"LD_PRELOAD={preload}"
    return "system default"


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
    # `python -m package` runs package.__main__: the user typed the package's name
    name = spec.name.removesuffix(".__main__") if spec is not None and spec.name else None
    head = ["python", "-m", name] if name else ["python", sys.argv[0]]
    return " ".join(shlex.quote(a) for a in [*head, *sys.argv[1:]])


def environment(device: torch.device | None = None, *, cpu_allocator: str | None = None) -> dict:
    """Device, versions, date and the exact command: the stamp on every result file.

    ``cpu_allocator``: what the process's CPU allocator does with freed memory, stamped as is; None: the
    allocator as the process found it (:func:`default_cpu_allocator`).
    """
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
        # what converted models gave dropped units' parameters unless a result row says otherwise
        "dropped_grads": DEFAULT_DROPPED_GRADS,
        "cpu_allocator": cpu_allocator or default_cpu_allocator(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": _command_line(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    return env
