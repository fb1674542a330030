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
  session with 1001 first, and a session the server cancels at the drain deadline ends
  quietly, 1001 both ways (``error=shutdown``).
* The client is watched during the upstream handshake: one that leaves abandons it at once
  and frees its slot. Every session ends with its upstream closed, its slot released and
  one log line naming what went wrong (``client_gone``, ``internal``, …); never a traceback
  from uvicorn, never a second close to the client.

This module is the handler (admission, accept, the open sessions, the canonical line);
:mod:`proxy.bridge.upstream` is the upstream side (URL, sub-protocols, the handshake, a
failed one as the client's refusal) and :mod:`proxy.bridge.pump` the frames both ways.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Message, Receive, Scope, Send
from websockets.asyncio.client import ClientConnection

from ..admission import Admission, Admitted
from ..config.settings import Settings
from ..errors import ClientGone, ProxyError, ShuttingDown
from ..observe.logs import get_logger
from ..observe.metrics import Metrics
from ..observe.tracing import active as active_tracing
from ..phases import Transport
from ..policy.python_port import PythonSdkListener
from ..upstream.breaker import Breaker
from .pump import INTERNAL, SHUTDOWN, Meter, Pump, Session, client_sender
from .upstream import (
    caller_from_subprotocols,
    client_subprotocol,
    gateway_ws_url,
    open_routed,
    refuse,
    without_token,
)


class Bridge(Transport[Session]):
    """The ASGI app for every bridged socket on one port (built once per port: the main one,
    and the Python client's TLS port with ``python``, whose caller credential is
    fal-client's ``Authorization: Key``). ``injected`` is replaced when the keys rotate;
    ``sessions`` are the open ones, for :meth:`close_all` at shutdown."""

    def __init__(
        self, settings: Settings, admission: Admission, metrics: Metrics, *,
        python: PythonSdkListener | None = None,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.admission = admission
        self.metrics = metrics
        self.injected = settings.injected_headers()
        self.gateway_ws = gateway_ws_url(settings.gateway_url)
        self.breaker: Breaker | None = None  # FAL_PROXY_FALLBACK=direct (set by the app)
        self.sessions: set[Session] = set()
        self.read_headers = admission.header_reader(python)
        self.log = get_logger("proxy.websocket")
        self.tracing = active_tracing()  # OpenTelemetry (observe/tracing): None when off
        if self.tracing is not None:
            self.tracing.use_tags(admission.tags)

    def open(self, scope: Scope) -> Session:
        session = Session(scope["path"])
        if self.tracing is not None:  # its server span, then admission
            session.trace = self.tracing.call(scope["headers"])
        return session

    async def proxy(self, session: Session, scope: Scope, receive: Receive, send: Send) -> None:
        """request_filter (the handshake, admission) → upstream_peer (the upstream handshake,
        the breaker's way) → frames both ways."""
        raw_send = send  # the pump's frames: it turns an OSError into ClientGone itself
        session.client_send = send = client_sender(send)  # OSError on a send: ClientGone
        if (await receive())["type"] != "websocket.connect":
            return
        seen = self.read_headers(scope)
        offered: list[str] = list(scope.get("subprotocols") or [])
        if seen.credential is None:  # browsers: the caller credential as a sub-protocol
            seen.credential = caller_from_subprotocols(offered)
        query = without_token(scope["query_string"].decode("latin-1"))
        admitted = Admitted()
        try:
            try:
                await self.admission.admit(scope, seen, admitted, method="GET", query=query,
                                           target_header=None, websocket=True)  # fmt: skip
            finally:
                session.caller = admitted.caller
            target = admitted.target
            assert target is not None
            session.lease = await self.admission.take_slot(admitted, "GET", websocket=True)
            session.metadata = self.admission.metadata(admitted, session.request_id, websocket=True)
        except ProxyError as exc:
            # A refusal: the handshake answered with its status (a send that fails on the
            # way is handled like any other failure).
            session.error, session.refusal = exc.reason, exc
            await self._refuse(scope, send, session, exc)
            return
        # A session is a generation when it opens (its first request message), and each
        # request message after that one more: the socket runs the app once per message.
        # Labelled by the admitting pattern, as the forwarder's requests are before fal
        # has answered.
        label = admitted.app if admitted.app not in (None, "*") else "other"
        if session.trace is not None:  # the handshake's span: the gateway's spans' parent
            session.trace_headers = session.trace.upstream()
        self.metrics.observe_generation(label)
        session.generations = 1
        # Per message after the first (the pump's hot path): the count's coroutine itself, no
        # wrapper around it, and the metric's child looked up once, not once a message.
        count = self.admission.count_generation
        meter = Meter(lambda: count(admitted), self.metrics.generations.labels(label).inc)
        await self._bridge(scope, receive, raw_send, session, target.path, query, offered, meter)

    async def fail(
        self, session: Session, scope: Scope, send: Send, error: ProxyError,
        bug: BaseException | None,
    ) -> None:  # fmt: skip
        # The upstream was closed on the way out (Pump.run, _bridge, _connect).
        close = SHUTDOWN if isinstance(error, ShuttingDown) else INTERNAL
        await self._last_word(scope, session, error, close)

    def logging(self, session: Session) -> None:
        if session.error is not None:
            self.metrics.refusals.labels(session.error).inc()
        self.metrics.requests.labels("websocket", "ws", "none").inc()
        self.metrics.bytes.labels("in").inc(session.bytes_in)
        self.metrics.bytes.labels("out").inc(session.bytes_out)
        refusal = session.refusal
        if refusal is not None and refusal.hint is not None:  # likely the configuration's
            self.log.warning("websocket", hint=refusal.hint,
                             **{**session.log_fields(), **refusal.log_fields()})  # fmt: skip
        else:
            self.log.info("websocket", **session.log_fields())
        if session.trace is not None:
            session.trace.end(session.log_fields(), caller_key=session.caller,
                              status=refusal.status if refusal is not None else None)  # fmt: skip

    async def _bridge(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        session: Session,
        path: str,
        query: str,
        offered: list[str],
        meter: Meter,
    ) -> None:
        """Open the upstream socket, accept the client, pump frames until a close. ``send``
        is the server's own (the pump maps its OSError to ClientGone); everything else
        here sends through ``session.client_send``."""
        pump_send, send = send, session.client_send or send
        watch = asyncio.ensure_future(receive())  # the client, during the upstream handshake
        try:
            upstream = await self._connect(scope, send, session, watch, path, query, offered)
            if upstream is None:
                return
            session.upstream = upstream
            if session.trace is not None:  # 101: the frames both ways from here on
                session.trace.answered(101)
            try:
                chosen = client_subprotocol(offered, upstream.subprotocol)
                session.answered = session.accepted = True
                await send({"type": "websocket.accept", "subprotocol": chosen})
                self.sessions.add(session)
                self.metrics.open_websockets.inc()
                try:
                    pump = Pump(receive, pump_send, upstream, session,
                                self.settings.idle_timeout, meter, first=watch)  # fmt: skip
                    await pump.run()
                finally:
                    self.metrics.open_websockets.dec()
                    self.sessions.discard(session)
            finally:
                # Closed by the pump already, unless the accept failed or was cancelled: then
                # nothing else would ever close it.
                await upstream.close(*GOING_AWAY)
        finally:
            watch.cancel()  # if no pump took it

    async def _connect(
        self,
        scope: Scope,
        send: Send,
        session: Session,
        watch: asyncio.Future[Message],
        path: str,
        query: str,
        offered: list[str],
    ) -> ClientConnection | None:
        """The upstream socket, or None when the client was answered instead: refused (the
        upstream refused, or is unreachable), or gone before the upstream handshake ended.

        The handshake races ``watch`` (the client's next message): a client that leaves in
        the meantime abandons it (its TCP connection closed) instead of holding its slot up
        to FAL_PROXY_CONNECT_TIMEOUT, and is sent no accept. uvicorn answers that receive
        with the disconnect when the connection is lost before the accept, else once the
        accept is sent: then it is the session's first message (the pump's ``first``).
        """
        connecting = asyncio.ensure_future(
            open_routed(
                path, query, offered, session, gateway_ws=self.gateway_ws,
                injected=self.injected, settings=self.settings, breaker=self.breaker,
            )
        )  # fmt: skip
        upstream = None
        try:
            either: list[asyncio.Future[Any]] = [connecting, watch]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if watch.done() and (message := watch.result())["type"] == "websocket.disconnect":
                session.client_close = message.get("code", 1005)
                session.error = "client_gone"
                # A close before any accept: it reaches nobody, but ends the server's half of
                # the handshake (uvicorn logs an error for a handler that returns without one).
                session.answered = True
                try:
                    await send({"type": "websocket.close", "code": 1000})
                except ClientGone:
                    pass
                return None
            upstream = await connecting  # (a message that is not a disconnect: wait on)
            return upstream
        except ProxyError as exc:
            session.error, session.refusal = exc.reason, exc
            await self._refuse(scope, send, session, exc)
            return None
        finally:
            if upstream is None:  # not handed over: the client left, or a cancel, or a bug
                await _abandon(connecting)

    async def _refuse(self, scope: Scope, send: Send, session: Session, exc: ProxyError) -> None:
        session.answered = True
        await refuse(scope, send, exc)

    async def _last_word(
        self, scope: Scope, session: Session, refusal: ProxyError, close: tuple[int, str]
    ) -> None:
        """Tell the client why its session ends, if it can still be told: ``refusal`` when its
        handshake was not answered yet, else ``close`` (unless it was closed already)."""
        assert session.client_send is not None
        try:
            if not session.answered:
                await self._refuse(scope, session.client_send, session, refusal)
            else:
                await session.close_client(*close)
        except Exception:  # gone, or the server refuses: the reason is logged either way
            pass

    async def close_all(self, code: int = SHUTDOWN[0], reason: str = SHUTDOWN[1]) -> None:
        """Close every bridged session (both sides) before the server goes down, all at once
        (an upstream slow to answer its close holds up only its own session)."""

        async def close(session: Session) -> None:
            try:
                await session.close_client(code, reason)  # the one close this client gets
            except Exception:  # the client is gone already
                pass
            if session.upstream is not None:
                await session.upstream.close(code, reason)

        await asyncio.gather(*(close(s) for s in list(self.sessions)), return_exceptions=True)


GOING_AWAY = 1001, ""


async def _abandon(connecting: asyncio.Future[ClientConnection]) -> None:
    """Stop an upstream handshake nobody will use: cancelled (websockets then aborts its TCP
    connection), or, if it completed meanwhile, its socket closed. Never raises."""
    connecting.cancel()
    await asyncio.wait([connecting])
    if not connecting.cancelled() and connecting.exception() is None:
        await connecting.result().close(*GOING_AWAY)
