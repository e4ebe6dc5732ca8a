"""Ctrl-C held back while native code runs Python callbacks (torch's import and exporter).

A KeyboardInterrupt raised inside a Python callback that C++ called (torch's dispatcher while the
exporter traces, an extension's module initialisation) can end in std::terminate: the process dies
by SIGABRT with no message and, in a build, with its staging folder left behind. Inside
`deferred_interrupts()` the first Ctrl-C is only noted and raised as KeyboardInterrupt when the
block ends, where Python owns the stack; a second one is raised at once (the user insists).
"""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def deferred_interrupts():
    """Hold a Ctrl-C until the block ends; a no-op off the main thread or where SIGINT is not Python's."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # nested, ignored by the parent process, or a handler of the caller's own: leave it alone
        return
    pending = []

    def note(signum, frame):
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)

    signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt
