"""The emulator's ASGI app: Cloudflare AI Gateway's ``/v1/{account}/{gateway}/fal`` in front
of an emulated fal, plus read-only control paths under ``/_emulator/``.

Request flow: record → gateway checks (``cf-aig-authorization``, the fal key) → resolve
the fal URL (path mode, or ``x-fal-target-url`` on the bare ``/fal`` URL) → the fal host's
behaviour (``fal.run`` sync runs and streams, ``queue.fal.run``, ``rest.fal.ai``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from starlette.types import Receive, Scope, Send

from .apps import CATALOGUE, Files, InvalidInput, find_app, find_queue_app
from .asgi import (
    base_url,
    end_body,
    header_map,
    read_body,
    send_event,
    send_json,
    send_raw,
    start_sse,
)
from .config import EmulatorConfig
from .faults import serve_fault
from .queue import Queue
from .realtime import serve_realtime
from .recorder import Recorder, read_and_digest
from .storage import Storage

GATEWAY_PATH = re.compile(r"/v1/([^/]+)/([^/]+)/fal(/.*)?")
# Cloudflare's answer when an authenticated gateway gets no or a wrong cf-aig-authorization.
GATEWAY_401 = {
    "success": False,
    "result": [],
    "messages": [],
    "error": [{"code": 2009, "message": "Unauthorized"}],
}
TARGET_HOSTS = ("fal.run", "queue.fal.run", "rest.fal.ai")
_QUEUE_PATH = re.compile(
    r"/(?P<owner>.+?)/requests/(?P<id>[^/]+)(?P<action>/status/stream|/status|/cancel)?"
)


class Emulator:
    """Create with :func:`proxy.emulator.create_emulator`."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.recorder = Recorder(config.record_limit)
        self.files = Files()
        self.queue = Queue(config.seed + 2, config.time_scale)
        self.storage = Storage(self.files, random.Random(config.seed + 1))

    def _id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        gateway = GATEWAY_PATH.fullmatch(path)
        if scope["type"] == "websocket":
            if gateway:
                await serve_realtime(self, scope, receive, send, gateway.group(3) or "")
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        if path.startswith("/_emulator/"):
            await self._control(scope, path[len("/_emulator/") :], receive, send)
        elif gateway:
            await self._gateway(scope, gateway.group(3) or "", receive, send)
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

    # --- control paths -------------------------------------------------------------------

    async def _control(self, scope: Scope, path: str, receive: Receive, send: Send) -> None:
        method, recorder = scope["method"], self.recorder
        if path == "requests" and method == "DELETE":
            recorder.clear()
            await send_json(send, 200, {"cleared": True})
        elif path == "requests":
            await send_json(send, 200, list(recorder.requests))
        elif path == "events":
            await send_json(send, 200, recorder.events)
        elif path.startswith("gates/") and method == "POST":
            recorder.gates[path[len("gates/") :]].set()
            await send_json(send, 200, {"released": path[len("gates/") :]})
        elif path == "health":
            await send_json(send, 200, {"status": "ok"})
        elif path.startswith("files/") and method in ("GET", "HEAD"):
            item = self.files.items.get(path[len("files/") :])
            if item is None:
                await send_json(send, 404, {"detail": "File not found"})
            else:
                await send_raw(send, 200, item[1], [(b"content-type", item[0].encode())])
        elif path.startswith("uploads/"):
            await self._upload(scope, path[len("uploads/") :], receive, send)
        else:
            await send_json(send, 404, {"detail": "unknown emulator control path"})

    async def _upload(self, scope: Scope, rest: str, receive: Receive, send: Send) -> None:
        """The signed-URL side of storage: the client PUTs bytes here directly, not via a proxy."""
        body, size, digest, gone = await read_and_digest_full(receive)
        if gone:
            return
        self.recorder.record(scope, body[: 64 * 1024], size, digest, kind="upload")
        token, _, part = rest.partition("/")
        method = scope["method"]
        if not part and method == "PUT" and self.storage.put(token, body):
            await send_json(send, 200, {"ok": True})
        elif (
            part.isdigit()
            and method == "PUT"
            and (answer := self.storage.put_part(token, int(part), body))
        ):
            await send_json(send, 200, answer)
        elif part == "complete" and method == "POST" and self.storage.complete(token, body):
            await send_json(send, 200, {"ok": True})
        else:
            await send_json(send, 404, {"detail": "unknown or used upload URL"})

    # --- the gateway ---------------------------------------------------------------------

    async def _gateway(self, scope: Scope, fal_path: str, receive: Receive, send: Send) -> None:
        if fal_path.startswith("/emulator/noread"):
            # Never read the body (calling receive() would): the sender's buffers fill up.
            await self.recorder.gates["noread"].wait()
            return
        headers = header_map(scope)
        target = headers.get("x-fal-target-url")
        body, size, digest, gone = await read_and_digest(receive)
        if gone:
            return
        record = self.recorder.record(scope, body, size, digest, kind="gateway", target_url=target)
        # The gateway's headers are on every answer; fal's request id only once fal is reached
        # (the gateway's own refusals, 2009 and a bad target, never got that far).
        request_id = self._id()
        gateway_headers = [
            (b"cf-aig-log-id", f"01{self.rng.getrandbits(100):025X}".encode()),
            (b"cf-aig-cache-status", b"MISS"),
        ]
        common = [(b"x-fal-request-id", request_id.encode()), *gateway_headers]
        cf_token = self.config.cf_token
        if cf_token is not None and headers.get("cf-aig-authorization") != f"Bearer {cf_token}":
            await send_json(send, 401, GATEWAY_401, gateway_headers)
            return
        auth = headers.get("authorization", "")
        if (
            not auth.startswith("Key ")
            or len(auth) <= 4
            or (self.config.fal_key is not None and auth != f"Key {self.config.fal_key}")
        ):
            await send_json(send, 401, {"detail": "Invalid Key authorization header"}, common)
            return
        if target is not None:
            if fal_path not in ("", "/"):
                await send_json(
                    send,
                    400,
                    {"detail": "x-fal-target-url goes with the bare /fal URL"},
                    gateway_headers,
                )
                return
            parts = urlsplit(target)
            if parts.scheme != "https" or parts.hostname not in TARGET_HOSTS or parts.port:
                await send_json(
                    send, 400, {"detail": "x-fal-target-url must be a fal URL"}, gateway_headers
                )
                return
            host, path, query = parts.hostname, parts.path or "/", parts.query
        else:
            host, path, query = "fal.run", fal_path or "/", scope["query_string"].decode("latin-1")
        ctx = Call(self, scope, receive, send, common, request_id, record, body)
        if host == "queue.fal.run":
            await self._queue(ctx, scope["method"], path, query)
        elif host == "rest.fal.ai":
            await self._rest(ctx, path)
        else:
            await self._run(ctx, scope["method"], path, query)

    # --- fal.run -------------------------------------------------------------------------

    async def _run(self, ctx: Call, method: str, path: str, query: str) -> None:
        args = dict(parse_qsl(query, keep_blank_values=True))
        is_fault = path.startswith("/emulator/") and not path.startswith("/emulator/echo")
        if is_fault and await serve_fault(
            path[len("/emulator/") :],
            args,
            ctx.record,
            self.recorder,
            ctx.receive,
            ctx.send,
            ctx.headers,
            ctx.request_id,
        ):
            return
        found = find_app(path)
        if found is None:
            await send_json(
                ctx.send, 404, {"detail": f"Application {path.strip('/')!r} not found"}, ctx.headers
            )
            return
        app_id, app, rest = found
        data = query_input(args) if method in ("GET", "HEAD") else parse_json(ctx.body)
        if data is _BAD_JSON:
            await send_json(
                ctx.send,
                422,
                {
                    "detail": [
                        {"loc": ["body"], "msg": "invalid JSON", "type": "value_error.jsondecode"}
                    ]
                },
                ctx.headers,
            )
            return
        try:
            data = app.validate(data)
        except InvalidInput as exc:
            await send_json(ctx.send, 422, {"detail": exc.errors}, ctx.headers)
            return
        if rest == "/stream":
            await self._stream(ctx, app, data)
        elif rest:
            await send_json(
                ctx.send, 404, {"detail": f"{app_id} has no path {rest!r}"}, ctx.headers
            )
        else:
            result = await app.run(data, self.files, ctx.base, self.config.seed)
            await send_json(ctx.send, 200, result, ctx.headers)

    async def _stream(self, ctx: Call, app: Any, data: Any) -> None:
        lines = app.log_lines(data)
        gap = app.duration * self.config.time_scale / max(1, len(lines))
        await start_sse(ctx.send, ctx.headers)
        for step, line in enumerate(lines, 1):
            await asyncio.sleep(gap)
            await send_event(
                ctx.send,
                {"status": "IN_PROGRESS", "step": step, "steps": len(lines), "message": line},
            )
        await send_event(ctx.send, await app.run(data, self.files, ctx.base, self.config.seed))
        await end_body(ctx.send)

    # --- queue.fal.run -------------------------------------------------------------------

    async def _queue(self, ctx: Call, method: str, path: str, query: str) -> None:
        match = _QUEUE_PATH.fullmatch(path)
        if match is None:
            await self._submit(ctx, method, path)
            return
        job = self.queue.find(match["owner"], match["id"])
        if job is None:
            await send_json(ctx.send, 404, {"detail": "Request not found"}, ctx.headers)
            return
        action = match["action"] or ""
        with_logs = dict(parse_qsl(query)).get("logs") in ("1", "true")
        if action == "/status":
            await send_json(ctx.send, 200, job.status(time.monotonic(), with_logs), ctx.headers)
        elif action == "/status/stream":
            await start_sse(ctx.send, ctx.headers)
            last, logs_sent = None, 0
            while True:
                status = await self.queue.wait_for_change(job, last, with_logs)
                last = self.queue.status_key(job, with_logs)
                if with_logs:  # each event carries only the new lines: the SDK accumulates them
                    logs = status["logs"]
                    status["logs"], logs_sent = logs[logs_sent:], len(logs)
                await send_event(ctx.send, status)
                if status["status"] == "COMPLETED":
                    break
            await end_body(ctx.send)
        elif action == "/cancel" and method == "PUT":
            if job.state(time.monotonic()) == "COMPLETED":
                await send_json(ctx.send, 400, {"status": "ALREADY_COMPLETED"}, ctx.headers)
            else:
                job.cancelled = True
                await send_json(ctx.send, 202, {"status": "CANCELLATION_REQUESTED"}, ctx.headers)
        elif not action and method in ("GET", "HEAD"):
            if job.cancelled:
                await send_json(ctx.send, 400, {"detail": "Request was cancelled"}, ctx.headers)
            elif job.state(time.monotonic()) != "COMPLETED":
                await send_json(
                    ctx.send, 400, {"detail": "Request is still in progress"}, ctx.headers
                )
            else:
                result = await self.queue.result(job, self.files, ctx.base, self.config.seed)
                await send_json(
                    ctx.send,
                    200,
                    result,
                    [(b"x-fal-request-id", job.request_id.encode()), *ctx.headers[1:]],
                )
        else:
            await send_json(ctx.send, 405, {"detail": "Method not allowed"}, ctx.headers)

    async def _submit(self, ctx: Call, method: str, path: str) -> None:
        found = find_app(path) if method == "POST" else None
        if found is None:
            queue_app = find_queue_app(path.strip("/")) if method == "POST" else None
            if queue_app is None:
                await send_json(
                    ctx.send,
                    404,
                    {"detail": f"Application {path.strip('/')!r} not found"},
                    ctx.headers,
                )
                return
            found = (queue_app[0], queue_app[1], "")
        app_id, app, _ = found
        data = parse_json(ctx.body)
        try:
            if data is _BAD_JSON:
                raise InvalidInput(
                    [{"loc": ["body"], "msg": "invalid JSON", "type": "value_error.jsondecode"}]
                )
            data = app.validate(data)
        except InvalidInput as exc:
            await send_json(ctx.send, 422, {"detail": exc.errors}, ctx.headers)
            return
        job = self.queue.submit(app_id, app, data)
        await send_json(
            ctx.send,
            200,
            {"request_id": job.request_id, "status": "IN_QUEUE", "queue_position": 0, **job.urls()},
            [(b"x-fal-request-id", job.request_id.encode()), *ctx.headers[1:]],
        )

    # --- rest.fal.ai ---------------------------------------------------------------------

    async def _rest(self, ctx: Call, path: str) -> None:
        if path == "/storage/upload/initiate":
            await send_json(
                ctx.send,
                200,
                self.storage.initiate(ctx.body, ctx.base, multipart=False),
                ctx.headers,
            )
        elif path == "/storage/upload/initiate-multipart":
            await send_json(
                ctx.send,
                200,
                self.storage.initiate(ctx.body, ctx.base, multipart=True),
                ctx.headers,
            )
        elif path == "/tokens/":
            data = parse_json(ctx.body)
            apps = data.get("allowed_apps") if isinstance(data, dict) else None
            if not isinstance(apps, list) or not all(isinstance(a, str) for a in apps):
                await send_json(
                    ctx.send,
                    422,
                    {
                        "detail": [
                            {
                                "loc": ["body", "allowed_apps"],
                                "msg": "field required",
                                "type": "value_error.missing",
                            }
                        ]
                    },
                    ctx.headers,
                )
                return
            expiration = data.get("token_expiration", 120)
            if not isinstance(expiration, (int, float)) or isinstance(expiration, bool):
                await send_json(
                    ctx.send,
                    422,
                    {
                        "detail": [
                            {
                                "loc": ["body", "token_expiration"],
                                "msg": "must be a number of seconds",
                                "type": "type_error.number",
                            }
                        ]
                    },
                    ctx.headers,
                )
                return
            lifetime = min(float(expiration), self.config.token_lifetime)
            await send_json(ctx.send, 201, self.storage.issue_token(apps, lifetime), ctx.headers)
        else:
            await send_json(ctx.send, 404, {"detail": "Not Found"}, ctx.headers)


class Call:
    """One gateway request's context, handed to the fal host behaviours."""

    __slots__ = ("base", "body", "headers", "receive", "record", "request_id", "send")

    def __init__(
        self,
        emulator: Emulator,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: list[tuple[bytes, bytes]],
        request_id: str,
        record: dict[str, Any],
        body: bytes,
    ) -> None:
        self.receive, self.send, self.headers = receive, send, headers
        self.request_id, self.record, self.body = request_id, record, body
        self.base = base_url(scope, emulator.config.public_url)


_BAD_JSON = object()


def parse_json(body: bytes) -> Any:
    if not body:
        return {}
    try:
        return json.loads(body)
    except ValueError:
        return _BAD_JSON


def query_input(args: dict[str, str]) -> dict[str, Any]:
    """GET runs carry their input in the query: ``?prompt=cat&num_images=2``."""
    out: dict[str, Any] = {}
    for key, value in args.items():
        try:
            out[key] = json.loads(value) if value[:1] in "-0123456789[{tfn" and value else value
        except ValueError:
            out[key] = value
    return out


async def read_and_digest_full(receive: Receive) -> tuple[bytes, int, str, bool]:
    """Uploads are kept whole (they become files)."""
    body, size, gone = await read_body(receive)
    return body, size, hashlib.sha256(body).hexdigest(), gone
