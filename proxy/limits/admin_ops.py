"""What the admin API asks of the limits: listed callers, page cursors, and Redis's side.

The admin API (:mod:`proxy.app.admin_routes`, the operator's port) lists the callers with
usage this month a page at a time, resets a caller's quota and budget counters, and
blocks and unblocks a caller. Both backends answer with the types here; the Redis
backend does its part with the helpers below, off the request path (one command or one
pipeline per admin request, O(page) for a listing).

**Listing in Redis.** Keys name a digest of the caller, never the caller, so the digest
alone cannot tell the operator whom to block. The admit script therefore writes the id
beside the usage: when it creates a caller's usage hash of the month it also sets
``<prefix>:ids:<month>`` field ``<digest>`` to the id (:func:`id_arg`), expiring with the
month's usage (one hash per month, one field per caller with usage: bounded as usage is).
A page is one ``HSCAN`` of that hash and one pipeline of ``HGETALL`` (usage) and
``EXISTS`` (blocked) per caller listed; nothing walks the keyspace (no ``KEYS``, no
``SCAN``) and nothing on the request path grows with the number of callers.

**Cursors** are opaque to the operator (base64url of ``<kind>.<month>.<position>``): in
memory the offset into the month's callers (kept in first-use order, only ever appended
to within a month); in Redis the ``HSCAN`` cursor and the last digest listed from that
cursor's batch (a small hash answers whole in one batch, whatever ``COUNT`` asks, so a
page may be part of a batch: its entries are taken in digest order after the last one
listed). A cursor of another month starts that month's listing over. A cursor that does
not decode raises :class:`BadCursor`.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

from .money import as_usd

MAX_PAGE = 500
SEPARATOR = "\x1f"  # the script's argument separator (proxy.limits.script)
_ESCAPED = re.compile("%(25|1F)")


class BadCursor(ValueError):
    """A listing cursor this proxy did not write (or of the other backend)."""


@dataclass
class CallerRow:
    """One caller with usage this month: its id (None if Redis has only its digest),
    app → (generations, billable units, spend in micro-dollars), and whether it is blocked."""

    digest: str
    caller: str | None
    apps: dict[str, tuple[int, float, int]] = field(default_factory=dict)
    blocked: bool = False

    def to_json(self) -> dict[str, Any]:
        apps = sorted(self.apps.items())
        return {
            "id": self.caller,
            "key": self.digest,
            "generations": sum(gens for _, (gens, _, _) in apps),
            "billable_units": round(sum(units for _, (_, units, _) in apps), 6),
            "spend_usd": as_usd(sum(spend for _, (_, _, spend) in apps)),
            "blocked": self.blocked,
            "apps": {
                app: {"generations": g, "billable_units": round(u, 6), "spend_usd": as_usd(s)}
                for app, (g, u, s) in apps
            },
        }


@dataclass
class CallerPage:
    callers: list[CallerRow]
    cursor: str | None  # None: the listing is complete


def encode_cursor(kind: str, month: int, position: str) -> str:
    raw = f"{kind}.{month}.{position}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, kind: str) -> tuple[int, str]:
    """(month, position) of a cursor :func:`encode_cursor` wrote for ``kind``."""
    if len(cursor) > 200:
        raise BadCursor("cursor too long")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise BadCursor("not a cursor this proxy wrote") from None
    parts = raw.split(".")
    if len(parts) != 3 or parts[0] != kind or not parts[1].isdigit():
        raise BadCursor("not a cursor this proxy wrote (or of another limit store)")
    return int(parts[1]), parts[2]


def id_arg(caller: str) -> str:
    """A caller id as one argument of the script: never empty, never the separator
    (``%`` and the separator escaped; :func:`id_from_store` reverses it). An id that is not
    valid UTF-8 (a lone surrogate from a JWT) is stored with backslash escapes: shown, not
    reversible (its digest is still exact)."""
    text = caller.encode("utf-8", "surrogatepass").decode("utf-8", "backslashreplace")
    return "=" + text.replace("%", "%25").replace(SEPARATOR, "%1F")


def id_from_store(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if not text.startswith("="):
        return None
    return _ESCAPED.sub(lambda m: "%" if m.group(1) == "25" else SEPARATOR, text[1:])


def usage_apps(fields: dict[bytes, bytes]) -> dict[str, tuple[int, float, int]]:
    """A Redis usage hash (``g:``, ``u:``, ``s:`` + app) as app → (gens, units, spend)."""
    apps: dict[str, tuple[int, float, int]] = {}
    for name, value in fields.items():
        kind, app = name.decode()[:2], name.decode()[2:]
        gens, units, spend = apps.get(app, (0, 0, 0))
        if kind == "g:":
            gens = int(value)
        elif kind == "u:":
            units = float(value)
        elif kind == "s:":
            spend = int(value)
        apps[app] = (gens, units, spend)
    return apps


async def redis_page(
    redis: Any, ids_key: str, usage_key: Any, blocked_key: Any, month: int,
    cursor: str | None, limit: int,
) -> CallerPage:  # fmt: skip
    """One page of the month's callers from Redis (see the module doc). ``usage_key`` and
    ``blocked_key`` give a digest's keys."""
    scan, after = 0, ""
    if cursor is not None:
        at, position = decode_cursor(cursor, "r")
        if at == month:
            scan_text, _, after = position.partition("-")
            if not scan_text.isdigit() or (after and not re.fullmatch("[0-9a-f]{32}", after)):
                raise BadCursor("not a cursor this proxy wrote")
            scan = int(scan_text)
    rows: list[tuple[str, str | None]] = []
    next_scan = scan
    while True:
        next_scan, batch = await redis.hscan(ids_key, scan, count=limit)
        entries = sorted((digest.decode(), id_from_store(value)) for digest, value in batch.items())
        entries = [entry for entry in entries if entry[0] > after]
        room = limit - len(rows)
        rows += entries[:room]
        if len(entries) > room:  # the rest of this batch is the next page's
            next_cursor: str | None = encode_cursor("r", month, f"{scan}-{rows[-1][0]}")
            break
        scan, after = next_scan, ""
        if next_scan == 0:
            next_cursor = None
            break
        if len(rows) >= limit:
            next_cursor = encode_cursor("r", month, f"{next_scan}-")
            break
    if not rows:
        return CallerPage([], next_cursor)
    async with redis.pipeline(transaction=False) as pipe:
        for digest, _ in rows:
            pipe.hgetall(usage_key(digest))
            pipe.exists(blocked_key(digest))
        answers = await pipe.execute()
    callers = [
        CallerRow(digest, caller, usage_apps(answers[2 * i]), bool(answers[2 * i + 1]))
        for i, (digest, caller) in enumerate(rows)
    ]
    return CallerPage(callers, next_cursor)
