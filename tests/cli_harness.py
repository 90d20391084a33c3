"""``mtl <argv>`` in this process under a time limit, for the fuzz suites.

In-process (not a subprocess) so that hundreds of examples do not pay an interpreter start
and a torch import each; SIGALRM bounds a hang.
"""

from __future__ import annotations

import contextlib
import io
import signal
from dataclasses import dataclass


class _Hang(BaseException):
    """Not an Exception: the code under test must not be able to catch it as an error of its own."""


def _alarm(signum, frame):
    raise _Hang()


@dataclass
class CliRun:
    code: int | None  # exit code; None when nothing returned (a hang or an escaped exception)
    stderr: str
    hang: bool = False
    escaped: str = ""  # "Type: message" of an exception that escaped main

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def one_clear_error(self) -> bool:
        """Exit 2 with at most 3 lines on stderr and no traceback: what bad input must get."""
        return self.code == 2 and "Traceback" not in self.stderr and 1 <= len(self.lines) <= 3


def run_cli(argv: list[str], seconds: int) -> CliRun:
    from mtl.cli import main

    err = io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's own exit is an answer, not an escape
                code = e.code
    except _Hang:
        return CliRun(None, err.getvalue(), hang=True)
    except BaseException as e:  # noqa: BLE001 - what escapes main is the finding
        return CliRun(None, err.getvalue(), escaped=f"{type(e).__name__}: {e}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return CliRun(code, err.getvalue())
