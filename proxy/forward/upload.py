"""The request body on its way up, and the deadlines that watch it.

While a body streams, the exchange's deadline is the idle timeout, pushed back on every
chunk that moves (client to proxy, or proxy to gateway); once the whole body is sent the
first-byte clock starts, so a big upload is not cut short by it. When the deadline fires,
``ex.body_phase`` tells who stalled (:func:`proxy.upstream.failures.timeout_error`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from starlette.types import Message, Receive

from ..errors import ClientGone, PayloadTooLarge, RequestTimeout
from .deadline import Deadline
from .exchange import Exchange


class UploadDeadline:
    """The deadline for the response headers while a body streams up.

    ``progress()`` is called as chunks move; ``progress(done=True)`` once the body is sent,
    which also calls ``on_body_sent`` (the forwarder starts its disconnect watcher then).
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[object], idle: float,
        first_byte: float, on_body_sent: Callable[[], None],
    ) -> None:  # fmt: skip
        self.timeout = Deadline(loop, task, None)  # ``task``: the call's, which it cancels
        self.idle, self.first_byte = idle, first_byte
        self.on_body_sent = on_body_sent
        self.waiting_for_headers = True  # False once the headers came (or the call failed)
        self.body_sent = False

    def progress(self, done: bool = False) -> None:
        if self.waiting_for_headers:
            self.timeout.after(self.first_byte if done else self.idle)
        if done:
            self.body_sent = True
            self.on_body_sent()


async def stream_body(
    first_chunk: bytes, receive: Receive, ex: Exchange, deadline: UploadDeadline, max_bytes: int
) -> AsyncIterator[bytes]:
    """Yield the request body as the client sends it, within ``max_bytes``.

    Runs inside aiohttp's writer task. A failure is recorded on ``ex`` and raised: aiohttp
    then drops the upstream connection without finishing the body, so the upstream never
    takes a truncated body for a complete one.
    """
    deadline.progress()
    if first_chunk:
        ex.body_phase = "send"
        yield first_chunk
    more = True
    while more:
        deadline.progress()
        ex.body_phase = "receive"
        message = await receive()
        if message["type"] == "http.disconnect":
            ex.client_gone = True
            raise ClientGone()
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        ex.bytes_in += len(chunk)
        if ex.bytes_in > max_bytes:
            ex.body_error = PayloadTooLarge.over(max_bytes)
            raise ex.body_error
        if chunk:
            deadline.progress()
            ex.body_phase = "send"
            yield chunk
    ex.body_phase = None
    deadline.progress(done=True)


async def receive_body(receive: Receive, idle: float, in_hand: bool) -> Message:
    """The body's next message within ``idle`` seconds (408 after), ClientGone for a
    disconnect. ``in_hand``: the server holds the whole body already, so the message comes
    at once and the timer (~6 µs) is not armed."""
    if in_hand:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        return message
    try:
        async with asyncio.timeout(idle):
            message = await receive()
    except TimeoutError:
        raise RequestTimeout("request body stalled", f"nothing received for {idle:g}s") from None
    if message["type"] == "http.disconnect":
        raise ClientGone()
    return message


async def read_small_body(
    receive: Receive, ex: Exchange, idle: float, body_in_hand: Callable[[Receive], bool],
    limit: int = 16 * 1024, what: str = "a token request",
) -> bytes:  # fmt: skip
    """A whole body of at most ``limit`` bytes (``what``: a realtime token request, a
    ``wma.fal.run`` call), or 413 saying so."""
    body, more = bytearray(), True
    while more:
        message = await receive_body(receive, idle, body_in_hand(receive))
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > limit:
            raise PayloadTooLarge("request body too large", f"{what} is at most {limit} bytes")
    ex.bytes_in = len(body)
    return bytes(body)
