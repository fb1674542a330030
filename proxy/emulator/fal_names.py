"""fal's own host names (``fal.run``, ``queue.fal.run``, ``rest.fal.ai``, ``wma.fal.run``),
when a request reaches the emulator addressed to one of them.

Why: the JS SDK opens its realtime socket on a fixed ``wss://fal.run/<app>/realtime``, so a
browser test maps that name to a local TLS front (Chromium's ``--host-resolver-rules``)
whose plain bytes reach the emulator's own port with ``Host: fal.run``. Such a request is
served as that fal host itself: ``/<path>`` as ``/_fal/<host>/<path>`` (no gateway: fal's key,
or a realtime token from ``/tokens/``), the emulator's ``/_emulator/…`` paths unchanged (the
file URLs it hands out point there), and those URLs are ``https://<host>/…``, since fal's
names are only ever reached over TLS.
"""

from __future__ import annotations

from starlette.types import Scope

# api.fal.ai: fal's platform API (models, pricing), an operator's: proxy.emulator.fal_platform
FAL_HOSTS = ("fal.run", "queue.fal.run", "rest.fal.ai", "wma.fal.run", "api.fal.ai")


def fal_host(scope: Scope) -> str | None:
    """The fal host named by the request's ``Host`` (port 443 or none), else None."""
    for name, value in scope["headers"]:
        if name.lower() == b"host":
            host, _, port = value.decode("latin-1").lower().partition(":")
            return host if host in FAL_HOSTS and port in ("", "443") else None
    return None
