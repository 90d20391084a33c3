"""Stop signals deferred to the end of a training step, so a stop never cuts a step in half."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def deferred_signals(on_signal):
    """SIGINT and SIGTERM call ``on_signal(signum)`` instead of interrupting, so the trainer can
    stop between steps (a step is never cut in half). A second signal is not deferred: the
    user can always stop at once. Handlers can only be set from the main thread; elsewhere
    signals keep their usual effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handle(signum, frame):
        on_signal(signum)
        signal.signal(signum, previous[signum])

    for sig in (signal.SIGINT, signal.SIGTERM):
        # None: a handler set outside Python, which cannot be put back; the default then.
        previous[sig] = signal.signal(sig, handle) or signal.SIG_DFL
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
