"""Starting Flower's real deployment engine from fedmed's CLIs.

Flower 1.42 has no Python API to start a SuperLink or SuperNode, so fedmed spawns them as
child processes (their own process group, killed with the parent), polls the SuperLink's
``/health`` endpoint, and drives runs through the ``flwr`` CLI with a private
``FLWR_HOME`` per run so that parallel federations never share state or ports.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmed.errors import RunError, RunTimeout, UsageError

__all__ = [
    "Tls",
    "free_port",
    "flower_env",
    "spawn",
    "spawn_lines",
    "console_script",
    "flower_internal",
    "first_missing",
    "redact",
    "stop",
    "interrupt_on_sigterm",
    "server_healthy",
    "server_problem",
    "parse_address",
    "wait_healthy",
    "write_app_dir",
    "write_connection",
    "flwr",
    "flwr_lines",
    "APP_CONFIG_DEFAULTS",
]

# The run config keys the ServerApp/ClientApp read; `flwr run -c` may only set known keys.
APP_CONFIG_DEFAULTS: dict[str, Any] = {
    "fedmed-config": "",
    "out-dir": "",
    "resume": False,
    "mlflow-uri": "",
    "evaluate-model": "",  # fedmed-server --evaluate: score this saved model, no training
    "evaluate-split": "test",
    "bootstrap": 200,
    "sites": "",
    "data-root": "",
    "device": "auto",
    "fedmed-task": "",  # "" runs the federation; "stats" the federated statistics (server/stats.py)
}


@dataclass(frozen=True)
class Tls:
    """Certificates for the SuperLink (server side) or the CA a site trusts."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.ca is not None


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (tests and the demo start many processes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: private home, no telemetry, no update checks."""
    env = dict(os.environ)
    # Flower starts its helpers (flower-superexec, flwr-clientapp) by name: make sure the
    # ones of this environment are found even when it is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
    })
    # Flower's SuperExec (it starts the ServerApp, and a fallback site's ClientApps) looks for
    # new work every 1 s by default; its supported setting shortens that start-up wait.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    env.update(extra or {})
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGTERM the child when its parent dies, and give it its own group."""
    os.setsid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def console_script(name: str) -> str:
    """A console script of this interpreter's environment (works without PATH set up)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


# Flower logs the public key of a refused SuperNode; keys stay out of fedmed's logs.
_KEY_MATERIAL = re.compile(
    rb"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----|(?:ssh-ed25519|ecdsa-sha2-nistp\d+|ssh-rsa) [A-Za-z0-9+/=]{20,}")


def redact(line: bytes) -> bytes:
    """Replace PEM blocks and OpenSSH public keys in a log line."""
    return _KEY_MATERIAL.sub(b"[key redacted]", line)


def _pump(src: Any, fh: Any) -> None:
    for line in iter(src.readline, b""):
        fh.write(redact(line))
        fh.flush()
    fh.close()


def spawn(args: Sequence[str], *, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start a Flower executable (``flower-superlink``, ...) logging to ``log_path``.

    Its output passes through :func:`redact` on the way to the log file.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log_path, "ab")
    cmd = [console_script(args[0]), *args[1:]]
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, preexec_fn=preexec, start_new_session=preexec is None)
    threading.Thread(target=_pump, args=(proc.stdout, fh), daemon=True).start()
    return proc


def stop(proc: subprocess.Popen | None, *, timeout: float = 15.0) -> int | None:
    """Terminate a spawned process and its whole group (Flower's SuperExec children too)."""
    if proc is None:
        return None
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    try:  # leftover group members (SuperExec) of a process that already exited
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.returncode


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """SIGTERM (docker stop, systemd, a test) unwinds like Ctrl-C, so children are stopped."""
    signal.signal(signal.SIGTERM, _interrupt)


def _ssl_context(tls: Tls | None) -> ssl.SSLContext | None:
    if tls is None or tls.ca is None:
        return None
    return ssl.create_default_context(cafile=str(tls.ca))


def server_healthy(address: str, *, tls: Tls | None = None, timeout: float = 2.0) -> bool:
    """True when the SuperLink at ``host:port`` answers ``GET /health``."""
    return server_problem(address, tls=tls, timeout=timeout) is None


def server_problem(address: str, *, tls: Tls | None = None, timeout: float = 2.0) -> str | None:
    """None when the coordinator at ``host:port`` answers ``GET /health``, else why not (one phrase)."""
    scheme = "https" if tls is not None and tls.enabled else "http"
    try:
        with urllib.request.urlopen(f"{scheme}://{address}/health", timeout=timeout,
                                    context=_ssl_context(tls)) as r:
            return None if r.status == 200 else f"it answered HTTP {r.status}"
    except urllib.error.HTTPError as exc:
        return f"it answered HTTP {exc.code}"
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            return f"its TLS certificate is not trusted ({reason.verify_message})"
        if isinstance(reason, ssl.SSLError):
            return f"TLS failed ({reason.reason or reason})"
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused (is fedmed-server running there?)"
        if isinstance(reason, socket.gaierror):
            return "the host name does not resolve"
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return f"no answer within {timeout:.0f}s"
        return str(reason)
    except TimeoutError:
        return f"no answer within {timeout:.0f}s"
    except (OSError, ssl.SSLError) as exc:
        return type(exc).__name__


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) as a pair; ValueError with the expected form otherwise."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in address \
            or any(c.isspace() for c in address) or (":" in host and not address.startswith("[")):
        raise UsageError(f"--server {address!r} is not HOST:PORT (e.g. coordinator.example.org:9092, "
                         "10.0.0.5:9092 or [::1]:9092)")
    return host, int(port)


def wait_healthy(address: str, *, tls: Tls | None = None, timeout: float = 60.0,
                 proc: subprocess.Popen | None = None, log_path: Path | None = None) -> None:
    """Poll the SuperLink's health endpoint; fail fast if its process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server_healthy(address, tls=tls):
            return
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path and log_path.exists() else ""
            raise RunError(f"the Flower SuperLink exited with code {proc.returncode}:\n{tail}")
        time.sleep(0.25)
    raise RunTimeout(f"the Flower SuperLink at {address} did not become healthy within {timeout:.0f}s")


def write_app_dir(path: Path, *, name: str = "fedmed") -> Path:
    """A Flower app folder holding only ``pyproject.toml``.

    Its components name fedmed's installed modules, so the FAB carries no code: every site
    runs the fedmed it has installed (a FAB with its own modules would shadow them).
    """
    import fedmed

    path.mkdir(parents=True, exist_ok=True)
    cfg_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in APP_CONFIG_DEFAULTS.items())
    version = fedmed.__version__
    (path / "pyproject.toml").write_text(
        "[build-system]\nrequires = [\"hatchling\"]\nbuild-backend = \"hatchling.build\"\n\n"
        f"[project]\nname = \"{name}\"\nversion = \"{version}\"\n"
        "description = \"fedmed federation (components from the installed fedmed package)\"\n"
        "license = \"Apache-2.0\"\ndependencies = []\n\n"
        "[tool.flwr.app]\npublisher = \"fedmed\"\n\n"
        "[tool.flwr.app.components]\n"
        "serverapp = \"fedmed.server.app:app\"\nclientapp = \"fedmed.client.app:app\"\n\n"
        f"[tool.flwr.app.config]\n{cfg_lines}\n"
    )
    return path


def write_connection(flwr_home: Path, *, name: str, address: str, tls: Tls | None = None) -> None:
    """``$FLWR_HOME/config.toml`` naming the SuperLink connection ``name`` for the flwr CLI."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if tls is not None and tls.ca is not None:  # tls.enabled
        lines.append(f'root-certificates = "{Path(tls.ca).resolve()}"')
    else:
        lines.append("insecure = true")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def flower_internal(module: str, name: str) -> Any:
    """``module.name`` of the installed Flower, imported on demand (the roles' flower_compat checks)."""
    return getattr(importlib.import_module(module), name)


def first_missing(needs: Sequence[tuple[str, str]], env: str) -> str | None:
    """The first (module, name) in ``needs`` this Flower lacks, as a reason; None when all are there.

    ``$env`` (``module:name,...``) adds names, so a test can play a Flower release that removed one.
    """
    extra = [tuple(x.split(":", 1)) for x in os.environ.get(env, "").split(",") if ":" in x]
    for module, name in [*needs, *extra]:
        try:
            flower_internal(module, name)
        except (ImportError, AttributeError) as exc:
            return f"{module}.{name} is missing ({type(exc).__name__})"
    return None


def spawn_lines(args: Sequence[str], *, env: dict[str, str]) -> subprocess.Popen:
    """Start a helper with its output as a text pipe, in its own group, ended when this process dies."""
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.Popen(list(args), env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, errors="replace", preexec_fn=preexec,
                            start_new_session=preexec is None)


def flwr_lines(args: Sequence[str], *, env: dict[str, str]) -> subprocess.Popen:
    """Start the ``flwr`` CLI with its output as a text pipe (``flwr log`` is read line by line)."""
    return spawn_lines([console_script("flwr"), *args], env=env)


def flwr(args: Sequence[str], *, env: dict[str, str], timeout: float | None = None,
         stream_to: Any = None) -> subprocess.CompletedProcess:
    """Run the ``flwr`` CLI (``run``, ``log``, ``ls``, ``supernode register``)."""
    return subprocess.run([console_script("flwr"), *args], env=env, text=True, timeout=timeout,
                          stdout=stream_to if stream_to is not None else subprocess.PIPE,
                          stderr=subprocess.STDOUT if stream_to is not None else subprocess.PIPE,
                          stdin=subprocess.DEVNULL)
