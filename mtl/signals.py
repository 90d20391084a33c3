"""Stop signals deferred to the end of a training step, so a stop never cuts a step in half."""

from __future__ import annotations

import contextlib
import signal
import threading


# Stop signals that reached a grid's worker process outside a training loop (while a stage was
# built, evaluated or saved): the next deferred_signals block takes them, so the stage that
# starts stops at its first step with a checkpoint instead of training to its end.
requested: list[int] = []


def remember(signum, frame) -> None:
    """A worker process's handler between training loops: keep the signal for the next one."""
    requested.append(signum)


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
    if requested:
        on_signal(requested[-1])
        requested.clear()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
