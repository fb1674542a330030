"""``wma.fal.run``, emulated: fal's world-model (WebRTC) session negotiation, as the JS SDK's
``fal.realtime.open(wma(...))`` calls it. ``POST /session`` answers an offer for a known app
with a new session id and an answer SDP (400 for an unknown app), ``POST /session/heartbeat``
keeps a known session (404 for any other id), ``POST /ice`` hands out ICE servers. No media
flows: the emulator only negotiates. Sessions are kept per emulator, in memory."""

from __future__ import annotations

import weakref
from typing import Any

from .apps import CATALOGUE
from .asgi import send_json
from .context import Call, EmulatorState

ANSWER_SDP = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=emulator answer\r\nt=0 0\r\n"
ICE_SERVERS = {"ice_servers": [{"urls": "stun:stun.example:3478"}]}
MAX_SESSIONS = 10_000

_sessions: weakref.WeakKeyDictionary[EmulatorState, dict[str, str]] = weakref.WeakKeyDictionary()


def sessions(state: EmulatorState) -> dict[str, str]:
    """The emulator's open sessions: session id → app id."""
    return _sessions.setdefault(state, {})


async def serve_wma(ctx: Call, method: str, path: str) -> None:
    """A request for ``https://wma.fal.run<path>``."""
    if method != "POST":
        await send_json(ctx.send, 405, {"detail": "Method Not Allowed"}, ctx.headers)
    elif path == "/session":
        await _open_session(ctx)
    elif path == "/session/heartbeat":
        data = ctx.json()
        session_id = data.get("session_id") if isinstance(data, dict) else None
        if isinstance(session_id, str) and session_id in sessions(ctx.state):
            await send_json(ctx.send, 200, {}, ctx.headers)
        else:
            await send_json(ctx.send, 404, {"detail": "Session not found"}, ctx.headers)
    elif path == "/ice":
        await send_json(ctx.send, 200, ICE_SERVERS, ctx.headers)
    else:
        await send_json(ctx.send, 404, {"detail": "Not Found"}, ctx.headers)


async def _open_session(ctx: Call) -> None:
    data: Any = ctx.json()
    app_id = data.get("app_id") if isinstance(data, dict) else None
    if not isinstance(app_id, str) or app_id not in CATALOGUE:
        await send_json(ctx.send, 400, {"detail": f"unknown app {app_id!r}"}, ctx.headers)
        return
    if not isinstance(data.get("sdp"), str) or data.get("type") != "offer":
        await send_json(ctx.send, 400, {"detail": "an SDP offer is required"}, ctx.headers)
        return
    open_sessions = sessions(ctx.state)
    if len(open_sessions) >= MAX_SESSIONS:
        open_sessions.pop(next(iter(open_sessions)))
    session_id = ctx.state.new_request_id()  # a UUID4 from the seeded generator
    open_sessions[session_id] = app_id
    answer = {"session_id": session_id, "sdp": ANSWER_SDP, "type": "answer"}
    await send_json(ctx.send, 200, answer, ctx.headers)
