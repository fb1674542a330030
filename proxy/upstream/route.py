"""Where a forwarded request goes, and how it is sent: through the gateway, or, with
``FAL_PROXY_FALLBACK=direct``, the way the breaker says (:mod:`proxy.upstream.breaker`). Never twice
when it may have reached the upstream: aiohttp's own resend is off (:mod:`proxy.upstream.session`);
only a request that provably never left, or one that cannot start a generation on a stale
kept-alive connection, is sent once more.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable

import aiohttp
from yarl import URL

from ..config.settings import Settings
from ..forward.exchange import Exchange
from ..policy.targets import Target
from .breaker import (
    GATEWAY,
    Attempt,
    Breaker,
    direct_headers,
    direct_url,
    gateway_failed,
    never_left,
)


class UpstreamRoute:
    """The forwarder's way upstream. ``session`` is set by the app's lifespan, ``breaker`` by
    the app when the fallback is on."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.session: aiohttp.ClientSession | None = None
        self.breaker: Breaker | None = None

    async def open(
        self, ex: Exchange, target: Target, headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> aiohttp.ClientResponse:  # fmt: skip
        """Send the request through the gateway, or (``FAL_PROXY_FALLBACK=direct``) the way
        the breaker says; a request whose gateway connection failed goes to fal once more,
        directly, when its whole body is still in hand (it provably never left)."""
        assert self.session is not None
        breaker = self.breaker
        ticket = breaker.route() if breaker is not None else GATEWAY
        if ticket.direct:
            return await self._direct(ex, target, headers, body)
        verdict: bool | None = None  # the gateway worked, failed, or we cannot tell
        attempt = Attempt()
        try:
            response = await self._send(ex, target.upstream_url, headers, body, attempt)
            verdict = not gateway_failed(response.status, response.headers)
            return response
        except aiohttp.ClientError as exc:
            if breaker is None or not never_left(exc, attempt):
                raise
            verdict = False
            if not isinstance(body, bytes | None):
                raise  # a streamed body may have started: never sent twice
            return await self._direct(ex, target, headers, body)
        finally:
            if breaker is not None:
                breaker.report(ticket, verdict)

    async def _direct(
        self, ex: Exchange, target: Target, headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> aiohttp.ClientResponse:  # fmt: skip
        """The request straight to fal: fal's own URL, no gateway headers."""
        assert self.session is not None
        ex.via = "direct"
        url = direct_url(target.host, target.path, target.query, self.settings.gateway.fal_origin)
        return await self._send(ex, url, direct_headers(headers), body)

    async def _send(
        self, ex: Exchange, url: str, headers: list[tuple[str, str]],
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
                ex.method, URL(url, encoded=True), headers=headers, data=body,
                allow_redirects=False, trace_request_ctx=attempt,
            )  # fmt: skip

        try:
            return await request()
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            repeatable = not ex.generation and isinstance(body, bytes | None)
            if not repeatable or isinstance(exc, aiohttp.ClientConnectorError):
                raise
        return await request()
