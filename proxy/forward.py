"""The forwarding route: a pure-ASGI handler, request → target → headers → gateway → client.

Pure ASGI rather than a Starlette endpoint because this is the hot path: no
Request/Response objects, no middleware stack, headers handled as the raw byte
pairs the server gives. The data flows one way:

1. read the target (``x-fal-target-url`` or the fal.run-shaped path) and resolve it
   (:func:`proxy.targets.resolve_target`, pure);
2. build the upstream headers (:func:`proxy.headers.upstream_request_headers`, pure);
3. send to the gateway with the request body streamed as it arrives;
4. stream the response back chunk by chunk as the gateway sends it.

While the upstream call runs, a watcher waits for the client to go away and cancels
the call, which closes the upstream connection at once (an aborted SSE stream must
not keep a generation, or a connection, alive).
"""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from starlette.types import Message, Receive, Scope, Send
from yarl import URL

from .admission import Admission, Admitted, RequestHeaders
from .errors import (
    BadRequest,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    ShuttingDown,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .headers import InjectedHeaders, downstream_response_headers, upstream_request_headers
from .logs import get_logger, redact_query
from .metrics import Metrics
from .origins import cors_headers
from .settings import Settings
from .targets import Target


class _ClientGone(Exception):
    """The client disconnected; nothing more can be sent to it."""


class Exchange:
    """Per-request state, and the fields of the request's canonical log line."""

    __slots__ = (
        "app",
        "body_error",
        "body_phase",
        "bytes_in",
        "bytes_out",
        "caller",
        "cf_aig_log_id",
        "client_gone",
        "client_ip",
        "cors",
        "error",
        "fal_request_id",
        "gateway_error",
        "host",
        "kind",
        "method",
        "path",
        "query",
        "request_id",
        "response_done",
        "started",
        "status",
        "ttfb",
        "upstream_status",
    )  # fmt: skip

    def __init__(self, method: str) -> None:
        self.request_id = os.urandom(8).hex()
        self.method = method
        self.kind: str | None = None
        self.host: str | None = None
        self.path: str | None = None
        self.query: str | None = None
        self.status: int | None = None
        self.upstream_status: int | None = None
        self.bytes_in = self.bytes_out = 0
        self.started = time.perf_counter()
        self.ttfb: float | None = None
        self.error: str | None = None
        self.fal_request_id: str | None = None
        self.cf_aig_log_id: str | None = None
        self.gateway_error: str | None = None
        self.body_error: ProxyError | None = None
        self.body_phase: str | None = None  # "receive" | "send" while a streamed body moves
        self.response_done = False
        self.client_gone = False
        self.caller: str | None = None
        self.client_ip: str | None = None
        self.cors: list[tuple[bytes, bytes]] = []  # CORS headers for a listed cross-origin caller
        self.app: str | None = None  # the allowed-apps pattern that admitted it ("*": all allowed)

    def record(self, admitted: Admitted) -> None:
        """Take what admission learned (the log line shows it even for a refusal)."""
        self.client_ip, self.caller, self.app = admitted.client_ip, admitted.caller, admitted.app
        self.cors = cors_headers(admitted.cors_origin) if admitted.cors_origin else []
        if (target := admitted.target) is not None:
            self.kind, self.host, self.path, self.query = (
                target.kind, target.host, target.path, target.query)  # fmt: skip

    def log_fields(self) -> dict[str, Any]:
        now = time.perf_counter()
        fields = {
            "request_id": self.request_id,
            "method": self.method,
            "route": self.kind,
            "target_host": self.host,
            "target_path": self.path,
            "target_query": redact_query(self.query) if self.query else None,
            "status": self.status,
            "upstream_status": self.upstream_status,
            "ttfb_ms": round(self.ttfb * 1000, 2) if self.ttfb is not None else None,
            "duration_ms": round((now - self.started) * 1000, 2),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }
        for name in (
            "caller",
            "client_ip",
            "fal_request_id",
            "cf_aig_log_id",
            "error",
            "gateway_error",
        ):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        return fields


class Forwarder:
    """The ASGI app for every forwarded request. ``session`` is set by the app's lifespan."""

    def __init__(self, settings: Settings, admission: Admission, metrics: Metrics) -> None:
        self.settings = settings
        self.admission = admission
        self.metrics = metrics
        self.injected = InjectedHeaders.from_settings(settings)
        self.session: aiohttp.ClientSession | None = None
        self.log = get_logger("proxy.request")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex = Exchange(scope["method"])
        self.metrics.in_flight.inc()
        try:
            await self._handle(scope, receive, send, ex)
        except ProxyError as exc:
            ex.error = exc.reason
            if ex.status is None:  # nothing sent yet: answer with the error
                await self._send_error(send, exc, ex)
        except _ClientGone:
            ex.error, ex.status = "client_gone", 499
        except asyncio.CancelledError:
            # The server cancelled the request: the drain deadline (FAL_PROXY_DRAIN_SECONDS)
            # passed with it still streaming. Record the cut (not a clean 2xx) and end the
            # task quietly: re-raised, uvicorn would log a traceback per stream.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            ex.error = ShuttingDown.reason
            if ex.status is None:  # nothing sent yet: say so (uvicorn would answer 500)
                await self._send_error(
                    send, ShuttingDown("proxy shutting down", "retry the request"), ex
                )
        except Exception:
            # A bug, not a condition we know: log it with its traceback, answer 500 if
            # nothing was sent yet, else let the server cut the connection.
            ex.error = "internal"
            self.log.exception("internal_error", request_id=ex.request_id)
            if ex.status is not None:
                raise
            await self._send_error(
                send, ProxyError("internal proxy error", f"request id {ex.request_id}"), ex
            )
        finally:
            self.metrics.in_flight.dec()
            self._log(ex)

    def _log(self, ex: Exchange) -> None:
        status = ex.status or 0
        self.metrics.observe(
            ex.kind,
            status,
            self.metrics.app_labels(ex.app, ex.path, ex.upstream_status),
            time.perf_counter() - ex.started,
            ex.ttfb,
            ex.bytes_in,
            ex.bytes_out,
            ex.error,
        )
        if ex.gateway_error:
            hint = "the gateway refused the proxy's cf-aig-authorization: check CF_AIG_TOKEN"
            self.log.warning("request", hint=hint, **ex.log_fields())
        elif status >= 500 or (ex.error is not None and status not in range(400, 500)):
            # Upstream trouble, a client gone mid-way, or a bug; refusals (4xx) stay at info.
            self.log.warning("request", **ex.log_fields())
        else:
            self.log.info("request", **ex.log_fields())

    async def _send_error(self, send: Send, exc: ProxyError, ex: Exchange) -> None:
        body = exc.body()
        ex.status = exc.status
        headers = [*exc.headers(body), (b"x-proxy-request-id", ex.request_id.encode()), *ex.cors]
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        ex.bytes_out += len(body)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, ex: Exchange) -> None:
        settings, admission = self.settings, self.admission
        raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
        seen = RequestHeaders.read(raw_headers, admission.auth_header)
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
            raise PayloadTooLarge(
                "request body too large",
                f"{declared} bytes; this proxy accepts at most {settings.max_body_bytes}",
            )
        try:
            headers = upstream_request_headers(
                raw_headers, target, self.injected, method=ex.method, request_id=ex.request_id
            )
        except UnicodeDecodeError:
            raise BadRequest(
                "invalid header value", "header values must be ASCII or UTF-8"
            ) from None
        # The body's first message (the whole body for a token request) must arrive, within
        # the idle deadline, before a slot is taken: a client that declares a body and never
        # sends it holds no slot, and is answered 408.
        if target.kind == "token":
            # The body says which apps the token is for: read it (it is small), check it, and
            # forward what was checked, re-serialised, never the client's own bytes.
            body = admission.check_token_body(await self._read_small_body(receive, ex))
            headers = [(n, v) for n, v in headers if n not in ("content-length", "content-type")]
            headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
            first: Message = {"type": "http.request", "body": body, "more_body": False}
        else:
            first = await self._receive_body(receive)
        lease = await admission.take_slot(admitted, ex.method)
        try:
            await self._exchange(target, headers, receive, send, ex, first)
        finally:
            await lease.release()

    async def _receive_body(self, receive: Receive) -> Message:
        """The next body message, within the idle timeout (408); raises _ClientGone."""
        # uvicorn's receive() is its request cycle's method: when the whole body is in
        # (the usual small JSON), it answers at once and the timer (~6 µs) is not needed.
        cycle = getattr(receive, "__self__", None)
        if cycle is not None and getattr(cycle, "more_body", True) is False:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            return message
        idle = self.settings.idle_timeout
        try:
            async with asyncio.timeout(idle):
                message = await receive()
        except TimeoutError:
            raise RequestTimeout(
                "request body stalled", f"nothing received for {idle:g}s"
            ) from None
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        return message

    async def _read_small_body(
        self, receive: Receive, ex: Exchange, limit: int = 16 * 1024
    ) -> bytes:
        body, more = bytearray(), True
        while more:
            message = await self._receive_body(receive)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                raise PayloadTooLarge(
                    "request body too large", f"a token request is at most {limit} bytes"
                )
        ex.bytes_in = len(body)
        return bytes(body)

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

    async def _exchange(
        self,
        target: Target,
        headers: list[tuple[str, str]],
        receive: Receive,
        send: Send,
        ex: Exchange,
        first: Message,
    ) -> None:
        assert self.session is not None, "the app's lifespan did not run"
        settings = self.settings
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        watcher: asyncio.Task[None] | None = None

        async def watch_disconnect() -> None:
            # After the body, the only message left is http.disconnect: the client went away
            # (or the response completed, which `response_done` tells apart).
            message = await receive()
            if message["type"] == "http.disconnect" and not ex.response_done:
                ex.client_gone = True
                task.cancel()

        body: bytes | AsyncIterator[bytes] | None
        first_chunk = first.get("body", b"")
        ex.bytes_in = len(first_chunk)
        if ex.bytes_in > settings.max_body_bytes:
            raise PayloadTooLarge("request body too large", f"over {settings.max_body_bytes} bytes")

        waiting_for_headers = True
        body_done = False
        if first.get("more_body", False):
            # While the body streams, the deadline is the idle timeout, pushed back on every
            # chunk that moves (client to proxy, or proxy to gateway); the first-byte clock
            # starts once the body is sent, so a big upload is not cut short by it.
            deadline = asyncio.timeout(None)

            def progress(done: bool = False) -> None:
                nonlocal watcher, body_done
                if waiting_for_headers:
                    wait = settings.first_byte_timeout if done else settings.idle_timeout
                    deadline.reschedule(loop.time() + wait)
                if done:
                    body_done = True
                    if watcher is None:
                        watcher = loop.create_task(watch_disconnect())

            body = self._stream_body(first_chunk, receive, ex, progress)
        else:
            # The whole body is here already (the usual small JSON): no streaming needed.
            body = first_chunk or None
            deadline = asyncio.timeout(settings.first_byte_timeout)
            watcher = loop.create_task(watch_disconnect())

        response: aiohttp.ClientResponse | None = None
        try:
            try:
                async with deadline:
                    response = await self.session.request(
                        ex.method,
                        URL(target.upstream_url, encoded=True),
                        headers=headers,
                        data=body,
                        allow_redirects=False,
                    )
            except TimeoutError:
                if ex.body_error is not None:
                    raise ex.body_error from None
                if ex.body_phase == "receive":
                    raise RequestTimeout(
                        "request body stalled", f"nothing received for {settings.idle_timeout:g}s"
                    ) from None
                if ex.body_phase == "send":
                    raise UpstreamTimeout(
                        "the gateway stopped reading the request body",
                        f"no progress for {settings.idle_timeout:g}s",
                    ) from None
                raise UpstreamTimeout(
                    "the gateway did not answer in time",
                    f"no response headers within {settings.first_byte_timeout:g}s"
                    if deadline.expired()
                    else f"no connection within {settings.connect_timeout:g}s",
                ) from None
            except aiohttp.ClientError as exc:
                raise _failure(ex, exc, "the gateway could not be reached") from None
            finally:
                waiting_for_headers = False
            if watcher is None and body_done:  # (else the body iterator will start it)
                watcher = loop.create_task(watch_disconnect())
            await self._relay_response(response, send, ex)
        except asyncio.CancelledError:
            if ex.client_gone:
                task.uncancel()
                raise _ClientGone() from None
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            if response is not None:
                if ex.response_done:
                    response.release()
                else:
                    response.close()  # drop the connection: the upstream sees the abort

    async def _stream_body(
        self, first_chunk: bytes, receive: Receive, ex: Exchange, progress: Any
    ) -> AsyncIterator[bytes]:
        """Yield the request body as the client sends it, within the size limit.

        Runs inside aiohttp's writer task. ``progress()`` pushes the request's deadline
        back each time a chunk moves; ``ex.body_phase`` tells, if the deadline fires, who
        stalled. A failure is recorded on ``ex`` and raised: aiohttp then drops the
        upstream connection without finishing the body, so the upstream never takes a
        truncated body for a complete one.
        """
        progress()
        if first_chunk:
            ex.body_phase = "send"
            yield first_chunk
        more = True
        while more:
            progress()
            ex.body_phase = "receive"
            message = await receive()
            if message["type"] == "http.disconnect":
                ex.client_gone = True
                raise _ClientGone()
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            ex.bytes_in += len(chunk)
            if ex.bytes_in > self.settings.max_body_bytes:
                ex.body_error = PayloadTooLarge(
                    "request body too large", f"over {self.settings.max_body_bytes} bytes"
                )
                raise ex.body_error
            if chunk:
                progress()
                ex.body_phase = "send"
                yield chunk
        ex.body_phase = None
        progress(done=True)

    async def _relay_response(
        self, response: aiohttp.ClientResponse, send: Send, ex: Exchange
    ) -> None:
        ex.ttfb = time.perf_counter() - ex.started
        ex.upstream_status = ex.status = response.status
        raw = response.raw_headers
        for name, value in raw:
            lname = name.lower()
            if lname == b"x-fal-request-id":
                ex.fal_request_id = value.decode("latin-1")
            elif lname == b"cf-aig-log-id":
                ex.cf_aig_log_id = value.decode("latin-1")
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": downstream_response_headers(
                    raw, status=response.status, request_id=ex.request_id
                )
                + ex.cors,
            }
        )
        remaining = response.content_length  # known length: finish with the last chunk
        idle = self.settings.idle_timeout
        content = response.content
        first_chunk = True
        while True:
            try:
                if content.is_eof():
                    # The whole rest of the body is buffered (a small body arrives with its
                    # headers): take it without arming a timer.
                    chunk = content.read_nowait()
                else:
                    # Waiting here (rather than taking whatever few bytes are buffered right
                    # now) lets chunks grow: measured 4x faster on a 64 MiB download.
                    async with asyncio.timeout(idle):
                        chunk = await content.readany()
            except TimeoutError:
                raise UpstreamTimeout(
                    "the gateway stalled mid-response", f"nothing received for {idle:g}s"
                ) from None
            except aiohttp.ClientError as exc:
                # The upload may still be running after an early answer: its failure
                # surfaces here, wrapped by aiohttp.
                raise _failure(ex, exc, "the gateway broke the response") from None
            if first_chunk:
                first_chunk = False
                if response.status == 401:
                    ex.gateway_error = _gateway_auth_error(
                        chunk, response.headers.get("content-encoding", "")
                    )
            if not chunk:
                ex.response_done = True
                await send({"type": "http.response.body", "body": b""})
                return
            ex.bytes_out += len(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    ex.response_done = True
                    await send({"type": "http.response.body", "body": chunk})
                    return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})


def _failure(ex: Exchange, exc: aiohttp.ClientError, message: str) -> Exception:
    """What an aiohttp error really was: the client leaving or its body failing (both raised
    inside aiohttp's writer task and wrapped by it), else the gateway's fault."""
    if ex.client_gone:
        return _ClientGone()
    if ex.body_error is not None:
        return ex.body_error
    return UpstreamUnavailable(message, _describe(exc))


def _describe(exc: BaseException) -> str:
    """A description of a connection failure for the caller; no URLs, no headers."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection failed: {exc.os_error.strerror or type(exc.os_error).__name__}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the gateway closed the connection"
    return type(exc).__name__


def _gateway_auth_error(first_chunk: bytes, content_encoding: str) -> str | None:
    """Tell a Cloudflare gateway 401 (code 2009: bad cf-aig-authorization) from a fal 401.

    Bodies pass through compressed, so a gzip/deflate head is inflated (2 KiB at most)
    just for this check.
    """
    head = first_chunk[:4096]
    if content_encoding.strip().lower() in ("gzip", "deflate", "x-gzip"):
        try:
            # wbits 47: accept a zlib or a gzip header.
            head = zlib.decompressobj(47).decompress(head, 2048)
        except zlib.error:
            return None
    head = head[:2048]
    if b"2009" in head and (
        b'"code"' in head or b"AiGatewayError" in head or b"internalCode" in head
    ):
        return "cf_gateway_unauthorized_2009"
    return None
