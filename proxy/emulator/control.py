"""The emulator's control paths, ``/_emulator/…`` (outside the gateway prefix): read back and
clear what it received, release gates, hold and release queue jobs, serve generated and
uploaded files, and take the bytes that signed upload URLs point at (the storage side no
proxy stands in front of)."""

from __future__ import annotations

import hashlib
import time

from starlette.types import Receive, Scope, Send

from .asgi import read_body, send_json, send_raw
from .context import EmulatorState


async def serve_control(
    state: EmulatorState, scope: Scope, path: str, receive: Receive, send: Send
) -> None:
    """``path`` is what follows ``/_emulator/``."""
    method, recorder = scope["method"], state.recorder
    if path == "requests" and method == "DELETE":
        recorder.clear()
        state.queue.reset()
        await send_json(send, 200, {"cleared": True})
    elif path == "requests":
        await send_json(send, 200, list(recorder.requests))
    elif path == "events":
        await send_json(send, 200, recorder.events)
    elif path.startswith("gates/") and method == "POST":
        recorder.gates[path[len("gates/") :]].set()
        await send_json(send, 200, {"released": path[len("gates/") :]})
    elif path == "queue/hold" and method in ("POST", "DELETE"):
        # Jobs submitted from now on are held (POST), or not (DELETE: held ones stay held).
        state.queue.holding = method == "POST"
        await send_json(send, 200, {"holding": state.queue.holding})
    elif path == "queue/release" and method == "POST":
        moved = state.queue.release()
        now = time.monotonic()
        await send_json(send, 200, {"released": {j.request_id: j.state(now) for j in moved}})
    elif path == "outage" and method in ("POST", "DELETE"):
        # The gateway's own failure, on demand: a Cloudflare 5xx page for every gateway call
        # (recorded, never reaching fal) until DELETE. ?status=503 picks the status.
        query = scope["query_string"].decode("latin-1").partition("status=")[2] or "502"
        if method == "POST" and not (query.isdigit() and 500 <= int(query) <= 599):
            await send_json(send, 400, {"detail": "status must be 500-599"})
            return
        state.outage = int(query) if method == "POST" else None
        await send_json(send, 200, {"outage": state.outage})
    elif path == "health":
        await send_json(send, 200, {"status": "ok"})
    elif path.startswith("files/") and method in ("GET", "HEAD"):
        item = state.files.items.get(path[len("files/") :])
        if item is None:
            await send_json(send, 404, {"detail": "File not found"})
        else:
            await send_raw(send, 200, item[1], [(b"content-type", item[0].encode())])
    elif path.startswith("uploads/"):
        await _upload(state, scope, path[len("uploads/") :], receive, send)
    else:
        await send_json(send, 404, {"detail": "unknown emulator control path"})


async def _upload(
    state: EmulatorState, scope: Scope, rest: str, receive: Receive, send: Send
) -> None:
    """The signed-URL side of storage: the client PUTs bytes here directly, not via a proxy."""
    body, size, digest, gone = await read_and_digest_full(receive)
    if gone:
        return
    state.recorder.record(scope, body[: 64 * 1024], size, digest, kind="upload")
    token, _, part = rest.partition("/")
    method, storage = scope["method"], state.storage
    if not part and method == "PUT" and storage.put(token, body):
        await send_json(send, 200, {"ok": True})
    elif (
        part.isdigit() and method == "PUT" and (answer := storage.put_part(token, int(part), body))
    ):
        await send_json(send, 200, answer)
    elif part == "complete" and method == "POST" and storage.complete(token, body):
        await send_json(send, 200, {"ok": True})
    else:
        await send_json(send, 404, {"detail": "unknown or used upload URL"})


async def read_and_digest_full(receive: Receive) -> tuple[bytes, int, str, bool]:
    """Uploads are kept whole (they become files)."""
    body, size, gone = await read_body(receive)
    return body, size, hashlib.sha256(body).hexdigest(), gone
