"""fal's realtime WebSocket, emulated: ``<gateway>/<app>/realtime`` speaking msgpack.

Authentication, as fal takes it: a ``fal_jwt_token`` query parameter issued by the
emulator's ``/tokens/`` for the app's alias (the second id segment), or the key in an
``authorization: Key …`` handshake header (or a ``fal-api-key.<key>`` sub-protocol, the
gateway's browser form). An authenticated gateway also wants ``cf-aig-authorization``.
The check is the gateway's own, shared with HTTP: :mod:`proxy.emulator.credentials`.
Each binary frame is a msgpack input object and gets a msgpack result; a text frame is JSON
in, JSON out. Invalid input gets fal's ``{"type": "x-fal-error", "error": …, "reason": …}``
message, not a close.

For tests of what sits in front (the proxy's WebSocket bridge):

* Every realtime socket the client closes adds the event ``ws-closed:<code>:<reason>``
  (``GET /_emulator/events``), so a test can see which close code and reason arrived;
  every message a realtime app receives adds ``ws-message:<app id>``.
* ``emulator/ws/realtime`` (same authentication) is a scripted socket. A text frame that is
  a JSON object with one of these keys is a command; anything else is echoed back verbatim,
  keeping its frame type:

  - ``{"close": <code>, "reason": "<text>"}``: close with that code and reason.
  - ``{"drop": true}``: vanish without a close frame (the TCP connection is just closed),
    as a crashed upstream does; the peer sees 1006.
  - ``{"flood": <n>, "size": <bytes>}``: send ``n`` binary frames of ``size`` bytes each
    (frame ``i`` is filled with the byte ``i % 256``) as fast as the peer takes them,
    then the text frame ``{"flooded": <n>}``.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

import msgpack
from starlette.types import Message, Receive, Scope, Send

from .apps import InvalidInput, find_app
from .asgi import base_url, header_map
from .context import EmulatorState
from .credentials import Refusal, check_credentials, fal_only

SCRIPTED = "emulator/ws/realtime"  # the test-behaviour socket (see the module docstring)
SCRIPTED_APP = "emulator/echo/realtime"  # whose catalogue entry it borrows


async def serve_realtime(
    state: EmulatorState, scope: Scope, receive: Receive, send: Send, fal_path: str,
    *, direct: bool = False,
) -> None:  # fmt: skip
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    state.recorder.record(scope, b"", 0, "", kind="direct-websocket" if direct else "websocket")
    if state.outage is not None and not direct:  # the gateway's own failure, as over HTTP
        await send({"type": "websocket.http.response.start", "status": state.outage,
                    "headers": [(b"content-type", b"text/html")]})  # fmt: skip
        await send({"type": "websocket.http.response.body", "body": b"Cloudflare error"})
        return
    scripted = fal_path.strip("/") == SCRIPTED
    found = find_app(SCRIPTED_APP) if scripted else find_app(fal_path)
    if found is None or found[2] != "/realtime":
        await send({"type": "websocket.close", "code": 1008, "reason": "no such realtime app"})
        return
    app_id, app, _ = found
    alias = app_id.split("/")[1]
    token = dict(parse_qsl(scope["query_string"].decode("latin-1"))).get("fal_jwt_token", "")
    # An authenticated gateway wants its token on WebSockets too (a header, or the browsers'
    # sub-protocol); fal takes its key, or a token from /tokens/ for this app's alias.
    refusal = check_credentials(
        fal_only(state.config) if direct else state.config,
        scope,
        header_map(scope),
        lambda: bool(token) and state.storage.check_token(token, alias),
    )
    if refusal is not None and refusal.gateways:
        reason = "Unauthorized" if refusal is Refusal.GATEWAY else refusal.value
        await send({"type": "websocket.close", "code": 1008, "reason": reason})
        return
    if refusal is Refusal.FAL_KEY:
        await send({"type": "websocket.close", "code": 4001, "reason": "Unauthorized"})
        return
    await send({"type": "websocket.accept"})
    if scripted:
        await _scripted(state, receive, send)
        return
    base = base_url(scope, state.config.public_url)
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            _record_close(state, message)
            return
        state.recorder.events.append(f"ws-message:{app_id}")  # what reached fal, one by one
        binary = message.get("bytes") is not None
        try:
            data = (
                msgpack.unpackb(message["bytes"])
                if binary
                else json.loads(message.get("text") or "")
            )
            data = app.validate(data)
            reply: Any = await app.run(data, state.files, base, state.config.seed)
        except InvalidInput as exc:
            reply = {
                "type": "x-fal-error",
                "error": "INVALID_INPUT",
                "reason": json.dumps(exc.errors),
            }
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            reply = {
                "type": "x-fal-error",
                "error": "INVALID_MESSAGE",
                "reason": "could not decode the frame",
            }
        if binary:
            await send({"type": "websocket.send", "bytes": msgpack.packb(reply)})
        else:
            await send({"type": "websocket.send", "text": json.dumps(reply)})


def _record_close(state: EmulatorState, message: Message) -> None:
    state.recorder.events.append(f"ws-closed:{message.get('code')}:{message.get('reason') or ''}")


async def _scripted(state: EmulatorState, receive: Receive, send: Send) -> None:
    """``emulator/ws/realtime``: echo, or obey a close / drop / flood command."""
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            _record_close(state, message)
            return
        text = message.get("text")
        command: Any = None
        if text is not None:
            try:
                command = json.loads(text)
            except ValueError:
                command = None
        if isinstance(command, dict) and "close" in command:
            await send(
                {
                    "type": "websocket.close",
                    "code": int(command["close"]),
                    "reason": str(command.get("reason", "")),
                }
            )
            return
        if isinstance(command, dict) and command.get("drop"):
            return  # no close frame: uvicorn closes the TCP connection under a returning app
        if isinstance(command, dict) and "flood" in command:
            count, size = int(command["flood"]), int(command.get("size", 1024 * 1024))
            for i in range(count):
                await send({"type": "websocket.send", "bytes": bytes([i % 256]) * size})
            await send({"type": "websocket.send", "text": json.dumps({"flooded": count})})
            continue
        key = "text" if text is not None else "bytes"
        await send({"type": "websocket.send", key: message.get(key)})
