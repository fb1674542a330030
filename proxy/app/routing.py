"""Which handler serves a connection: by the port it arrived on (a map built once), then by
its kind and path.

Each listening port has its app: the public port's and the Python client's TLS port's are a
:class:`PortApp` (its own forwarder, bridge and usage route, built for that port), the
operator's port (``FAL_PROXY_METRICS_PORT``) a small Starlette app. Reserved paths
(``/healthz``, ``/readyz``, ``/metrics``) and the lifespan go to the proxy's Starlette app.
"""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from ..bridge.handler import Bridge
from ..config.settings import RESERVED_PATHS
from ..forward.handler import Forwarder
from .usage_routes import CallerUsage


class PortApp:
    """One port's fal traffic: forwarded HTTP, bridged sockets, the caller's usage route (and
    on the public port the realtime token route)."""

    def __init__(self, forwarder: Forwarder, bridge: Bridge, starlette: Starlette,
                 usage_route: str | None, usage: CallerUsage,
                 token: tuple[str, ASGIApp] | None = None) -> None:  # fmt: skip
        self.forwarder = forwarder
        self.bridge = bridge
        self.starlette = starlette
        self.usage_route = usage_route
        self.usage = usage
        # The realtime token route (path, handler), on the public port only.
        self.token_route: str | None = token[0] if token is not None else None
        self.token: ASGIApp | None = token[1] if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path in RESERVED_PATHS:
            await self.starlette(scope, receive, send)
        elif scope["type"] == "http":
            if path == self.usage_route:
                await self.usage(scope, receive, send)
            elif path == self.token_route and self.token is not None:
                await self.token(scope, receive, send)
            else:
                await self.forwarder(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.bridge(scope, receive, send)
        else:
            await self.starlette(scope, receive, send)


class ProxyApp:
    """The proxy's ASGI app: each connection to its port's app.

    ``apps`` maps the extra ports (the operator's, the Python client's) to their apps; any
    other port is the public one (``main``). ``bridges`` and ``draining`` are the server's
    handles for shutdown: every bridged socket closed with 1001, ``/readyz`` answering 503.
    """

    def __init__(self, main: PortApp, apps: dict[int, ASGIApp], starlette: Starlette,
                 bridges: list[Bridge], draining: asyncio.Event) -> None:  # fmt: skip
        self.main = main
        self.apps = apps
        self.starlette = starlette
        self.bridges = bridges
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.starlette(scope, receive, send)
            return
        app: ASGIApp = self.main
        if self.apps:  # only with extra ports: most proxies never look the port up
            server = scope.get("server")
            app = self.apps.get(server[1], self.main) if server else self.main
        await app(scope, receive, send)

    async def close_sockets(self) -> None:
        """Close every bridged session, on every port, before the server goes down."""
        await asyncio.gather(*(bridge.close_all() for bridge in self.bridges))
