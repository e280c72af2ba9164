"""The sites' port: Flower's Fleet API only; run submission stays on the coordinator's loopback.

Flower 1.42 serves its Fleet API (sites), Control API (``flwr run`` / ``ls`` / ``stop``) and
Runtime API on one HTTP port; ``--control-api-address`` is deprecated and ignored, and the
Control API's only login (OIDC) ships with Flower's enterprise distribution. Whoever
reaches the sites' port could therefore submit a run. So fedmed binds the SuperLink to a
loopback port and puts this small forwarding gateway on the sites' address: it passes
``/v1/fleet/*`` and ``/health`` through (headers intact, so SuperNode authentication still
works end to end) and answers everything else with 403. It is hand-rolled because it is a
path allow-list of ~40 lines over Starlette/uvicorn/httpx, which Flower itself runs on.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from pathlib import Path

from fedmed.errors import RunError, RunTimeout

__all__ = ["Gateway", "FORWARDED_PREFIXES"]

FORWARDED_PREFIXES = ("/v1/fleet/",)
_FORWARDED_EXACT = ("/health",)
_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authorization", "proxy-authenticate", "content-length", "content-encoding"}
REFUSED = "fedmed: this port serves the sites' Fleet API only; runs are submitted on the coordinator's loopback\n"


def _app(upstream: str, verify: ssl.SSLContext | bool):
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=httpx.Timeout(120.0))

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not (path in _FORWARDED_EXACT or path.startswith(FORWARDED_PREFIXES)):
            return PlainTextResponse(REFUSED, status_code=403)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        upstream_res = await client.request(request.method, path, params=request.query_params,
                                            content=await request.body(), headers=headers)
        out = {k: v for k, v in upstream_res.headers.items() if k.lower() not in _HOP}
        return Response(upstream_res.content, status_code=upstream_res.status_code, headers=out)

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)])


class Gateway:
    """Serve the forwarding gateway on ``host:port`` in a background thread."""

    def __init__(self, host: str, port: int, *, upstream: str, upstream_ca: Path | None = None,
                 certfile: Path | None = None, keyfile: Path | None = None) -> None:
        import uvicorn

        verify: ssl.SSLContext | bool = False
        if upstream_ca is not None:
            verify = ssl.create_default_context(cafile=str(upstream_ca))
        config = uvicorn.Config(_app(upstream, verify), host=host, port=port, log_level="warning",
                                ssl_certfile=str(certfile) if certfile else None,
                                ssl_keyfile=str(keyfile) if keyfile else None, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="fedmed-gateway", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.error = exc

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if self.error is not None or not self._thread.is_alive():
                raise RunError(f"the sites' gateway could not start: {self.error}")
            if time.monotonic() > deadline:
                raise RunTimeout("the sites' gateway did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
