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

This module is the handler (admission, accept, the open sessions, the canonical line);
:mod:`proxy.bridge_upstream` is the upstream side (URL, sub-protocols, the handshake, a
failed one as the client's refusal) and :mod:`proxy.bridge_pump` the frames both ways.
"""

from __future__ import annotations

import os

from starlette.types import Receive, Scope, Send

from .admission import Admission, Admitted, RequestHeaders
from .bridge_pump import Pump, Session
from .bridge_upstream import (
    caller_from_subprotocols,
    client_subprotocol,
    gateway_ws_url,
    open_upstream,
    refuse,
    without_token,
)
from .errors import ProxyError
from .headers import InjectedHeaders
from .logs import get_logger
from .metrics import Metrics
from .settings import Settings


class Bridge:
    """The ASGI app for every bridged socket. ``injected`` is replaced when the keys rotate;
    ``sessions`` are the open ones, for :meth:`close_all` at shutdown."""

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
            await refuse(scope, send, exc)
        except Exception:
            # A bug, not hostile input we know: logged here (uvicorn would print "Exception in
            # ASGI application"), and the client refused or closed with 1011.
            session.error = "internal"
            self.log.exception("internal_error", request_id=session.request_id)
            if session.upstream is None:
                internal = ProxyError("internal proxy error", f"request id {session.request_id}")
                await refuse(scope, send, internal)
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
        """Open the upstream socket, accept the client, pump frames until a close."""
        try:
            upstream = await open_upstream(
                path, query, offered,
                gateway_ws=self.gateway_ws, injected=self.injected, settings=self.settings,
            )  # fmt: skip
        except ProxyError as exc:
            # Answered here, not in __call__: a send that fails on the way is then handled
            # (logged, then a 500 tried) like any other unexpected error.
            session.error = exc.reason
            await refuse(scope, send, exc)
            return
        session.upstream, session.client_send = upstream, send
        chosen = client_subprotocol(offered, upstream.subprotocol)
        await send({"type": "websocket.accept", "subprotocol": chosen})
        self.sessions.add(session)
        self.metrics.open_websockets.inc()
        try:
            await Pump(receive, send, upstream, session, self.settings.idle_timeout).run()
        finally:
            self.metrics.open_websockets.dec()
            self.sessions.discard(session)

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
        if session.error is not None:
            self.metrics.refusals.labels(session.error).inc()
        self.metrics.requests.labels("websocket", "ws", "none").inc()
        self.metrics.bytes.labels("in").inc(session.bytes_in)
        self.metrics.bytes.labels("out").inc(session.bytes_out)
        self.log.info("websocket", **session.log_fields())
