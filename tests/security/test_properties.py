"""Property-based tests (hypothesis) of the pure policies, and one end to end.

* ``upstream_request_headers``: whatever the client sends, its credentials, cookies and
  gateway controls never go upstream; the proxy's own headers are there exactly once.
* ``downstream_response_headers``: no cookie, no ``alt-svc``, no hop-by-hop header ever
  reaches the client; every end-to-end header does, unchanged.
* ``resolve_target``: a generated URL is refused with a 4xx, or it names exactly one of the
  three fal hosts, goes under the gateway base and carries no dot segment once decoded.
  Accepted URLs are also parsed by two independent URL parsers (``urllib`` and ``yarl``),
  which must agree on scheme, host, port and the absence of user info.
* end to end: random client headers and targets through the running proxy never show the
  fal key to the client or in the logs, and the client's credentials never reach the
  gateway.

The expectations are written from the README's policy, not copied from the code: the
name lists here are this test's own.
"""

from __future__ import annotations

import gzip
import os
import re
import uuid
from urllib.parse import unquote, urlsplit

import yarl
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

from proxy.errors import ProxyError
from proxy.policy.headers import (
    InjectedHeaders,
    downstream_response_headers,
    upstream_request_headers,
)
from proxy.policy.targets import Target, resolve_target
from tests.conftest import CF_TOKEN, FAL_KEY, FakeGateway, RunningProxy
from tests.security import RawHTTP, load_corpus

GW = "https://gateway.ai.cloudflare.com/v1/acct/gw/fal"
ROUTE = "/api/fal/proxy"
ALLOWED_HOSTS = ("fal.run", "queue.fal.run", "rest.fal.ai")
REST_PATHS = ("/storage/upload/initiate", "/storage/upload/initiate-multipart", "/tokens/")

# No example database: nothing written into the repository (.hypothesis/).
PURE = settings(database=None, max_examples=300, deadline=None)

# --- header names -----------------------------------------------------------------------------

CREDENTIALS = ("authorization", "cookie", "cookie2", "proxy-authorization", "x-proxy-authorization")
HOP_BY_HOP = (
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
)
CF_NAMES = (
    "cf-aig-authorization",
    "cf-aig-skip-cache",
    "cf-aig-cache-key",
    "cf-aig-cache-ttl",
    "cf-aig-max-attempts",
    "cf-aig-event-id",
    "cf-aig-byok-alias",
    "cf-aig-metadata",
    "cf-aig-custom-cost",
    "cf-aig-collect-log",
    "cf-aig-request-timeout",
    "cf-aig-backoff",
    "cf-aig-retry-delay",
    "cf-aig-log-id",
    "cf-cache-ttl",
    "cf-skip-cache",
    "cf-cache-key",
    "cf-connecting-ip",
    "cf-connecting-ipv6",
    "cf-ray",
    "cf-ipcountry",
    "cf-visitor",
    "cf-worker",
    "cf-access-client-id",
    "cf-access-jwt-assertion",
)
X_FAL = (
    "x-fal-target-url",
    "x-fal-client-proxy",
    "x-fal-queue-priority",
    "x-fal-runner-hint",
    "x-fal-request-timeout",
    "x-fal-store-io",
    "x-fal-object-lifecycle-preference",
)
# Never forwarded besides the above (README: "host, expect, forwarded/x-forwarded-*/client-IP
# headers, browser context (origin, referer, sec-*)").
NEVER_FORWARDED_OTHERS = (
    "host",
    "expect",
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "origin",
    "referer",
    "cdn-loop",
)
# x-stainless-*: SDK telemetry, dropped too (tests/unit/test_headers.py).
NEVER_FORWARDED_PREFIXES = ("cf-", "x-forwarded-", "sec-", "x-stainless-")
ORDINARY = (
    "content-type",
    "accept",
    "user-agent",
    "content-length",
    "accept-encoding",
    "x-custom",
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-host",
    "sec-fetch-mode",
    "x-stainless-os",
    "if-none-match",
    "cache-control",
    "x-app-token",
)
INTERESTING = CREDENTIALS + HOP_BY_HOP + CF_NAMES + X_FAL + NEVER_FORWARDED_OTHERS + ORDINARY
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Headers the proxy itself sets (README "Headers"); each value is checked separately.
OWNED = (
    "authorization",
    "cf-aig-authorization",
    "x-fal-client-proxy",
    "x-fal-target-url",
    "cf-aig-event-id",
    "cf-aig-skip-cache",
    "cf-aig-max-attempts",
)


@st.composite
def random_case(draw: st.DrawFn, name: str) -> str:
    if not draw(st.booleans()):
        return name
    flags = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if f else c for c, f in zip(name, flags, strict=True))


header_names = st.one_of(
    st.sampled_from(INTERESTING),
    st.sampled_from(INTERESTING).flatmap(random_case),
    st.from_regex(r"\Acf-[a-z0-9-]{0,16}\Z"),
    st.from_regex(r"\Acf-aig-[a-z0-9-]{0,16}\Z"),
    st.from_regex(r"\Ax-fal-[a-z0-9-]{0,16}\Z"),
    st.from_regex(r"\Asec-[a-z0-9-]{0,16}\Z"),
    st.text(TOKEN_CHARS, min_size=1, max_size=20),
)
visible_ascii = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
utf8_text = st.text(st.characters(blacklist_categories=("Cs",), min_codepoint=0x20), max_size=40)
header_values = st.one_of(
    visible_ascii,
    utf8_text,
    st.sampled_from(["true", "TRUE", " true ", "false", "1", "Key client-key", "Bearer x", ""]),
)


@st.composite
def client_header_lists(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    pairs = draw(st.lists(st.tuples(header_names, header_values), max_size=14))
    if draw(st.booleans()):  # a Connection header naming some of the others (and more)
        tokens = draw(
            st.lists(
                st.one_of(st.sampled_from([n for n, _ in pairs] or ["x"]), header_names),
                min_size=1,
                max_size=4,
            )
        )
        pairs.insert(draw(st.integers(0, len(pairs))), ("connection", ", ".join(tokens)))
    return [(n.encode("latin-1"), v.encode("utf-8")) for n, v in pairs]


def _target(url: str) -> Target:
    return resolve_target(ROUTE, "", url, gateway_url=GW, proxy_route=ROUTE)


TARGETS = [
    _target(u)
    for u in (
        "https://fal.run/fal-ai/fast-sdxl",
        "https://fal.run/fal-ai/x/stream",
        "https://queue.fal.run/fal-ai/flux/dev",
        "https://queue.fal.run/fal-ai/flux/requests/r1/status?logs=1",
        "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3",
        "https://rest.fal.ai/tokens/",
    )
]
INJECTED = [
    InjectedHeaders(
        authorization="Key server-key-1:s", cf_aig_authorization="Bearer server-cf-token"
    ),
    InjectedHeaders(authorization="Key server-key-2:s", cf_aig_authorization=None),
    # FAL_PROXY_AUTH_HEADER set to another name: the caller's credential is that header.
    InjectedHeaders(
        authorization="Key server-key-3:s", cf_aig_authorization=None, caller_header="x-app-token"
    ),
]


def _connection_named(pairs: list[tuple[str, str]]) -> set[str]:
    return {
        t.strip().lower() for n, v in pairs if n == "connection" for t in v.split(",") if t.strip()
    }


def _must_not_be_forwarded(
    name: str, named: set[str], caller_header: str = "x-proxy-authorization"
) -> bool:
    return (
        name in CREDENTIALS
        or name == caller_header
        or name in HOP_BY_HOP
        or name in NEVER_FORWARDED_OTHERS
        or name.startswith(NEVER_FORWARDED_PREFIXES)
        or name in named
        or name in ("x-fal-target-url", "x-fal-client-proxy")
        or "_" in name
    )  # README: names with "_" are dropped (cf_aig_authorization)


@PURE
@given(
    client=client_header_lists(),
    target=st.sampled_from(TARGETS),
    injected=st.sampled_from(INJECTED),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]),
    request_id=st.from_regex(r"\A[0-9a-f]{16}\Z"),
)
@example(
    client=[
        (b"authorization", b"Key client-key"),
        (b"Cookie", b"session=abc"),
        (b"proxy-authorization", b"Basic Zm9v"),
        (b"cf-aig-cache-key", b"shared"),
        (b"cf-aig-skip-cache", b"true"),
        (b"connection", b"x-hop"),
        (b"x-hop", b"1"),
        (b"x-fal-queue-priority", b"low"),
    ],
    target=TARGETS[0],
    injected=INJECTED[0],
    method="POST",
    request_id="0123456789abcdef",
)
def test_upstream_headers_never_carry_client_credentials_or_gateway_controls(
    client: list[tuple[bytes, bytes]],
    target: Target,
    injected: InjectedHeaders,
    method: str,
    request_id: str,
) -> None:
    out = upstream_request_headers(client, target, injected, method=method, request_id=request_id)
    sent = [(n.decode("latin-1").lower(), v.decode("utf-8")) for n, v in client]
    named = _connection_named(sent)

    def values(name: str) -> list[str]:
        return [v for n, v in out if n == name]

    # Exactly one authorization, the proxy's; the proxy's other headers once each.
    assert values("authorization") == [injected.authorization]
    assert values("cf-aig-authorization") == (
        [injected.cf_aig_authorization] if injected.cf_aig_authorization else []
    )
    assert values("x-fal-client-proxy") == [injected.client_proxy]
    assert values("x-fal-target-url") == ([target.target_url] if target.target_url else [])
    assert values("cf-aig-event-id") == [request_id]
    assert values("cf-aig-max-attempts") == ["1"]
    assert values("cf-aig-skip-cache") in ([], ["true"])
    client_opted_out = any(
        n == "cf-aig-skip-cache" and v.strip().lower() == "true" for n, v in sent
    )
    if client_opted_out or target.kind != "run":
        assert values("cf-aig-skip-cache") == ["true"]

    # No cf-* header but the proxy's own, and cf-aig-skip-cache only as "true".
    own_cf = {
        ("cf-aig-authorization", injected.cf_aig_authorization),
        ("cf-aig-event-id", request_id),
        ("cf-aig-max-attempts", "1"),
        ("cf-aig-skip-cache", "true"),
    }
    for name, value in out:
        assert name == name.lower()
        if name.startswith("cf-"):
            assert (name, value) in own_cf

    # Everything else is a client header the policy lets through, unchanged.
    forwarded = [(n, v) for n, v in out if n not in OWNED]
    event(
        "client credentials sent: "
        f"{any(n in CREDENTIALS or n == injected.caller_header for n, _ in sent)}, "
        f"forwarded any: {bool(forwarded)}"
    )
    caller = injected.caller_header
    for name, value in forwarded:
        assert (name, value) in sent
        assert not _must_not_be_forwarded(name, named, caller), name
    # ... and every such client header is forwarded (nothing fal needs is lost).
    expected = [
        (n, v) for n, v in sent if not _must_not_be_forwarded(n, named, caller) and n not in OWNED
    ]
    assert forwarded == expected

    # A client credential value never travels, unless the client also sent the very same
    # value under a forwardable name, or it happens to equal one of the proxy's own values.
    secrets = {v for n, v in sent if n in CREDENTIALS or n == caller}
    own_values = {v for n, v in out if n in OWNED}
    for name, value in out:
        if value in secrets:
            assert value in own_values or (name, value) in expected, (name, value)


@PURE
@given(
    client=st.lists(
        st.tuples(header_names.map(lambda n: n.encode("latin-1")), st.binary(max_size=12)),
        max_size=8,
    ),
    target=st.sampled_from(TARGETS),
)
def test_upstream_headers_refuse_non_utf8_only_when_forwarding_it(
    client: list[tuple[bytes, bytes]], target: Target
) -> None:
    """Values are decoded as UTF-8: a non-UTF-8 value raises (the proxy answers 400), and
    only when that header would be forwarded; a dropped header is never even decoded."""

    def is_utf8(value: bytes) -> bool:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    sent = [(n.decode("latin-1").lower(), v) for n, v in client]
    named = {
        t.strip().lower()
        for n, v in sent
        if n == "connection"
        for t in v.decode("latin-1").split(",")
        if t.strip()
    }
    would_forward_bad = any(
        not is_utf8(v) and not _must_not_be_forwarded(n, named) for n, v in sent
    )
    event(f"non-UTF-8 forwardable value: {would_forward_bad}")
    try:
        out = upstream_request_headers(client, target, INJECTED[0], method="POST", request_id="r")
    except UnicodeDecodeError:
        assert would_forward_bad
        return
    assert not would_forward_bad
    assert [v for n, v in out if n == "authorization"] == [INJECTED[0].authorization]
    assert not any(n.startswith("cf-") and n not in OWNED for n, _ in out)


# --- response headers ---------------------------------------------------------------------------

RESPONSE_DROPPED = (*HOP_BY_HOP, "set-cookie", "set-cookie2", "alt-svc")
RESPONSE_NAMES = (
    *RESPONSE_DROPPED,
    "content-type",
    "content-length",
    "content-encoding",
    "x-fal-request-id",
    "x-fal-request-timeout-type",
    "cf-aig-log-id",
    "cf-aig-cache-status",
    "etag",
    "vary",
    "cache-control",
    "x-custom-hop",
    "date",
    "server",
)
response_names = st.one_of(
    st.sampled_from(RESPONSE_NAMES),
    st.sampled_from(RESPONSE_NAMES).flatmap(random_case),
    st.text(TOKEN_CHARS, min_size=1, max_size=20),
)


@st.composite
def upstream_header_lists(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    pairs = draw(
        st.lists(
            st.tuples(
                response_names,
                st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
            ),
            max_size=14,
        )
    )
    if draw(st.booleans()):
        tokens = draw(
            st.lists(
                st.one_of(st.sampled_from([n for n, _ in pairs] or ["x"]), response_names),
                min_size=1,
                max_size=4,
            )
        )
        pairs.insert(
            draw(st.integers(0, len(pairs))), (draw(random_case("connection")), ", ".join(tokens))
        )
    return [(n.encode("latin-1"), v if isinstance(v, bytes) else v.encode()) for n, v in pairs]


@PURE
@given(
    upstream=upstream_header_lists(),
    status=st.one_of(
        st.sampled_from([200, 201, 202, 204, 304, 401, 404, 422, 500]), st.integers(100, 599)
    ),
    request_id=st.from_regex(r"\A[0-9a-f]{16}\Z"),
)
@example(
    upstream=[
        (b"Set-Cookie", b"a=1"),
        (b"SET-COOKIE2", b"b=2"),
        (b"Alt-Svc", b"h3"),
        (b"Connection", b"X-Hop, close"),
        (b"x-hop", b"1"),
        (b"Keep-Alive", b"t=5"),
        (b"x-fal-request-id", b"req"),
    ],
    status=200,
    request_id="0123456789abcdef",
)
def test_downstream_headers_never_carry_cookies_or_hop_by_hop(
    upstream: list[tuple[bytes, bytes]], status: int, request_id: str
) -> None:
    out = downstream_response_headers(upstream, status=status, request_id=request_id)
    lowered = [(n.decode("latin-1").lower(), v) for n, v in upstream]
    named = {
        t.strip().lower()
        for n, v in lowered
        if n == "connection"
        for t in v.decode("latin-1").split(",")
        if t.strip()
    }
    for name, _ in out[:-1]:
        text = name.decode("latin-1")
        assert text == text.lower()
        assert text not in RESPONSE_DROPPED and text not in named, text
    assert out[-1] == (b"x-proxy-request-id", request_id.encode())
    if status in (204, 304):
        assert not any(n == b"content-length" for n, _ in out)
    # Every other end-to-end header passes unchanged, in order.
    expected = [
        (n.encode("latin-1"), v)
        for n, v in lowered
        if n not in RESPONSE_DROPPED
        and n not in named
        and not (status in (204, 304) and n == "content-length")
    ]
    assert out[:-1] == expected


# --- resolve_target -------------------------------------------------------------------------------

HOSTS = (
    "fal.run",
    "queue.fal.run",
    "rest.fal.ai",
    "FAL.RUN",
    "Queue.Fal.Run",
    "REST.FAL.AI",
    "fal.run.",
    "queue.fal.run.",
    "fal.run.evil.com",
    "evilfal.run",
    "fal-run.com",
    "api.fal.run",
    "fal.ai",
    "rest.alpha.fal.ai",
    "ws.fal.run",
    "localhost",
    "127.0.0.1",
    "2130706433",
    "0x7f000001",
    "169.254.169.254",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "metadata.google.internal",
    "%66al.run",
    "fal%2erun",
    "fal.run%00",
    "f\u0430l.run",
    "fal\uff0erun",
    "xn--fal-1na.run",
    "evil.com",
    "",
    " fal.run",
    "fal.run\t",
    "fal.run\\",
    "fal.run\\@evil.com",
)
USERINFO = ("", "", "", "user@", "user:pass@", "fal.run@", "evil.com@", "@", ":@", "fal.run:443@")
PORTS = ("", "", "", ":443", ":8443", ":0", ":", ":443 ", ":-1", ":65536", ":0443", ":4430", ":80")
SCHEMES = (
    "https",
    "https",
    "https",
    "HTTPS",
    "hTTps",
    "http",
    "ws",
    "wss",
    "ftp",
    "file",
    "javascript",
    "https+unix",
    "",
    " https",
)
SEPARATORS = ("://", "://", "://", "://", ":/", ":", ":///", ":\\\\", "//")
SEGMENTS = (
    "fal-ai",
    "fast-sdxl",
    "flux",
    "dev",
    "x",
    "stream",
    "requests",
    "r1",
    "status",
    "storage",
    "upload",
    "initiate",
    "initiate-multipart",
    "complete-multipart",
    "tokens",
    "keys",
    "users",
    "me",
    "openai",
    "v1.5",
    "...",
    "a%2Fb",
    "",
    "",
    ".",
    "..",
    "%2e",
    "%2e%2e",
    "%2E%2e",
    ".%2e",
    "%2e.",
    "%252e%252e",
    "%25252e",
    "%2525252e",
    "..;",
    "..;x",
    "..%2f",
    "..%3F",
    "..%23",
    "..%3b",
    "%2f",
    "%2F%2F",
    "%5c",
    "\\",
    "..\\",
    "%00",
    "%0a",
    "%0D%0A",
    "%7f",
    "%250a",
    "%25",
    "%",
    "%zz",
    "caf\u00e9",
    "%ef%bc%8e",
    "@evil.com",
    "evil.com",
    ":x",
    ";x",
    "a b",
    "\t",
    "\r\n",
    "\x00",
)
QUERIES = (
    "",
    "",
    "?x=1",
    "?",
    "?a=%2e%2e/../",
    "?logs=1",
    "?storage_type=fal-cdn-v3",
    "?a=b c",
    "?@evil.com",
    "?https://evil.com",
    "?a=\r\n",
)
FRAGMENTS = ("", "", "", "#", "#x", "#@evil.com")


@st.composite
def target_urls(draw: st.DrawFn) -> str:
    segments = draw(st.lists(st.sampled_from(SEGMENTS), max_size=6))
    path = "".join("/" + s for s in segments) + draw(st.sampled_from(["", "", "/"]))
    return (
        draw(st.sampled_from(SCHEMES))
        + draw(st.sampled_from(SEPARATORS))
        + draw(st.sampled_from(USERINFO))
        + draw(st.sampled_from(HOSTS))
        + draw(st.sampled_from(PORTS))
        + path
        + draw(st.sampled_from(QUERIES))
        + draw(st.sampled_from(FRAGMENTS))
    )


CLEAN_SEGMENTS = (
    "fal-ai",
    "fast-sdxl",
    "flux",
    "dev",
    "x",
    "stream",
    "requests",
    "r1",
    "status",
    "v1.5",
    "...",
    "a%2Fb",
    "%20",
    "@x",
    ":x",
    "~u",
)


@st.composite
def near_valid_urls(draw: st.DrawFn) -> str:
    """Allowed scheme, host and port, a mostly clean path: many are accepted, so the
    properties about accepted targets are exercised, with a hostile segment now and then."""
    host = draw(st.sampled_from(ALLOWED_HOSTS).flatmap(random_case))
    if host.lower() == "rest.fal.ai" and draw(st.booleans()):
        path = draw(st.sampled_from(REST_PATHS))
    else:
        segments = draw(
            st.lists(
                st.one_of(st.sampled_from(CLEAN_SEGMENTS), st.sampled_from(SEGMENTS)),
                min_size=1,
                max_size=5,
            )
        )
        path = "".join("/" + x for x in segments)
    query = draw(st.sampled_from(["", "", "?x=1", "?logs=1", "?a=%2e%2e/../", "?@evil.com"]))
    return (
        draw(st.sampled_from(["https", "HTTPS"]))
        + "://"
        + host
        + draw(st.sampled_from(["", ":443"]))
        + path
        + query
    )


@st.composite
def valid_then_mutated(draw: st.DrawFn) -> str:
    """An allowed URL with one substring inserted somewhere: the near misses."""
    base = draw(
        st.sampled_from(
            [
                "https://fal.run/fal-ai/fast-sdxl",
                "https://queue.fal.run/fal-ai/flux/requests/r1/status?logs=1",
                "https://rest.fal.ai/tokens/",
                "https://rest.fal.ai/storage/upload/initiate?storage_type=x",
            ]
        )
    )
    at = draw(st.integers(0, len(base)))
    insert = draw(
        st.one_of(
            st.sampled_from(
                [
                    "..",
                    "/..",
                    "/.",
                    "%2e%2e",
                    "/%2e%2e",
                    "@",
                    "@evil.com",
                    ":8443",
                    ".",
                    "%",
                    "%2f",
                    "//",
                    "\\",
                    ";",
                    "?",
                    "#",
                    " ",
                    "\t",
                    "\x00",
                    "\r\n",
                    "\u0430",
                    ".evil.com",
                    "evil",
                    ":",
                    "[",
                    "]",
                    "%40",
                ]
            ),
            st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=4),
        )
    )
    return base[:at] + insert + base[at:]


url_like = st.one_of(
    target_urls(),
    near_valid_urls(),
    valid_then_mutated(),
    st.from_regex(
        r"\A(https?|HTTPS|wss?)://[A-Za-z0-9._~%@:\[\]-]{0,24}"
        r"(/[A-Za-z0-9._~%;:@!$&'()*+,=\\-]{0,16}){0,4}(\?[A-Za-z0-9._~%/?=&-]{0,16})?\Z"
    ),
    st.text(max_size=60),
)


def _fully_decoded(path: str) -> str:
    for _ in range(10):
        decoded = unquote(path, errors="replace")
        if decoded == path:
            return path
        path = decoded
    raise AssertionError(f"still encoded after 10 rounds: {path!r}")


def _check_accepted(target: Target) -> None:
    assert target.host in ALLOWED_HOSTS
    assert target.upstream_url == GW or target.upstream_url.startswith(GW + "/")
    assert target.path.startswith("/") and re.fullmatch(r"[\x21-\x7e]+", target.path)
    decoded = _fully_decoded(target.path)
    assert not any(s in (".", "..") for s in re.split(r"[/?#;\\]", decoded)), decoded
    assert not decoded.startswith("//") and "\\" not in decoded
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded)
    suffix = f"?{target.query}" if target.query else ""
    if target.host == "fal.run":
        assert target.path != "/"
        assert target.upstream_url == GW + target.path + suffix
        assert target.target_url is None
    else:
        assert target.upstream_url == GW
        assert target.target_url == f"https://{target.host}{target.path}{suffix}"
        if target.host == "queue.fal.run":
            assert target.path != "/"
        else:
            assert target.path in REST_PATHS


def _resolve_or_refuse(path: str, query: str, header: str | None) -> Target | None:
    try:
        return resolve_target(path, query, header, gateway_url=GW, proxy_route=ROUTE)
    except ProxyError as exc:
        assert 400 <= exc.status < 500, (exc.status, exc.message)
        assert exc.message and exc.detail
        return None


@settings(database=None, max_examples=1000, deadline=None)
@given(url=url_like, path=st.sampled_from([ROUTE, "/fal-ai/fast-sdxl", "/anything"]))
def test_resolve_target_refuses_or_returns_an_allowed_fal_target(url: str, path: str) -> None:
    target = _resolve_or_refuse(path, "", url)
    event("accepted" if target else "refused")
    if target is None:
        return
    note(f"accepted: {target}")
    _check_accepted(target)
    # Two independent URL parsers agree on what was accepted: https, the same host, no
    # user info, the default port.
    parts = urlsplit(url)
    assert parts.scheme.lower() == "https"
    assert parts.hostname == target.host
    assert parts.username is None and parts.password is None
    assert parts.port in (None, 443)
    assert parts.fragment == ""
    parsed = yarl.URL(url)
    assert (parsed.scheme, parsed.host, parsed.port, parsed.user) == (
        "https",
        target.host,
        443,
        None,
    )


raw_paths = st.one_of(
    st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6).map(
        lambda s: "".join("/" + x for x in s)
    ),
    st.from_regex(r"\A/[A-Za-z0-9._~%;:@!$&'()*+,=/\\-]{0,40}\Z"),
    st.text(max_size=40),
)


@settings(database=None, max_examples=800, deadline=None)
@given(path=raw_paths, query=st.sampled_from(QUERIES).map(lambda q: q[1:]))
def test_fal_run_shaped_paths_refuse_or_stay_under_the_gateway(path: str, query: str) -> None:
    target = _resolve_or_refuse(path, query, None)
    if target is None:
        return
    _check_accepted(target)
    assert target.host == "fal.run" and target.path == path


def test_resolve_target_property_is_not_vacuous() -> None:
    """The URL strategies do produce accepted targets (else the property proves nothing)."""
    accepted: list[str] = []

    @settings(database=None, max_examples=200, deadline=None)
    @given(url=near_valid_urls())
    def collect(url: str) -> None:
        if _resolve_or_refuse(ROUTE, "", url) is not None:
            accepted.append(url)

    collect()
    assert len(accepted) >= 20
    assert {yarl.URL(u).host for u in accepted} >= {"fal.run", "queue.fal.run"}


# --- end to end ---------------------------------------------------------------------------------

# Allowed targets the emulator answers at once (no gates, hangs or stalls).
SAFE_ALLOWED = (
    "https://fal.run/emulator/echo",
    "https://fal.run/emulator/echo?x=1",
    "https://fal.run/emulator/cookie",
    "https://fal.run/emulator/hop",
    "https://fal.run/emulator/gzip",
    "https://fal.run/emulator/status/422",
    "https://fal.run/emulator/status/500",
    "https://fal.run/emulator/text404",
    "https://fal.run/fal-ai/unknown-app",
    "https://queue.fal.run/emulator/echo",
    "https://queue.fal.run/fal-ai/flux/requests/nope/status",
    "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3",
    "https://rest.fal.ai/tokens/",
)
# Corpus entries a client can send as one header value.
SENDABLE_HOSTILE = tuple(
    c.value for c in load_corpus() if not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", c.value)
)
# These would change the HTTP framing of the raw request or switch protocols.
FRAMING = (
    "content-length",
    "transfer-encoding",
    "upgrade",
    "host",
    "expect",
    "te",
    "connection",
    "accept-encoding",
)
E2E_NAMES = tuple(n for n in INTERESTING if n not in FRAMING)
e2e_names = st.one_of(
    st.sampled_from(E2E_NAMES),
    st.from_regex(r"\Acf-aig-[a-z0-9-]{1,12}\Z"),
    st.from_regex(r"\Ax-fal-[a-z0-9-]{1,12}\Z").filter(lambda n: n != "x-fal-target-url"),
    st.text("abcdefghijklmnopqrstuvwxyz-", min_size=3, max_size=12).filter(
        lambda n: n.strip("-") == n and n not in FRAMING
    ),
)
# A header value a client can send: no controls; the HTTP parser strips the ends.
e2e_values = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)


@st.composite
def e2e_requests(draw: st.DrawFn) -> tuple[str, str, str, list[tuple[str, str]]]:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
    path = draw(st.sampled_from([ROUTE, ROUTE + "?ignored=1", "/some/other/path"]))
    target = draw(
        st.one_of(
            st.sampled_from(SAFE_ALLOWED),
            st.sampled_from(SENDABLE_HOSTILE),
            valid_then_mutated().filter(lambda u: not re.search(r"[\x00-\x1f\x7f]", u)),
        )
    )
    headers = draw(st.lists(st.tuples(e2e_names, e2e_values), max_size=8))
    return method, path, target, headers


def _no_secret(blob: bytes) -> bool:
    return (
        FAL_KEY.encode() not in blob and CF_TOKEN.encode() not in blob and b"SENTINEL" not in blob
    )


@settings(
    database=None,
    max_examples=int(os.environ.get("SECURITY_E2E_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(request=e2e_requests())
def test_end_to_end_the_key_never_reaches_the_client_or_the_logs_and_client_credentials_never_go_upstream(  # noqa: E501 - a test name cannot be wrapped
    proxy: RunningProxy,
    fake_gateway: FakeGateway,
    request: tuple[str, str, str, list[tuple[str, str]]],
) -> None:
    method, path, target, extra = request
    fake_gateway.clear()
    # Credentials with values no strategy can produce, so any sighting upstream is a leak.
    secrets = {
        name: f"client-secret-{name}-{uuid.uuid4().hex}"
        for name in ("authorization", "cookie", "proxy-authorization", "x-proxy-authorization")
    }
    headers = [(n.encode(), v.encode()) for n, v in extra]
    headers += [(n.encode(), v.encode()) for n, v in secrets.items()]
    headers.append((b"x-fal-target-url", target.encode("utf-8")))
    headers.append((b"accept-encoding", b"identity"))
    body = b'{"prompt": "cat", "allowed_apps": ["echo"]}' if method in ("POST", "PUT") else b""
    note(f"{method} {path} target={target!r} headers={extra!r}")
    with RawHTTP(proxy.url) as http:
        r = http.request(method, path, headers, body)
    assert b"internal proxy error" not in r.body, r.body  # no crash in the proxy itself
    content = r.body
    if (r.header(b"content-encoding") or b"").lower() == b"gzip":
        content = gzip.decompress(content)
    assert _no_secret(r.head) and _no_secret(content), r.raw[:500]
    # The client's credentials never reach the gateway, under any header.
    records = fake_gateway.requests()
    event(f"status {r.status // 100}xx, {'forwarded' if records else 'not forwarded'}")
    for record in records:
        for name, value in record["headers"]:
            for secret in secrets.values():
                assert secret not in value, (name, value)
        assert [v for n, v in record["headers"] if n == "authorization"] == [f"Key {FAL_KEY}"]
    # The fal key never appears in a log line (waiting for this request's line first).
    request_id = r.header(b"x-proxy-request-id")
    if request_id is not None:
        proxy.wait_for_request_log(request_id.decode())
    log_text = "\n".join(proxy.process.lines)
    assert FAL_KEY not in log_text and CF_TOKEN not in log_text and "SENTINEL" not in log_text
    for secret in secrets.values():
        assert secret not in log_text
