"""Request-head rules (RFC 9112 §3.2) and FAL_PROXY_ALLOWED_HOSTS, as tables."""

from __future__ import annotations

import pytest

from proxy.policy.request_head import head_problem, host_allowed, normalise_host_pattern

H = [(b"host", b"proxy.example.com")]


@pytest.mark.parametrize(
    ("target", "version", "headers", "refused"),
    [
        (b"/fal-ai/fast-sdxl", "1.1", H, False),
        (b"/fal-ai/fast-sdxl?x=1", "1.0", H, False),
        (b"/fal-ai/fast-sdxl", "1.0", [], False),  # HTTP/1.0 may omit Host
        (b"/fal-ai/fast-sdxl", "0.9", H, True),
        (b"/fal-ai/fast-sdxl", "2.0", H, True),
        (b"/fal-ai/fast-sdxl", "1.2", H, True),
        (b"http://evil.example/fal-ai/fast-sdxl", "1.1", H, True),  # absolute-form
        (b"https://proxy.example.com/fal-ai/fast-sdxl", "1.1", H, True),
        (b"evil.example:443", "1.1", H, True),  # authority-form
        (b"*", "1.1", H, True),  # asterisk-form
        (b"", "1.1", H, True),
        (b"/x", "1.1", [], True),  # HTTP/1.1 needs Host
        (b"/x", "1.1", [*H, (b"host", b"evil.example")], True),
        (b"/x", "1.1", [*H, *H], True),  # even the same value twice
        (b"/x", "1.0", [*H, *H], True),
        (b"/x", "1.1", [(b"x-host", b"a"), *H], False),
    ],
)
def test_head_problems(target: bytes, version: str, headers, refused: bool) -> None:
    assert (head_problem(target, version, headers) is not None) == refused


PATTERNS = tuple(
    normalise_host_pattern(p) for p in ("Proxy.Example.com", "*.internal.example", "[::1]")
)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("proxy.example.com", True),
        ("PROXY.EXAMPLE.COM:8787", True),
        ("proxy.example.com.", True),
        ("a.internal.example", True),
        ("a.b.internal.example", True),
        ("internal.example", False),  # *.x is sub-domains only
        ("xinternal.example", False),
        ("proxy.example.com.evil.example", False),
        ("evil.example", False),
        ("[::1]:8787", True),
        ("127.0.0.1", False),
        ("", False),
        (None, False),
    ],
)
def test_allowed_hosts(host: str | None, allowed: bool) -> None:
    assert host_allowed(host, PATTERNS) == allowed


def test_no_patterns_allow_any_host() -> None:
    assert host_allowed("anything", ()) and host_allowed(None, ())


@pytest.mark.parametrize("bad", ["", "a/b", "user@host", "*.", "a.*.b", "http://x", "x y"])
def test_bad_host_patterns_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        normalise_host_pattern(bad)


def test_an_upgrade_needs_http_1_1() -> None:
    upgrade = [*H, (b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    assert head_problem(b"/x/realtime", "1.0", upgrade) is not None
    assert head_problem(b"/x/realtime", "1.1", upgrade) is None
    assert (
        head_problem(b"/x/realtime", "1.1", [*upgrade, (b"x-custom", "café".encode())]) is not None
    )
    assert (
        head_problem(b"/x", "1.1", [*H, (b"x-custom", "café".encode())]) is None
    )  # plain HTTP: forwarded
