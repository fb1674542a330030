"""``rest.fal.ai``, emulated: storage upload initiation (single and multipart; the bytes then
go to ``/_emulator/uploads/…``, see :mod:`proxy.emulator.control`) and ``/tokens/``, the
short-lived realtime tokens; both kept by :mod:`proxy.emulator.storage`."""

from __future__ import annotations

from .apps import field_error
from .asgi import send_json
from .context import Call


async def serve_rest(ctx: Call, path: str) -> None:
    """A request for ``https://rest.fal.ai<path>``."""
    storage = ctx.state.storage
    if path == "/storage/upload/initiate":
        answer = storage.initiate(ctx.body, ctx.base, multipart=False)
        await send_json(ctx.send, 200, answer, ctx.headers)
    elif path == "/storage/upload/initiate-multipart":
        answer = storage.initiate(ctx.body, ctx.base, multipart=True)
        await send_json(ctx.send, 200, answer, ctx.headers)
    elif path == "/tokens/":
        await _issue_token(ctx)
    else:
        await send_json(ctx.send, 404, {"detail": "Not Found"}, ctx.headers)


async def _issue_token(ctx: Call) -> None:
    """``POST /tokens/``: a token for ``allowed_apps``, living ``token_expiration`` seconds
    (capped by ``EmulatorConfig.token_lifetime``)."""
    data = ctx.json()
    apps = data.get("allowed_apps") if isinstance(data, dict) else None
    if not isinstance(apps, list) or not all(isinstance(a, str) for a in apps):
        error = field_error("allowed_apps", "field required", "value_error.missing")
        await send_json(ctx.send, 422, {"detail": [error]}, ctx.headers)
        return
    expiration = data.get("token_expiration", 120)
    if not isinstance(expiration, (int, float)) or isinstance(expiration, bool):
        error = field_error("token_expiration", "must be a number of seconds", "type_error.number")
        await send_json(ctx.send, 422, {"detail": [error]}, ctx.headers)
        return
    lifetime = min(float(expiration), ctx.state.config.token_lifetime)
    await send_json(ctx.send, 201, ctx.state.storage.issue_token(apps, lifetime), ctx.headers)
