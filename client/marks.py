"""What a site's node and ClientApp runner tell ``fedmed-client``: marked log lines, an exit code.

``fedmed-client`` itself imports no Flower. Flower's internals are checked by the processes
that use them (the warm runner, the node), which import Flower anyway: checking them in the
wrapper too cost about 1.6 CPU-s per site at start-up, while the sites' imports saturate the
machine. These constants are how the wrapper learns the outcome.
"""

from __future__ import annotations

__all__ = ["REFUSAL_MARK", "NOTICE_MARK", "RUNNER_READY", "RUNNER_CANNOT"]

REFUSAL_MARK = "fedmed site REFUSED"  # starts a refusal line: echoed on the site's console
NOTICE_MARK = "fedmed site NOTICE"  # starts a fallback notice (slower, still correct): echoed too
RUNNER_READY = "fedmed warm runner: this Flower has what it needs"  # the node may start now
RUNNER_CANNOT = 3  # the warm runner's exit code when this Flower lacks what it needs
