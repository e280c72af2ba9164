"""The coordinator's one use of Flower internals, checked where it is applied.

Flower's ``HttpGrid`` (the ServerApp's link to the SuperLink) pulls a reply's objects with
``flwr.supercore.constant.PULL_INITIAL_BACKOFF``: 1 s, doubling to 10 s. A site's node
uploads a reply as its message first, then its objects, so a pull that lands between the
two (the likelier the sooner the server asks) waited about a second for objects that
arrive milliseconds later, on every round (docs/benchmarks.md). :func:`shorten_reply_pulls`
gives that one call the backoff fedmed's site runner uses for the same kind of wait
(:meth:`fedmed.client.flower_compat.RuntimeConnection.pull_task_input`): 0.05 s doubling
to 0.5 s. What is pulled, and every check on it, stays Flower's. The client side keeps its
own internals in :mod:`fedmed.client.flower_compat` (the roles do not import each other).
"""

from __future__ import annotations

import functools
import importlib
import inspect

__all__ = ["shorten_reply_pulls", "PULL_BACKOFF", "PULL_BACKOFF_CAP"]

PULL_BACKOFF, PULL_BACKOFF_CAP = 0.05, 0.5
_GRID = "flwr.superlink.grid.http_grid"  # HttpGrid.pull_messages calls this module's pull_objects


def shorten_reply_pulls() -> str | None:
    """Shorten the HttpGrid's object-pull backoff; None when applied, else why not (unchanged).

    Applied once per process (a second call finds it done); the simulation's in-memory grid
    pulls no objects and is not affected.
    """
    try:
        mod = importlib.import_module(_GRID)
        fn = getattr(mod, "pull_objects", None)
        if fn is None:
            return f"{_GRID}.pull_objects is missing"
        if isinstance(fn, functools.partial) and fn.keywords.get("initial_backoff") == PULL_BACKOFF:
            return None
        params = inspect.signature(fn).parameters
        if not {"initial_backoff", "backoff_cap"} <= set(params):
            return f"{_GRID}.pull_objects no longer takes initial_backoff/backoff_cap"
        mod.pull_objects = functools.partial(fn, initial_backoff=PULL_BACKOFF,  # type: ignore[attr-defined]
                                             backoff_cap=PULL_BACKOFF_CAP)
    except Exception as exc:  # noqa: BLE001 - any surprise: Flower's grid as it is (slower, correct)
        return f"self-check raised {type(exc).__name__}: {exc}"
    return None
