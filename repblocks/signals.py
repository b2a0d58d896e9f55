"""Ctrl-C and SIGTERM stop the work, even where a library swallows the interrupt they raise.

Under :func:`interrupt_on_signals` (what the entry scripts run in), SIGINT and SIGTERM raise
``KeyboardInterrupt`` in the main thread, as Ctrl-C does, and are remembered. Raised as an exception,
the writers' cleanup runs (temporary files are removed). But the exception lands wherever the main
thread happens to be, and some libraries catch it there: JAX's garbage-collection callback drops it
("Exception ignored in ..."), so a SIGTERM during the LiteRT conversion let the run finish with
status 0 and replace the previous output; an import interrupted halfway (coremltools importing sympy)
leaves a module half made, which fails later with an ``AttributeError`` traceback.

So a signal is remembered as well as raised: :func:`check_interrupted` raises it again where the
work may stop (between stages, after each export, and in :mod:`repblocks.files` before any output
takes its final name), and :func:`repblocks.cli.exit_on_user_error` reports any error raised after a
signal as the interrupt it was (one line, status 130). A library that installs its own handler for
these signals has ours put back at each such check. Outside :func:`interrupt_on_signals` (the
library used from Python) nothing is installed and nothing is remembered.

A signal that comes while a module is being imported raises nothing until the import is done: the
exception would land inside a module's initialisation. In a native extension's (jaxlib's, imported
by the LiteRT conversion) the process then died with SIGSEGV, no line and no cleanup; in a Python
module's it leaves the module half made. The interrupt is raised instead as soon as the main thread
is outside every import (checked every few milliseconds on a timer, ``SIGALRM``); a second signal
before that raises at once, as the user insists.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["check_interrupted", "interrupt_on_signals", "received"]

_received: list[int] = []  # the signals that came under interrupt_on_signals, first first
_installed: dict[int, object] = {}  # signal -> the handler it had before ours, while ours is installed
_RETRY_S = 0.005  # how often a signal that came during an import looks again whether it may raise
_deferred: list[object] = []  # SIGALRM's handler before ours, while an interrupt waits for an import to end


def _interrupt(signum, frame):
    _received.append(signum)
    if _importing(frame) and not _deferred:  # a second signal while the first waits: the user insists
        _raise_after_imports()
        return
    _stop_retrying()
    raise KeyboardInterrupt(f"signal {signum}")


def _importing(frame) -> bool:
    """Whether ``frame`` (the main thread's, where a handler runs) is inside an import."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib."):
            return True
        frame = frame.f_back
    return False


def _raise_after_imports() -> None:
    _deferred.append(signal.signal(signal.SIGALRM, _retry))
    signal.setitimer(signal.ITIMER_REAL, _RETRY_S)


def _retry(signum, frame):
    if _importing(frame):
        signal.setitimer(signal.ITIMER_REAL, _RETRY_S)
        return
    _stop_retrying()
    if _received:  # else interrupt_on_signals has ended meanwhile: nothing is to be raised any more
        raise KeyboardInterrupt(f"signal {_received[0]}")


def _stop_retrying() -> None:
    if _deferred and threading.current_thread() is threading.main_thread():  # else the timer raises in the main one
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, _deferred.pop())


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Inside, SIGTERM and SIGINT raise ``KeyboardInterrupt`` and are remembered (:func:`received`).

    SIGINT that the process inherited ignored (a job started in the background) stays ignored, as the
    shell meant. Only the main thread can install handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else [])
    previous = {signum: signal.getsignal(signum) for signum in signals}
    for signum in signals:
        signal.signal(signum, _interrupt)
    _installed.update(previous)
    try:
        yield
    finally:
        _stop_retrying()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
            _installed.pop(signum, None)
        _received.clear()


def received() -> int | None:
    """The first signal that came under :func:`interrupt_on_signals`, or None."""
    return _received[0] if _received else None


def check_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` when a signal came (and something swallowed it); put our handlers back.

    Call it where the work may stop, and before output takes its final name.
    """
    if _received:
        _stop_retrying()  # raised here, not again by the timer during the cleanup
        raise KeyboardInterrupt(f"signal {_received[0]}")
    if _installed and threading.current_thread() is threading.main_thread():
        for signum in _installed:
            if signal.getsignal(signum) is not _interrupt:  # a library installed its own
                signal.signal(signum, _interrupt)
