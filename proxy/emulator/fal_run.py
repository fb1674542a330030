"""``fal.run``, emulated: sync runs of the catalogue's apps (:mod:`proxy.emulator.apps`;
POST with a JSON body, or GET with the input in the query), their ``/stream`` SSE, fal's
404 and 422 answers, and the fault-injection apps (:mod:`proxy.emulator.faults`)."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import parse_qsl

from .apps import App, InvalidInput, find_app
from .asgi import end_body, send_event, send_json, start_sse
from .context import BAD_JSON, Call, invalid_json_errors
from .faults import serve_fault


async def serve_run(ctx: Call, method: str, path: str, query: str) -> None:
    """A request for ``https://fal.run<path>?<query>``."""
    state = ctx.state
    args = dict(parse_qsl(query, keep_blank_values=True))
    is_fault = path.startswith("/emulator/") and not path.startswith("/emulator/echo")
    if is_fault and await serve_fault(
        path[len("/emulator/") :],
        args,
        ctx.record,
        state.recorder,
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
    data = query_input(args) if method in ("GET", "HEAD") else ctx.json()
    if data is BAD_JSON:
        await send_json(ctx.send, 422, {"detail": invalid_json_errors()}, ctx.headers)
        return
    try:
        data = app.validate(data)
    except InvalidInput as exc:
        await send_json(ctx.send, 422, {"detail": exc.errors}, ctx.headers)
        return
    if rest == "/stream":
        await _stream(ctx, app, data)
    elif rest:
        await send_json(ctx.send, 404, {"detail": f"{app_id} has no path {rest!r}"}, ctx.headers)
    else:
        result = await app.run(data, state.files, ctx.base, state.config.seed)
        await send_json(ctx.send, 200, result, [*ctx.headers, billable_units(result)])


def billable_units(result: Any) -> tuple[bytes, bytes]:
    """fal's ``x-fal-billable-units`` on a result: here one unit per image (or one)."""
    images = result.get("images") if isinstance(result, dict) else None
    units = len(images) if isinstance(images, list) and images else 1
    return (b"x-fal-billable-units", str(units).encode())


async def _stream(ctx: Call, app: App, data: Any) -> None:
    """``<app>/stream``: an SSE progress event per log line, then the result."""
    config = ctx.state.config
    lines = app.log_lines(data)
    gap = app.duration * config.time_scale / max(1, len(lines))
    await start_sse(ctx.send, ctx.headers)
    for step, line in enumerate(lines, 1):
        await asyncio.sleep(gap)
        await send_event(
            ctx.send,
            {"status": "IN_PROGRESS", "step": step, "steps": len(lines), "message": line},
        )
    await send_event(ctx.send, await app.run(data, ctx.state.files, ctx.base, config.seed))
    await end_body(ctx.send)


def query_input(args: dict[str, str]) -> dict[str, Any]:
    """GET runs carry their input in the query: ``?prompt=cat&num_images=2``."""
    out: dict[str, Any] = {}
    for key, value in args.items():
        try:
            out[key] = json.loads(value) if value[:1] in "-0123456789[{tfn" and value else value
        except ValueError:
            out[key] = value
    return out
