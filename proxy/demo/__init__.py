"""Demo mode: the proxy, the offline emulator and a demo page, on one port.

``fal-gateway-proxy demo`` builds this app. Requests for ``/v1/…`` (the emulated gateway)
and ``/_emulator/…`` go to the emulator; ``/`` and ``/demo/<file>`` serve the page;
``/dashboard`` the proxy's live dashboard (docs/dashboard.md: the demo has no operator's
port, so it is served here, open like the rest of the demo); everything else is the real
proxy, configured with the emulator as its gateway, so the page's SDK calls take exactly the
path they would take in production: browser → proxy (``/api/fal/proxy``) → gateway → fal,
only the last two being emulated.
"""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, PlainTextResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from ..app.assemble import create_app
from ..config.settings import Settings
from ..emulator import EmulatorConfig, create_emulator

STATIC = Path(__file__).parent / "static"


def create_demo_app(settings: Settings, emulator_config: EmulatorConfig) -> ASGIApp:
    proxy = create_app(settings, dashboard_on_proxy=True)
    emulator = create_emulator(emulator_config)
    static = StaticFiles(directory=STATIC)
    index = FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await proxy(scope, receive, send)  # the emulator needs no start-up
            return
        path = scope["path"]
        if path.startswith(("/v1/", "/_emulator/")):
            await emulator(scope, receive, send)
        elif scope["type"] == "http" and (path == "/dashboard" or path.startswith("/dashboard/")):
            await proxy.starlette(scope, receive, send)
        elif scope["type"] == "http" and path == "/":
            await index(scope, receive, send)
        elif scope["type"] == "http" and path.startswith("/demo/"):
            try:
                await static(
                    {**scope, "path": path[len("/demo") :], "root_path": ""}, receive, send
                )
            except HTTPException as exc:  # StaticFiles raises 404/405 instead of answering
                await PlainTextResponse(exc.detail, status_code=exc.status_code)(
                    scope, receive, send
                )
        else:
            await proxy(scope, receive, send)

    return app
