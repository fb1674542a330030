"""Where a forwarded request goes, and how it is sent: through the gateway, or, with
``FAL_PROXY_FALLBACK=direct``, the way the breaker says (:mod:`proxy.upstream.breaker`). Never twice
when it may have reached the upstream: aiohttp's own resend is off (:mod:`proxy.upstream.session`);
only a request that provably never left, or one that cannot start a generation on a stale
kept-alive connection, is sent once more.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

import aiohttp
from yarl import URL

from ..config.settings import Settings
from ..policy.targets import Target
from .breaker import (
    Attempt,
    Breaker,
    direct_headers,
    direct_url,
    gateway_failed,
    never_left,
)

T = TypeVar("T")


class RoutedCall(Protocol):
    """What the route reads of a call, and the one thing it writes (``via``)."""

    method: str
    generation: bool
    via: str | None


async def via_breaker(
    breaker: Breaker | None,
    gateway: Callable[[], Awaitable[T]],
    direct: Callable[[], Awaitable[T]],
    *,
    judge: Callable[[T], bool],
    judge_error: Callable[[BaseException], tuple[bool | None, bool]],
) -> T:
    """One upstream attempt the breaker's way, for both transports: straight to fal while
    the breaker is open, else through the gateway, and the breaker told how the gateway did.

    ``judge``: did the gateway work, given what it answered. ``judge_error``: for what the
    attempt raised, (did the gateway work: True, False or None for "cannot tell"; may the
    call go straight to fal instead). Nothing else decides a route.
    """
    if breaker is None:
        return await gateway()
    ticket = breaker.route()
    if ticket.direct:
        return await direct()
    verdict: bool | None = None  # the gateway worked, failed, or we cannot tell
    try:
        result = await gateway()
        verdict = judge(result)
        return result
    except Exception as exc:
        verdict, fall_back = judge_error(exc)
        if not fall_back:
            raise
        return await direct()
    finally:
        breaker.report(ticket, verdict)


class UpstreamRoute:
    """The forwarder's way upstream. ``session`` is set by the app's lifespan, ``breaker`` by
    the app when the fallback is on."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.session: aiohttp.ClientSession | None = None
        self.breaker: Breaker | None = None

    async def open(
        self, call: RoutedCall, target: Target, headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> aiohttp.ClientResponse:  # fmt: skip
        """Send the request through the gateway, or (``FAL_PROXY_FALLBACK=direct``) the way
        the breaker says; a request whose gateway connection failed goes to fal once more,
        directly, when its whole body is still in hand (it provably never left)."""
        assert self.session is not None
        if self.breaker is None:
            return await self._send(call, target.upstream_url, headers, body)
        attempt = Attempt()

        def judge_error(exc: BaseException) -> tuple[bool | None, bool]:
            if not isinstance(exc, aiohttp.ClientError) or not never_left(exc, attempt):
                return None, False
            # Failed before it left; a streamed body may have started: never sent twice.
            return False, isinstance(body, bytes | None)

        return await via_breaker(
            self.breaker,
            lambda: self._send(call, target.upstream_url, headers, body, attempt),
            lambda: self._direct(call, target, headers, body),
            judge=lambda response: not gateway_failed(response.status, response.headers),
            judge_error=judge_error,
        )

    async def _direct(
        self, call: RoutedCall, target: Target, headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> aiohttp.ClientResponse:  # fmt: skip
        """The request straight to fal: fal's own URL, no gateway headers."""
        assert self.session is not None
        call.via = "direct"
        url = direct_url(target.host, target.path, target.query, self.settings.gateway.fal_origin)
        return await self._send(call, url, direct_headers(headers), body)

    async def _send(
        self, call: RoutedCall, url: str, headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None, attempt: Attempt | None = None,
    ) -> aiohttp.ClientResponse:  # fmt: skip
        """One request on the pool. A call that cannot start a generation (a queue status or
        result read, a cancel), with its whole body in hand, is sent once more when its kept-
        alive connection turned out closed by the upstream; any other is not (aiohttp's own
        resend is off, proxy.upstream: a GET on fal.run runs the model)."""
        session = self.session
        assert session is not None

        def request() -> Awaitable[aiohttp.ClientResponse]:
            return session.request(
                call.method, URL(url, encoded=True), headers=headers, data=body,
                allow_redirects=False, trace_request_ctx=attempt,
            )  # fmt: skip

        try:
            return await request()
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            repeatable = not call.generation and isinstance(body, bytes | None)
            if not repeatable or isinstance(exc, aiohttp.ClientConnectorError):
                raise
        return await request()
