"""The dashboard's routes on the operator's port: ``/dashboard``, its files, its events.

* ``GET /dashboard``: the page (static HTML; a strict Content-Security-Policy: every script,
  style and connection from this origin, nothing inline).
* ``GET /dashboard/static/<file>``: its script and style, from a fixed list read once.
* ``GET /dashboard/events``: ``text/event-stream``, one JSON snapshot a second, the first at
  once (:class:`~proxy.dashboard.feed.Feed`); it ends when the server drains.

With ``FAL_PROXY_ADMIN_TOKEN`` set, every one of them needs the token: ``Authorization:
Bearer <token>``, or HTTP Basic with any user name and the token as the password (what a
browser can send for a page load: a 401 answers ``WWW-Authenticate: Basic`` so it asks).
Compared in constant time, never logged. Without a token the page is open to whoever
reaches the operator's port (loopback by default).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ..errors import ProxyError, Unauthorized
from ..observe.logs import get_logger
from ..observe.redaction import register_secret
from .feed import Feed, TooManyViewers

log = get_logger("proxy.dashboard")
STATIC = Path(__file__).parent / "static"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
FILES = {"dashboard.js": "text/javascript; charset=utf-8",
         "dashboard.css": "text/css; charset=utf-8"}  # fmt: skip
REALM = 'Basic realm="fal-gateway-proxy", charset="UTF-8"'
MAX_CREDENTIAL = 1024  # bytes of an Authorization value worth decoding
HEADERS = {"cache-control": "no-store", "x-content-type-options": "nosniff",
           "referrer-policy": "no-referrer", "x-frame-options": "DENY"}  # fmt: skip


class DashboardRoutes:
    """The routes; :meth:`use_token` swaps the admin token in (file reload)."""

    def __init__(self, feed: Feed, token: str | None, draining: asyncio.Event,
                 prefix: str = "/dashboard") -> None:  # fmt: skip
        self.feed = feed
        self.draining = draining
        self.prefix = prefix
        self._token: bytes | None = None
        if token is not None:
            self.use_token(token)
        self.page = (STATIC / "index.html").read_bytes()
        self.files = {name: ((STATIC / name).read_bytes(), kind) for name, kind in FILES.items()}

    def use_token(self, token: str) -> None:
        register_secret(token)
        self._token = token.encode()

    def routes(self) -> list[Route]:
        p = self.prefix
        return [
            Route(p, self.index, methods=["GET", "HEAD"]),
            Route(f"{p}/static/{{name}}", self.static, methods=["GET", "HEAD"]),
            Route(f"{p}/events", self.events, methods=["GET"]),
        ]

    def allowed(self, request: Request) -> Response | None:
        """None when the request may see the dashboard; else the 401 to answer."""
        token = self._token
        if token is None:
            return None
        given = [v for k, v in request.scope["headers"] if k == b"authorization"]
        sent = credential(given[0]) if len(given) == 1 else b""
        # Compared whatever was sent, so the time taken says nothing of it.
        if hmac.compare_digest(sent, token) and sent:
            return None
        client = request.client.host if request.client else "unknown"
        # A browser's first load carries nothing (it asks after the 401): not a warning.
        (log.warning if given else log.info)(
            "dashboard_refused", client_ip=client, path=request.url.path,
            reason="wrong" if given else "missing",
        )  # fmt: skip
        error = Unauthorized("admin token required", "the dashboard needs FAL_PROXY_ADMIN_TOKEN: "
                             "'Authorization: Bearer <token>', or Basic with the token as the "
                             "password")  # fmt: skip
        body = error.body()
        headers = {k.decode(): v.decode() for k, v in error.headers(body)}
        return Response(body, 401, headers={**headers, **HEADERS, "www-authenticate": REALM})

    async def index(self, request: Request) -> Response:
        if (refused := self.allowed(request)) is not None:
            return refused
        body = b"" if request.method == "HEAD" else self.page
        headers = {**HEADERS, "content-security-policy": CSP}
        return Response(body, media_type="text/html; charset=utf-8", headers=headers)

    async def static(self, request: Request) -> Response:
        if (refused := self.allowed(request)) is not None:
            return refused
        found = self.files.get(request.path_params["name"])
        if found is None:
            return Response(b'{"message": "not found", "detail": "no such file"}', 404,
                            media_type="application/json", headers=HEADERS)  # fmt: skip
        body, kind = found
        return Response(b"" if request.method == "HEAD" else body, media_type=kind,
                        headers={**HEADERS, "content-security-policy": CSP})  # fmt: skip

    async def events(self, request: Request) -> Response:
        if (refused := self.allowed(request)) is not None:
            return refused
        try:
            viewer = self.feed.subscribe()
        except TooManyViewers:
            error = ProxyError("too many dashboards open", "close one and reload")
            body = error.body()
            return Response(body, 503, media_type="application/json", headers=HEADERS)
        feed, draining = self.feed, self.draining

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield b"retry: 2000\n\n"
                while not draining.is_set():
                    get = asyncio.ensure_future(viewer.queue.get())
                    stop = asyncio.ensure_future(draining.wait())
                    try:
                        done, _ = await asyncio.wait(
                            {get, stop}, return_when=asyncio.FIRST_COMPLETED
                        )
                    finally:
                        get.cancel()
                        stop.cancel()
                    if get not in done:
                        return
                    yield b"data: " + get.result().encode() + b"\n\n"
            finally:
                feed.unsubscribe(viewer)

        headers = {**HEADERS, "x-accel-buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def credential(value: bytes) -> bytes:
    """The token an ``Authorization`` value carries: a Bearer's, or a Basic's password
    (any user name); empty when it is neither, or too long to be one."""
    if len(value) > MAX_CREDENTIAL:
        return b""
    scheme, _, rest = value.strip().partition(b" ")
    scheme = scheme.lower()
    if scheme == b"bearer":
        return rest.strip()
    if scheme == b"basic":
        try:
            decoded = base64.b64decode(rest.strip(), validate=True)
        except (binascii.Error, ValueError):
            return b""
        return decoded.partition(b":")[2]
    return b""
