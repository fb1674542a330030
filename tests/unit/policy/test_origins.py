"""Origin policy table."""

from __future__ import annotations

import pytest

from proxy.errors import Forbidden
from proxy.policy.origins import (
    OriginPolicy,
    check_browser_request,
    check_origin,
    cors_headers,
    normalise_origin,
    preflight_headers,
)

POLICY = OriginPolicy.build(
    ["https://app.example.com", "http://localhost:3000"], ["x-custom"], "x-proxy-authorization"
)


@pytest.mark.parametrize(
    ("origin", "host", "expected"),
    [
        (None, "proxy.local", None),  # not a browser cross-site request
        ("https://app.example.com", "proxy.local", "https://app.example.com"),
        ("HTTPS://APP.EXAMPLE.COM:443", "proxy.local", "https://app.example.com"),
        ("http://localhost:3000", "127.0.0.1:8787", "http://localhost:3000"),
        ("http://127.0.0.1:8787", "127.0.0.1:8787", None),  # same origin
        ("http://localhost:8787", "localhost:8787", None),
        ("http://[::1]:8787", "[::1]:8787", None),
    ],
)
def test_allowed_origins(origin: str | None, host: str, expected: str | None) -> None:
    assert check_origin(origin, host, POLICY) == expected


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "https://app.example.com.evil.example",
        "http://app.example.com",  # other scheme
        "https://app.example.com:8443",  # other port
        "http://localhost:3001",
        "null",  # sandboxed iframe, file://
        "",
        "https://user@app.example.com",
        "https://app.example.com/path",
        "javascript:alert(1)",
    ],
)
def test_refused_origins(origin: str) -> None:
    with pytest.raises(Forbidden) as info:
        check_origin(origin, "proxy.local", POLICY)
    assert info.value.reason == "origin_refused"


def test_no_origin_is_listed_by_default() -> None:
    with pytest.raises(Forbidden):
        check_origin("https://app.example.com", "proxy.local", OriginPolicy.build([], [], None))


def test_preflight_allows_what_the_sdk_sends() -> None:
    headers = dict(preflight_headers("https://app.example.com", POLICY))
    allowed = headers[b"access-control-allow-headers"].decode().split(", ")
    for name in (
        "content-type",
        "accept",
        "authorization",
        "x-fal-target-url",
        "x-fal-queue-priority",
        "x-fal-runner-hint",
        "x-fal-request-timeout",
        "x-fal-object-lifecycle",
        "x-fal-object-lifecycle-preference",
        "x-proxy-authorization",
        "x-custom",
    ):
        assert name in allowed
    assert headers[b"access-control-allow-methods"] == b"GET, HEAD, POST, PUT, PATCH, DELETE"
    assert headers[b"access-control-allow-origin"] == b"https://app.example.com"
    assert b"access-control-allow-credentials" not in headers


def test_responses_expose_the_headers_the_sdk_reads() -> None:
    headers = dict(cors_headers("https://app.example.com"))
    assert (
        headers[b"access-control-expose-headers"]
        == b"x-fal-request-id, x-fal-request-timeout-type, x-fal-billable-units"
    )
    assert headers[b"vary"] == b"Origin"


@pytest.mark.parametrize(
    "bad", ["app.example.com", "ftp://x", "https://", "https://a.com/x", "https://a.com:99999"]
)
def test_normalise_origin_refuses_non_origins(bad: str) -> None:
    with pytest.raises(ValueError):
        normalise_origin(bad)


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        # DNS rebinding: evil.example re-pointed at the proxy makes Origin and Host agree.
        ("http://evil.example:8787", "evil.example:8787"),
        ("https://proxy.example.com", "proxy.example.com"),  # a name must be listed to count
    ],
)
def test_same_origin_counts_only_for_addresses_not_names(origin: str, host: str) -> None:
    with pytest.raises(Forbidden):
        check_origin(origin, host, POLICY)
    listed = OriginPolicy.build([origin], [], None)
    assert check_origin(origin, host, listed) == origin


LISTED = "https://app.example.com"


@pytest.mark.parametrize(
    ("origin", "referer", "site", "host", "allowed"),
    [
        (None, None, None, "127.0.0.1:8787", True),  # curl, server-side SDKs
        (None, None, "none", "127.0.0.1:8787", True),  # the user typed the URL
        (None, "https://evil.example/p", "cross-site", "127.0.0.1:8787", False),  # <img src>
        (None, None, "cross-site", "127.0.0.1:8787", False),  # ... with no-referrer
        (None, None, "same-site", "127.0.0.1:8787", False),
        (None, None, "weird", "127.0.0.1:8787", False),
        (None, "https://evil.example/p", None, "127.0.0.1:8787", False),  # Referer alone
        (None, f"{LISTED}/page?q=1", "cross-site", "127.0.0.1:8787", True),
        (None, "https://user:pw@app.example.com/", "cross-site", "127.0.0.1:8787", True),
        (None, "http://127.0.0.1:8787/demo", "same-origin", "127.0.0.1:8787", True),
        (None, None, "same-origin", "127.0.0.1:8787", True),
        (None, None, "same-origin", "[::1]:8787", True),
        (None, None, "same-origin", "evil.example:8787", False),  # DNS rebinding
        (None, "http://evil.example:8787/", "same-origin", "evil.example:8787", False),
        (None, None, "same-origin", "app.example.com", True),  # served under a listed name
        (None, "about:client", "cross-site", "127.0.0.1:8787", False),
        (None, "not a url", "cross-site", "127.0.0.1:8787", False),
        (
            None,
            "http://[::1",
            "cross-site",
            "127.0.0.1:8787",
            False,
        ),  # urlsplit raises: still a 403
        (None, "http://[zz]/", "same-origin", "127.0.0.1:8787", True),  # no origin: Host decides
        (None, "http://a:99999/", "cross-site", "127.0.0.1:8787", False),
        ("https://evil.example", None, "cross-site", "127.0.0.1:8787", False),
        (LISTED, None, "cross-site", "127.0.0.1:8787", True),
    ],
)
def test_browser_requests_without_an_origin(origin, referer, site, host, allowed) -> None:
    if allowed:
        check_browser_request(origin, referer, site, host, POLICY)
    else:
        with pytest.raises(Forbidden):
            check_browser_request(origin, referer, site, host, POLICY)
