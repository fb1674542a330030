"""uvicorn's httptools protocol with the two guards it lacks: a request-head deadline and
:func:`proxy.policy.request_head.head_problem`.

* **Header timeout.** uvicorn closes idle keep-alive connections but has no limit on how
  long a request head may take to arrive, so 400 connections that trickle one byte a
  second stay open forever and can exhaust the process's file descriptors (slowloris).
  A connection whose head is not complete within ``header_timeout`` seconds (from
  accept, or from the first byte of a later request on a keep-alive connection) gets a
  JSON 408 and is closed, as nginx's ``client_header_timeout`` does.
* **Malformed heads** (HTTP/0.9, absolute-form targets, a missing or doubled ``Host``) are
  refused with a JSON 400 before the app runs: raising from the parser callback makes
  uvicorn answer with :meth:`send_400_response`, which here writes our JSON shape, for
  its own parser errors too.

* **The client's departure, told.** The forwarder learns that a client hung up mid-call
  from :func:`on_client_lost`: the protocol calls it back from ``connection_lost``. Without
  it, every call would keep a task waiting on ``receive()`` for ``http.disconnect`` (a task
  made and cancelled per request, ~5 µs).
* **One write per answer.** uvicorn writes a response's head and its body with one
  ``transport.write`` each: two ``send()`` syscalls for a small answer, which py-spy put at
  ~5 % of a small request's CPU each. A request's writes go through :class:`GatheredWrites`,
  which holds a response's head until its body's first write (then both go out in one
  ``writev``) or, if none comes, the end of the event loop's turn; a body's writes go out at
  once, so a streamed event never waits behind the rest of the loop's turn. Nothing waits
  for a timer.

Everything else (parsing, flow control, keep-alive, upgrades) is uvicorn's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from ..errors import BadRequest, RequestTimeout
from ..observe.logs import get_logger
from ..policy.request_head import head_problem

log = get_logger("proxy.request")


class _BadHead(Exception):
    """Raised inside a parser callback: httptools wraps it and uvicorn answers 400."""


_ON_LOST = "fal_proxy_on_lost"  # a request cycle's entry: called when its client goes away


def on_client_lost(receive: Any, callback: Callable[[], None]) -> Callable[[], object] | None:
    """Have ``callback`` called once if the client of the request ``receive`` belongs to
    leaves before its answer is complete (now, if it has left already); returns what stops
    that. None when ``receive`` is not a request of :class:`GuardedHttpToolsProtocol`: the
    caller then waits for ``http.disconnect`` on ``receive()`` itself."""
    cycle = getattr(receive, "__self__", None)
    if not isinstance(cycle, RequestResponseCycle):
        return None
    transport: Any = cycle.transport  # this protocol's cycles write through GatheredWrites
    if not isinstance(transport, GatheredWrites):
        return None
    if cycle.disconnected:
        callback()
        return _nothing
    # As receive() does before it waits: a connection whose reading is paused (a big body
    # read slowly) would never see the client's end.
    cycle.flow.resume_reading()
    entries = cycle.__dict__
    entries[_ON_LOST] = callback
    return lambda: entries.pop(_ON_LOST, None)


def _nothing() -> None:
    pass


def _tell_lost(cycle: Any) -> None:
    callback = cycle.__dict__.pop(_ON_LOST, None)
    if callback is not None:
        callback()


GATHER_LIMIT = 64 * 1024  # a head this large is written at once, not held for its body


class GatheredWrites:
    """The transport as a request's uvicorn cycle sees it: a response's head is held until
    the next write (its body's first: both go out together), or the turn's end
    (``call_soon``) if none comes in it; every other write goes out at once, after what is
    held.

    Everything that ends the connection or writes past the cycle flushes first, so bytes
    never change order or stay behind: the cycle's ``close()`` here, and the protocol's own
    writes and closes (:class:`GuardedHttpToolsProtocol` calls :meth:`flush`).
    """

    __slots__ = ("_held", "_loop", "_size", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._held: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        self._held.append(data)
        self._size += len(data)
        # uvicorn writes a head whole, starting with its status line (a 100 Continue too).
        # Anything else is body: out now, with the head if it is still held. Holding a
        # streamed event to the turn's end made it wait for every other callback of the
        # turn (a burst's first event for the whole burst), and cost a call_soon per event.
        if data.startswith(b"HTTP/") and self._size < GATHER_LIMIT:
            if len(self._held) == 1:
                self._loop.call_soon(self.flush)
            return
        self.flush()

    def flush(self) -> None:
        if not self._held:
            return
        held, self._held, self._size = self._held, [], 0
        if self._transport.is_closing():  # the client is gone: what it would have read, too
            return
        if len(held) == 1:
            self._transport.write(held[0])
        else:
            self._transport.writelines(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # anything else a cycle might use: the transport's
        return getattr(self._transport, name)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout: float = 10.0  # set per server by :func:`guarded_protocol`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: str | None = None
        self._reading_head = False
        # Every request of this connection not yet answered: uvicorn's self.cycle is only the
        # newest (a pipelined one replaces the one still streaming).
        self._open_cycles: list[Any] = []
        self._gathered: GatheredWrites | None = None

    # uvicorn narrows BaseTransport to Transport in the same signature (and ignores it too).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._gathered = GatheredWrites(transport, self.loop)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        # Every request still being answered, not only uvicorn's newest cycle.
        for cycle in self._open_cycles:
            if not cycle.response_complete:
                _tell_lost(cycle)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head = True

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # A later request on a kept-alive connection whose head did not arrive whole in this
        # read (usually it does, and no timer is needed). One pipelined behind a response
        # still streaming waits for it (uvicorn reads it only then): its clock starts at that
        # response's end, so a slow pipelined head never cuts a stream short.
        if (
            self._reading_head
            and self._head_timer is None
            and not self.transport.is_closing()
            and (self.cycle is None or self.cycle.response_complete)
        ):
            self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._reading_head and self._head_timer is None and not self.transport.is_closing():
            self._arm()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._disarm()
        problem = head_problem(self.url, self.parser.get_http_version(), self.headers)
        if problem is not None:
            self._refusal = problem
            raise _BadHead(problem)
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not before:  # a request (not an upgrade): remember it until answered
            self._open_cycles = [c for c in self._open_cycles if not c.response_complete]
            self._open_cycles.append(self.cycle)
            self.cycle.transport = self._gathered  # type: ignore[assignment]  # duck-typed

    def shutdown(self) -> None:
        self._flush()  # uvicorn closes the transport itself when the response is complete
        super().shutdown()

    def timeout_keep_alive_handler(self) -> None:
        self._flush()
        super().timeout_keep_alive_handler()

    def _flush(self) -> None:
        if self._gathered is not None:
            self._gathered.flush()

    def send_400_response(self, msg: str) -> None:
        detail = self._refusal or "the request could not be parsed as HTTP/1.1"
        log.info(
            "request",
            status=400,
            error="bad_request_head",
            detail=detail,
            client_ip=self.client[0] if self.client else None,
        )
        self._flush()
        if not self._abandon_cycles():  # a 400 now would read as the answer to the request before
            self.transport.write(BadRequest("invalid HTTP request", detail).http_response())
        self.transport.close()

    def _abandon_cycles(self) -> bool:
        """Tell a request still being answered (and any pipelined after it) that its client
        is gone, before the connection closes under it; True if there was one.

        A closing transport reports the loss only later: meanwhile the app's next write
        would raise ("handler is closed") instead of ending quietly as a disconnect.
        """
        busy = [c for c in self._open_cycles if not c.response_complete]
        for cycle in busy:
            cycle.disconnected = True
            cycle.message_event.set()
            _tell_lost(cycle)
        return bool(busy)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._flush()
        if self.transport.is_closing():
            return
        log.info(
            "request",
            status=408,
            error="header_timeout",
            client_ip=self.client[0] if self.client else None,
        )
        if not self._abandon_cycles():  # nothing else is being written
            timeout = RequestTimeout(
                "request headers too slow",
                f"the request head must arrive within {self.header_timeout:g}s "
                "(FAL_PROXY_HEADER_TIMEOUT)",
            )
            self.transport.write(timeout.http_response())
        self.transport.close()


def guarded_protocol(header_timeout: float) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for uvicorn's ``http=``, with this server's header timeout."""
    return type(
        "GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"header_timeout": header_timeout}
    )
