"""``FAL_PROXY_FALLBACK=direct``: a circuit breaker around the gateway, and the direct path to
fal it opens onto. The breaker is a small state machine on the monotonic clock (no timer, no
thread: each call asks it the way, in O(1)); the rest are pure functions.

Only failures that are the gateway's own count: a connection (TCP, TLS, DNS) that failed
before the request was sent, or a 5xx that fal did not write (no ``x-fal-request-id``: a
Cloudflare error page). ``failures`` of them in a row, within ``window`` seconds, open it: calls
then go straight to fal for ``open_seconds``; then the next call is the one probe through the
gateway (the others keep going direct meanwhile) and its outcome closes or reopens it. The
pattern is the classic one (Nygard, *Release It!*, "Circuit Breaker"); the counting is ours.

A request that may have reached the gateway is never sent again: only one whose connection
failed (:func:`never_left`) is retried, once, on the direct path.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True, slots=True)
class Ticket:
    """One call's way: straight to fal, or through the gateway (as the probe, perhaps)."""

    direct: bool
    probe: bool = False


GATEWAY = Ticket(direct=False)
DIRECT = Ticket(direct=True)


class Breaker:
    """Closed (through the gateway), open (straight to fal) or half-open (one probe out)."""

    def __init__(
        self, failures: int, window: float, open_seconds: float, *,
        on_change: Callable[[str, str], None] = lambda _old, _new: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.failures, self.window, self.open_seconds = failures, window, open_seconds
        self.on_change, self.clock = on_change, clock
        self.state = CLOSED
        self.recent: deque[float] = deque(maxlen=failures)  # times of the failures in a row
        self.opened_at = 0.0
        self.probing = False

    def route(self) -> Ticket:
        if self.state == CLOSED:
            return GATEWAY
        if self.state == OPEN and self.clock() - self.opened_at >= self.open_seconds:
            self._set(HALF_OPEN)
        if self.state == HALF_OPEN and not self.probing:
            self.probing = True
            return Ticket(direct=False, probe=True)
        return DIRECT

    def success(self, ticket: Ticket) -> None:
        """The gateway answered (fal's answer, even an error, is the gateway working)."""
        if ticket.direct:
            return
        self.recent.clear()
        if ticket.probe:
            self.probing = False
            self._set(CLOSED)

    def failure(self, ticket: Ticket) -> None:
        """The gateway itself failed this call."""
        if ticket.direct:
            return
        now = self.clock()
        if ticket.probe:
            self.probing = False
            self._open(now)
            return
        if self.state != CLOSED:
            return  # a call sent before the breaker opened, failing late
        self.recent.append(now)
        if len(self.recent) == self.failures and now - self.recent[0] <= self.window:
            self._open(now)

    def abandon(self, ticket: Ticket) -> None:
        """The call ended with no verdict (the client left, an ambiguous error): a probe's turn
        passes to the next call."""
        if ticket.probe:
            self.probing = False

    def report(self, ticket: Ticket, worked: bool | None) -> None:
        """A call's outcome: the gateway worked, failed, or (None) we cannot tell."""
        if worked is None:
            self.abandon(ticket)
        elif worked:
            self.success(ticket)
        else:
            self.failure(ticket)

    def _open(self, now: float) -> None:
        self.opened_at = now
        self.recent.clear()
        self._set(OPEN)

    def _set(self, state: str) -> None:
        if state != self.state:
            old, self.state = self.state, state
            self.on_change(old, state)


class Attempt:
    """One request's connection, as aiohttp's tracing saw it (``trace_request_ctx``)."""

    __slots__ = ("connecting",)

    def __init__(self) -> None:
        self.connecting = False  # a new connection to the gateway was being made


def connection_tracing() -> aiohttp.TraceConfig:
    """Tells, per request, whether aiohttp started making a connection: a connect timeout
    while merely queued for the proxy's own pool (FAL_PROXY_UPSTREAM_CONNECTIONS) is local
    congestion, not the gateway failing."""

    async def creating(_session: Any, context: Any, _params: Any) -> None:
        attempt = context.trace_request_ctx
        if isinstance(attempt, Attempt):
            attempt.connecting = True

    tracing = aiohttp.TraceConfig()
    tracing.on_connection_create_start.append(creating)
    return tracing


def never_left(exc: BaseException, attempt: Attempt) -> bool:
    """The request provably never reached the gateway, and the gateway is to blame: a
    connection to it was being made and failed (refused, DNS, TLS) or timed out. (aiohttp
    sends a request only once, see proxy.upstream: no earlier attempt can have sent it.)"""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return True
    return isinstance(exc, aiohttp.ConnectionTimeoutError) and attempt.connecting


# Timeouts a caller can cause at will, with a slow synchronous run: the gateway (504) or the
# Cloudflare edge in front of it (524, after ~100 s) gave up waiting for fal. The gateway was
# up to say so; counted, they would let any caller open the breaker and move every other
# caller's traffic off the gateway.
CALLER_TIMEOUTS = frozenset({504, 524})


def gateway_failed(status: int, headers: Mapping[str, str]) -> bool:
    """A 5xx that fal did not write and no caller can produce at will: the gateway's own
    (Cloudflare's error pages carry no fal request id; fal's own 5xx do, and are answers, not
    outages; a timeout waiting for fal is the caller's slow run, not an outage)."""
    return status >= 500 and status not in CALLER_TIMEOUTS and "x-fal-request-id" not in headers


def direct_url(host: str, path: str, query: str, origin: str | None) -> str:
    """``https://<host><path>?<query>``: fal itself; ``origin`` (tests only) stands in for
    fal's hosts as ``<origin>/<host><path>``."""
    suffix = f"?{query}" if query else ""
    if origin is not None:
        return f"{origin}/{host}{path}{suffix}"
    return f"https://{host}{path}{suffix}"


def direct_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The gateway's headers off: every ``cf-aig-*`` and ``x-fal-target-url`` (fal's own URL
    is the target now); fal's key and the client's headers stay."""
    return [(n, v) for n, v in headers if not n.startswith("cf-aig-") and n != "x-fal-target-url"]
