"""Files that survive a kill at any point: atomic replacement, and appends that are durable when they return.

:func:`atomic_write` writes a new version of a file beside it (``.<name>.tmp-<pid>`` in the same folder),
flushes and fsyncs it, then renames it over the old one with ``os.replace`` and fsyncs the folder where the
platform allows: a reader (or a resumed run) sees either the complete old file or the complete new one,
never a mix or a truncated file. A killed writer leaves at most a temporary file, which
:func:`remove_temporaries` clears.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

import torch

__all__ = ["atomic_write", "atomic_write_text", "atomic_torch_save", "atomic_write_csv", "append_csv",
           "read_csv", "remove_temporaries"]

_TMP_MARK = ".tmp-"


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, make it durable, then replace ``path`` by it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save(obj, path)``, but the previous file stays valid until the new one is complete."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _csv_text(fields: list[str], rows: Iterable[dict], header: bool) -> str:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def atomic_write_csv(path: Path, fields: list[str], rows: Iterable[dict]) -> None:
    atomic_write_text(path, _csv_text(fields, rows, header=True))


def append_csv(path: Path, fields: list[str], rows: Iterable[dict]) -> None:
    """Append ``rows`` (a header first if the file is new) and fsync before returning.

    Not atomic: a kill during the append can leave a partial last line. The training loop appends only what
    its checkpoint already holds and rewrites the file from the checkpoint on ``--resume``.
    """
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        f.write(_csv_text(fields, rows, header=new))
        f.flush()
        os.fsync(f.fileno())


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def remove_temporaries(folder: Path) -> None:
    """Delete what killed writers left in ``folder`` (the ``.<name>.tmp-<pid>`` files of atomic_write)."""
    for tmp in Path(folder).glob(f".*{_TMP_MARK}*"):
        with contextlib.suppress(OSError):
            tmp.unlink()
