"""What the emulator received, kept for tests and users to read back.

Records are plain JSON-able dicts; ``GET /_emulator/requests`` returns them oldest first.
Gates let a test pause a behaviour until it says go (``POST /_emulator/gates/<name>``),
so streaming can be proven without sleeps; events note what happened out of band (a
client that went away while a behaviour waited).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections import defaultdict, deque
from typing import Any

from starlette.types import Receive, Scope

KEEP_BODY = 64 * 1024  # bytes of each body kept verbatim; the digest covers all of it


class Recorder:
    def __init__(self, limit: int) -> None:
        self.requests: deque[dict[str, Any]] = deque(maxlen=limit)
        self.events: list[str] = []
        self.gates: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.calls: dict[str, int] = defaultdict(int)  # per-path call counters (flaky apps)

    def record(
        self,
        scope: Scope,
        body_head: bytes,
        body_len: int,
        digest: str,
        *,
        kind: str,
        target_url: str | None = None,
    ) -> dict[str, Any]:
        record = {
            "kind": kind,
            "time": time.time(),
            "method": scope.get(
                "method", "GET"
            ),  # a WebSocket scope has none: its handshake is a GET
            "path": (scope.get("raw_path") or scope["path"].encode()).decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "body_b64": base64.b64encode(body_head).decode(),
            "body_len": body_len,
            "body_sha256": digest,
            "target_url": target_url,
        }
        self.requests.append(record)
        return record

    def clear(self) -> None:
        self.requests.clear()
        self.events.clear()
        self.gates.clear()
        self.calls.clear()


async def read_and_digest(receive: Receive) -> tuple[bytes, int, str, bool]:
    """Read a request body as it streams in: (head, length, sha256, disconnected)."""
    digest, head, size, more = hashlib.sha256(), bytearray(), 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return bytes(head), size, digest.hexdigest(), True
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        digest.update(chunk)
        size += len(chunk)
        if len(head) < KEEP_BODY:
            head += chunk[: KEEP_BODY - len(head)]
    return bytes(head), size, digest.hexdigest(), False
