"""Which address is the client, and one warning when a web server in front is not trusted.

The rule is pure (:func:`proxy.policy.client_ip.client_ip`); this module keeps the one bit of
state around it: how many requests carried an ``X-Forwarded-For`` the proxy ignored.
"""

from __future__ import annotations

from typing import Any

from ..observe.logs import get_logger
from ..policy.client_ip import Network, client_ip
from ..policy.request_head import RequestHeaders

UNTRUSTED_FORWARDS = 20  # requests with an ignored X-Forwarded-For before the one warning

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
