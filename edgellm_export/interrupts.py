"""Ctrl-C and SIGTERM handled at safe points.

An exception raised asynchronously inside torch or onnxruntime C++ code can
abort the process ("terminate called after throwing ...") before any cleanup
runs. The CLI therefore installs handlers that only record the signal; the
export loops call `check()` between tensors, where raising is safe. A second
signal raises at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(BaseException):
    """SIGTERM, surfaced like KeyboardInterrupt so every cleanup handler runs."""


_pending: int | None = None
# Set by the console entry points: the recording handlers stay from the process's
# first statement to its exit, so no signal finds Python's default handlers in
# between (one would end the process by the signal instead of exit 130 / 143).
_process_wide = False


def _exception_for(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _record(signum, frame) -> None:
    global _pending
    if _pending is not None:  # asked twice: stop now
        raise _exception_for(signum)
    _pending = signum


def install() -> dict:
    """Record SIGINT/SIGTERM from now on; returns the previous handlers for `restore`.

    Under `install_for_process` this keeps the handlers and any signal already
    recorded (e.g. one that arrived while the CLI was importing)."""
    global _pending
    if _process_wide or threading.current_thread() is not threading.main_thread():
        return {}
    _pending = None
    return {sig: signal.signal(sig, _record) for sig in (signal.SIGINT, signal.SIGTERM)}


def install_for_process() -> None:
    """For console entry points: record signals until the process exits; never restored."""
    global _process_wide
    install()
    _process_wide = threading.current_thread() is threading.main_thread()


def restore(previous: dict) -> None:
    global _pending
    if _process_wide:
        return
    _pending = None
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def check() -> None:
    """Raise KeyboardInterrupt / Terminated if a signal arrived since the last check."""
    global _pending
    if _pending is not None:
        signum, _pending = _pending, None
        raise _exception_for(signum)


def ignore_further() -> None:
    """Cleanup is done; a late signal must not turn the exit into a traceback."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def deferred():
    """A block that SIGINT/SIGTERM cannot interrupt (e.g. the two renames that
    publish an export): signals are noted and acted on right after it. Python
    runs handlers in the main thread only, so recording handlers suffice."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    saved = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
             for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    for signum in caught[:1]:
        handler = saved[signum]
        if callable(handler):
            handler(signum, None)  # e.g. _record under the CLI, default_int_handler otherwise
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)
