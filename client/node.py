"""``python -m fedmed.client.node --poll S -- ARGS``: Flower's SuperNode, asking sooner when idle.

``fedmed-client`` starts the node this way instead of as ``flower-supernode ARGS``: the
node is Flower's own, only its hard-coded 3 s idle sleep is capped at ``--poll`` seconds and
its 0.5 s waits on its own state (a reply to upload) at 20 ms
(:func:`fedmed.client.flower_compat.run_supernode`), so a site picks up each round's message
within ``--poll`` instead of 1.5 s later on average, and uploads its reply at once. When
this Flower has moved that loop, it says so once and runs Flower's node unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys

from fedmed.client import flower_compat
from fedmed.client.marks import NOTICE_MARK
from fedmed.errors import freeze_at_exit
from fedmed.flower import console_script

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedmed.client.node", description=__doc__.splitlines()[0])
    p.add_argument("--poll", type=float, default=0.25, help="longest idle sleep of the node, seconds")
    p.add_argument("node_args", nargs=argparse.REMAINDER, help="flower-supernode's arguments, after --")
    a = p.parse_args(argv)
    freeze_at_exit()  # a run's end waits on this process's exit
    if not 0.01 <= a.poll <= 3.0:
        p.error("--poll must be between 0.01 and 3 seconds")
    args = a.node_args[1:] if a.node_args[:1] == ["--"] else a.node_args
    problem = flower_compat.check_node_poll()
    if problem is not None:  # Flower moved its loop: its node as it is (slower, still correct)
        print(f"{NOTICE_MARK}: Flower's idle poll stays at 3 s ({problem})", file=sys.stderr, flush=True)
        os.execv(console_script("flower-supernode"), ["flower-supernode", *args])
    flower_compat.run_supernode(args, poll=a.poll)
    return 0


if __name__ == "__main__":
    sys.exit(main())
