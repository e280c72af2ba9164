"""How every fedmed command ends: bad input is one clear line and exit code 2, not a trace."""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["USER_ERRORS", "run_command"]

# Errors that describe the user's input or environment (a file, a column, a key, a site).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError, TimeoutError)


def run_command(prog: str, fn: Callable[[], int], *, interrupted: str = "interrupted",
                interrupted_code: int = 130) -> int:
    """Run ``fn``; user errors print ``prog: error: ...`` and return 2."""
    try:
        return int(fn() or 0)
    except USER_ERRORS as exc:  # ConfigError is a ValueError
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return interrupted_code
