"""Small ASGI helpers for the emulator: read a body, answer JSON, raw bytes or SSE."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Receive, Scope, Send

from .fal_names import fal_host

Headers = list[tuple[bytes, bytes]]


async def read_body(receive: Receive, limit: int | None = None) -> tuple[bytes, int, bool]:
    """Read the whole request body; keep at most ``limit`` bytes of it.

    Returns ``(kept, total_length, disconnected)``.
    """
    kept, total, more = bytearray(), 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return bytes(kept), total, True
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        total += len(chunk)
        if limit is None or len(kept) < limit:
            kept += chunk if limit is None else chunk[: limit - len(kept)]
    return bytes(kept), total, False


async def send_raw(send: Send, status: int, body: bytes, headers: Headers) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, data: Any, headers: Headers | None = None) -> None:
    body = json.dumps(data).encode()
    await send_raw(send, status, body, [(b"content-type", b"application/json"), *(headers or [])])


async def start_sse(send: Send, headers: Headers | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-cache"),
                *(headers or []),
            ],
        }
    )


async def send_event(send: Send, data: Any, event: str | None = None) -> None:
    prefix = f"event: {event}\n" if event else ""
    await send(
        {
            "type": "http.response.body",
            "body": f"{prefix}data: {json.dumps(data)}\n\n".encode(),
            "more_body": True,
        }
    )


async def end_body(send: Send) -> None:
    await send({"type": "http.response.body", "body": b""})


def header_map(scope: Scope) -> dict[str, str]:
    """First value of each request header, names lower-case."""
    out: dict[str, str] = {}
    for name, value in scope["headers"]:
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


def base_url(scope: Scope, configured: str | None) -> str:
    """The emulator's own origin, for URLs it hands out (files, uploads); ``""`` (paths on
    the client's origin) when configured as ``"/"``."""
    if configured:
        return configured.rstrip("/")
    host = header_map(scope).get("host")
    if host:
        return f"{'https' if fal_host(scope) else 'http'}://{host}"  # fal's names: TLS only
    server = scope.get("server") or ("127.0.0.1", 80)
    return f"http://{server[0]}:{server[1]}"
