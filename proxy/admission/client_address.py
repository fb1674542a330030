"""Which address is the client, whose limits an anonymous call counts against, and one
warning when a web server in front is not trusted.

The rules are pure (:mod:`proxy.policy.client_ip`); this module keeps the state around them:
how many requests carried an ``X-Forwarded-For`` the proxy ignored, and which address buckets
have limits of their own this month (:class:`AddressBuckets`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..limits.windows import period_bounds
from ..observe.logs import get_logger
from ..policy.client_ip import Network, client_ip, limit_key, page_host
from ..policy.request_head import RequestHeaders

UNTRUSTED_FORWARDS = 20  # requests with an ignored X-Forwarded-For before the one warning
# Address buckets (an IPv4 address, an IPv6 /64) with limits and usage of their own per
# calendar month; past that, new ones share one. Each holds ~200 bytes of counts until the
# month ends, and a /48 alone holds 65,536 /64s: without a bound, spraying addresses would
# grow the process (and Redis) without end.
MAX_ADDRESS_BUCKETS = 100_000
SHARED_BUCKET = "ip:others"

log = get_logger("proxy.admission")


class ClientAddresses:
    def __init__(self, trusted_proxies: tuple[Network, ...]) -> None:
        self.trusted_proxies = trusted_proxies
        self._forwarded_ignored = 0  # requests whose X-Forwarded-For an untrusted peer sent

    def client(self, scope: Any, headers: RequestHeaders) -> str:
        peer = scope.get("client")
        address = client_ip(peer[0] if peer else None, headers.forwarded_for, self.trusted_proxies)
        if (
            headers.forwarded_for
            and address != "unknown"
            and self._forwarded_ignored < UNTRUSTED_FORWARDS
        ):
            self._note_ignored_forward(address, headers)
        return address

    def page_host(self, scope: Any, headers: RequestHeaders) -> str | None:
        """The host the page was served from (:func:`~proxy.policy.client_ip.page_host`)."""
        peer = scope.get("client")
        return page_host(peer[0] if peer else None, headers.host, headers.forwarded_host,
                         headers.forwarded_port, self.trusted_proxies)  # fmt: skip

    def _note_ignored_forward(self, address: str, headers: RequestHeaders) -> None:
        """Say once when an untrusted peer keeps sending X-Forwarded-For: a web server in
        front of the proxy that is not in FAL_PROXY_TRUSTED_PROXIES makes every user behind
        it one client (one rate-limit bucket with FAL_PROXY_AUTH=none)."""
        forwarded = {hop.strip() for value in headers.forwarded_for for hop in value.split(",")}
        if address in forwarded:
            return  # believed: a trusted peer told us the address
        self._forwarded_ignored += 1
        if self._forwarded_ignored == UNTRUSTED_FORWARDS:
            log.warning(
                "x_forwarded_for_ignored",
                peer=address,
                requests=UNTRUSTED_FORWARDS,
                hint="requests from this peer carry X-Forwarded-For, but it is not in "
                "FAL_PROXY_TRUSTED_PROXIES: every user behind it counts as one client "
                "(one set of limits with FAL_PROXY_AUTH=none). Add it if it is your web "
                "server or load balancer.",
            )


class AddressBuckets:
    """Whose limits an anonymous call (``FAL_PROXY_AUTH=none``) counts against: its address
    bucket, for the first ``limit`` buckets seen this calendar month; every later one shares
    ``ip:others`` (fails closed: spreading calls over more addresses buys no more calls).
    O(1) per call; the set is dropped when the month ends."""

    def __init__(
        self, limit: int = MAX_ADDRESS_BUCKETS, clock: Callable[[], float] = time.time
    ) -> None:
        self.limit, self.clock = limit, clock
        self._seen: set[str] = set()
        self._ends = 0.0  # the end of the month the set is for
        self._warned = False

    def key(self, address: str) -> str:
        bucket = limit_key(address)
        seen = self._seen
        if bucket in seen:
            return f"ip:{bucket}"
        now = self.clock()
        if now >= self._ends:
            seen.clear()
            self._ends, self._warned = period_bounds("month", now)[2], False
        if len(seen) < self.limit:
            seen.add(bucket)
            return f"ip:{bucket}"
        if not self._warned:
            self._warned = True
            log.warning(
                "address_buckets_full",
                buckets=self.limit,
                hint="this month's anonymous clients past this many share one set of limits "
                "and quotas; set FAL_PROXY_AUTH=token or jwt so callers are counted by "
                "credential, not by address",
            )
        return SHARED_BUCKET
