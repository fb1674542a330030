"""The emulator's ASGI app: Cloudflare AI Gateway's ``/v1/{account}/{gateway}/fal`` in front
of an emulated fal, plus read-only control paths under ``/_emulator/``.

Request flow: record → gateway checks (``cf-aig-authorization``, the fal key) → resolve
the fal URL (path mode, or ``x-fal-target-url`` on the bare ``/fal`` URL) → the fal host's
behaviour (``fal.run`` sync runs and streams, ``queue.fal.run``, ``rest.fal.ai``).

This module only routes: the gateway is :mod:`proxy.emulator.gateway` (its credential check
:mod:`proxy.emulator.credentials`, for WebSockets too), the fal hosts are
:mod:`proxy.emulator.fal_run`, :mod:`proxy.emulator.fal_queue` and
:mod:`proxy.emulator.fal_rest`, the realtime WebSocket :mod:`proxy.emulator.realtime`, the
control paths :mod:`proxy.emulator.control`; the state they share is
:class:`proxy.emulator.context.EmulatorState`. A request addressed to one of fal's own names
(``Host: fal.run``, handed over by a TLS front) is that fal host's, as on ``/_fal/<host>``:
:mod:`proxy.emulator.fal_names`.
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from .apps import CATALOGUE
from .asgi import base_url, send_json
from .context import EmulatorState
from .control import serve_control
from .fal_names import fal_host
from .gateway import DIRECT_PATH, GATEWAY_PATH, serve_direct, serve_gateway
from .realtime import serve_realtime


class Emulator(EmulatorState):
    """Create with :func:`proxy.emulator.create_emulator`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        host = fal_host(scope)  # addressed to fal's own name (a TLS front): fal itself
        if host is not None and not path.startswith("/_emulator/"):
            path = f"/_fal/{host}{path}"
        gateway = GATEWAY_PATH.fullmatch(path)
        direct = DIRECT_PATH.fullmatch(path)  # fal itself, no gateway (the proxy's fallback)
        if scope["type"] == "websocket":
            if gateway:
                await serve_realtime(self, scope, receive, send, gateway.group(3) or "")
            elif direct and direct.group(1) == "fal.run":
                await serve_realtime(self, scope, receive, send, direct.group(2) or "", direct=True)
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        if path.startswith("/_emulator/"):
            await serve_control(self, scope, path[len("/_emulator/") :], receive, send)
        elif gateway:
            await serve_gateway(self, scope, gateway.group(3) or "", receive, send)
        elif direct:
            await serve_direct(self, scope, direct.group(1), direct.group(2) or "/", receive, send)
        elif path == "/":
            await send_json(
                send,
                200,
                {
                    "emulator": "offline fal + Cloudflare AI Gateway; no real fal call is made",
                    "gateway_url": f"{base_url(scope, self.config.public_url)}"
                    "/v1/emulator/emulator/fal",
                    "apps": sorted(CATALOGUE),
                    "requests": "/_emulator/requests",
                },
            )
        else:
            await send_json(
                send,
                404,
                {"success": False, "error": [{"code": 7003, "message": "No route for that URI"}]},
            )
