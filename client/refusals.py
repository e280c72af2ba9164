"""Error replies that leave the ClientApp runners: a fixed code and a site-side reference.

The full exception (or the refused app's details) goes to the site's own log under the
reference; the server only learns the kind, the reference and fixed public text
(:func:`fedmed.messages.error_reason`). The site's console shows every refusal too:
:data:`~fedmed.client.marks.REFUSAL_MARK` starts the line that :mod:`fedmed.client.cli` echoes
from the logs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from flwr.app import Context, Message

from fedmed.client.approval import AppRefused
from fedmed.client.marks import REFUSAL_MARK
from fedmed.messages import ERROR_CODES, error_reason, new_ref

__all__ = ["REFUSAL_MARK", "new_ref", "site_error", "log_refusal", "log_internal", "run_app_safely"]

log = logging.getLogger("fedmed.client")

def site_error(kind: str, ref: str, public: str = "") -> tuple[int, str]:
    """``(code, reason)`` of a site error reply of ``kind``; ``public`` must be fixed text."""
    return ERROR_CODES[kind], error_reason(kind, ref, public=public)


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

    fedmed's handlers already answer through the guard (:func:`fedmed.client.guard.error_reply`);
    this catches what fails outside them (an unknown message type, Flower's own dispatch).
    """
    from fedmed.client.guard import error_reply

    try:
        return app(message=message, context=context)
    except Exception as ex:  # noqa: BLE001 - nothing leaves as exception text
        site = str(context.node_config.get("site", "")) if context is not None else ""
        return error_reply(message, ex, site=site or None)
