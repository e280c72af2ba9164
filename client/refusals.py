"""Error replies that leave the ClientApp runners: a fixed code and a site-side reference.

The full exception (or the refused app's details) goes to the site's own log under the
reference; the server only learns the kind, the reference and fixed public text
(:func:`fedmed.messages.error_reason`). The site's console shows every refusal too:
:data:`REFUSAL_MARK` starts the line that :mod:`fedmed.client.cli` echoes from the logs.
"""

from __future__ import annotations

import logging
import secrets
import sys
from typing import Callable

from flwr.app import Context, Message
from flwr.app.error import Error

from fedmed import messages
from fedmed.client.approval import AppRefused

__all__ = ["REFUSAL_MARK", "new_ref", "site_error", "log_refusal", "log_internal", "run_app_safely"]

log = logging.getLogger("fedmed.client")

REFUSAL_MARK = "fedmed site REFUSED"
# Used only until fedmed.messages carries the shared site error contract (same format).
_FALLBACK_CODES = {"site-data": 1001, "policy": 1002, "budget": 1003, "app-refused": 1004, "guard": 1005,
                   "internal": 1006}


def new_ref() -> str:
    """A fresh 12-hex reference tying a reply to the site's log line."""
    return secrets.token_hex(6)


def site_error(kind: str, ref: str, public: str = "") -> tuple[int, str]:
    """``(code, reason)`` of a site error reply of ``kind``; ``public`` must be fixed text."""
    if hasattr(messages, "error_reason"):
        reason = messages.error_reason(kind, ref, public=public)
    else:
        reason = f"fedmed/{kind} ref={ref}" + (f": {public}" if public else "")
    codes = getattr(messages, "ERROR_CODES", None) or _FALLBACK_CODES
    return int(codes[kind]), reason


def log_refusal(exc: AppRefused) -> tuple[int, str]:
    """Log (site log and console) why a submitted app was refused; the code and reason to send back."""
    ref = new_ref()
    line = f"{REFUSAL_MARK} a submitted app (ref {ref}): {exc.public}; only the installed fedmed app runs here"
    log.error("%s [%s]", line, exc.detail)
    print(line, file=sys.stderr, flush=True)
    return site_error("app-refused", ref, exc.public)


def log_internal(what: str, exc: BaseException) -> tuple[int, str]:
    """Log an unexpected failure with its traceback; the code and reason to send back."""
    ref = new_ref()
    log.error("fedmed site: %s failed (ref %s)", what, ref, exc_info=exc)
    return site_error("internal", ref)


def run_app_safely(app: Callable[..., Message], message: Message, context: Context) -> Message:
    """The app's reply; an exception it raises becomes a code+ref error, its text never leaves.

    A :class:`fedmed.messages.PublicRefusal` is the one exception whose text is safe to send.
    """
    try:
        return app(message=message, context=context)
    except Exception as ex:
        public_cls = getattr(messages, "PublicRefusal", None)
        if public_cls is not None and isinstance(ex, public_cls):
            ref = new_ref()
            log.error("fedmed site: the ClientApp refused the task (ref %s): %s", ref, ex)
            code, reason = site_error(getattr(ex, "kind", "policy"), ref, str(ex))
        else:
            code, reason = log_internal("the ClientApp", ex)
        return Message(Error(code=code, reason=reason), reply_to=message)
