"""``POST /api/fal/realtime-token`` (``FAL_PROXY_REALTIME_TOKEN_ROUTE``): a realtime token for
the fal JS SDK's ``tokenProvider``, which replaces the SDK's deprecated default provider::

    const tokenProvider = async (app) => (await (await fetch("/api/fal/realtime-token",
      { method: "POST", body: JSON.stringify({ app }) })).json()).token;
    fal.realtime.connect(app, { tokenProvider, onResult })

The body names the endpoint as the SDK passes it (``fal-ai/fast-lcm-diffusion/realtime``);
the answer is ``{"token": "…", "expires_in": N}``. Underneath it is the proxied token call
(``x-fal-target-url: https://rest.fal.ai/tokens/``), built here from the endpoint's alias and
handed to the forwarder, so everything that call gets applies unchanged: the caller check,
allowed apps, the expiry cap (``FAL_PROXY_TOKEN_MAX_EXPIRATION``; the SDK asks for 120 s), the
hourly window, quotas (a token for an app under one is refused), usage and the log line. Only
the shape of the answer changes: fal's JSON string becomes the object above.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from ..errors import BadRequest, MethodNotAllowed, PayloadTooLarge, ProxyError
from ..forward.handler import Forwarder
from ..observe.logs import get_logger
from ..observe.request_ids import new_request_id
from .usage_routes import send_answer

TOKEN_TARGET = b"https://rest.fal.ai/tokens/"
DEFAULT_EXPIRATION = 120  # what the SDK's own provider asks for
MAX_BODY = 4096
MAX_ANSWER = 64 * 1024  # fal's answer is a JWT: a few hundred bytes
# An endpoint id as the SDK passes it: owner/alias, then any path (``/realtime``).
_ENDPOINT = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._-]*/([A-Za-z0-9][A-Za-z0-9._-]*)(/[A-Za-z0-9._/-]*)?"
)

log = get_logger("proxy.request")


def token_request(body: bytes, max_expiration: int) -> tuple[bytes, int]:
    """The proxied token call's body for a route request's ``body``, and the token's life in
    seconds; BadRequest for anything but ``{"app": "<owner/alias[/path]>"}`` (with an
    optional ``"expires_in"`` up to ``max_expiration``). Pure."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    app = data.get("app") if isinstance(data, dict) else None
    match = _ENDPOINT.fullmatch(app) if isinstance(app, str) else None
    if match is None:
        raise BadRequest(
            "invalid realtime token request",
            'send {"app": "<endpoint id>"}, e.g. {"app": "fal-ai/fast-lcm-diffusion/realtime"}',
        )
    assert isinstance(data, dict)
    expires = data.get("expires_in", min(DEFAULT_EXPIRATION, max_expiration))
    if not isinstance(expires, int) or isinstance(expires, bool) or not expires > 0:
        raise BadRequest("invalid realtime token request", "expires_in must be whole seconds")
    expires = min(expires, max_expiration)
    forwarded = {"allowed_apps": [match.group(1)], "token_expiration": expires}
    return json.dumps(forwarded, separators=(",", ":")).encode(), expires


def token_answer(body: bytes, expires: int) -> bytes | None:
    """fal's answer (a JSON string; ``{"token"}`` or ``{"detail"}`` from proxies that wrap it)
    as ``{"token", "expires_in"}``; None if it holds no token."""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(data, dict):
        data = data.get("token", data.get("detail"))
    if not isinstance(data, str) or not data:
        return None
    return json.dumps({"token": data, "expires_in": expires}).encode()


class RealtimeTokenRoute:
    """The route, for one port: rewrites the request into the proxied token call for its
    ``forwarder`` and the answer into the route's shape."""

    def __init__(self, forwarder: Forwarder, proxy_route: str) -> None:
        self.forwarder = forwarder
        self.proxy_route = proxy_route
        self.max_expiration = forwarder.settings.access.token_max_expiration

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "OPTIONS":  # a preflight: the forwarder's rules, unchanged
            await self.forwarder(scope, receive, send)
            return
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed("method not allowed", "use POST", allow="POST")
            body, expires = token_request(await _read(receive), self.max_expiration)
        except ProxyError as exc:
            await _refuse(send, exc, scope)
            return
        dropped = (b"content-length", b"content-type", b"x-fal-target-url", b"accept-encoding")
        headers = [(name, value) for name, value in scope["headers"] if name not in dropped]
        headers += [
            (b"x-fal-target-url", TOKEN_TARGET),
            (b"accept-encoding", b"identity"),  # the answer is read here: plain, please
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        route = self.proxy_route.encode()
        inner = {**scope, "path": self.proxy_route, "raw_path": route, "headers": headers,
                 "query_string": b""}  # fmt: skip
        sent = False

        async def receive_body() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # the client's disconnect, when it comes
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.forwarder(inner, receive_body, _Reshaped(send, expires))


class _Reshaped:
    """The forwarder's ``send`` for the route: a 2xx answer (fal's token) held, then sent as
    ``{"token", "expires_in"}`` with its headers (request id, CORS) kept; any other answer
    (a refusal, fal's error) passes unchanged."""

    def __init__(self, send: Send, expires: int) -> None:
        self.send, self.expires = send, expires
        self.start: Message | None = None
        self.body = bytearray()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
            self.start = message
            return
        if self.start is None:
            await self.send(message)
            return
        if len(self.body) <= MAX_ANSWER:  # past it: no token, and nothing more is kept
            self.body += message.get("body", b"")
        if message.get("more_body", False):
            return
        encoded = any(n == b"content-encoding" and v.strip().lower() not in (b"", b"identity")
                      for n, v in self.start["headers"])  # fmt: skip
        answer = None if encoded else token_answer(bytes(self.body), self.expires)
        status = 200 if answer is not None else 502
        if answer is None:
            answer = json.dumps(
                {"message": "no token in fal's answer", "detail": "fal answered without one"}
            ).encode()
        kept = [(n, v) for n, v in self.start["headers"]
                if n not in (b"content-length", b"content-type", b"content-encoding")]  # fmt: skip
        headers = [*kept, (b"content-type", b"application/json"),
                   (b"content-length", str(len(answer)).encode()),
                   (b"cache-control", b"no-store")]  # fmt: skip
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": answer})


async def _read(receive: Receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise BadRequest("invalid realtime token request", "the client left")
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            raise PayloadTooLarge("request body too large", f"at most {MAX_BODY} bytes here")
        if not message.get("more_body", False):
            return bytes(body)


async def _refuse(send: Send, exc: ProxyError, scope: Scope) -> None:
    request_id = new_request_id()
    body = exc.body()
    await send_answer(send, exc.status, exc.headers(body), body, request_id)
    log.info("request", request_id=request_id, method=scope["method"], route="realtime_token",
             status=exc.status, error=exc.reason)  # fmt: skip
