"""``queue.fal.run``, emulated over HTTP: submit, status (polling, with logs, and SSE),
result and cancel, answered from the job model of :mod:`proxy.emulator.queue`."""

from __future__ import annotations

import gzip
import json
import re
import time
from typing import Any
from urllib.parse import parse_qsl

from .apps import InvalidInput, find_app, find_queue_app
from .asgi import Headers, end_body, send_event, send_json, send_raw, start_sse
from .context import BAD_JSON, Call, invalid_json_errors
from .fal_run import billable_units

_QUEUE_PATH = re.compile(
    r"/(?P<owner>.+?)/requests/(?P<id>[^/]+)(?P<action>/status/stream|/status|/cancel)?"
)


async def serve_queue(ctx: Call, method: str, path: str, query: str) -> None:
    """A request for ``https://queue.fal.run<path>?<query>``."""
    queue = ctx.state.queue
    match = _QUEUE_PATH.fullmatch(path)
    if match is None:
        await _submit(ctx, method, path)
        return
    job = queue.find(match["owner"], match["id"])
    if job is None:
        await _answer(ctx, 404, {"detail": "Request not found"}, ctx.headers)
        return
    action = match["action"] or ""
    with_logs = dict(parse_qsl(query)).get("logs") in ("1", "true")
    if action == "/status":
        await _answer(ctx, 200, job.status(time.monotonic(), with_logs), ctx.headers)
    elif action == "/status/stream":
        await start_sse(ctx.send, ctx.headers)
        last, logs_sent = None, 0
        while True:
            status = await queue.wait_for_change(job, last, with_logs)
            last = queue.status_key(job, with_logs)
            if with_logs:  # each event carries only the new lines: the SDK accumulates them
                logs = status["logs"]
                status["logs"], logs_sent = logs[logs_sent:], len(logs)
            await send_event(ctx.send, status)
            if status["status"] == "COMPLETED":
                break
        await end_body(ctx.send)
    elif action == "/cancel" and method == "PUT":
        if job.state(time.monotonic()) == "COMPLETED":
            await _answer(ctx, 400, {"status": "ALREADY_COMPLETED"}, ctx.headers)
        else:
            job.cancelled = True
            await _answer(ctx, 202, {"status": "CANCELLATION_REQUESTED"}, ctx.headers)
    elif not action and method in ("GET", "HEAD"):
        if job.cancelled:
            await _answer(ctx, 400, {"detail": "Request was cancelled"}, ctx.headers)
        elif job.state(time.monotonic()) != "COMPLETED":
            await _answer(ctx, 400, {"detail": "Request is still in progress"}, ctx.headers)
        else:
            result = await queue.result(job, ctx.state.files, ctx.base, ctx.state.config.seed)
            await _answer(
                ctx,
                200,
                result,
                [
                    (b"x-fal-request-id", job.request_id.encode()),
                    *ctx.headers[1:],
                    billable_units(result),
                ],
            )
    else:
        await _answer(ctx, 405, {"detail": "Method not allowed"}, ctx.headers)


async def _submit(ctx: Call, method: str, path: str) -> None:
    """``POST <app id>``: validate the input, queue a job, answer with its URLs."""
    found = find_app(path) if method == "POST" else None
    if found is None:
        queue_app = find_queue_app(path.strip("/")) if method == "POST" else None
        if queue_app is None:
            await _answer(
                ctx,
                404,
                {"detail": f"Application {path.strip('/')!r} not found"},
                ctx.headers,
            )
            return
        found = (queue_app[0], queue_app[1], "")
    app_id, app, _ = found
    data = ctx.json()
    try:
        if data is BAD_JSON:
            raise InvalidInput(invalid_json_errors())
        data = app.validate(data)
    except InvalidInput as exc:
        await _answer(ctx, 422, {"detail": exc.errors}, ctx.headers)
        return
    job = ctx.state.queue.submit(app_id, app, data)
    await _answer(
        ctx,
        200,
        {"request_id": job.request_id, "status": "IN_QUEUE", "queue_position": 0, **job.urls()},
        [(b"x-fal-request-id", job.request_id.encode()), *ctx.headers[1:]],
    )


async def _answer(ctx: Call, status: int, data: Any, headers: Headers | None = None) -> None:
    """A JSON answer; gzipped (``--gzip-queue``) when the request accepts gzip."""
    accepted = ",".join(v for k, v in ctx.record["headers"] if k.lower() == "accept-encoding")
    if ctx.state.config.gzip_queue and "gzip" in accepted.lower():
        body = gzip.compress(json.dumps(data).encode())
        compressed = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
        await send_raw(ctx.send, status, body, [*compressed, *(headers or [])])
    else:
        await send_json(ctx.send, status, data, headers)
