"""What a coordinator leaves behind when it is SIGKILLed, found and stopped on the next start.

``fedmed-server`` runs Flower's SuperLink in its own process group (with the ServerApp
processes Flower starts under it). A SIGKILL gives fedmed no chance to stop them, and they
keep the port (and the run's database) the restarted server needs. A pid file in the run
folder names the server and that group; on start, a live server refuses a second one beside
it, and a dead one's group is stopped — only processes that are Flower's own.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from fedmed.errors import RunError

__all__ = ["PID_FILE", "claim_run_folder", "record_group", "release_run_folder", "stop_leftovers"]

PID_FILE = "server.pid"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _processes() -> dict[int, tuple[int, int]]:
    """``pid -> (parent pid, process group)`` of every live process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # fields after the command's closing parenthesis: state, ppid, pgrp, ...
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    table[int(entry.name)] = (int(fields[1]), int(fields[2]))
            except (OSError, IndexError, ValueError):
                continue
    return table


def _group_members(pgid: int, address: str | None = None) -> list[int]:
    """Flower processes of group ``pgid``, their descendants (Flower's SuperExec starts a
    session of its own under the SuperLink) and any that name the SuperLink's ``address``
    (orphans whose parent is gone)."""
    table = _processes()
    found = {pid for pid, (_, group) in table.items() if group == pgid}
    if address:
        found |= {pid for pid in table if address in _cmdline(pid)}
    grew = True
    while grew:
        kids = {pid for pid, (parent, _) in table.items() if parent in found} - found
        found |= kids
        grew = bool(kids)
    return sorted(pid for pid in found if "flower-" in _cmdline(pid) or "flwr-" in _cmdline(pid))


def _alive(pids: list[int]) -> list[int]:
    table = _processes()
    return [pid for pid in pids if pid in table]


def stop_leftovers(pgid: int, *, address: str | None = None, timeout: float = 10.0) -> list[int]:
    """SIGTERM then SIGKILL the Flower processes of group ``pgid``; the pids that were stopped."""
    members = _group_members(pgid, address)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in members:
            try:
                os.kill(pid, sig)
                os.kill(pid, signal.SIGCONT)  # a stopped (hung) process handles its SIGTERM now
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while _alive(members) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _alive(members):
            break
    return members


def claim_run_folder(out: Path) -> list[int]:
    """Refuse when a live server owns ``out``; stop what a killed one left. Returns stopped pids."""
    path = out / PID_FILE
    stopped: list[int] = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
            server, group, address = int(old["server"]), old.get("group"), old.get("address")
        except (ValueError, KeyError, TypeError):
            server, group, address = -1, None, None
        if server > 0 and server != os.getpid() and "fedmed-server" in _cmdline(server):
            raise RunError(f"another fedmed-server (pid {server}) is running the federation in {out}; "
                               "stop it first, or pass --out for a new run folder")
        if group:
            stopped = stop_leftovers(int(group), address=address)
    path.write_text(json.dumps({"server": os.getpid(), "group": None}))
    return stopped


def record_group(out: Path, group: int, *, address: str) -> None:
    """Note the SuperLink's process group and loopback address once it is started."""
    (out / PID_FILE).write_text(json.dumps({"server": os.getpid(), "group": group, "address": address}))


def release_run_folder(out: Path) -> None:
    (out / PID_FILE).unlink(missing_ok=True)
