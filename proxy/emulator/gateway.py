"""The emulated Cloudflare AI Gateway, ``/v1/{account}/{gateway}/fal`` over HTTP: record the
request, check its credentials (:mod:`proxy.emulator.credentials`), resolve the fal URL
(path mode, or ``x-fal-target-url`` on the bare ``/fal`` URL) and hand the request to that
fal host: ``fal.run`` (:mod:`proxy.emulator.fal_run`), ``queue.fal.run``
(:mod:`proxy.emulator.fal_queue`), ``rest.fal.ai`` (:mod:`proxy.emulator.fal_rest`) or
``wma.fal.run`` (:mod:`proxy.emulator.wma`).

Every answer carries the gateway's ``cf-aig-log-id`` and ``cf-aig-cache-status``; fal's
``x-fal-request-id`` only once fal is reached (the gateway's own refusals, 2009 and a bad
target, never got that far).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from starlette.types import Receive, Scope, Send

from .asgi import header_map, send_json, send_raw
from .context import Call, EmulatorState
from .credentials import Refusal, check_credentials, fal_only
from .fal_names import FAL_HOSTS
from .fal_platform import serve_platform
from .fal_queue import serve_queue
from .fal_rest import serve_rest
from .fal_run import serve_run
from .recorder import read_and_digest
from .wma import serve_wma

GATEWAY_PATH = re.compile(r"/v1/([^/]+)/([^/]+)/fal(/.*)?")
# Cloudflare's answer when an authenticated gateway gets no or a wrong cf-aig-authorization.
GATEWAY_401 = {
    "success": False,
    "result": [],
    "messages": [],
    "error": [{"code": 2009, "message": "Unauthorized"}],
}
# Not api.fal.ai: the platform API is reached directly by an operator, never through the gateway.
TARGET_HOSTS = tuple(host for host in FAL_HOSTS if host != "api.fal.ai")
DIRECT_PATH = re.compile(
    r"/_fal/(fal\.run|queue\.fal\.run|rest\.fal\.ai|wma\.fal\.run|api\.fal\.ai)(/.*)?"
)
# What Cloudflare serves when it, not the origin, fails: HTML, and no fal request id.
CLOUDFLARE_PAGE = (
    b"<!DOCTYPE html><html><head><title>%d | gateway.ai.cloudflare.com | Cloudflare</title>"
    b"</head><body><h1>Error</h1><p>Cloudflare encountered an error.</p></body></html>"
)


def gateway_error(message: str) -> dict[str, object]:
    """A refusal of the gateway's own, in Cloudflare's envelope (as GATEWAY_401)."""
    return {"success": False, "result": [], "messages": [], "error": [{"message": message}]}


async def serve_gateway(
    state: EmulatorState, scope: Scope, fal_path: str, receive: Receive, send: Send
) -> None:
    """One HTTP request to the gateway; ``fal_path`` is what follows ``…/fal``."""
    if fal_path.startswith("/emulator/noread"):
        # Never read the body (calling receive() would): the sender's buffers fill up.
        await state.recorder.gates["noread"].wait()
        return
    headers = header_map(scope)
    target = headers.get("x-fal-target-url")
    body, size, digest, gone = await read_and_digest(receive)
    if gone:
        return
    record = state.recorder.record(scope, body, size, digest, kind="gateway", target_url=target)
    request_id = state.new_request_id()
    gateway_headers = [
        (b"cf-aig-log-id", state.new_log_id().encode()),
        (b"cf-aig-cache-status", b"MISS"),
    ]
    common = [(b"x-fal-request-id", request_id.encode()), *gateway_headers]
    if state.outage is not None:  # Cloudflare's own error page: fal never saw the request
        page = CLOUDFLARE_PAGE % state.outage
        await send_raw(
            send, state.outage, page, [(b"content-type", b"text/html"), *gateway_headers]
        )
        return
    refusal = check_credentials(state.config, scope, headers)
    if refusal is Refusal.GATEWAY:
        await send_json(send, 401, GATEWAY_401, gateway_headers)
        return
    if refusal is Refusal.FAL_KEY:
        await send_json(send, 401, {"detail": "Invalid Key authorization header"}, common)
        return
    if refusal is not None:  # stored keys / billing: the gateway's own 400, fal never asked
        await send_json(send, 400, gateway_error(refusal.value), gateway_headers)
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
    ctx = Call(state, scope, receive, send, common, request_id, record, body)
    await serve_fal(ctx, host, scope["method"], path, query)


async def serve_direct(
    state: EmulatorState, scope: Scope, host: str, path: str, receive: Receive, send: Send
) -> None:
    """One HTTP request to fal itself, no gateway in front (``/_fal/<host><path>``): the
    proxy's direct path when the gateway is down (FAL_PROXY_TEST_FAL_ORIGIN). Recorded as
    ``direct``; only fal's key is checked."""
    body, size, digest, gone = await read_and_digest(receive)
    if gone:
        return
    query = scope["query_string"].decode("latin-1")
    target = f"https://{host}{path}" + (f"?{query}" if query else "")
    record = state.recorder.record(scope, body, size, digest, kind="direct", target_url=target)
    request_id = state.new_request_id()
    common = [(b"x-fal-request-id", request_id.encode())]
    if check_credentials(fal_only(state.config), scope, header_map(scope)) is not None:
        await send_json(send, 401, {"detail": "Invalid Key authorization header"}, common)
        return
    ctx = Call(state, scope, receive, send, common, request_id, record, body)
    await serve_fal(ctx, host, scope["method"], path, query)


async def serve_fal(ctx: Call, host: str, method: str, path: str, query: str) -> None:
    if host == "queue.fal.run":
        await serve_queue(ctx, method, path, query)
    elif host == "rest.fal.ai":
        await serve_rest(ctx, path)
    elif host == "wma.fal.run":
        await serve_wma(ctx, method, path)
    elif host == "api.fal.ai":
        await serve_platform(ctx, method, path, query)
    else:
        await serve_run(ctx, method, path, query)
