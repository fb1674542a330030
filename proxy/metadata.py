"""``cf-aig-metadata``: who called, which app, which request and what kind of call, on every
upstream request and socket handshake, so an operator can filter the gateway's logs and spend
by user and model. A pure function and one small class; no I/O.

The gateway takes a flat JSON object of at most 5 entries (more are dropped, by Cloudflare);
this sends 4. The caller is a keyed hash by default (HMAC-SHA256, RFC 2104), since a caller id
can be an e-mail address (a JWT ``sub``) and the gateway's logs are read by more people than
the proxy's secrets are: the same caller always gets the same tag, and the tag says nothing of
the id without the key. ``FAL_PROXY_METADATA_CALLER=raw`` sends the id itself, ``off`` nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json

MAX_ENTRIES = 5  # Cloudflare keeps the first 5 entries of the object
TAG_HEX = 24  # 96 bits of the HMAC: no collisions among any realistic number of callers
_DERIVE = b"fal-gateway-proxy/cf-aig-metadata/caller"


def derived_key(secret: str) -> bytes:
    """The hash key when none is configured: derived from a secret the proxy holds (the
    gateway token, else the fal key), so every replica tags a caller alike."""
    return hmac.new(secret.encode(), _DERIVE, hashlib.sha256).digest()


class CallerTags:
    """How callers appear in ``cf-aig-metadata`` (``mode``: hash, raw or off)."""

    def __init__(self, mode: str, key: bytes) -> None:
        self.mode = mode
        self.key = key

    def tag(self, caller: str) -> str | None:
        if self.mode == "off":
            return None
        if self.mode == "raw":
            return caller
        return hmac.new(self.key, caller.encode(), hashlib.sha256).hexdigest()[:TAG_HEX]


def metadata_header(*, caller: str | None, app: str | None, request_id: str, route: str) -> str:
    """The header's value: a compact JSON object of string entries (never more than 5)."""
    entries = {"request_id": request_id, "route": route}
    if app is not None:
        entries["app"] = app
    if caller is not None:
        entries["caller"] = caller
    assert len(entries) <= MAX_ENTRIES
    # ensure_ascii: a header value stays ASCII whatever a caller id holds.
    return json.dumps(entries, separators=(",", ":"), ensure_ascii=True)
