"""Which address is the client? Pure.

``X-Forwarded-For`` is trusted only when the connection comes from an address listed in
``FAL_PROXY_TRUSTED_PROXIES`` (a load balancer, an ingress). Then the list is walked from
the right, skipping trusted hops, and the first untrusted address is the client: entries
further left were written by the client itself and prove nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Sequence[str]) -> tuple[Network, ...]:
    """``["10.0.0.0/8", "127.0.0.1"]`` → networks; raises ValueError on a bad entry."""
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip())


def _parse(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address, IPv4-mapped IPv6 (``::ffff:1.2.3.4``) read as the IPv4 it is; None if garbage."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    ip = _parse(address)
    return ip is not None and any(ip in net for net in trusted)


def normalise(address: str) -> str:
    """One spelling per address: ``::ffff:1.2.3.4`` → ``1.2.3.4``, ``0:0::1`` → ``::1``."""
    if ":" not in address and address[-1:].isdigit():  # IPv4 from the socket: already one spelling
        return address
    ip = _parse(address)
    return str(ip) if ip is not None else address


def limit_key(address: str) -> str:
    """The rate-limit bucket of a client address: the address, or its /64 for IPv6.

    One IPv6 host usually holds a whole /64 (SLAAC, privacy addresses): keyed by address,
    it could rotate through 2^64 buckets and never meet a limit.
    """
    if ":" not in address:  # IPv4 (normalised already by client_ip), or "unknown"
        return address
    ip = _parse(address)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip) if ip is not None else address


def client_ip(peer: str | None, forwarded_for: Sequence[str], trusted: tuple[Network, ...]) -> str:
    """The client's address, given the TCP peer and every ``X-Forwarded-For`` header value."""
    peer = normalise(peer) if peer else "unknown"
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            ip = _parse(hop)
            # garbage in the header: fall back to the last hop we know
            return str(ip) if ip is not None else peer
    first = _parse(hops[0]) if hops else None
    return str(first) if first is not None else peer


LOOPBACK: tuple[Network, ...] = parse_networks(["127.0.0.0/8", "::1"])


def page_host(
    peer: str | None, host: str | None, forwarded_host: str | None, forwarded_port: str | None,
    trusted: tuple[Network, ...],
) -> str | None:  # fmt: skip
    """The host a browser's page was served from, for the same-origin check: ``Host``, or
    what a forwarding proxy reports in ``X-Forwarded-Host`` (its first entry, with
    ``X-Forwarded-Port`` when it names no port) when the connection comes from it.

    Believed from ``trusted`` (FAL_PROXY_TRUSTED_PROXIES) and from loopback: a dev server on
    the same machine (Next.js ``rewrites``, Vite with ``changeOrigin``) replaces ``Host``
    with the proxy's and keeps the page's here. A page cannot forge it: a browser sends no
    such header on a simple request, and a custom one needs a preflight, which is judged on
    ``Origin`` alone.
    """
    if not forwarded_host or peer is None:
        return host
    if not (_trusted(peer, trusted) or _trusted(peer, LOOPBACK)):
        return host
    first = forwarded_host.split(",", 1)[0].strip()
    if not first:
        return host
    has_port = first.rsplit("]", 1)[-1].count(":") == 1
    port = (forwarded_port or "").split(",", 1)[0].strip()
    if not has_port and port.isdigit():
        first = f"{first}:{port}"
    return first
