from __future__ import annotations

import pytest

from proxy.policy.client_ip import client_ip, limit_key, page_host, parse_networks

TRUSTED = parse_networks(["10.0.0.0/8", "127.0.0.1"])


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("203.0.113.9", [], "203.0.113.9"),
        ("203.0.113.9", ["1.2.3.4"], "203.0.113.9"),  # untrusted peer: its header is ignored
        ("10.1.2.3", ["198.51.100.7"], "198.51.100.7"),
        ("10.1.2.3", ["6.6.6.6, 198.51.100.7"], "198.51.100.7"),  # spoofed left entry ignored
        ("10.1.2.3", ["6.6.6.6, 198.51.100.7, 10.9.9.9"], "198.51.100.7"),  # trusted hops skipped
        ("10.1.2.3", ["6.6.6.6", "198.51.100.7"], "198.51.100.7"),  # several header lines
        ("10.1.2.3", [], "10.1.2.3"),
        ("10.1.2.3", ["garbage"], "10.1.2.3"),
        ("127.0.0.1", ["2001:db8::1"], "2001:db8::1"),
        (None, [], "unknown"),
    ],
)
def test_forwarded_for_is_believed_only_from_trusted_proxies(peer, xff, expected) -> None:
    assert client_ip(peer, xff, TRUSTED) == expected


def test_nothing_trusted_by_default() -> None:
    assert client_ip("10.1.2.3", ["198.51.100.7"], ()) == "10.1.2.3"


def test_bad_networks_are_refused() -> None:
    with pytest.raises(ValueError):
        parse_networks(["not-an-ip"])


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("::ffff:10.1.2.3", ["198.51.100.7"], "198.51.100.7"),  # a mapped trusted peer is trusted
        ("10.1.2.3", ["::ffff:198.51.100.7"], "198.51.100.7"),  # one spelling per address
        ("10.1.2.3", ["0:0:0:0:0:ffff:c633:6407"], "198.51.100.7"),
        ("::ffff:203.0.113.9", [], "203.0.113.9"),
        ("10.1.2.3", ["2001:DB8:0:0::1"], "2001:db8::1"),
        ("10.1.2.3", ["::ffff:10.9.9.9"], "10.9.9.9"),  # all trusted: the leftmost, normalised
    ],
)
def test_ipv4_mapped_and_other_spellings_are_one_address(peer, xff, expected) -> None:
    assert client_ip(peer, xff, TRUSTED) == expected


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:db8::ffff:1:2", "2001:db8::/64"),  # the same /64: the same bucket
        ("2001:db8:0:1::1", "2001:db8:0:1::/64"),
        ("unknown", "unknown"),
    ],
)
def test_limit_keys_group_an_ipv6_slash_64(address: str, key: str) -> None:
    assert limit_key(address) == key


TRUSTED_LB = parse_networks(["10.0.0.5"])


@pytest.mark.parametrize(
    ("peer", "host", "forwarded_host", "forwarded_port", "page"),
    [
        # A same-machine dev server (Next.js rewrites): the page's host comes forwarded.
        ("127.0.0.1", "127.0.0.1:8787", "localhost:3000", "3000", "localhost:3000"),
        ("::1", "[::1]:8787", "localhost:3000", None, "localhost:3000"),
        ("127.0.0.1", "127.0.0.1:8787", "localhost", "3000", "localhost:3000"),  # port apart
        ("127.0.0.1", "127.0.0.1:8787", "[::1]", "5173", "[::1]:5173"),
        ("127.0.0.1", "127.0.0.1:8787", "a.test:1, b.test:2", None, "a.test:1"),  # the first
        ("10.0.0.5", "proxy:8787", "app.example", "443", "app.example:443"),  # a trusted LB
        # Anyone else's X-Forwarded-Host is not believed.
        ("203.0.113.9", "proxy:8787", "localhost:3000", None, "proxy:8787"),
        ("10.0.0.6", "proxy:8787", "app.example", None, "proxy:8787"),
        (None, "proxy:8787", "localhost:3000", None, "proxy:8787"),
        ("127.0.0.1", "127.0.0.1:8787", None, "3000", "127.0.0.1:8787"),
        ("127.0.0.1", "127.0.0.1:8787", " , x", None, "127.0.0.1:8787"),  # no first entry
        ("127.0.0.1", "127.0.0.1:8787", "localhost", "http", "localhost"),  # not a port
    ],
)
def test_the_pages_host_as_a_forwarding_dev_server_reports_it(
    peer: str | None, host: str, forwarded_host: str | None, forwarded_port: str | None, page: str
) -> None:
    assert page_host(peer, host, forwarded_host, forwarded_port, TRUSTED_LB) == page
