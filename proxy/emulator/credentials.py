"""The gateway's credential check, in one place for HTTP and WebSocket alike: Cloudflare's
``cf-aig-authorization`` first (only when ``cf_token`` is set), then fal's key.

HTTP takes both from headers: ``cf-aig-authorization: Bearer <cf_token>`` and
``authorization: Key <key>`` (checked against ``fal_key``; any non-empty key when that is
``None``). A WebSocket handshake may carry them as sub-protocols instead, as browsers must:
``cf-aig-authorization.<cf_token>`` and ``fal-api-key.<key>`` (the latter only when there is
no ``authorization`` header); fal's realtime socket also takes, instead of the key, a token
from ``/tokens/`` (the caller says whether its token is valid). A WebSocket ``Key `` with
nothing after it is let through when ``fal_key`` is ``None``; HTTP refuses it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

from starlette.types import Scope

from .config import EmulatorConfig

CF_PROTOCOL = "cf-aig-authorization."  # + the gateway token: the browser form on WebSockets
KEY_PROTOCOL = "fal-api-key."  # + the fal key: likewise


class Refusal(enum.Enum):
    """Which credential a request lacks."""

    GATEWAY = "cf-aig-authorization"  # the gateway's own: Cloudflare's 401 with code 2009
    FAL_KEY = "authorization"  # fal's: no key, or the wrong one
    # Stored keys (--byok) and Unified Billing (--unified-billing): the gateway's own 400s.
    BYOK_UNAVAILABLE = "Configured BYOK credentials are unavailable"
    BOTH_KEYS = "a provider key and a stored key (cf-aig-byok-alias) were both sent"
    NO_CREDENTIALS = "provider credentials are required (cf-aig-no-wholesale)"

    @property
    def gateways(self) -> bool:
        """Answered by the gateway itself (never reaches fal)."""
        return self is not Refusal.FAL_KEY


def fal_only(config: EmulatorConfig) -> EmulatorConfig:
    """The credential rules of fal itself: its key, no gateway token, no stored keys."""
    return dataclasses.replace(config, cf_token=None, byok={}, unified_billing=False)


def check_credentials(
    config: EmulatorConfig,
    scope: Scope,
    headers: dict[str, str],
    fal_token_ok: Callable[[], bool] | None = None,
) -> Refusal | None:
    """``None`` when the request may pass, else the first credential it lacks.

    ``headers`` is :func:`~proxy.emulator.asgi.header_map` of ``scope``; ``fal_token_ok``
    (WebSocket only) says whether the request carries a valid fal token instead of a key.
    """
    websocket = scope["type"] == "websocket"
    offered: list[str] = (scope.get("subprotocols") or []) if websocket else []
    cf_token = config.cf_token
    if (
        cf_token is not None
        and headers.get("cf-aig-authorization") != f"Bearer {cf_token}"
        and f"{CF_PROTOCOL}{cf_token}" not in offered
    ):
        return Refusal.GATEWAY
    auth = headers.get("authorization", "")
    if not auth and any(p.startswith(KEY_PROTOCOL) for p in offered):
        auth = "Key " + next(p for p in offered if p.startswith(KEY_PROTOCOL))[len(KEY_PROTOCOL) :]
    alias = headers.get("cf-aig-byok-alias")
    if config.byok and alias is not None and auth:
        return Refusal.BOTH_KEYS  # the proxy must send one or the other, never both
    if not auth and (config.byok or config.unified_billing):
        stored = config.byok.get(alias or "default")
        if stored is not None:
            auth = f"Key {stored}"  # the gateway adds the stored key
        elif alias is not None:
            return Refusal.BYOK_UNAVAILABLE
        elif config.unified_billing and headers.get("cf-aig-no-wholesale") != "true":
            return None  # the gateway pays fal from its credits
        else:
            return Refusal.NO_CREDENTIALS
    key = config.fal_key
    key_ok = (
        auth.startswith("Key ")
        and (websocket or len(auth) > 4)
        and (key is None or auth == f"Key {key}")
    )
    if key_ok or (fal_token_ok is not None and fal_token_ok()):
        return None
    return Refusal.FAL_KEY
