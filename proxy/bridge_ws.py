"""WebSocket bridge: ``ws://<proxy>/<fal path>`` ↔ ``wss://<gateway>/fal/<fal path>``, key added.

Browsers cannot set headers on a WebSocket, so a page holding no key could not talk to
fal's socket endpoints itself; through the proxy it can. The upgrade passes the same
admission as HTTP (origin, caller, app, a concurrency slot held for the whole session),
then the proxy opens the upstream socket with ``Authorization: Key <server key>`` and
``cf-aig-authorization`` in its handshake, accepts the client, and relays frames both
ways until either side closes.

* Credentials offered by the client never travel upstream: the sub-protocols
  ``fal-api-key.*``, ``cf-aig-authorization.*`` and ``proxy-authorization.*`` (a browser's
  way to send the caller credential), and a ``fal_jwt_token`` in the query. The client
  still gets back one of the sub-protocols it offered (Chrome aborts the handshake
  otherwise): the one the upstream chose, else the first non-credential one it offered.
* Frames keep their type and order. Backpressure: each pump awaits the other side's
  send, and both libraries bound their receive queues, so a slow reader stalls its
  writer instead of growing memory. ``max_size`` is the same on both sides.
* Sessions with no frame either way for ``FAL_PROXY_IDLE_TIMEOUT`` are closed (1001);
  pings keep healthy idle-looking sockets alive on both sides in between.
* Close codes and reasons are relayed both ways; an upstream that refuses the handshake
  has its HTTP status relayed to the client (ASGI's ``websocket.http.response``); an
  upstream that dies gets the client closed with 1011; a proxy shutting down closes every
  session with 1001 first.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from urllib.parse import unquote_plus, urlsplit

from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from .admission import Admission, Admitted, RequestHeaders
from .errors import ProxyError, UpstreamUnavailable
from .headers import CLIENT_PROXY_ID, InjectedHeaders
from .logs import get_logger
from .metrics import Metrics
from .settings import Settings

CREDENTIAL_SUBPROTOCOLS = ("fal-api-key.", "cf-aig-authorization.", "proxy-authorization.")
CALLER_SUBPROTOCOL = "proxy-authorization."
DIRECT_FAL = "wss://fal.run"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: what a sub-protocol may be


class _connect_without_redirects(connect):
    """websockets' ``connect`` that never follows a redirect on the upstream handshake.

    It would follow up to 10, with the fal key on a same-origin ``Location`` (outside the
    gateway's ``/fal`` too) and ``cf-aig-authorization`` even cross-origin. A 3xx is
    relayed to the client like any other refusal.
    """

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


def is_credential_subprotocol(protocol: str) -> bool:
    """Sub-protocols that carry a credential, in any letter case (tokens are case-insensitive)."""
    return protocol.lower().startswith(CREDENTIAL_SUBPROTOCOLS)


def caller_from_subprotocols(offered: list[str]) -> str | None:
    """A browser's caller credential, sent as the sub-protocol ``proxy-authorization.<token>``."""
    return next(
        (p[len(CALLER_SUBPROTOCOL) :] for p in offered if p.lower().startswith(CALLER_SUBPROTOCOL)),
        None,
    )


class Session:
    """One bridged socket: counters for its canonical log line."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "caller",
        "client_close",
        "client_send",
        "error",
        "frames_in",
        "frames_out",
        "path",
        "request_id",
        "started",
        "upstream",
        "upstream_close",
    )

    def __init__(self, request_id: str, path: str) -> None:
        self.request_id, self.path, self.started = request_id, path, time.perf_counter()
        self.frames_in = self.frames_out = self.bytes_in = self.bytes_out = 0
        self.client_close: int | None = None
        self.upstream_close: int | None = None
        self.error: str | None = None
        self.caller: str | None = None
        self.upstream: ClientConnection | None = None
        self.client_send: Send | None = None


class Bridge:
    def __init__(self, settings: Settings, admission: Admission, metrics: Metrics) -> None:
        self.settings = settings
        self.admission = admission
        self.metrics = metrics
        self.injected = InjectedHeaders.from_settings(settings)
        self.gateway_ws = gateway_ws_url(settings.gateway_url)
        self.sessions: set[Session] = set()
        self.log = get_logger("proxy.websocket")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = Session(os.urandom(8).hex(), scope["path"])
        lease = None
        try:
            if (await receive())["type"] != "websocket.connect":
                return
            seen = RequestHeaders.read(scope["headers"], self.admission.auth_header)
            offered: list[str] = list(scope.get("subprotocols") or [])
            if seen.credential is None:  # browsers: the caller credential as a sub-protocol
                seen.credential = caller_from_subprotocols(offered)
            query = without_token(scope["query_string"].decode("latin-1"))
            admitted = Admitted()
            try:
                await self.admission.admit(scope, seen, admitted, method="GET", query=query,
                                           target_header=None, websocket=True)  # fmt: skip
            finally:
                session.caller = admitted.caller
            target = admitted.target
            assert target is not None
            lease = await self.admission.take_slot(admitted, "GET", websocket=True)
            await self._bridge(scope, receive, send, session, target.path, query, offered)
        except ProxyError as exc:
            session.error = exc.reason
            await _refuse(scope, send, exc)
        except Exception:
            # A bug, not hostile input we know: logged here (uvicorn would print "Exception in
            # ASGI application"), and the client refused or closed with 1011.
            session.error = "internal"
            self.log.exception("internal_error", request_id=session.request_id)
            if session.upstream is None:
                internal = ProxyError("internal proxy error", f"request id {session.request_id}")
                await _refuse(scope, send, internal)
        finally:
            if lease is not None:
                await lease.release()
            self._log(session)

    async def _bridge(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        session: Session,
        path: str,
        query: str,
        offered: list[str],
    ) -> None:
        settings = self.settings
        url, direct = upstream_ws_url(
            self.gateway_ws, path, query, realtime_direct=settings.realtime_direct
        )
        headers = [
            ("authorization", self.injected.authorization),
            ("x-fal-client-proxy", CLIENT_PROXY_ID),
        ]
        if self.injected.cf_aig_authorization is not None and not direct:
            headers.append(("cf-aig-authorization", self.injected.cf_aig_authorization))
        passable = upstream_subprotocols(offered)
        try:
            upstream = await _connect_without_redirects(
                url,
                additional_headers=headers,
                subprotocols=[Subprotocol(p) for p in passable] or None,
                max_size=settings.ws_max_bytes,
                open_timeout=settings.connect_timeout,
                proxy=None,
                ping_interval=20,
                ping_timeout=20,
                compression=None,
                user_agent_header=CLIENT_PROXY_ID,
            )
        except InvalidStatus as exc:
            session.error = "upstream_refused"
            # The upstream's own refusal, relayed as it came (status and body).
            body = bytes(exc.response.body or b"")
            relayed = [(b"content-type", b"application/json"),
                       (b"content-length", str(len(body)).encode())]  # fmt: skip
            await _send_refusal(scope, send, exc.response.status_code, relayed, body)
            return
        except (TimeoutError, InvalidHandshake, OSError) as exc:
            session.error = "upstream_unavailable"
            unreachable = UpstreamUnavailable(
                "the gateway could not be reached", type(exc).__name__
            )
            await _refuse(scope, send, unreachable)
            return
        session.upstream, session.client_send = upstream, send
        chosen = client_subprotocol(offered, upstream.subprotocol)
        await send({"type": "websocket.accept", "subprotocol": chosen})
        self.sessions.add(session)
        self.metrics.open_websockets.inc()
        try:
            await self._relay(receive, send, upstream, session)
        finally:
            self.metrics.open_websockets.dec()
            self.sessions.discard(session)

    async def _relay(
        self, receive: Receive, send: Send, upstream: ClientConnection, session: Session
    ) -> None:
        loop = asyncio.get_running_loop()
        idle = self.settings.idle_timeout
        last = [loop.time()]  # last frame either way, for the idle timeout

        async def close_when_idle() -> None:
            # Sleeps until the idle deadline, re-armed by the frames seen meanwhile: one timer
            # per idle period, not one per frame.
            while (left := idle - (loop.time() - last[0])) > 0:  # noqa: ASYNC110 - a deadline
                await asyncio.sleep(left)
            session.error = "idle_timeout"
            session.client_close = session.upstream_close = 1001
            await send({"type": "websocket.close", "code": 1001, "reason": "idle timeout"})
            await upstream.close(1001, "idle timeout")

        async def client_to_upstream() -> None:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    session.client_close = message.get("code", 1005)
                    await upstream.close(
                        _sendable(session.client_close), message.get("reason") or ""
                    )
                    return
                raw = message.get("bytes")  # an empty binary frame stays binary
                data: str | bytes = raw if raw is not None else (message.get("text") or "")
                session.frames_in += 1
                session.bytes_in += len(data)
                last[0] = loop.time()
                await upstream.send(data)  # waits while the upstream is not reading: backpressure

        async def upstream_to_client() -> None:
            try:
                async for data in upstream:
                    session.frames_out += 1
                    session.bytes_out += len(data)
                    last[0] = loop.time()
                    key = "bytes" if isinstance(data, bytes) else "text"
                    await send({"type": "websocket.send", key: data})
            except ConnectionClosed:
                pass
            sent = upstream.protocol.close_sent
            rcvd, code, reason = client_close(
                upstream.close_code,
                upstream.close_reason,
                (sent.code, sent.reason) if sent is not None else None,
            )
            session.upstream_close = rcvd
            if session.client_close is None:
                await send({"type": "websocket.close", "code": code, "reason": reason})

        tasks = [
            asyncio.ensure_future(client_to_upstream()),
            asyncio.ensure_future(upstream_to_client()),
            asyncio.ensure_future(close_when_idle()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks[0] in done and not tasks[1].done():  # the client left: let the upstream's
                await asyncio.wait([tasks[1]], timeout=5)  # close handshake finish, briefly
        finally:
            for task in tasks:
                task.cancel()
            await upstream.close()

    async def close_all(self, code: int = 1001, reason: str = "proxy shutting down") -> None:
        """Close every bridged session (both sides) before the server goes down."""
        for session in list(self.sessions):
            try:
                if session.client_send is not None:
                    await session.client_send(
                        {"type": "websocket.close", "code": code, "reason": reason}
                    )
            except Exception:  # the client is gone already
                pass
            if session.upstream is not None:
                await session.upstream.close(code, reason)

    def _log(self, session: Session) -> None:
        fields = {
            "request_id": session.request_id,
            "route": "websocket",
            "target_path": session.path,
            "duration_ms": round((time.perf_counter() - session.started) * 1000, 2),
            "frames_in": session.frames_in,
            "frames_out": session.frames_out,
            "bytes_in": session.bytes_in,
            "bytes_out": session.bytes_out,
            "client_close": session.client_close,
            "upstream_close": session.upstream_close,
        }
        if session.caller is not None:
            fields["caller"] = session.caller
        if session.error is not None:
            fields["error"] = session.error
            self.metrics.refusals.labels(session.error).inc()
        self.metrics.requests.labels("websocket", "ws", "none").inc()
        self.metrics.bytes.labels("in").inc(session.bytes_in)
        self.metrics.bytes.labels("out").inc(session.bytes_out)
        self.log.info("websocket", **fields)


def upstream_ws_url(
    gateway_ws: str, path: str, query: str, *, realtime_direct: bool
) -> tuple[str, bool]:
    """Where a bridged socket goes: ``(url, straight_to_fal)``. Pure.

    ``…/realtime`` paths go straight to ``wss://fal.run`` when ``FAL_PROXY_REALTIME_DIRECT``
    is on (the gateway documents only fal's HTTP-over-WebSocket protocol); everything
    else goes to the gateway's WebSocket URL.
    """
    direct = realtime_direct and path.endswith("/realtime")
    return (DIRECT_FAL if direct else gateway_ws) + path + (f"?{query}" if query else ""), direct


def gateway_ws_url(gateway_url: str) -> str:
    """``https://gateway…/fal`` → ``wss://gateway…/fal``; ``http://…`` → ``ws://…`` (any case)."""
    parts = urlsplit(gateway_url)
    scheme = "wss" if parts.scheme.lower() == "https" else "ws"
    return f"{scheme}://{parts.netloc}{parts.path}"


def without_token(query: str) -> str:
    """Drop every client ``fal_jwt_token`` (any case, any percent-encoding of the name): the
    proxy's key authenticates the upstream socket. The rest goes on byte for byte."""
    if not query:
        return query
    kept = [
        part
        for part in query.split("&")
        if unquote_plus(part.partition("=")[0]).strip().lower() != "fal_jwt_token"
    ]
    return "&".join(kept)


def upstream_subprotocols(offered: list[str]) -> list[str]:
    """The client's offers that may travel upstream: well-formed tokens (websockets refuses
    to send an empty or non-token one) that carry no credential."""
    return [p for p in offered if _TOKEN.fullmatch(p) and not is_credential_subprotocol(p)]


def client_subprotocol(offered: list[str], upstream_choice: str | None) -> str | None:
    """The sub-protocol to accept the client with: always one of its own offers (Chrome aborts
    the handshake otherwise). The upstream's choice, else the first that went upstream, else
    (only credential ones were offered) the first well-formed one, which echoes its own value.
    """
    if upstream_choice in offered:
        return upstream_choice
    return next(iter(upstream_subprotocols(offered) or [p for p in offered if _TOKEN.fullmatch(p)]),
                None)  # fmt: skip


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


def _sendable(code: int | None) -> int:
    """Codes that may not be sent in a close frame (1005, 1006, 1015, unset) become 1000."""
    if code is None or code in (1005, 1006, 1015):
        return 1000
    return code


async def _refuse(scope: Scope, send: Send, exc: ProxyError) -> None:
    """Refuse the upgrade with the proxy's own JSON error."""
    body = exc.body()
    await _send_refusal(scope, send, exc.status, exc.headers(body), body)


async def _send_refusal(
    scope: Scope, send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """Refuse with an HTTP status where the server allows it, else close (→ 403)."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008 if status < 500 else 1011})
