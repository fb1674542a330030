"""One call's skeleton: the phases both transports run, in one order, with one error vocabulary.

Modelled on the phases of Cloudflare's Pingora proxy (``request_filter``, ``upstream_peer``,
``fail_to_connect``, ``logging``; one context per request). A transport (the HTTP forwarder,
:mod:`proxy.forward`; the WebSocket bridge, :mod:`proxy.bridge`) is a :class:`Transport`
that fills in its phases; :meth:`Transport.__call__` runs them and owns everything they
share:

1. ``open``: the call's record (:class:`Call`: request id, clock, what its line will say);
2. ``proxy``: the transport's own work, top-down: read the head, admit
   (:class:`~proxy.admission.Admission`: origin, caller, target, app, then a slot), choose
   the route (:func:`proxy.upstream.route.via_breaker`), exchange, stream back;
3. the slot given back (:meth:`Call.release`) whatever happened, before any failure is
   answered, so a client that retries at once finds its slot free;
4. ``fail``: every way a call can end badly, mapped once: a refusal or upstream failure
   (:class:`~proxy.errors.ProxyError`) answered with its status; the client gone
   (:class:`~proxy.errors.ClientGone`) recorded; the server's cancel at the drain deadline
   answered as ``shutdown`` and ended quietly (the task uncancelled: re-raised, uvicorn would
   print a traceback per stream); anything else a bug, logged with its traceback and
   answered ``internal``;
5. ``logging``: exactly one canonical line and the call's metrics.

May import: errors, policy, observe, limits, config, admission, upstream.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Generic, TypeVar

from starlette.types import Receive, Scope, Send

from .errors import ClientGone, ProxyError, ShuttingDown
from .limits import Lease
from .observe.request_ids import new_request_id


class Call:
    """What every call records, whatever its transport; each transport's record adds its own
    (:class:`~proxy.forward.exchange.Exchange`, :class:`~proxy.bridge.pump.Session`)."""

    __slots__ = (
        "app", "caller", "client_ip", "error", "lease", "refusal", "request_id", "started", "via",
    )  # fmt: skip

    def __init__(self) -> None:
        self.request_id = new_request_id()
        self.started = time.perf_counter()
        self.error: str | None = None  # the reason tag of what went wrong, for the line
        self.refusal: ProxyError | None = None  # the proxy's own answer, if it gave one
        self.caller: str | None = None
        self.client_ip: str | None = None
        self.app: str | None = None  # the allowed-apps pattern that admitted it ("*": all allowed)
        self.via: str | None = None  # "direct": sent straight to fal (FAL_PROXY_FALLBACK)
        self.lease: Lease | None = None  # the concurrency slot, once taken

    async def release(self) -> None:
        """Give the slot back (idempotent, never raises)."""
        lease, self.lease = self.lease, None
        if lease is not None:
            await lease.release()


C = TypeVar("C", bound=Call)

SHUTTING_DOWN = "proxy shutting down", "retry the request"


class Transport(Generic[C]):
    """The phases of one transport; :meth:`__call__` (the ASGI app) runs them in order."""

    log: Any  # the transport's logger (structlog)

    def open(self, scope: Scope) -> C:
        """The call's record, before anything is read."""
        raise NotImplementedError

    async def proxy(self, call: C, scope: Scope, receive: Receive, send: Send) -> None:
        """Admit the call, send it upstream, stream the answer back; raise what went wrong."""
        raise NotImplementedError

    async def fail(
        self, call: C, scope: Scope, send: Send, error: ProxyError, bug: BaseException | None
    ) -> None:
        """Tell the client ``error``, if it can still be told. ``bug``: what a bug raised
        (``error`` is then ``internal``): a transport that can no longer answer re-raises
        it, so the server cuts the connection."""
        raise NotImplementedError

    def logging(self, call: C) -> None:
        """Exactly one canonical line, and the call's metrics."""
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call = self.open(scope)
        try:
            try:
                await self.proxy(call, scope, receive, send)
            finally:
                await call.release()
        except ProxyError as exc:
            call.error, call.refusal = exc.reason, exc
            await self.fail(call, scope, send, exc, None)
        except ClientGone:
            call.error = "client_gone"
        except asyncio.CancelledError:
            # The server cancelled the call: the drain deadline (FAL_PROXY_DRAIN_SECONDS)
            # passed with it still running. Record the cut and end the task quietly.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            call.error = ShuttingDown.reason
            await self.fail(call, scope, send, ShuttingDown(*SHUTTING_DOWN), None)
        except Exception as exc:
            # A bug, not a condition we know: logged with its traceback (uvicorn would print
            # "Exception in ASGI application"), the client told if it still can be.
            call.error = "internal"
            self.log.exception("internal_error", request_id=call.request_id)
            internal = ProxyError("internal proxy error", f"request id {call.request_id}")
            await self.fail(call, scope, send, internal, exc)
        finally:
            self.logging(call)
