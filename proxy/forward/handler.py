"""The forwarding route: a pure-ASGI handler, the HTTP transport's phases (:mod:`proxy.phases`).

Pure ASGI rather than a Starlette endpoint because this is the hot path: no
Request/Response objects, no middleware stack, headers handled as the raw byte
pairs the server gives. :meth:`Forwarder.proxy` reads top-down, one way:

1. read the head (this port's way: :meth:`~proxy.admission.Admission.header_reader`) and
   answer a CORS preflight;
2. admit: origin, caller, the target resolved (:func:`proxy.policy.targets.resolve_target`,
   pure), method, app; the body's size;
3. build the upstream headers (:func:`proxy.policy.headers.upstream_request_headers`, pure);
4. take a slot (rate windows, quotas, concurrency), once the body's first message is in;
5. the round trip (:mod:`proxy.forward.round_trip`): through the gateway or, with the
   breaker open, straight to fal (:func:`proxy.upstream.route.via_breaker`), the answer
   streamed back chunk by chunk as the gateway sends it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import aiohttp
from starlette.types import Message, Receive, Scope, Send

from ..admission import Admission, Admitted
from ..config.settings import Settings
from ..errors import (
    BadRequest,
    PayloadTooLarge,
    ProxyError,
)
from ..observe.logs import get_logger
from ..observe.metrics import Metrics
from ..observe.tracing import active as active_tracing
from ..phases import Transport
from ..policy.headers import upstream_request_headers, with_trace
from ..policy.plan_requests import apply_request_policy, with_query
from ..policy.python_port import REWRITE_ACCEPT_ENCODING, PythonSdkListener, rewrite_queue_urls
from ..policy.targets import WMA_HOST, WMA_KINDS
from ..upstream.route import UpstreamRoute
from .exchange import Exchange
from .round_trip import ClientLost, round_trip
from .upload import read_small_body, receive_body

# A wma.fal.run call's body: a session offer's SDP with its candidates is a few KiB.
WMA_MAX_BODY = 64 * 1024


class Forwarder(Transport[Exchange]):
    """The ASGI app for every forwarded request on one port (built once per port: the main
    one, and the Python client's TLS port with ``python``). ``session`` is set by the app's
    lifespan; ``injected`` is replaced when the keys rotate."""

    def __init__(
        self, settings: Settings, admission: Admission, metrics: Metrics,
        route: UpstreamRoute | None = None, *, python: PythonSdkListener | None = None,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.admission = admission
        self.metrics = metrics
        self.injected = settings.injected_headers()
        self.route = route if route is not None else UpstreamRoute(settings)
        # The Python client's TLS port: its credential is fal-client's Authorization: Key,
        # its target the path, and its queue answers point back at that port.
        self.python = python
        self.read_headers = admission.header_reader(python)
        # Whether the request's whole body is in already, so its first message needs no
        # timer: the server knows (serve/ plugs in uvicorn's answer after checking it at
        # start-up); the default always arms the timer, right on any server.
        self.body_in_hand: Callable[[Receive], bool] = lambda receive: False
        # Whether the server can tell the call when its client leaves (serve/ plugs in
        # proxy.serve.protocol.on_client_lost); the default says no, and the call then
        # waits for http.disconnect on receive() in a task of its own.
        self.on_client_lost: ClientLost = lambda receive, callback: None
        self.log = get_logger("proxy.request")
        self.key_hint = fal_key_hint(settings.gateway.mode, python is not None)
        # OpenTelemetry (observe/tracing): None when off, and then no call makes a span.
        self.tracing = active_tracing()
        if self.tracing is not None:
            self.tracing.use_tags(admission.tags)

    @property
    def session(self) -> aiohttp.ClientSession | None:
        return self.route.session

    @session.setter
    def session(self, session: aiohttp.ClientSession | None) -> None:
        self.route.session = session

    def open(self, scope: Scope) -> Exchange:
        self.metrics.in_flight.inc()
        ex = Exchange(scope["method"])
        if self.tracing is not None:  # its server span, then admission
            ex.trace = self.tracing.call(scope["headers"])
        return ex

    async def fail(
        self, ex: Exchange, scope: Scope, send: Send, error: ProxyError, bug: BaseException | None
    ) -> None:
        if ex.status is None:  # nothing sent yet: answer with the error
            await self._send_error(send, error, ex)
        elif bug is not None:
            raise bug  # mid-answer: the server cuts the connection

    def logging(self, ex: Exchange) -> None:
        self.metrics.in_flight.dec()
        if ex.error == "client_gone":
            ex.status = 499
        status = ex.status or 0
        app = self.metrics.app_labels(ex.app, ex.path, ex.upstream_status)
        if ex.generation:
            self.metrics.observe_generation(app)
        if ex.units_counted:
            self.metrics.observe_units(app, ex.billable_units, ex.cost)
        duration = time.perf_counter() - ex.started
        self.metrics.observe(
            ex.kind, status, app, duration, ex.ttfb, ex.bytes_in, ex.bytes_out, ex.error
        )
        if ex.upstream_seconds is not None and ex.kind is not None:
            # The proxy's own work: the whole call (to here, before the log line) less the
            # round trip upstream (fal_proxy_overhead_seconds).
            self.metrics.observe_overhead(ex.kind, duration - ex.upstream_seconds)
        if ex.gateway_error:
            hint = "the gateway refused the proxy's cf-aig-authorization: check CF_AIG_TOKEN"
            self.log.warning("request", hint=hint, **ex.log_fields())
        elif ex.refusal is not None and ex.refusal.hint is not None:
            # A refusal that is likely the configuration's: say what to change.
            fields = {**ex.log_fields(), **ex.refusal.log_fields()}
            self.log.warning("request", hint=ex.refusal.hint, **fields)
        elif ex.upstream_status == 401:
            # fal's own 401: the key the proxy sent (never the client's) was refused.
            self.log.warning("request", hint=self.key_hint, **ex.log_fields())
        elif status >= 500 or (ex.error is not None and status not in range(400, 500)):
            # Upstream trouble, a client gone mid-way, or a bug; refusals (4xx) stay at info.
            self.log.warning("request", **ex.log_fields())
        else:
            self.log.info("request", **ex.log_fields())
        if ex.trace is not None:
            key = ex.caller if ex.caller is not None or ex.client_ip is None else (
                self.admission.limit_key(None, ex.client_ip))  # fmt: skip
            ex.trace.end(ex.log_fields(), status=ex.status, caller_key=key, app=ex.app)

    async def _send_error(self, send: Send, exc: ProxyError, ex: Exchange) -> None:
        body = exc.body()
        ex.status = exc.status
        headers = [*exc.headers(body), (b"x-proxy-request-id", ex.request_id.encode()), *ex.cors]
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        ex.bytes_out += len(body)

    async def proxy(self, ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
        """request_filter (the head, admission) → upstream_peer (the route) → the exchange."""
        settings, admission, python = self.settings, self.admission, self.python
        raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
        seen = self.read_headers(scope)
        if ex.method == "OPTIONS" and seen.origin and seen.preflight_method:
            ex.client_ip = admission.client(scope, seen)
            await self._send_preflight(send, admission.preflight(scope, seen), ex)
            return
        admitted = Admitted()
        try:
            await admission.admit(scope, seen, admitted, method=ex.method,
                                  query=scope["query_string"].decode("latin-1"),
                                  target_header=seen.target)  # fmt: skip
        finally:  # what was learned, for the log line, refused or not
            ex.record(admitted)
        target = admitted.target
        assert target is not None
        declared = admitted.declared_length
        if declared is not None and declared > settings.max_body_bytes:
            raise PayloadTooLarge.over(settings.max_body_bytes, declared)
        # The caller's plan pins or caps what it may ask fal for (policy/plan_requests),
        # before the header policy: what it sets then goes through like any x-fal-* header.
        policy = admission.request_policy(admitted, ex.method)
        if not policy.empty:
            raw_headers, query, changed = apply_request_policy(policy, raw_headers, target.query)
            admitted.target = target = with_query(target, query)
            ex.request_policy = list(changed) or None
        try:
            headers = upstream_request_headers(
                raw_headers, target, self.injected, method=ex.method, request_id=ex.request_id,
                metadata=admission.metadata(admitted, ex.request_id),
            )  # fmt: skip
        except UnicodeDecodeError:
            raise BadRequest(
                "invalid header value", "header values must be ASCII or UTF-8"
            ) from None
        rewrite: Callable[[bytes], bytes | None] | None = None
        if python is not None and python.rewrites(ex.method, target):
            # Its answer carries queue URLs to point at this port: ask for what can be read.
            headers = [(n, v) for n, v in headers if n != "accept-encoding"]
            headers.append(("accept-encoding", REWRITE_ACCEPT_ENCODING))
            rewrite = partial(rewrite_queue_urls, origin=python.origin)
        # The body's first message (the whole body for a token request) must arrive, within
        # the idle deadline, before a slot is taken: a client that declares a body and never
        # sends it holds no slot, and is answered 408.
        if target.kind == "token":
            # The body says which apps the token is for: read it (it is small), check it, and
            # forward what was checked, re-serialised, never the client's own bytes.
            body = admission.check_token_body(
                await read_small_body(receive, ex, settings.idle_timeout, self.body_in_hand),
                admitted,
            )
            headers = [(n, v) for n, v in headers if n not in ("content-length", "content-type")]
            headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
            first: Message = {"type": "http.request", "body": body, "more_body": False}
        elif target.kind in WMA_KINDS:
            # Read whole (small), checked, and for a session offer or heartbeat forwarded
            # re-serialised: a session's app is in its body (allowed apps, quotas, usage).
            body = admission.check_wma_body(
                await self._read_wma_body(receive, ex, declared), admitted
            )
            ex.app = admitted.app
            metadata = admission.metadata(admitted, ex.request_id)  # the session's app now
            # A cached heartbeat would let the session lapse, cached ICE servers hand one
            # caller's TURN credentials to another: never from the gateway's cache.
            drop = {"content-length", "cf-aig-metadata", "cf-aig-skip-cache"}
            if target.kind != "wma_ice":
                drop.add("content-type")
            headers = [(n, v) for n, v in headers if n not in drop]
            if target.kind != "wma_ice":
                headers.append(("content-type", "application/json"))
            headers += [
                ("content-length", str(len(body))),
                ("cf-aig-metadata", metadata),
                ("cf-aig-skip-cache", "true"),
            ]
            first = {"type": "http.request", "body": body, "more_body": False}
        else:
            first = await receive_body(receive, settings.idle_timeout, self.body_in_hand(receive))
        ex.lease = await admission.take_slot(admitted, ex.method)
        ex.generation = admitted.generation
        if ex.trace is not None:  # the upstream span: the gateway's spans' parent
            headers = with_trace(headers, ex.trace.upstream())
        # An SSE stream (a /stream run, a queue status stream) counts open while it runs.
        streaming = target.path.endswith("/stream")
        stream = self.metrics.stream_opened(target.kind) if streaming else None
        sent = time.perf_counter()
        try:
            await round_trip(self.route, settings, target, headers, receive, send, ex, first,
                             rewrite, self.on_client_lost)  # fmt: skip
        finally:
            ex.upstream_seconds = round_trip_seconds = time.perf_counter() - sent
            submitted = ex.fal_request_id if ex.generation and target.kind == "queue" else None
            if submitted is not None and 200 <= (ex.upstream_status or 0) < 300:
                # Noted as the answer's last bytes go out, with no await in between.
                admission.note_queue_submit(admitted, submitted)
            self.metrics.observe_upstream(target.kind, round_trip_seconds)
            if stream is not None:
                stream.dec()
            await ex.release()  # before the units: as soon as the answer is through
            if ex.generation or ex.billable_units:
                upstream = ex.upstream_status
                # fal answered 2xx, or the whole call went up and no answer came (the
                # client hung up, a first-byte timeout): fal may be running it, so its
                # estimate stays charged; only fal's own failure answer gives it back.
                ran = (upstream is None and ex.body_went_up) or (
                    upstream is not None and 200 <= upstream < 300)  # fmt: skip
                ex.units_counted, ex.cost = await admission.settle(
                    admitted, target.path, ex.billable_units, ex.fal_request_id,
                    succeeded=ran,
                )  # fmt: skip

    async def _read_wma_body(self, receive: Receive, ex: Exchange, declared: int | None) -> bytes:
        """A ``wma.fal.run`` call's whole body, at most :data:`WMA_MAX_BODY` bytes (413)."""
        what = f"a {WMA_HOST} call's body"
        if declared is not None and declared > WMA_MAX_BODY:  # said up front: not read at all
            raise PayloadTooLarge(
                "request body too large", f"{what} is at most {WMA_MAX_BODY} bytes"
            )
        return await read_small_body(receive, ex, self.settings.idle_timeout, self.body_in_hand,
                                     limit=WMA_MAX_BODY, what=what)  # fmt: skip

    async def _send_preflight(
        self, send: Send, headers: list[tuple[bytes, bytes]], ex: Exchange
    ) -> None:
        ex.status, ex.kind = 204, "preflight"
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": [*headers, (b"x-proxy-request-id", ex.request_id.encode())],
            }
        )
        await send({"type": "http.response.body", "body": b""})


def fal_key_hint(mode: str, python_port: bool) -> str:
    """What a fal 401 tells the operator to check: the key the proxy sends, by credential
    mode. On the Python client's port the client holds a placeholder key the proxy drops,
    so the hint says which key is meant."""
    if mode == "byok":
        return "fal refused the key stored in the gateway: check the key behind CF_AIG_BYOK_ALIAS"
    if mode == "unified":
        return "fal refused the gateway's Unified Billing: check FAL_PROXY_UNIFIED_BILLING"
    where = "the proxy's FAL_KEY (not the client's placeholder key)" if python_port else "FAL_KEY"
    return f"fal refused the proxy's key (wrong or revoked): check {where}"
