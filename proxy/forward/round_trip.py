"""One request's round trip upstream: the body up, the answer down, the client watched.

The body is sent as it arrives (:mod:`proxy.forward.upload`), the answer relayed as the
gateway sends it (:mod:`proxy.forward.relay`). While the call runs, the client is watched
(the server says when it leaves; else a task waits for it to) and the call cancelled if it
goes, which closes the upstream connection at once (an aborted SSE stream must not keep a
generation, or a connection, alive). Every failure
becomes the client's error (:mod:`proxy.upstream.failures`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
from starlette.types import Message, Receive, Send

from ..config.settings import Settings
from ..errors import ClientGone, PayloadTooLarge
from ..policy.targets import Target
from ..upstream.failures import client_error, timeout_error
from ..upstream.route import UpstreamRoute
from .deadline import Deadline
from .exchange import Exchange
from .relay import relay_response, relay_rewritten
from .upload import UploadDeadline, stream_body

# The server's way of telling a call that its client left (proxy.serve.protocol.on_client_lost):
# (receive, callback) → what stops it, or None when the server cannot tell.
ClientLost = Callable[[Receive, Callable[[], None]], Callable[[], object] | None]


async def round_trip(
    route: UpstreamRoute,
    settings: Settings,
    target: Target,
    headers: list[tuple[str, str]],
    receive: Receive,
    send: Send,
    ex: Exchange,
    first: Message,
    rewrite: Callable[[bytes], bytes | None] | None = None,
    on_client_lost: ClientLost = lambda receive, callback: None,
) -> None:
    """Send the request upstream (its body streamed as it arrives) and relay the answer,
    while the client is watched: if it leaves, the call is cancelled (which closes the
    upstream connection at once: an aborted stream keeps no generation alive). The server
    says when it leaves (``on_client_lost``); else a task waits for ``http.disconnect``."""
    assert route.session is not None, "the app's lifespan did not run"
    loop = asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    assert task is not None
    stop_watching: Callable[[], object] | None = None

    def client_left() -> None:
        if not ex.response_done:  # (a disconnect after the whole answer is no news)
            ex.client_gone = True
            task.cancel()

    async def watch_disconnect() -> None:
        # After the body, the only message left is http.disconnect: the client went away
        # (or the response completed, which `response_done` tells apart).
        message = await receive()
        if message["type"] == "http.disconnect":
            client_left()

    def start_watcher() -> None:
        nonlocal stop_watching
        # Called once the whole body is sent (or in hand, about to be): from here on fal
        # may start the generation whatever becomes of the answer (a caller hanging up
        # must not get its budget's estimate back, proxy.limits.spend).
        ex.body_went_up = True
        if stop_watching is None:
            stop_watching = on_client_lost(receive, client_left)
            if stop_watching is None:
                stop_watching = loop.create_task(watch_disconnect()).cancel

    body: bytes | AsyncIterator[bytes] | None
    first_chunk = first.get("body", b"")
    ex.bytes_in = len(first_chunk)
    if ex.bytes_in > settings.max_body_bytes:
        raise PayloadTooLarge.over(settings.max_body_bytes)

    def body_sent() -> None:
        start_watcher()
        if ex.trace is not None:
            ex.trace.event("request_body_sent")

    upload: UploadDeadline | None = None
    if first.get("more_body", False):
        upload = UploadDeadline(
            loop, task, settings.idle_timeout, settings.first_byte_timeout, body_sent
        )
        deadline = upload.timeout
        body = stream_body(first_chunk, receive, ex, upload, settings.max_body_bytes)
    else:
        # The whole body is here already (the usual small JSON): no streaming needed.
        body = first_chunk or None
        deadline = Deadline(loop, task, loop.time() + settings.first_byte_timeout)
        start_watcher()

    response: aiohttp.ClientResponse | None = None
    try:
        try:
            async with deadline:
                response = await route.open(ex, target, headers, body)
        except TimeoutError:
            raise timeout_error(
                body_error=ex.body_error, body_phase=ex.body_phase,
                first_byte_expired=deadline.expired(), idle=settings.idle_timeout,
                first_byte=settings.first_byte_timeout, connect=settings.connect_timeout,
            ) from None  # fmt: skip
        except aiohttp.ClientError as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                ex.body_went_up = False  # no connection was made: it provably never left
            raise client_error(
                exc, client_gone=ex.client_gone, body_error=ex.body_error,
                message="the gateway could not be reached",
            ) from None  # fmt: skip
        finally:
            if upload is not None:
                upload.waiting_for_headers = False
        if upload is not None and upload.body_sent:  # (else the body iterator starts it)
            start_watcher()
        idle = Deadline(loop, task, None)  # the idle timeout between two chunks
        if rewrite is not None:
            await relay_rewritten(response, send, ex, settings.idle_timeout, rewrite, idle)
        else:
            await relay_response(response, send, ex, settings.idle_timeout, idle)
    except asyncio.CancelledError:
        if ex.client_gone:
            task.uncancel()
            raise ClientGone() from None
        raise
    finally:
        if stop_watching is not None:
            stop_watching()
        if response is not None:
            if ex.response_done:
                response.release()
            else:
                response.close()  # drop the connection: the upstream sees the abort
