"""uvicorn's httptools protocol with the two guards it lacks: a request-head deadline and
:func:`proxy.request_head.head_problem`.

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

Everything else (parsing, flow control, keep-alive, upgrades) is uvicorn's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import BadRequest, RequestTimeout
from .logs import get_logger
from .request_head import head_problem

log = get_logger("proxy.request")


class _BadHead(Exception):
    """Raised inside a parser callback: httptools wraps it and uvicorn answers 400."""


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

    # uvicorn narrows BaseTransport to Transport in the same signature (and ignores it too).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

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

    def send_400_response(self, msg: str) -> None:
        detail = self._refusal or "the request could not be parsed as HTTP/1.1"
        log.info(
            "request",
            status=400,
            error="bad_request_head",
            detail=detail,
            client_ip=self.client[0] if self.client else None,
        )
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
