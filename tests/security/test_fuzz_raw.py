"""Raw-bytes fuzzing of the running proxy (hypothesis), over a real TCP socket.

Every example is a request the test writes byte for byte (request line, header block,
body framing, WebSocket handshake) to a real ``python -m proxy`` process in front of the
offline emulator, which records what reaches it. Four properties must hold for all of them:

1. the proxy never answers 500: no 5xx it makes itself but 502/503/504 (a 5xx relayed from
   the gateway, with ``upstream_status`` on the request's log line, is the gateway's);
2. its log has no traceback, no "Exception in ASGI application", no ``level=error`` line;
3. the fal key, the gateway token and the JWT secret never appear in a response or a log
   line, and no client credential (caller token, ``Authorization``, cookies, a
   ``fal_jwt_token``, credential sub-protocols) appears in a log line;
4. what reaches the gateway names an allowed app on a fal host, carries the proxy's key
   and gateway token once each, and none of the client's credentials, under any header
   name (underscored names such as ``cf_aig_authorization`` included); and a request that
   is not valid and allowed (a wrong request line, a missing or doubled ``Host``, a foreign
   ``Origin``, an app outside ``FAL_PROXY_ALLOWED_APPS``, a realtime token body that fal
   could read differently, a bad caller JWT, a body cut short) sends nothing at all.

The proxies run with
``FAL_PROXY_ALLOWED_APPS=fal-ai/fast-sdxl,fal-ai/flux/*,emulator/echo,emulator/die`` (so
"allowed" means something; ``emulator/die`` is an upstream that dies mid-body),
``CF_AIG_TOKEN`` set, and no rate limits (the fuzzer sends hundreds of requests a minute
from one address). One proxy per configuration per module:
``FAL_PROXY_AUTH=none``; ``jwt`` with a JWKS file (one RSA and one EC key); ``jwt`` with
an HS256 secret. After each example a barrier (``fuzz_support.Barrier``) waits until the
proxy has nothing in flight and its log lines are read, so each example is judged on its
own log lines and gateway records; nothing sleeps. The lines no example was judged on
(start-up, anything logged late) are checked when a proxy's fixture is torn down, after
every test that used it, whatever order they ran in.

The fuzzers: raw HTTP requests (request line, Host, headers, credentials, x-fal-target-url,
body framing and pipelining), WebSocket handshakes (sub-protocols, ``fal_jwt_token``
queries), realtime token bodies, and caller JWTs against both JWT proxies. Each starts from
a clean request and changes a few things, so a defect that needs an otherwise valid request
is reached; the clean ones must go through (the properties are not vacuous). Hypothesis
stops a test at its first failing example, so ``test_known_shapes`` also tries one named
member of each family found so far, every run.

Deterministic: ``derandomize=True``, no example database. ``FUZZ_RAW_SCALE`` (default 1)
multiplies every ``max_examples``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from tests.conftest import CF_TOKEN, FAL_KEY, FakeGateway, RunningProxy, launch_proxy
from tests.security import load_corpus
from tests.security.fuzz_support import (
    ALLOWED_APPS,
    FORWARDED_METHODS,
    HOSTPORT,
    PORT,
    Barrier,
    Keys,
    Outcome,
    build_jwt,
    gateway_records,
    jwt_acceptable,
    leaked,
    log_errors,
    record_problems,
    request_line,
    send_raw,
    token_body_verdict,
)

JWT_SECRET = "jwt-SENTINEL-secret-3c9d-0123456789abcdef"  # HS256 secret, 32+ characters
AUDIENCE, ISSUER = "fal-proxy", "https://app.example"
SERVER_SECRETS = (FAL_KEY, CF_TOKEN, JWT_SECRET, "SENTINEL")
COMMON_ENV = {
    "FAL_PROXY_ALLOWED_APPS": ",".join(ALLOWED_APPS),
    "CF_AIG_TOKEN": CF_TOKEN,
    "FAL_PROXY_RATE_LIMIT_RPM": "0",
    "FAL_PROXY_SUBMITS_PER_HOUR": "0",
    "FAL_PROXY_MAX_CONCURRENT": "0",
}
SCALE = float(os.environ.get("FUZZ_RAW_SCALE", "1"))


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )


# --- what one example is ------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Bytes to write, and what the oracle knows about them."""

    data: bytes  # @HOSTPORT@ / @PORT@ are replaced by the proxy's address
    method: str = "GET"  # of the first request (a response to HEAD has no body)
    half_close: bool = False  # shut the write side right after sending (a body cut short)
    refuse: tuple[str, ...] = ()  # why nothing may reach the gateway; empty: it may
    secrets: tuple[str, ...] = ()  # client credentials in the request
    expect: int | None = None  # a clean request the proxy must serve with this status
    forward: bool = False  # a clean request that must reach the gateway (any status)

    def __repr__(self) -> str:
        fields = [f"data={self.data!r}"]
        if self.half_close:
            fields.append("half_close=True")
        if self.refuse:
            fields.append(f"refuse={self.refuse!r}")
        if self.expect:
            fields.append(f"expect={self.expect}")
        if self.forward:
            fields.append("forward=True")
        return f"Plan({', '.join(fields)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis's printer
        printer.text(repr(self))


@dataclass
class Harness:
    proxy: RunningProxy
    gateway: FakeGateway
    barrier: Barrier = field(init=False)
    marker_headers: bytes = b""
    last_secrets: tuple[str, ...] = ()
    judged: list[tuple[int, int]] = field(default_factory=list)  # log line ranges examples checked

    def __post_init__(self) -> None:
        self.barrier = Barrier(self.proxy, self.marker_headers)

    def __repr__(self) -> str:
        return f"Harness({self.proxy.url})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis's printer
        printer.text(repr(self))

    def run(self, plan: Plan) -> None:
        """Send one plan and assert the four properties on everything it caused."""
        # Records that arrived after the previous example was judged (none are expected: the
        # barrier waited) are still judged, against that example's credentials.
        late = gateway_records(self.gateway)
        self.gateway.clear()
        for record in late:
            problems = record_problems(record, self.last_secrets)
            assert not problems, f"property 4 (late record): {problems} in {record.short()}"
        self.last_secrets = plan.secrets
        start = len(self.proxy.process.lines)
        data = self.barrier.render(plan.data)
        outcome = send_raw(
            self.barrier.address, data, method=plan.method, half_close=plan.half_close
        )
        self.barrier.settle()
        end = len(self.proxy.process.lines)
        lines = self.proxy.process.lines[start:end]
        self.judged.append((start, end))
        records = gateway_records(self.gateway)
        self.gateway.clear()
        for text in (
            f"sent {data!r}",
            f"got {outcome.summary()}",
            f"gateway received {[r.short() for r in records]}",
        ):
            note(text) if currently_in_test_context() else print(text)
        if currently_in_test_context():
            event(
                f"status {outcome.final[0].status if outcome.final else 'none'}; "
                f"{'forwarded' if records else 'not forwarded'}"
            )
        check(plan, outcome, lines, records)


def check(plan: Plan, outcome: Outcome, lines: list[str], records: list[Any]) -> None:
    # A hang is a failure of its own: every plan is framed so the proxy can always answer.
    assert not outcome.timed_out, (
        f"the proxy neither answered nor closed the connection: {outcome.summary()}"
    )
    # 1. no 500 (nor any 5xx of the proxy's own but 502/503/504)
    for reply in outcome.replies:
        if 500 <= reply.status <= 599:
            request_id = (reply.header(b"x-proxy-request-id") or b"").decode()
            line = request_line(lines, request_id) if request_id else None
            relayed = line is not None and line.get("upstream_status") == reply.status
            assert relayed or reply.status in (502, 503, 504), (
                f"property 1: the proxy answered {reply!r}"
            )
    assert b"internal proxy error" not in outcome.received, f"property 1: {outcome.summary()}"
    # 2. no traceback or error in the proxy's log
    errors = log_errors(lines)
    assert not errors, "property 2: error lines in the proxy's log:\n" + "\n".join(
        e[:1500] for e in errors
    )
    # 3. no server secret in any response; no secret, server's or client's, in the log
    assert not leaked(outcome.received, SERVER_SECRETS), (
        f"property 3: a server secret in the response: {outcome.summary()}"
    )
    log_text = "\n".join(lines)
    in_log = leaked(log_text, SERVER_SECRETS + tuple(s for s in plan.secrets if len(s) >= 16))
    assert not in_log, f"property 3: {in_log} in the proxy's log:\n" + "\n".join(
        line[:600] for line in lines if any(s in line for s in in_log)
    )
    # 4. the gateway saw only valid, allowed requests with the proxy's credentials
    problems = [(r.short(), p) for r in records for p in record_problems(r, plan.secrets)]
    assert not problems, f"property 4: the gateway received {problems}"
    assert not (plan.refuse and records), (
        f"property 4: forwarded although {list(plan.refuse)}: {[r.short() for r in records]}"
    )
    # Not vacuous: the clean requests do go through.
    if plan.expect is not None:
        statuses = [r.status for r in outcome.final]
        assert statuses[:1] == [plan.expect] and records, (
            f"a clean request was not served: expected {plan.expect}, got {outcome.summary()}"
        )
    assert records or not plan.forward, f"a clean request was not forwarded: {outcome.summary()}"


# --- fixtures -------------------------------------------------------------------------------------


def _harness(gateway: FakeGateway, marker_headers: bytes = b"", **env: str) -> Iterator[Harness]:
    proxy = launch_proxy(gateway.gateway_url, **COMMON_ENV, **env)
    try:
        harness = Harness(proxy, gateway, marker_headers=marker_headers)
        yield harness
        # At teardown, so after every example on this harness, whatever order they ran in.
        assert_unjudged_lines_clean(harness)
    finally:
        proxy.process.stop()


def assert_unjudged_lines_clean(harness: Harness) -> None:
    """Properties 2 and 3 for the lines no example was judged on: start-up, and anything
    logged late (asyncio's "Task exception was never retrieved" comes at garbage collection)."""
    harness.barrier.settle()
    every = list(harness.proxy.process.lines)
    judged = {i for start, end in harness.judged for i in range(start, end)}
    lines = [line for i, line in enumerate(every) if i not in judged]
    assert not log_errors(lines), "property 2:\n" + "\n".join(e[:1500] for e in log_errors(lines))
    assert not leaked("\n".join(lines), SERVER_SECRETS), "property 3"


@pytest.fixture(scope="module")
def open_harness(fake_gateway: FakeGateway) -> Iterator[Harness]:
    yield from _harness(fake_gateway)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
        other_rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        other_ec=ec.generate_private_key(ec.SECP256R1()),
        hs_secret=JWT_SECRET,
    )


@pytest.fixture(scope="module")
def jwks_harness(
    fake_gateway: FakeGateway, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    jwks = tmp_path_factory.mktemp("jwks") / "jwks.json"
    jwks.write_text(keys.jwks())
    yield from _harness(
        fake_gateway,
        FAL_PROXY_AUTH="jwt",
        FAL_PROXY_JWT_JWKS_FILE=str(jwks),
        FAL_PROXY_JWT_AUDIENCE=AUDIENCE,
        FAL_PROXY_JWT_ISSUER=ISSUER,
    )


@pytest.fixture(scope="module")
def hs_harness(fake_gateway: FakeGateway) -> Iterator[Harness]:
    yield from _harness(fake_gateway, FAL_PROXY_AUTH="jwt", FAL_PROXY_JWT_SECRET=JWT_SECRET)


# --- building blocks ----------------------------------------------------------------------------

TINY_PROMPT = b'{"prompt":"a cat","image_size":{"width":16,"height":16}}'
SECRETS = st.integers(0, 999_999).map(lambda i: f"client-cred-{i:06d}-zq")

# fal.run-shaped paths: True = allowed (may go upstream), False = must not, None = no claim.
PATHS: list[tuple[bytes, bool | None]] = [
    (b"/emulator/echo", True),
    (b"/emulator/echo?x=1&y=%0d%0a", True),
    (b"/emulator/echo/sub/path", True),
    (b"/emulator/echo/;x", True),
    (b"/fal-ai/fast-sdxl", True),
    (b"/fal-ai/flux/schnell", True),
    (b"/fal-ai/flux/dev/stream", True),
    (b"/emulator/echo?fal_jwt_token=abc", True),
    (b"/emulator/die", True),
    (b"/fal-ai/fast-lcm-diffusion", False),
    (b"/emulator/status/500", False),
    (b"/emulator/cookie", False),
    (b"/emulator/echo/../status/500", False),
    (b"/emulator/echo/%2e%2e/status/500", False),
    (b"/emulator/echo/%252e%252e/status/500", False),
    (b"/emulator/echo\xc3\xa9", False),
    (b"/emulator/echo%00", False),
    (b"/fal-ai/fast-sdxlx", False),
    (b"/FAL-AI/FAST-SDXL", False),
    (b"/", False),
    (b"/healthz", False),
    (b"/metrics", False),
    (b"/readyz", False),
    (b"//emulator/echo", None),
    (b"/emulator/echo#frag", None),
    (b"/api/fal/proxy", False),
    (b"/api/fal/proxy?ignored=1", False),
    (b"/some/other/path", False),
]
RESERVED = (b"/healthz", b"/metrics", b"/readyz")
# x-fal-target-url values; "token": the realtime token endpoint (the body decides).
TARGET_URLS: list[tuple[bytes, bool | str | None]] = [
    (b"https://fal.run/emulator/echo", True),
    (b"https://fal.run/fal-ai/fast-sdxl", True),
    (b"https://fal.run/fal-ai/flux/schnell", True),
    (b"https://FAL.RUN/emulator/echo?x=1", True),
    (b"https://fal.run/emulator/die", True),
    (b"https://fal.run:443/emulator/echo", True),
    (b"https://queue.fal.run/fal-ai/flux/dev", True),
    (b"https://queue.fal.run/emulator/echo", True),
    (b"https://queue.fal.run/fal-ai/flux/requests/abc/status", True),
    (b"https://queue.fal.run/fal-ai/fast-sdxl/requests/abc", True),
    (b"https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3", True),
    (b"https://rest.fal.ai/tokens/", "token"),
    (b"https://fal.run/fal-ai/fast-lcm-diffusion", False),
    (b"https://fal.run/emulator/status/500", False),
    (b"https://queue.fal.run/fal-ai/fast-lcm-diffusion", False),
    (b"https://queue.fal.run/fal-ai/fast-lcm-diffusion/requests/abc/status", False),
    (b"http://fal.run/emulator/echo", False),
    (b"https://fal.run.evil.example/emulator/echo", False),
    (b"https://evil.example/emulator/echo", False),
    (b"https://fal.run:8443/emulator/echo", False),
    (b"https://user:pw@fal.run/emulator/echo", False),
    (b"https://fal.run/emulator/echo/../status/500", False),
    (b"https://fal.run/emulator/echo/%2e%2e/status/500", False),
    (b"https://rest.fal.ai/users/me", False),
    (b"https://rest.fal.ai/tokens", False),
    (b"https://fal.run/emulator/\xc3\xa9cho", False),
    (b"", False),
]
CORPUS_TARGETS = [
    c.value.encode("utf-8") for c in load_corpus()
]  # all hostile (hostile_targets.txt)
target_urls = st.one_of(
    st.sampled_from(TARGET_URLS), st.sampled_from(CORPUS_TARGETS).map(lambda v: (v, False))
)

SAME_ORIGINS = [b"http://" + HOSTPORT, b"http://localhost:" + PORT]
FOREIGN_ORIGINS = [b"https://evil.example", b"null", b"http://evil.example:" + PORT]
CRED_NAMES = [
    b"authorization",
    b"Authorization",
    b"x-proxy-authorization",
    b"X-Proxy-Authorization",
    b"proxy-authorization",
    b"cf-aig-authorization",
    b"CF-AIG-Authorization",
    b"cookie",
    b"Cookie",
    b"cookie2",
    b"cf_aig_authorization",
    b"CF_AIG_AUTHORIZATION",
    b"x_proxy_authorization",
    b"proxy_authorization",
]
INJECTIONS = [
    b"a\r\nb",
    b"a\nb",
    b"a\rb",
    b"a\x00b",
    b"\xff\xfe",
    b"caf\xc3\xa9",
    b"\xe9t\xe9",
    b"a\r\n b",
    b"\r\n\r\nGET /emulator/status/500 HTTP/1.1\r\nhost: " + HOSTPORT + b"\r\n\r\n",
    b"  padded  ",
    b"\t",
]
generic_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24).map(str.encode),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=8).map(
        lambda s: s.encode("utf-8")
    ),
    st.binary(max_size=12),
    st.sampled_from(INJECTIONS),
)
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@st.composite
def credential_headers(draw: st.DrawFn) -> tuple[bytes, bytes, str]:
    name = draw(st.sampled_from(CRED_NAMES))
    secret = draw(SECRETS)
    if name.lower().startswith(b"cookie"):
        value = b"session=" + secret.encode()
    else:
        value = draw(st.sampled_from([b"Key ", b"Bearer ", b"", b"Basic "])) + secret.encode()
    return name, value, secret


other_headers = st.one_of(
    st.tuples(
        st.sampled_from([b"content-type", b"Content-Type"]),
        st.sampled_from([b"application/json", b"text/plain", b"application/json; charset=utf-16"]),
    ),
    st.tuples(
        st.sampled_from(
            [
                b"accept",
                b"user-agent",
                b"x-fal-queue-priority",
                b"x-fal-runner-hint",
                b"x-fal-request-timeout",
                b"x-custom",
                b"X-Custom",
                b"x-forwarded-for",
                b"forwarded",
                b"x-real-ip",
                b"cf-aig-cache-key",
                b"cf-connecting-ip",
                b"x-fal-client-proxy",
                b"x_custom",
                b"fal_key",
                b"x-fal-store-io",
            ]
        ),
        generic_values,
    ),
    st.tuples(
        st.sampled_from([b"origin", b"Origin"]),
        st.sampled_from(SAME_ORIGINS + FOREIGN_ORIGINS + [b""]),
    ),
    st.tuples(
        st.just(b"referer"),
        st.sampled_from([b"https://evil.example/page", b"http://" + HOSTPORT + b"/"]),
    ),
    st.tuples(
        st.just(b"sec-fetch-site"), st.sampled_from([b"cross-site", b"same-origin", b"none"])
    ),
    st.tuples(
        st.just(b"connection"),
        st.sampled_from([b"close", b"keep-alive", b"x-custom", b"close, x-custom", b"te"]),
    ),
    st.tuples(
        st.sampled_from([b"keep-alive", b"expect", b"te", b"trailer", b"upgrade"]),
        st.sampled_from(
            [b"timeout=5", b"100-continue", b"nope", b"trailers", b"x-custom", b"h2c", b"websocket"]
        ),
    ),
    st.tuples(st.just(b"cf-aig-skip-cache"), st.sampled_from([b"true", b"false"])),
    st.tuples(st.just(b"accept-encoding"), st.sampled_from([b"identity", b"gzip", b"br"])),
    st.tuples(
        st.sampled_from([b"x_fal_target_url", b"X_FAL_TARGET_URL"]), target_urls.map(lambda t: t[0])
    ),
    st.tuples(
        st.sampled_from([b"content_length", b"transfer_encoding", b"content_type"]),
        st.sampled_from([b"0", b"5", b"chunked", b"application/json"]),
    ),
    st.tuples(st.text(TOKEN_CHARS, min_size=1, max_size=16).map(str.encode), generic_values),
)

PIPELINED = [  # (hypothesis draws the first entries most often)
    b"GET /emulator/status/500 HTTP/1.1\r\nhost: "
    + HOSTPORT
    + b"\r\n\r\n\x16\x03\x01\x00",  # then garbage
    b"GET /emulator/status/500 HTTP/1.1\r\nhost: " + HOSTPORT + b"\r\n\r\nnot a request\r\n\r\n",
    b"GET /emulator/status/500 HTTP/1.1\r\nhost: " + HOSTPORT + b"\r\n\r\n",
    b"POST /fal-ai/fast-lcm-diffusion HTTP/1.1\r\nhost: "
    + HOSTPORT
    + b"\r\ncontent-length: 2\r\n\r\n{}",
    b"GET /emulator/status/500 HTTP/1.1\r\n",  # a head that never ends
    b"\x16\x03\x01\x00",
]
BAD_LENGTHS = [
    b"-1",
    b"+5",
    b"0x5",
    b"5a",
    b"",
    b" 5",
    b"5,5",
    b"05",
    b"99999999999999999999",
    b"104857601",
    b"\xd9\xa5",
    b"5\x00",
]


@dataclass
class Framed:
    headers: list[tuple[bytes, bytes]]
    body: bytes
    half_close: bool = False
    refuse: tuple[str, ...] = ()
    delivered: bytes | None = None  # the body the proxy reads, when the framing says so exactly


def chunk(body: bytes, sizes: list[int], upper: bool, extension: bool) -> bytes:
    out, at = bytearray(), 0
    for size in sizes:
        piece = body[at : at + size]
        if not piece:
            break
        at += len(piece)
        digits = f"{len(piece):x}".upper() if upper else f"{len(piece):x}"
        out += digits.encode() + (b";ext=1" if extension else b"") + b"\r\n" + piece + b"\r\n"
    if at < len(body):
        rest = body[at:]
        out += f"{len(rest):x}".encode() + b"\r\n" + rest + b"\r\n"
    return bytes(out) + b"0\r\n\r\n"


@st.composite
def framings(draw: st.DrawFn, body: bytes) -> Framed:
    kind = draw(
        st.sampled_from(
            [
                "pipelined",
                "short",
                "long",
                "chunked",
                "chunked-cut",
                "cl+te",
                "dup-cl",
                "bad-cl",
                "exact",
                "none",
            ]
        )
    )
    cl = draw(st.sampled_from([b"content-length", b"Content-Length"]))
    te = (b"transfer-encoding", draw(st.sampled_from([b"chunked", b"Chunked", b"gzip, chunked"])))
    if kind == "none":
        return Framed([], b"", delivered=b"")
    if kind == "exact":
        return Framed([(cl, str(len(body)).encode())], body, delivered=body)
    if kind == "pipelined":
        extra = draw(st.sampled_from(PIPELINED))
        return Framed([(cl, str(len(body)).encode())], body + extra, delivered=body)
    if kind == "short":  # announces less than it sends: the rest is a second "request"
        body = body or b"{}"
        k = draw(st.integers(1, len(body)))
        return Framed([(cl, str(len(body) - k).encode())], body, delivered=body[: len(body) - k])
    if kind == "long":  # announces more than it sends, then stops sending
        k = draw(st.integers(1, 1000))
        return Framed(
            [(cl, str(len(body) + k).encode())],
            body,
            half_close=True,
            refuse=("the body is shorter than its content-length",),
        )
    sizes = draw(st.lists(st.integers(1, 16), min_size=1, max_size=4))
    encoded = chunk(body, sizes, draw(st.booleans()), draw(st.booleans()))
    if kind == "chunked":
        return Framed([te], encoded, delivered=body if te[1].lower() == b"chunked" else None)
    if kind == "chunked-cut":
        cut = draw(st.integers(0, len(encoded) - 1))
        return Framed(
            [te], encoded[:cut], half_close=True, refuse=("the chunked body was cut short",)
        )
    if kind == "cl+te":  # both: either reading takes the same bytes
        return Framed([(cl, str(len(encoded)).encode()), te], encoded)
    if kind == "dup-cl":
        k = draw(st.integers(0, 3))
        headers = [(cl, str(len(body)).encode()), (b"content-length", str(len(body) + k).encode())]
        return Framed(
            headers,
            body + b"x" * k,
            delivered=body if k == 0 else None,
            refuse=("two different content-lengths",) if k else (),
        )
    value = draw(st.sampled_from(BAD_LENGTHS))
    body = (body + b"     ")[:5]
    refuse = ("content-length over FAL_PROXY_MAX_BODY_BYTES",) if value == b"104857601" else ()
    return Framed([(cl, value)], body, refuse=refuse)


bodies = st.one_of(
    st.sampled_from(
        [
            b"",
            TINY_PROMPT,
            b"{}",
            b'{"prompt": ""}',
            b'{"allowed_apps":["echo"]}',
            b'{"allowed_apps":["fast-lcm-diffusion"],"token_expiration":60}',
        ]
    ),
    st.binary(max_size=40),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=6),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=6,
    ).map(lambda v: json.dumps(v).encode()),
)


def _has_crlf(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(b"\r" in v or b"\n" in v for _, v in headers)


ALLOWED_PATHS = [p for p, label in PATHS if label is True]
ALLOWED_TARGETS = [(t, label) for t, label in TARGET_URLS if label is True]
benign_headers = st.one_of(
    st.tuples(st.just(b"content-type"), st.just(b"application/json")),
    st.tuples(
        st.sampled_from(
            [
                b"accept",
                b"user-agent",
                b"x-fal-queue-priority",
                b"x-fal-runner-hint",
                b"x-custom",
                b"X-Custom",
                b"x-forwarded-for",
                b"cf-aig-cache-key",
            ]
        ),
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=16).map(str.encode),
    ),
    st.tuples(st.just(b"connection"), st.sampled_from([b"close", b"keep-alive"])),
    st.tuples(st.just(b"accept-encoding"), st.just(b"identity")),
    st.tuples(st.just(b"cf-aig-skip-cache"), st.just(b"true")),
)
UNDERSCORED = [
    b"cf_aig_authorization",
    b"CF_AIG_AUTHORIZATION",
    b"x_proxy_authorization",
    b"proxy_authorization",
    b"x_fal_target_url",
    b"content_length",
    b"transfer_encoding",
    b"x_custom",
    b"fal_key",
]
# Each example is a clean, allowed request with up to three of these things changed (and, one
# time in four or so, its body framed oddly), so a defect that needs a request valid in every
# other respect is reached.
HTTP_PERTURBATIONS = [
    "method",
    "version",
    "form",
    "host",
    "target",
    "headers",
    "underscore",
    "origin",
    "body",
]


@st.composite
def http_plans(draw: st.DrawFn) -> Plan:
    changes = draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3]))
    change = set(
        draw(
            st.lists(
                st.sampled_from(HTTP_PERTURBATIONS), min_size=changes, max_size=changes, unique=True
            )
        )
    )
    method = draw(
        st.sampled_from(
            [
                "GET",
                "POST",
                "POST",
                "PUT",
                "PATCH",
                "DELETE",
                "HEAD",
                "OPTIONS",
                "TRACE",
                "CONNECT",
                "PROPFIND",
                "get",
                "Post",
            ]
            if "method" in change
            else ["POST", "GET"]
        )
    )
    version = (
        draw(
            st.sampled_from(
                [
                    b"HTTP/1.0",
                    b"HTTP/0.9",
                    b"HTTP/2.0",
                    b"HTTP/1.2",
                    b"HTTP/3",
                    b"http/1.1",
                    b"HTTP/1.1 x",
                    b"",
                ]
            )
        )
        if "version" in change
        else b"HTTP/1.1"
    )
    if "target" in change:
        path, path_label = draw(st.sampled_from(PATHS))
        targets = [
            (draw(st.sampled_from([b"x-fal-target-url", b"X-Fal-Target-Url"])), draw(target_urls))
            for _ in range(draw(st.sampled_from([0, 1, 1, 2])))
        ]
    elif draw(st.booleans()):
        path, path_label, targets = draw(st.sampled_from(ALLOWED_PATHS)), True, []
    else:
        path, path_label = (
            draw(st.sampled_from([b"/api/fal/proxy", b"/api/fal/proxy?ignored=1"])),
            False,
        )
        targets = [(b"x-fal-target-url", draw(st.sampled_from(ALLOWED_TARGETS)))]
    form = (
        draw(st.sampled_from(["absolute", "absolute", "authority", "asterisk"]))
        if "form" in change
        else "origin"
    )
    if form == "origin":
        target = path
    elif form == "absolute":
        target = (
            draw(
                st.sampled_from(
                    [
                        b"http://" + HOSTPORT,
                        b"https://fal.run",
                        b"http://evil.example",
                        b"HTTP://" + HOSTPORT,
                    ]
                )
            )
            + path
        )
    elif form == "authority":
        target = draw(st.sampled_from([HOSTPORT, b"fal.run:443"]))
    else:
        target = b"*"
    if "host" in change:
        hosts = [
            (
                draw(st.sampled_from([b"host", b"Host", b"HOST"])),
                draw(
                    st.sampled_from(
                        [
                            HOSTPORT,
                            b"evil.example",
                            b"localhost:" + PORT,
                            b"127.0.0.1",
                            b"",
                            b"fal.run",
                        ]
                    )
                ),
            )
            for _ in range(draw(st.sampled_from([0, 0, 1, 2, 2, 3])))
        ]
    else:
        hosts = [(b"host", HOSTPORT)]
    creds = draw(st.lists(credential_headers(), max_size=3))
    creds = [c for c in creds if b"_" not in c[0]]
    others = draw(st.lists(benign_headers, max_size=3))
    if "headers" in change:
        others += draw(st.lists(other_headers, min_size=1, max_size=4))
    if "underscore" in change:
        for _ in range(draw(st.integers(1, 2))):
            name = draw(st.sampled_from(UNDERSCORED))
            secret = draw(SECRETS)
            creds.append((name, b"Bearer " + secret.encode(), secret))
    if "origin" in change:
        others.append(
            (
                draw(st.sampled_from([b"origin", b"Origin"])),
                draw(st.sampled_from(SAME_ORIGINS + FOREIGN_ORIGINS)),
            )
        )
        if draw(st.booleans()):
            others.append(
                draw(
                    st.sampled_from(
                        [
                            (b"referer", b"https://evil.example/page"),
                            (b"sec-fetch-site", b"cross-site"),
                            (b"origin", b"null"),
                        ]
                    )
                )
            )
    if "body" in change:
        body = draw(bodies)
    else:
        body = (
            draw(st.sampled_from([TINY_PROMPT, b"{}", b'{"x":[1,"y"]}']))
            if method != "GET"
            else b""
        )
    odd_framing = (
        draw(st.integers(0, 3)) == 0
    )  # (not one of the changes: any request may be framed oddly)
    framed = (
        draw(framings(body))
        if odd_framing
        else (
            Framed([(b"content-length", str(len(body)).encode())], body, delivered=body)
            if body or method != "GET"
            else Framed([], b"", delivered=b"")
        )
    )
    headers = (
        hosts
        + [(n, v) for n, (v, _) in targets]
        + [(n, v) for n, v, _ in creds]
        + others
        + framed.headers
    )
    headers = draw(st.permutations(headers))
    request_line = method.encode() + b" " + target + (b" " + version if version else b"")
    data = (
        request_line
        + b"\r\n"
        + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
        + b"\r\n"
        + framed.body
    )

    refuse = list(framed.refuse)
    if not _has_crlf(
        headers
    ):  # (a CR or LF in a value re-frames the head: no structural claim then)
        if method not in FORWARDED_METHODS:
            refuse.append(f"method {method}")
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            refuse.append(f"version {version!r}")
        if form != "origin":
            refuse.append(f"{form}-form request target")
        if len(hosts) > 1:
            refuse.append("two Host headers")
        if not hosts and version == b"HTTP/1.1":
            refuse.append("HTTP/1.1 without Host")
        origins = [v for n, v in others if n.lower() == b"origin"]
        if origins and all(v in FOREIGN_ORIGINS for v in origins):
            refuse.append("a foreign Origin")
        if any(path.split(b"?")[0] == r for r in RESERVED):
            refuse.append("a reserved path")
        label = targets[0][1][1] if targets else path_label
        if label is False:
            refuse.append("target or app not allowed")
        if (
            label == "token"
            and framed.delivered is not None
            and token_body_verdict(framed.delivered) is False
        ):
            refuse.append("a token body that must be refused")
    # Nothing changed: the request must go through (rest.fal.ai takes only POSTs).
    forward = (
        not change
        and not odd_framing
        and (method == "POST" or not any(b"rest.fal.ai" in v for _, (v, _) in targets))
    )
    return Plan(
        data,
        method=method,
        half_close=framed.half_close,
        refuse=tuple(refuse),
        secrets=tuple(s for _, _, s in creds),
        forward=forward,
    )


def _http(method: str, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    lines = [method.encode() + b" " + path + b" HTTP/1.1", b"host: " + HOSTPORT]
    lines += [n + b": " + v for n, v in headers]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(b"content-length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@fuzz_settings(500)
@given(plan=http_plans())
@example(
    plan=Plan(
        _http("POST", b"/emulator/echo", [(b"content-type", b"application/json")], b'{"x":1}'),
        method="POST",
        expect=200,
    )
)
@example(
    plan=Plan(
        _http(
            "POST",
            b"/api/fal/proxy",
            [(b"x-fal-target-url", b"https://queue.fal.run/fal-ai/flux/dev")],
            TINY_PROMPT,
        ),
        method="POST",
        expect=200,
    )
)
def test_raw_http_requests(open_harness: Harness, plan: Plan) -> None:
    open_harness.run(plan)


# --- WebSocket handshakes -----------------------------------------------------------------------

WS_PATHS: list[tuple[bytes, bool | None]] = [
    (b"/emulator/echo/realtime", True),
    (b"/emulator/echo/realtime", True),
    (b"/fal-ai/fast-sdxl/realtime", True),
    (b"/fal-ai/flux/dev/realtime", True),
    (b"/fal-ai/fast-lcm-diffusion/realtime", False),
    (b"/emulator/ws/realtime", False),
    (b"/api/fal/proxy", False),
    (b"/emulator/echo/../ws/realtime", False),
]
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


@st.composite
def query_params(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """``key=value``, and the value when it is a fal_jwt_token a parser would read."""
    secret = draw(SECRETS)
    key, is_token = draw(
        st.sampled_from(
            [
                (b"fal_jwt_token", True),
                (b"fal_jwt_token", True),
                (b"fal%5Fjwt%5Ftoken", True),
                (b"%66al_jwt_token", True),
                (b"fal_jwt_token%00", False),
                (b"FAL_JWT_TOKEN", False),
                (b"fal_jwt_token[]", False),
                (b"keep", False),
                (b"fal-jwt-token", False),
            ]
        )
    )
    if not is_token:
        return key + b"=" + draw(st.sampled_from([b"1", b"", b"a%20b"])), None
    return key + b"=" + secret.encode(), secret


@st.composite
def subprotocols(draw: st.DrawFn) -> tuple[bytes, str | None]:
    secret = draw(SECRETS)
    template, is_secret = draw(
        st.sampled_from(
            [
                ("v1", False),
                ("msgpack", False),
                ("fal-api-key.{}", True),
                ("Fal-Api-Key.{}", True),
                ("FAL-API-KEY.{}", True),
                ("proxy-authorization.{}", True),
                ("Proxy-Authorization.{}", True),
                ("cf-aig-authorization.{}", True),
                ("CF-AIG-Authorization.{}", True),
                ("fal-api-key.", False),
            ]
        )
    )
    return template.format(secret).encode(), secret if is_secret else None


WS_PERTURBATIONS = [
    "path",
    "method",
    "version",
    "form",
    "host",
    "handshake",
    "origin",
    "creds",
    "spacing",
    "headers",
]


@st.composite
def ws_plans(draw: st.DrawFn) -> Plan:
    changes = draw(st.sampled_from([0, 1, 1, 1, 2]))
    change = set(
        draw(
            st.lists(
                st.sampled_from(WS_PERTURBATIONS), min_size=changes, max_size=changes, unique=True
            )
        )
    )
    path, label = draw(
        st.sampled_from(WS_PATHS if "path" in change else [p for p in WS_PATHS if p[1]])
    )
    params = draw(st.lists(query_params(), max_size=3))
    query = b"&".join(p for p, _ in params)
    method = draw(st.sampled_from(["POST", "HEAD", "PUT"])) if "method" in change else "GET"
    version = (
        draw(st.sampled_from([b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0"]))
        if "version" in change
        else b"HTTP/1.1"
    )
    absolute = "form" in change
    target = (b"http://" + HOSTPORT if absolute else b"") + path + (b"?" + query if query else b"")
    offered = draw(st.lists(subprotocols(), max_size=4))
    headers = (
        [
            (draw(st.sampled_from([b"host", b"Host"])), HOSTPORT)
            for _ in range(draw(st.sampled_from([0, 2])))
        ]
        if "host" in change
        else [(b"host", HOSTPORT)]
    )
    headers.append((b"upgrade", draw(st.sampled_from([b"websocket", b"websocket", b"WebSocket"]))))
    headers.append(
        (b"connection", draw(st.sampled_from([b"Upgrade", b"upgrade", b"keep-alive, Upgrade"])))
    )
    key, ws_version = WS_KEY, b"13"
    if "handshake" in change:
        key, ws_version = draw(
            st.sampled_from(
                [(b"", b"13"), (b"short", b"13"), (b"!!!!", b"13"), (WS_KEY, b"8"), (WS_KEY, b"14")]
            )
        )
    headers += [(b"sec-websocket-key", key), (b"sec-websocket-version", ws_version)]
    names = [p for p, _ in offered]
    style = draw(
        st.sampled_from(
            ["each", "spaces", "trailing-comma", "leading-comma", "empty-element", "comma-only"]
            if "spacing" in change
            else ["one"]
        )
    )
    if style == "each":
        headers += [
            (draw(st.sampled_from([b"sec-websocket-protocol", b"Sec-WebSocket-Protocol"])), n)
            for n in names
        ]
    elif names or style != "one":
        joined = {"one": b", ", "spaces": b" ,  ", "empty-element": b",,"}.get(style, b",").join(
            names
        )
        value = {
            "trailing-comma": joined + b" , ",
            "leading-comma": b", " + joined,
            "comma-only": joined + b",",
        }.get(style, joined)
        headers.append((b"sec-websocket-protocol", value))
    creds = (
        draw(st.lists(credential_headers(), min_size=1, max_size=3)) if "creds" in change else []
    )
    headers += [(n, v) for n, v, _ in creds]
    origin = draw(st.sampled_from(SAME_ORIGINS + FOREIGN_ORIGINS)) if "origin" in change else None
    if origin is not None:
        headers.append((b"origin", origin))
    extra = draw(st.lists(other_headers, min_size=1, max_size=3)) if "headers" in change else []
    extra = [(n, v) for n, v in extra if n.lower() not in (b"origin", b"connection", b"upgrade")]
    headers += extra
    headers = draw(st.permutations(headers))
    data = (
        method.encode()
        + b" "
        + target
        + b" "
        + version
        + b"\r\n"
        + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
        + b"\r\n"
    )

    refuse = []
    if label is False:
        refuse.append("app not allowed")
    if not _has_crlf(extra):  # (a CR or LF in a value re-frames the head: no structural claim then)
        if method != "GET":
            refuse.append(f"method {method}")
        if version != b"HTTP/1.1":
            refuse.append(
                f"WebSocket handshake over {version.decode()} (RFC 6455: HTTP/1.1 or higher)"
            )
        if absolute:
            refuse.append("absolute-form request target")
        host_count = sum(1 for n, _ in headers if n.lower() == b"host")
        if host_count != 1:
            refuse.append(f"{host_count} Host headers")
        if origin in FOREIGN_ORIGINS:
            refuse.append("a foreign Origin")
        if key != WS_KEY or ws_version != b"13":
            refuse.append("not a valid handshake")
    secrets = [s for _, s in params if s] + [s for _, s in offered if s] + [s for _, _, s in creds]
    clean = not (change - {"creds"})  # a clean handshake for an allowed app is bridged
    return Plan(
        data,
        method=method,
        refuse=tuple(refuse),
        secrets=tuple(secrets),
        expect=101 if clean else None,
    )


def _ws(
    path: bytes, protocols: bytes | None = None, extra: list[tuple[bytes, bytes]] = ()
) -> bytes:
    headers = [
        (b"host", HOSTPORT),
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-key", WS_KEY),
        (b"sec-websocket-version", b"13"),
        *extra,
    ]
    if protocols is not None:
        headers.append((b"sec-websocket-protocol", protocols))
    return (
        b"GET "
        + path
        + b" HTTP/1.1\r\n"
        + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
        + b"\r\n"
    )


@fuzz_settings(400)
@given(plan=ws_plans())
@example(plan=Plan(_ws(b"/emulator/echo/realtime", b"v1"), expect=101))
def test_raw_websocket_handshakes(open_harness: Harness, plan: Plan) -> None:
    open_harness.run(plan)


# --- realtime token bodies --------------------------------------------------------------------

APP_ITEMS = [
    "fast-sdxl",
    "flux",
    "echo",
    "fast-lcm-diffusion",
    "*",
    "",
    "flux*",
    "FLUX",
    "Fast-SDXL",
    "echo\u0000",
    "fast-sdxl ",
    1,
    None,
    ["flux"],
]
EXPIRATIONS = [
    "1",
    "120",
    "300",
    "301",
    "0",
    "-1",
    "1.5",
    "120.0",
    "1e2",
    "true",
    "null",
    '"120"',
    "NaN",
    "Infinity",
    "99999999999999999999999",
    "-0",
]
KEYS = [
    "allowed_apps",
    "token_expiration",
    "Allowed_Apps",
    "ALLOWED_APPS",
    "token_Expiration",
    "\\u0061llowed_apps",
    "x",
    "allowed_apps ",
]


@st.composite
def token_texts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["object"] * 6 + ["deep", "garbage"]))
    if kind == "garbage":
        return draw(
            st.sampled_from(
                [
                    "",
                    "null",
                    "[]",
                    '"allowed_apps"',
                    "{",
                    '{"allowed_apps":["echo"]',
                    '{"allowed_apps":["echo"]}{"allowed_apps":["fast-lcm-diffusion"]}',
                    "{'allowed_apps':['echo']}",
                    '{"allowed_apps":["echo"],}',
                ]
            )
        )
    if kind == "deep":
        n = draw(st.sampled_from([10, 100, 1000, 30_000]))
        return draw(
            st.sampled_from(
                [
                    "[" * n,
                    "[" * n + "]" * n,
                    '{"a":' * n + "1" + "}" * n,
                    '{"allowed_apps":["echo"],"x":' + "[" * n + "]" * n + "}",
                    '{"allowed_apps":' + "[" * n + '"echo"' + "]" * n + "}",
                ]
            )
        )
    apps = draw(
        st.one_of(
            st.lists(st.sampled_from(["fast-sdxl", "flux", "echo"]), min_size=1, max_size=3),
            st.lists(st.sampled_from(APP_ITEMS), max_size=3),
        )
    )
    members = [("allowed_apps", json.dumps(apps))]
    if draw(st.booleans()):
        members.append(
            ("token_expiration", draw(st.sampled_from(["120", "60", "300", *EXPIRATIONS])))
        )
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # duplicates, case variants, extras
        key = draw(st.sampled_from(KEYS))
        value = (
            json.dumps(draw(st.lists(st.sampled_from(APP_ITEMS), max_size=2)))
            if "apps" in key.lower() or "u0061" in key
            else draw(st.sampled_from(EXPIRATIONS))
        )
        members.append((key, value))
    members = draw(st.permutations(members))
    space = draw(st.sampled_from(["", " ", "\n", "\t "]))
    return space + "{" + ("," + space).join(f'"{k}":{space}{v}' for k, v in members) + "}" + space


ENCODINGS = ["utf-8"] * 6 + [
    "utf-8-sig",
    "utf-16",
    "utf-16-le",
    "utf-16-be",
    "utf-32",
    "latin-1+xff",
    "nul-prefix",
    "padded",
]


@st.composite
def token_bodies(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=40))
    text = draw(token_texts())
    encoding = draw(st.sampled_from(ENCODINGS))
    if encoding == "latin-1+xff":
        return text.encode("utf-8", "surrogatepass") + b"\xff"
    if encoding == "nul-prefix":
        return b"\x00" + text.encode("utf-8", "surrogatepass")
    if encoding == "padded":  # over the 64 KiB a token request may have
        return text.encode("utf-8", "surrogatepass") + b" " * 70_000
    return text.encode(encoding, "surrogatepass")


TOKEN_URLS = [b"https://rest.fal.ai/tokens/"] * 6 + [
    b"https://REST.FAL.AI/tokens/",
    b"https://rest.fal.ai:443/tokens/",
    b"https://rest.fal.ai/tokens/?x=1",
    b"https://rest.fal.ai/tokens",
]


@st.composite
def token_plans(draw: st.DrawFn) -> Plan:
    body = draw(token_bodies())
    url = draw(st.sampled_from(TOKEN_URLS))
    method = draw(st.sampled_from(["POST"] * 8 + ["PUT", "GET"]))
    content_type = draw(
        st.sampled_from(
            [
                b"application/json",
                b"application/json",
                b"text/plain",
                b"application/json; charset=utf-16",
            ]
        )
    )
    chunked = draw(st.integers(0, 4)) == 0
    headers = [(b"host", HOSTPORT), (b"x-fal-target-url", url), (b"content-type", content_type)]
    if chunked:
        headers.append((b"transfer-encoding", b"chunked"))
        payload = chunk(body, [draw(st.integers(1, 64))] * 3, False, False)
    else:
        headers.append((b"content-length", str(len(body)).encode()))
        payload = body
    data = (
        method.encode()
        + b" /api/fal/proxy HTTP/1.1\r\n"
        + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
        + b"\r\n"
        + payload
    )
    verdict = token_body_verdict(body)
    refuse = []
    if verdict is False:
        refuse.append("a token body that must be refused")
    if url == b"https://rest.fal.ai/tokens":
        refuse.append("not the token endpoint")
    clean = (
        verdict is True
        and url == TOKEN_URLS[0]
        and method == "POST"
        and content_type == b"application/json"
        and len(body) <= 64 * 1024
    )
    return Plan(data, method=method, refuse=tuple(refuse), expect=201 if clean else None)


def _token(body: bytes) -> Plan:
    data = _http(
        "POST",
        b"/api/fal/proxy",
        [
            (b"x-fal-target-url", b"https://rest.fal.ai/tokens/"),
            (b"content-type", b"application/json"),
        ],
        body,
    )
    verdict = token_body_verdict(body)
    return Plan(
        data,
        method="POST",
        refuse=("a token body that must be refused",) if verdict is False else (),
        expect=201 if verdict is True else None,
    )


@fuzz_settings(300)
@given(plan=token_plans())
@example(plan=_token(b'{"allowed_apps":["flux","echo"],"token_expiration":120}'))
def test_realtime_token_bodies(open_harness: Harness, plan: Plan) -> None:
    open_harness.run(plan)


# --- caller JWTs ------------------------------------------------------------------------------

MISSING = "<missing>"


@dataclass(frozen=True)
class JwtSpec:
    alg: Any = "RS256"
    kid: Any = "rsa-1"
    method: str = "rsa"  # how the signature is made (fuzz_support.sign)
    sub: Any = "user-1"
    exp: Any = 300  # seconds from now; MISSING or a literal value (str)
    aud: Any = AUDIENCE
    iss: Any = ISSUER
    nbf: Any = MISSING
    extra: tuple[tuple[str, Any], ...] = ()  # more header fields
    mutation: str = "none"
    prefix: str = "Bearer "
    placement: str = "header"

    def token(self, keys: Keys) -> str:
        now = int(time.time())
        header: dict[str, Any] = {"alg": self.alg, "typ": "JWT"}
        if self.kid is not MISSING:
            header["kid"] = self.kid
        header.update(dict(self.extra))
        claims: dict[str, Any] = {}
        for name, value in (("sub", self.sub), ("aud", self.aud), ("iss", self.iss)):
            if value is not MISSING:
                claims[name] = value
        for name, value in (("exp", self.exp), ("nbf", self.nbf)):
            if value is not MISSING:
                claims[name] = now + value if isinstance(value, int) else value
        return mutate(build_jwt(header, claims, self.method, keys), self.mutation)


def mutate(token: str, how: str) -> str:
    head, body, sig = token.split(".")
    flip = {"A": "B", "B": "A"}

    def flip_at(part: str, i: int) -> str:
        return part[:i] + flip.get(part[i], "A") + part[i + 1 :] if part else "A"

    return {
        "none": token,
        "flip-header": f"{flip_at(head, 2)}.{body}.{sig}",
        "flip-payload": f"{head}.{flip_at(body, 3)}.{sig}",
        "flip-sig": f"{head}.{body}.{flip_at(sig, 1)}",
        "drop-sig": f"{head}.{body}.",
        "extra-segment": f"{token}.{sig}",
        "two-segments": f"{head}.{body}",
        "garbage": "eyJhbGciOiJIUzI1NiJ9.\x7fnot-base64!.@@@",
        "empty": "",
        "spaces": f"{head}. {body}.{sig}",
        "non-ascii": f"{head}.{body}\u00e9.{sig}",
        "long": f"{head}.{body}{'A' * 6000}.{sig}",
        "trailing-dot": token + ".",
        "header-not-object": f"{'WzFd'}.{body}.{sig}",  # base64url("[1]")
    }[how]


JWKS_BASES = [JwtSpec(), JwtSpec(alg="ES256", kid="ec-1", method="ec"), JwtSpec(kid=MISSING)]
HS_BASES = [JwtSpec(alg="HS256", kid=MISSING, method="hs", aud=MISSING, iss=MISSING)]
PERTURBATIONS: dict[str, list[Any]] = {
    "alg": [
        "RS256",
        "ES256",
        "HS256",
        "none",
        "None",
        "RS512",
        "PS256",
        "ES384",
        "HS512",
        "",
        None,
    ],
    "kid": ["rsa-1", "ec-1", "nope", MISSING, 7, "", ["rsa-1"], "../../jwks"],
    "method": [
        "rsa",
        "ec",
        "hs",
        "hs-rsa-pem",
        "none",
        "garbage",
        "other-rsa",
        "other-ec",
        "hs-wrong",
    ],
    "sub": ["user-1", "", 42, MISSING, ["x"], None],
    "exp": [300, -600, MISSING, "soon", 10**12, 1.5],
    "aud": [AUDIENCE, "other", MISSING, ["other", AUDIENCE]],
    "iss": [ISSUER, "https://evil.example", MISSING],
    "nbf": [MISSING, 600],
    "extra": [
        (),
        (("crit", ["exp"]),),
        (("jku", "https://evil.example/jwks"),),
        (("x5u", "https://evil.example/x"),),
        (("b64", False),),
        (("jwk", {"kty": "oct", "k": "c2VjcmV0"}),),
    ],
    "mutation": [
        "flip-header",
        "flip-payload",
        "flip-sig",
        "drop-sig",
        "extra-segment",
        "two-segments",
        "garbage",
        "empty",
        "spaces",
        "non-ascii",
        "long",
        "trailing-dot",
        "header-not-object",
    ],
    "prefix": ["Bearer ", "bearer ", "BEARER ", "", "Bearer  ", "Basic ", "Token "],
    "placement": [
        "header",
        "header-case",
        "authorization",
        "underscore",
        "dup-first",
        "dup-last",
        "none",
        "ws-subprotocol",
        "ws-subprotocol-case",
        "ws-header",
    ],
}


@st.composite
def jwt_specs(draw: st.DrawFn, bases: list[JwtSpec]) -> JwtSpec:
    spec = draw(st.sampled_from(bases))
    for name in draw(st.lists(st.sampled_from(sorted(PERTURBATIONS)), max_size=3, unique=True)):
        spec = JwtSpec(**{**spec.__dict__, name: draw(st.sampled_from(PERTURBATIONS[name]))})
    if (
        spec.placement in ("header", "header-case", "ws-subprotocol", "ws-header")
        and draw(st.integers(0, 3)) == 0
    ):
        spec = JwtSpec(
            **{**spec.__dict__, "placement": draw(st.sampled_from(PERTURBATIONS["placement"]))}
        )
    return spec


def jwt_plan(spec: JwtSpec, keys: Keys, mode: str) -> Plan:
    token = spec.token(keys)
    credential = spec.prefix + token
    try:
        encoded = credential.encode("latin-1")
    except UnicodeEncodeError:
        encoded = credential.encode("utf-8")
    acceptable = jwt_acceptable(
        token,
        keys=keys,
        mode=mode,
        audience=AUDIENCE if mode == "jwks" else None,
        issuer=ISSUER if mode == "jwks" else None,
    )
    bearer_ok = spec.prefix.lower().startswith("bearer ") or spec.prefix == ""
    valid = acceptable and bearer_ok
    garbage = b"Bearer not-a-jwt-at-all"
    placement = spec.placement
    headers: list[tuple[bytes, bytes]] = []
    refuse: list[str] = []
    if placement in ("header", "header-case", "ws-header"):
        name = b"X-Proxy-Authorization" if placement == "header-case" else b"x-proxy-authorization"
        headers.append((name, encoded))
        if not valid:
            refuse.append("the caller JWT is not valid")
    elif placement == "authorization":
        headers.append((b"authorization", encoded))
        refuse.append("the caller JWT is in Authorization, not the caller header")
    elif placement == "underscore":
        headers.append((b"x_proxy_authorization", encoded))
        refuse.append("the caller JWT is in an underscore header, not the caller header")
    elif placement in ("dup-first", "dup-last"):
        pair = [(b"x-proxy-authorization", encoded), (b"x-proxy-authorization", garbage)]
        headers += pair if placement == "dup-first" else pair[::-1]
        if not valid:
            refuse.append("no caller JWT is valid")
    elif placement == "none":
        refuse.append("no caller credential")
    ws = placement.startswith("ws-")
    if placement in ("ws-subprotocol", "ws-subprotocol-case"):
        name = (
            "Proxy-Authorization." if placement == "ws-subprotocol-case" else "proxy-authorization."
        )
        headers.append((b"sec-websocket-protocol", (name + token).encode("utf-8") + b", v1"))
        if not acceptable:  # (a sub-protocol carries the bare token: no prefix)
            refuse.append("the caller JWT is not valid")
        valid = acceptable
    # Not vacuous: a valid token, unmodified, where the README says it goes, is accepted. (Without
    # a kid, a JWKS of two keys leaves the key ambiguous: a proxy may refuse such a token.)
    clean = (
        valid
        and spec.mutation == "none"
        and placement in ("header", "header-case", "ws-subprotocol", "ws-header")
        and (mode == "hs" or spec.kid is not MISSING)
    )
    if ws:
        data = (
            _ws(b"/emulator/echo/realtime", None, headers)
            if placement == "ws-header"
            else _ws(b"/emulator/echo/realtime", headers[-1][1], headers[:-1])
        )
        return Plan(data, refuse=tuple(refuse), secrets=(token,), expect=101 if clean else None)
    data = _http(
        "POST", b"/emulator/echo", [(b"content-type", b"application/json"), *headers], b'{"n":1}'
    )
    return Plan(
        data, method="POST", refuse=tuple(refuse), secrets=(token,), expect=200 if clean else None
    )


@fuzz_settings(200)
@given(spec=jwt_specs(JWKS_BASES))
@example(spec=JwtSpec())
@example(spec=JwtSpec(alg="ES256", kid="ec-1", method="ec", placement="ws-subprotocol", prefix=""))
def test_caller_jwts_with_a_jwks(jwks_harness: Harness, keys: Keys, spec: JwtSpec) -> None:
    plan = jwt_plan(spec, keys, "jwks")
    note(repr(plan))
    jwks_harness.run(plan)


@fuzz_settings(120)
@given(spec=jwt_specs(HS_BASES))
@example(spec=HS_BASES[0])
def test_caller_jwts_with_an_hs256_secret(hs_harness: Harness, keys: Keys, spec: JwtSpec) -> None:
    plan = jwt_plan(spec, keys, "hs")
    note(repr(plan))
    hs_harness.run(plan)


# --- known shapes, one request each ------------------------------------------------------------
# Hand-written members of the families the fuzzers above explore, so each is always tried
# and reported by name (a failing @example would stop hypothesis before it generates).

SHAPES: dict[str, tuple[str, Any]] = {
    "underscore credential headers": (
        "open_harness",
        lambda keys: Plan(
            _http(
                "POST",
                b"/emulator/echo",
                [
                    (b"cf_aig_authorization", b"Bearer client-cred-000001-zq"),
                    (b"x_proxy_authorization", b"client-cred-000002-zq"),
                ],
                b"{}",
            ),
            method="POST",
            secrets=("client-cred-000001-zq", "client-cred-000002-zq"),
        ),
    ),
    "absolute-form target": (
        "open_harness",
        lambda keys: Plan(
            b"GET http://evil.example/emulator/echo HTTP/1.1\r\nhost: " + HOSTPORT + b"\r\n\r\n",
            refuse=("absolute-form request target",),
        ),
    ),
    "asterisk-form target": (
        "open_harness",
        lambda keys: Plan(
            b"GET * HTTP/1.1\r\nhost: "
            + HOSTPORT
            + b"\r\nx-fal-target-url: https://fal.run/emulator/echo\r\n\r\n",
            refuse=("asterisk-form request target",),
        ),
    ),
    "HTTP/0.9": (
        "open_harness",
        lambda keys: Plan(
            b"GET /emulator/echo HTTP/0.9\r\nhost: " + HOSTPORT + b"\r\n\r\n",
            refuse=("version HTTP/0.9",),
        ),
    ),
    "no HTTP version": (
        "open_harness",
        lambda keys: Plan(b"GET /emulator/echo\r\n\r\n", refuse=("no version",)),
    ),
    "HTTP/1.1 without Host": (
        "open_harness",
        lambda keys: Plan(
            b"GET /emulator/echo HTTP/1.1\r\n\r\n", refuse=("HTTP/1.1 without Host",)
        ),
    ),
    "two Host headers": (
        "open_harness",
        lambda keys: Plan(
            b"GET /emulator/echo HTTP/1.1\r\nhost: " + HOSTPORT + b"\r\nhost: evil.example\r\n\r\n",
            refuse=("two Host headers",),
        ),
    ),
    "an upstream dying mid-body": (
        "open_harness",
        lambda keys: Plan(
            _http("POST", b"/emulator/die", [(b"content-type", b"application/json")], b"{}"),
            method="POST",
            forward=True,
        ),
    ),
    "two pipelined requests, then bytes that are no request": (
        "open_harness",
        lambda keys: Plan(
            _http("POST", b"/emulator/echo", [], b"{}")
            + b"GET /emulator/status/500 HTTP/1.1\r\nhost: "
            + HOSTPORT
            + b"\r\n\r\n\x16\x03\x01\x00",
            method="POST",
        ),
    ),
    "WebSocket credential sub-protocol in other letter case": (
        "open_harness",
        lambda keys: Plan(
            _ws(b"/emulator/echo/realtime", b"Fal-Api-Key.client-cred-000003-zq, v1"),
            secrets=("client-cred-000003-zq",),
        ),
    ),
    "WebSocket percent-encoded fal_jwt_token": (
        "open_harness",
        lambda keys: Plan(
            _ws(b"/emulator/echo/realtime?fal%5Fjwt%5Ftoken=client-cred-000004-zq"),
            secrets=("client-cred-000004-zq",),
        ),
    ),
    "WebSocket fal_jwt_token": (
        "open_harness",
        lambda keys: Plan(
            _ws(b"/emulator/echo/realtime?fal_jwt_token=client-cred-000005-zq"),
            secrets=("client-cred-000005-zq",),
        ),
    ),
    "WebSocket sub-protocol list with an empty element": (
        "open_harness",
        lambda keys: Plan(
            _ws(b"/emulator/echo/realtime", b"v1, fal-api-key.client-cred-000006-zq,"),
            secrets=("client-cred-000006-zq",),
        ),
    ),
    "WebSocket handshake with a non-ASCII header value": (
        "open_harness",
        lambda keys: Plan(_ws(b"/emulator/echo/realtime", None, [(b"x-custom", b"caf\xc3\xa9")])),
    ),
    "WebSocket handshake over HTTP/1.0": (
        "open_harness",
        lambda keys: Plan(
            _ws(b"/emulator/echo/realtime").replace(b"HTTP/1.1", b"HTTP/1.0", 1),
            refuse=("HTTP/1.0 handshake",),
        ),
    ),
    "token body with a duplicate key": (
        "open_harness",
        lambda keys: _token(b'{"allowed_apps":["fast-lcm-diffusion"],"allowed_apps":["echo"]}'),
    ),
    "token body with a case-folded duplicate key": (
        "open_harness",
        lambda keys: _token(b'{"allowed_apps":["echo"],"Allowed_Apps":["fast-lcm-diffusion"]}'),
    ),
    "token body with a BOM": (
        "open_harness",
        lambda keys: _token(b'\xef\xbb\xbf{"allowed_apps":["echo"]}'),
    ),
    "token body in UTF-16": (
        "open_harness",
        lambda keys: _token('{"allowed_apps":["echo"]}'.encode("utf-16")),
    ),
    "token body of 30,000 [": ("open_harness", lambda keys: _token(b"[" * 30_000)),
    "JWT alg none": (
        "jwks_harness",
        lambda keys: jwt_plan(JwtSpec(alg="none", method="none"), keys, "jwks"),
    ),
    "JWT HS256 keyed with the RSA public key": (
        "jwks_harness",
        lambda keys: jwt_plan(JwtSpec(alg="HS256", method="hs-rsa-pem"), keys, "jwks"),
    ),
    "JWT ES256 with the RSA key's kid": (
        "jwks_harness",
        lambda keys: jwt_plan(JwtSpec(alg="ES256", kid="rsa-1", method="ec"), keys, "jwks"),
    ),
    "JWT RS256 with the EC key's kid": (
        "jwks_harness",
        lambda keys: jwt_plan(JwtSpec(alg="RS256", kid="ec-1", method="rsa"), keys, "jwks"),
    ),
    "JWT HS512 with the secret": (
        "hs_harness",
        lambda keys: jwt_plan(
            JwtSpec(alg="HS512", kid=MISSING, method="hs", aud=MISSING, iss=MISSING), keys, "hs"
        ),
    ),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_known_shapes(request: pytest.FixtureRequest, keys: Keys, shape: str) -> None:
    fixture, build = SHAPES[shape]
    harness: Harness = request.getfixturevalue(fixture)
    harness.run(build(keys))


def test_fuzz_helpers_judge_records_independently() -> None:
    """The oracle itself: a record with the proxy's credentials for an allowed app passes,
    and each kind of leak is caught."""
    from tests.security.fuzz_support import PREFIX, Record

    def record(
        path: str = f"{PREFIX}/emulator/echo",
        headers: list[tuple[str, str]] | None = None,
        target: str | None = None,
        body: bytes = b"",
        kind: str = "gateway",
        query: str = "",
    ) -> Record:
        base = [("authorization", f"Key {FAL_KEY}"), ("cf-aig-authorization", f"Bearer {CF_TOKEN}")]
        return Record(kind, "POST", path, query, base + (headers or []), body, len(body), target)

    assert record_problems(record(), []) == []
    assert record_problems(record(f"{PREFIX}/fal-ai/flux/dev/stream"), []) == []
    assert record_problems(record(f"{PREFIX}/fal-ai/fast-lcm-diffusion"), [])
    assert record_problems(record(headers=[("cf_aig_authorization", "x")]), [])
    assert record_problems(record(headers=[("x-custom", "Key client-cred-1")]), ["client-cred-1"])
    assert (
        record_problems(
            record(PREFIX, target="https://queue.fal.run/fal-ai/flux/requests/a/status"), []
        )
        == []
    )
    assert record_problems(
        record(PREFIX, target="https://queue.fal.run/fal-ai/fast-lcm-diffusion/requests/a"), []
    )
    assert (
        record_problems(
            record(PREFIX, target="https://rest.fal.ai/tokens/", body=b'{"allowed_apps":["echo"]}'),
            [],
        )
        == []
    )
    assert record_problems(
        record(
            PREFIX,
            target="https://rest.fal.ai/tokens/",
            body=b'{"allowed_apps":["echo"],"allowed_apps":["x"]}',
        ),
        [],
    )
    assert record_problems(
        record(
            f"{PREFIX}/emulator/echo/realtime",
            kind="websocket",
            headers=[("sec-websocket-protocol", "Fal-Api-Key.k, v1")],
        ),
        [],
    )
    assert record_problems(
        record(f"{PREFIX}/emulator/echo/realtime", kind="websocket", query="fal%5Fjwt%5Ftoken=abc"),
        [],
    )
    assert token_body_verdict('{"allowed_apps":["echo"]}'.encode("utf-16")) is False
    assert token_body_verdict(b"[" * 30_000) in (False, None)
