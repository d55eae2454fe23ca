"""Ctrl-C and SIGTERM for the training command: raised as :class:`Interrupted`, held back while files are
being committed.

:func:`handle_interrupts` (used by the CLI) turns SIGINT and SIGTERM into :class:`Interrupted`, a
``KeyboardInterrupt`` that remembers the signal. :func:`deferred_interrupts` wraps the few lines that
write a checkpoint and the logs that go with it: a signal that arrives inside is delivered when they are
done, so an interrupted run never stops between its checkpoint and its logs. (SIGKILL cannot be held
back; :mod:`sdepth_ext.train.files` and the resume logic cover it.) Both only act in the main thread,
where Python delivers signals; elsewhere they do nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Interrupted", "handle_interrupts", "deferred_interrupts"]

_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s)


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM arrived; ``signum`` says which. Exit status ``128 + signum``."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_interrupts() -> Iterator[None]:
    if not _main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    if not _main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for signum in pending[:1]:
        signal.raise_signal(signum)  # delivered now through the handler that was there before
