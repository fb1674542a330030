from __future__ import annotations

import pytest

from proxy.client_ip import client_ip, parse_networks

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
