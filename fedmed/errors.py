"""fedmed's own errors, and how every fedmed command ends on one.

:class:`FedmedError` is the base of every error fedmed raises *for the person running it*:
a wrong argument or setting, data that fails a check, a file that is not what it should be,
a site's policy refusing, a federation that could not start or finish. Each subclass keeps
the built-in base callers already catch (``ValueError``, ``RuntimeError``, ``TimeoutError``).

:func:`run_command` prints those (and a missing file) as one ``prog: error: ...`` line with
exit code 2. Every other exception — a shape mismatch, a bare ``ValueError`` from a bug —
shows its traceback: it is a defect to fix, not a message to read.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["FedmedError", "UsageError", "RunError", "RunTimeout", "TrainingDiverged", "MissingExtra", "USER_ERRORS",
           "run_command"]


class FedmedError(Exception):
    """Base of fedmed's user-facing errors; the message says what is wrong and how to fix it."""


class UsageError(FedmedError, ValueError):
    """A command's arguments, a setting or the data given do not allow what was asked."""


class RunError(FedmedError, RuntimeError):
    """A run could not go on: a process would not start, a device is missing, a run did not finish."""


class RunTimeout(FedmedError, TimeoutError):
    """A run waited too long: sites did not connect, a server did not become healthy."""


class TrainingDiverged(FedmedError, FloatingPointError):
    """The training loss became NaN or infinite: a setting to change (the learning rate), not a bug."""


class MissingExtra(FedmedError, ModuleNotFoundError):
    """An optional package a command needs is not installed; the message names the pip extra."""


# What a command reports in one line; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (FedmedError, FileNotFoundError)


def run_command(prog: str, fn: Callable[[], int], *, interrupted: str = "interrupted",
                interrupted_code: int = 130) -> int:
    """Run ``fn``; a :data:`USER_ERRORS` error prints ``prog: error: ...`` and returns 2."""
    try:
        return int(fn() or 0)
    except USER_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return interrupted_code
