"""A fake Cloudflare AI Gateway in front of a fake fal, for end-to-end tests.

Run it as a process (``python -m tests.fakes.gateway --port 0``); it prints one JSON
line ``{"event": "listening", "port": N}``. It records every request it receives
under the gateway prefix (method, raw path, query, headers, body digest) and serves
them read-only at ``GET /_fake/requests``, outside the prefix.

Behaviour is chosen by the fal path: the path after the prefix (path mode) or the
path of ``x-fal-target-url`` (target mode). See ``_fal`` for the list. Pauses are
gates released by the test (``POST /_fake/release/<name>``), never sleeps, so a test
can prove that an SSE event arrived *before* the next one was even produced.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import hashlib
import json
import sys
from collections import defaultdict
from typing import Any
from urllib.parse import parse_qs, urlsplit

import uvicorn

KEEP_BODY = 64 * 1024
GATEWAY_2009 = {
    "success": False,
    "result": [],
    "messages": [],
    "error": [{"code": 2009, "message": "Unauthorized"}],
}


class FakeGateway:
    def __init__(self, prefix: str, key: str, cf_token: str | None) -> None:
        self.prefix = prefix.rstrip("/")
        self.key = key
        self.cf_token = cf_token
        self.requests: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.gates: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.counter = 0
        self.hits: dict[str, int] = defaultdict(int)  # per fal path, for stateful behaviours

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        if path.startswith("/_fake/"):
            await self._control(scope, path, receive, send)
        elif path == self.prefix or path.startswith(self.prefix + "/"):
            await self._gateway(scope, path[len(self.prefix):], receive, send)
        else:
            await _json(send, 404, {"detail": "not the gateway prefix"})

    async def _control(self, scope: dict[str, Any], path: str, receive: Any, send: Any) -> None:
        if path == "/_fake/requests" and scope["method"] == "DELETE":
            self.requests.clear()
            self.events.clear()
            self.hits.clear()
            await _json(send, 200, {})
        elif path == "/_fake/requests":
            await _json(send, 200, self.requests)
        elif path == "/_fake/events":
            await _json(send, 200, self.events)
        elif path.startswith("/_fake/release/"):
            self.gates[path.rsplit("/", 1)[1]].set()
            await _json(send, 200, {})
        else:
            await _json(send, 404, {})

    async def _gateway(self, scope: dict[str, Any], fal_path: str, receive: Any, send: Any) -> None:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        hmap = {k: v for k, v in headers}
        if fal_path.startswith("/fal-ai/noread"):
            # Never read the body: the sender's socket buffers fill up and it stalls.
            # (Waiting for a disconnect would mean calling receive(), which reads the body.)
            await self.gates["noread"].wait()
            return
        digest, kept, size, more = hashlib.sha256(), bytearray(), 0, True
        while more:  # read (and hash) the body as it streams in, keeping only its head
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            digest.update(chunk)
            size += len(chunk)
            if len(kept) < KEEP_BODY:
                kept += chunk[: KEEP_BODY - len(kept)]
        target = hmap.get("x-fal-target-url")
        record = {
            "method": scope["method"],
            "path": scope["raw_path"].decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": headers,
            "body_b64": base64.b64encode(bytes(kept)).decode(),
            "body_len": size,
            "body_sha256": digest.hexdigest(),
            "target_url": target,
        }
        self.requests.append(record)
        if self.cf_token is not None and hmap.get("cf-aig-authorization") != f"Bearer {self.cf_token}":
            await _json(send, 401, GATEWAY_2009)
            return
        if hmap.get("authorization") != f"Key {self.key}":
            await _json(send, 401, {"detail": "Invalid fal key"})
            return
        if target is not None:
            if fal_path not in ("", "/"):
                await _json(send, 400, {"detail": "x-fal-target-url needs the bare /fal URL"})
                return
            parts = urlsplit(target)
            host, path, query = parts.hostname, parts.path, parts.query
        else:
            host, path, query = "fal.run", fal_path, scope["query_string"].decode("latin-1")
        await self._fal(host or "", path, query, scope, bytes(kept), record, receive, send)

    async def _fal(self, host: str, path: str, query: str, scope: dict[str, Any], body: bytes,
                   record: dict[str, Any], receive: Any, send: Any) -> None:
        method = scope["method"]
        args = {k: v[0] for k, v in parse_qs(query).items()}
        self.counter += 1
        rid = f"req-{self.counter}"
        fal_headers = [(b"x-fal-request-id", rid.encode()), (b"cf-aig-log-id", b"log-" + rid.encode())]
        if host == "queue.fal.run":
            await self._queue(path, method, send, fal_headers)
        elif host == "rest.fal.ai" and path == "/tokens/":
            await _json(send, 201, "token-abc", fal_headers)
        elif host == "rest.fal.ai":
            await _json(send, 200, {"upload_url": "https://upload.example/u", "file_url": "https://v3.fal.media/f"}, fal_headers)
        elif path.startswith("/fal-ai/sse"):
            await self._sse(args, rid, receive, send, fal_headers)
        elif path.startswith("/fal-ai/bytes"):
            await self._bytes(int(args.get("size", "0")), send, fal_headers)
        elif path.startswith("/fal-ai/sink"):
            await _json(send, 200, {"len": record["body_len"], "sha256": record["body_sha256"]}, fal_headers)
        elif path.startswith("/fal-ai/status/"):
            code = int(path.rsplit("/", 1)[1])
            detail: Any = [{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}] if code == 422 else "boom"
            await _json(send, code, {"detail": detail}, fal_headers + [(b"x-fal-request-timeout-type", b"user")] if code == 504 else fal_headers)
        elif path.startswith("/fal-ai/flaky"):  # 503 for the first ?fail=N calls, then echo-like 200
            self.hits[path] += 1
            attempt = self.hits[path]
            if attempt <= int(args.get("fail", "2")):
                await _json(send, 503, {"detail": "try again"}, fal_headers)
            else:
                await _json(send, 200, {"attempt": attempt}, fal_headers)
        elif path.startswith("/fal-ai/text404"):
            await _raw(send, 404, b"no such app", [(b"content-type", b"text/plain")] + fal_headers)
        elif path.startswith("/fal-ai/gzip"):
            data = gzip.compress(json.dumps({"compressed": True, "pad": "x" * 2000}).encode())
            await _raw(send, 200, data, [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")] + fal_headers)
        elif path.startswith("/fal-ai/cookie"):
            cookie = dict(scope["headers"]).get(b"cookie", b"").decode()
            await _json(send, 200, {"cookie_seen": cookie}, fal_headers + [(b"set-cookie", b"session=secret-from-upstream; Path=/")])
        elif path.startswith("/fal-ai/hop"):
            extra = [(b"connection", b"x-custom-hop"), (b"x-custom-hop", b"1"), (b"keep-alive", b"timeout=5"),
                     (b"alt-svc", b'h3=":443"'), (b"x-end-to-end", b"kept")]
            await _json(send, 200, {"ok": True}, fal_headers + extra)
        elif path.startswith("/fal-ai/notmodified"):
            # A 304 may announce the length of the body it stands for (RFC 9110 §8.6).
            await send({"type": "http.response.start", "status": 304,
                        "headers": [(b"content-length", b"1234"), (b"etag", b'"v1"')] + fal_headers})
            await send({"type": "http.response.body", "body": b""})
        elif path.startswith("/fal-ai/die"):
            # Promise 1000 bytes, send 10, then drop the connection.
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/octet-stream"), (b"content-length", b"1000")] + fal_headers})
            await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
            raise RuntimeError("fake upstream dies mid-body (expected in tests)")
        elif path.startswith("/fal-ai/hang"):
            await self._until_released_or_gone("hang", receive, rid)
        elif path.startswith("/fal-ai/stall"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")] + fal_headers})
            await send({"type": "http.response.body", "body": b'data: {"n": 1}\n\n', "more_body": True})
            await self._until_released_or_gone("stall", receive, rid)
            await send({"type": "http.response.body", "body": b""})
        else:  # echo
            await _json(send, 200, {"method": method, "host": host, "path": path, "query": query,
                                    "body": body.decode("utf-8", "replace")}, fal_headers)

    async def _until_released_or_gone(self, gate: str, receive: Any, rid: str) -> None:
        release = asyncio.ensure_future(self.gates[gate].wait())
        gone = asyncio.ensure_future(receive())
        done, pending = await asyncio.wait({release, gone}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if gone in done:
            self.events.append(f"disconnected:{gate}:{rid}")

    async def _queue(self, path: str, method: str, send: Any, fal_headers: list[tuple[bytes, bytes]]) -> None:
        base = "https://queue.fal.run"
        if "/requests/" not in path:
            app = path.strip("/")
            rid = "req-queue-1"
            await _json(send, 200, {
                "request_id": rid, "status": "IN_QUEUE", "queue_position": 0,
                "status_url": f"{base}/{app}/requests/{rid}/status",
                "response_url": f"{base}/{app}/requests/{rid}",
                "cancel_url": f"{base}/{app}/requests/{rid}/cancel"}, fal_headers)
        elif path.endswith("/status/stream"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")] + fal_headers})
            for status in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED"):
                event = json.dumps({"status": status, "request_id": "req-queue-1"})
                await send({"type": "http.response.body", "body": f"data: {event}\n\n".encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        elif path.endswith("/status") and path.startswith("/fal-ai/progress/"):
            # IN_QUEUE, IN_PROGRESS, then COMPLETED from the third poll on (per status path).
            self.hits[path] += 1
            status = ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")[min(self.hits[path], 3) - 1]
            extra = {"queue_position": 0} if status == "IN_QUEUE" else {}
            await _json(send, 200, {"status": status, "request_id": "req-queue-1", "logs": [], **extra}, fal_headers)
        elif path.endswith("/status"):
            await _json(send, 200, {"status": "COMPLETED", "request_id": "req-queue-1", "logs": []}, fal_headers)
        elif path.endswith("/cancel") and method == "PUT":
            await _json(send, 202, {"status": "CANCELLATION_REQUESTED"}, fal_headers)
        else:
            await _json(send, 200, {"images": [{"url": "https://v3.fal.media/cat.png"}]}, fal_headers)

    async def _sse(self, args: dict[str, str], rid: str, receive: Any, send: Any,
                   fal_headers: list[tuple[bytes, bytes]]) -> None:
        count = int(args.get("n", "3"))
        gated = args.get("gated", "1") == "1"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")] + fal_headers})
        for i in range(1, count + 1):
            if gated and i > 1:
                await self.gates[f"sse-{i}"].wait()
            name = "event: done\n" if i == count else ""
            await send({"type": "http.response.body", "body": f'{name}data: {{"n": {i}}}\n\n'.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _bytes(self, size: int, send: Any, fal_headers: list[tuple[bytes, bytes]]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/octet-stream"), (b"content-length", str(size).encode())] + fal_headers})
        block = pattern_block()
        sent = 0
        while sent < size:
            chunk = block[: min(len(block), size - sent)]
            sent += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": sent < size})
        if size == 0:
            await send({"type": "http.response.body", "body": b""})


def pattern_block() -> bytes:
    """256 KiB of a deterministic pattern; the download body is this block repeated."""
    return bytes(range(256)) * 1024


async def _raw(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Any, status: int, data: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _raw(send, status, json.dumps(data).encode(), [(b"content-type", b"application/json")] + (headers or []))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--prefix", default="/v1/acct/gw/fal")
    parser.add_argument("--key", default="test-fal-key")
    parser.add_argument("--cf-token", default=None)
    args = parser.parse_args()
    app = FakeGateway(args.prefix, args.key, args.cf_token)

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            port = self.servers[0].sockets[0].getsockname()[1]
            print(json.dumps({"event": "listening", "port": port}), flush=True)

    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning",
                            lifespan="on", http="httptools", loop="uvloop")
    Server(config).run()


if __name__ == "__main__":
    sys.exit(main())
