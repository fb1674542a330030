"""One bridged session once both sides are open: frames both ways until either side closes or
the session idles out, each close relayed to the other side; and the session's record.

Frames keep their type and order. Backpressure: each pump awaits the other side's send, and
both libraries bound their receive queues, so a slow reader stalls its writer instead of
growing memory. How an upstream close reaches the client is the pure :func:`client_close`.
The client gets at most one close (:meth:`Session.close_client`), whoever sends it, and no
frame after it. What a pump task raised is not lost: :meth:`Pump.run` raises it once both
sides are closed (:class:`ClientGone` when the client could not be sent to).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from starlette.types import Message, Receive, Send
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from ..errors import ClientGone, ProxyError
from ..observe.tracing import CallTrace
from ..phases import Call

SHUTDOWN = 1001, "proxy shutting down"
INTERNAL = 1011, "internal proxy error"
GONE = 1001, "client gone"


def client_sender(send: Send) -> Send:
    """``send`` raising :class:`~proxy.errors.ClientGone` where the server says the client is
    gone: a send that fails with OSError, the ASGI spec's way (uvicorn raises
    ClientDisconnected, an OSError)."""

    async def send_to_client(message: Message) -> None:
        try:
            await send(message)
        except OSError as exc:
            raise ClientGone(type(exc).__name__) from None

    return send_to_client


class Session(Call):
    """One bridged socket: counters for its canonical log line, and what closes it.

    ``answered``: the client's handshake was answered (an accept or a refusal was sent, or
    tried); ``accepted``: with an accept; ``close_sent``: the client was sent its close.
    """

    __slots__ = (
        "accepted",
        "answered",
        "bytes_in",
        "bytes_out",
        "client_close",
        "client_send",
        "close_sent",
        "frames_in",
        "frames_out",
        "generations",
        "metadata",
        "path",
        "trace",
        "trace_headers",
        "upstream",
        "upstream_close",
    )

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.frames_in = self.frames_out = self.bytes_in = self.bytes_out = 0
        self.generations = 0  # counted against the caller's limits: 1 at open, 1 per message after
        self.client_close: int | None = None
        self.upstream_close: int | None = None
        self.metadata: str | None = None  # cf-aig-metadata for the upstream handshake
        self.upstream: ClientConnection | None = None
        self.client_send: Send | None = None
        self.answered = self.accepted = self.close_sent = False
        self.trace: CallTrace | None = None  # its spans (OTEL_*): None, tracing off
        self.trace_headers: list[tuple[str, str]] = []  # for the upstream handshake

    async def close_client(self, code: int, reason: str) -> None:
        """Close the accepted client with ``code`` and ``reason``, unless it was sent a close
        already (uvicorn rejects a second one with a RuntimeError) or has left."""
        if not self.accepted or self.close_sent or self.client_close is not None:
            return
        self.close_sent = True  # first: a pump must send no frame after it, even meanwhile
        assert self.client_send is not None
        await self.client_send({"type": "websocket.close", "code": code, "reason": reason})

    def log_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "route": "websocket",
            "target_path": self.path,
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 2),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "generations": self.generations,
            "client_close": self.client_close,
            "upstream_close": self.upstream_close,
        }
        if self.caller is not None:
            fields["caller"] = self.caller
        if self.error is not None:
            fields["error"] = self.error
        if self.via is not None:
            fields["via"] = self.via
        return fields


class Meter(NamedTuple):
    """Counts a client message after the first as one more generation of the caller's (the
    session's opening counted the first): ``charge()`` raises the refusal when the caller
    has no more; ``charged()`` runs once it did not."""

    charge: Callable[[], Awaitable[object]]
    charged: Callable[[], None]


class Pump:
    """Frames both ways for one session: :meth:`run` returns once either side has closed (or
    the session idled out), with the upstream closed.

    ``send`` is the server's: an OSError from it (or :class:`ClientGone`) means the client
    is gone. ``first``, when given, is a receive begun earlier: its message comes first.
    ``meter`` (:class:`Meter`) counts a client message after the first; a message the
    caller's limits refuse is not sent, and the session ends with :func:`refusal_close`.
    """

    def __init__(
        self,
        receive: Receive,
        send: Send,
        upstream: ClientConnection,
        session: Session,
        idle: float,
        meter: Meter | None = None,
        *,
        first: Awaitable[Message] | None = None,
    ) -> None:
        self.receive, self.send, self.upstream = receive, send, upstream
        self.session, self.idle, self.meter, self.first = session, idle, meter, first
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()  # last frame either way, for the idle timeout

    async def run(self) -> None:
        """Pump until a side closes; then stop the pumps, collect what they raised, and close
        the upstream: 1001 when the server cancels (shutdown), 1001 for a client gone, 1011
        for a bug. Raises the first pump failure (ClientGone, or a bug) after all that."""
        tasks = [
            asyncio.ensure_future(self.client_to_upstream()),
            asyncio.ensure_future(self.upstream_to_client()),
            asyncio.ensure_future(self.close_when_idle()),
        ]
        closing = 1000, ""
        failure: Exception | None = None
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            first = tasks[0]
            if first in done and first.exception() is None and not tasks[1].done():
                # The client left: let the upstream's close handshake finish, briefly.
                await asyncio.wait([tasks[1]], timeout=5)
        except asyncio.CancelledError:
            closing = SHUTDOWN
            raise
        finally:
            for task in tasks:
                task.cancel()
            # Every outcome collected (else a failure is lost and the session looks clean);
            # a task cancelled here ends with CancelledError, which is not a failure.
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            failure = next((o for o in outcomes if isinstance(o, Exception)), None)
            if failure is not None and closing != SHUTDOWN:
                closing = GONE if isinstance(failure, ClientGone) else INTERNAL
            await self.upstream.close(*closing)
        if failure is not None:
            raise failure

    async def client_to_upstream(self) -> None:
        """Client frames up until the client leaves; its close code and reason go up too."""
        receive, upstream, session, loop = self.receive, self.upstream, self.session, self.loop
        meter, first, self.first = self.meter, self.first, None
        while True:
            if first is None:
                message = await receive()
            else:
                message, first = await first, None
            if message["type"] == "websocket.disconnect":
                session.client_close = message.get("code", 1005)
                await upstream.close(_sendable(session.client_close), message.get("reason") or "")
                return
            raw = message.get("bytes")  # an empty binary frame stays binary
            data: str | bytes = raw if raw is not None else (message.get("text") or "")
            if meter is not None and session.frames_in:
                try:
                    await meter.charge()
                except ProxyError as refusal:  # used up: this message goes nowhere
                    session.error = refusal.reason
                    await session.close_client(*refusal_close(refusal))
                    await upstream.close(1000, "")
                    return
                meter.charged()
                session.generations += 1
            session.frames_in += 1
            session.bytes_in += len(data)
            self.last = loop.time()
            try:
                await upstream.send(data)  # waits while the upstream is not reading: backpressure
            except ConnectionClosed:  # the upstream ended: the other pump relays its close
                return

    async def upstream_to_client(self) -> None:
        """Upstream frames down until the upstream socket ends; then the client is closed with
        what :func:`client_close` makes of it, unless the client closed first."""
        send, upstream, session, loop = self.send, self.upstream, self.session, self.loop
        try:
            async for data in upstream:
                if session.close_sent:  # too late for the client: read on to the upstream's close
                    continue
                session.frames_out += 1
                session.bytes_out += len(data)
                self.last = loop.time()
                key = "bytes" if isinstance(data, bytes) else "text"
                try:  # the server's own send, not client_sender's: one coroutine less a frame
                    await send({"type": "websocket.send", key: data})
                except OSError as exc:  # the client is gone (client_sender's way)
                    raise ClientGone(type(exc).__name__) from None
        except ConnectionClosed:
            pass
        sent = upstream.protocol.close_sent
        rcvd, code, reason = client_close(
            upstream.close_code,
            upstream.close_reason,
            (sent.code, sent.reason) if sent is not None else None,
        )
        session.upstream_close = rcvd
        await session.close_client(code, reason)  # unless the client left or was closed already

    async def close_when_idle(self) -> None:
        """Close both sides with 1001 after ``idle`` seconds with no frame either way."""
        # Sleeps until the idle deadline, re-armed by the frames seen meanwhile: one timer
        # per idle period, not one per frame.
        loop, session = self.loop, self.session
        while (left := self.idle - (loop.time() - self.last)) > 0:  # noqa: ASYNC110 - a deadline
            await asyncio.sleep(left)
        session.error = "idle_timeout"
        await session.close_client(1001, "idle timeout")
        session.client_close = session.upstream_close = 1001
        await self.upstream.close(1001, "idle timeout")


def client_close(
    received: int | None, reason: str | None, sent: tuple[int, str] | None
) -> tuple[int | None, int, str]:
    """How an ended upstream socket closes the client: ``(upstream code, code, reason)``.

    ``received`` and ``reason`` are the upstream's close frame (None/1006: there was none);
    ``sent`` the proxy's own close of the upstream, if any. When the proxy closed the
    upstream itself (e.g. 1009, a message over FAL_PROXY_WS_MAX_BYTES) the client is told
    that, not "connection lost"; an upstream that died (no close frame) becomes 1011.
    """
    if received in (None, 1006) and sent is not None:
        received = sent[0]
    code = _sendable(received) if received not in (None, 1006) else 1011
    text = reason or ("upstream connection lost" if code == 1011 else "")
    if sent is not None and sent[0] == received:
        text = sent[1] or text
    return received, code, text[:120]


def refusal_close(refusal: ProxyError) -> tuple[int, str]:
    """The close a session gets when the caller's limits refuse a message: 1008 (policy)
    naming the limit, or 1013 (try again later) when the limit store is unavailable. The
    reason fits a close frame (123 bytes)."""
    code = 1013 if refusal.status == 503 else 1008
    text = f"{refusal.message}: {refusal.detail}" if refusal.detail else refusal.message
    return code, text.encode("utf-8", "replace")[:123].decode("utf-8", "ignore")


def _sendable(code: int | None) -> int:
    """Codes that may not be sent in a close frame (1005, 1006, 1015, unset) become 1000."""
    if code is None or code in (1005, 1006, 1015):
        return 1000
    return code
