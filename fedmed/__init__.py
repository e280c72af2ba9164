"""fedmed: federated learning for hospitals (CNN + Transformer fusion on Flower)."""

import os as _os
import sys as _sys

# Flower sends usage events to its servers unless FLWR_TELEMETRY_ENABLED is "0", and reads that
# switch once, when flwr is first imported. No event of a site's or a coordinator's run may leave
# the machine (and hospitals are offline, where each event waits on a connection that fails), so
# fedmed turns it off before any of its modules imports flwr, whatever the environment says; a
# process that imported flwr first (Flower's own runners load fedmed's apps) is switched off too.
_os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
_telemetry = _sys.modules.get("flwr.supercore.telemetry")
if _telemetry is not None:
    setattr(_telemetry, "FLWR_TELEMETRY_ENABLED", "0")  # noqa: B010 (Flower reads this name at each event)

__version__ = "0.1.0"
