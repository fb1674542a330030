"""Hypothesis over raw requests on the Python client's TLS port (``FAL_PROXY_PYTHON_SDK_PORT``).

The same four properties as ``test_fuzz_raw.py`` (no 500, no error line, no secret in a
response or a log line, nothing reaches the gateway that is not valid, allowed and carrying
only the proxy's credentials), judged by the same independent oracle, for what is particular
to this port:

* its paths: fal.run-shaped runs, and ``/queue.fal.run/…`` queue calls built from segments a
  hostile client would try (dot segments raw and encoded, ``//``, a host after the prefix,
  controls, non-ASCII);
* its credential: the caller's token in ``Authorization: Key …`` (callers authenticate with
  tokens here), right, wrong, repeated, in another scheme or header;
* a client's own ``x-fal-target-url``, cookies and gateway headers, which must change nothing.

A request with the right token for an allowed app must be served (not vacuous); one without
it must reach nothing.
"""

from __future__ import annotations

import gzip
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, example, given, note
from hypothesis import strategies as st

from proxy.errors import BadGateway
from proxy.policy.python_port import MAX_GZIP_MEMBERS, _skip_value, decoded, rewrite_queue_urls
from tests.conftest import FakeGateway, launch_proxy
from tests.redis_support import free_port
from tests.security.fuzz_support import (
    HOSTPORT,
    Barrier,
    app_allowed,
    gateway_records,
    has_dot_segment,
    send_raw,
)
from tests.security.test_fuzz_raw import (
    COMMON_ENV,
    SECRETS,
    TINY_PROMPT,
    Plan,
    assert_unjudged_lines_clean,
    check,
    fuzz_settings,
)

TOKEN = "python-caller-token-7f3a9c1e"  # the one valid caller token (FAL_KEY of the client)


class PortHarness:
    """One proxy with the TLS port; plans are sent there, the barrier uses the main port."""

    def __init__(self, gateway: FakeGateway, state: Path, tokens: Path) -> None:
        self.gateway = gateway
        self.port = free_port()
        self.proxy = launch_proxy(
            gateway.gateway_url, **COMMON_ENV, FAL_PROXY_PYTHON_SDK_PORT=str(self.port),
            FAL_PROXY_STATE_DIR=str(state), FAL_PROXY_AUTH="token",
            FAL_PROXY_CLIENT_TOKENS_FILE=str(tokens),
        )  # fmt: skip
        self.proxy.process.wait_for_json(lambda r: r.get("event") == "python_sdk")
        self.barrier = Barrier(self.proxy, marker_headers=b"")
        self.tls = ssl.create_default_context(cafile=str(state / "ca-bundle.pem"))
        self.judged: list[tuple[int, int]] = []
        self.last_secrets: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"PortHarness({self.port})"

    def run(self, plan: Plan) -> dict[str, Any] | None:
        """Send ``plan`` on the TLS port and check the properties; the first JSON answer."""
        self.gateway.clear()
        start = len(self.proxy.process.lines)
        data = plan.data.replace(HOSTPORT, f"127.0.0.1:{self.port}".encode())
        outcome = send_raw(("127.0.0.1", self.port), data, method=plan.method, tls=self.tls)
        self.barrier.settle()
        end = len(self.proxy.process.lines)
        self.judged.append((start, end))
        records = gateway_records(self.gateway)
        self.gateway.clear()
        note(f"sent {data!r}\ngot {outcome.summary()}\ngateway {[r.short() for r in records]}")
        status = outcome.final[0].status if outcome.final else "none"
        event(f"status {status}; {'forwarded' if records else 'not forwarded'}")
        check(plan, outcome, self.proxy.process.lines[start:end], records)
        final = outcome.final[0] if outcome.final else None
        try:
            return json.loads(final.body) if final is not None else None
        except ValueError:
            return None


@pytest.fixture(scope="module")
def port_harness(
    fake_gateway: FakeGateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PortHarness]:
    folder = tmp_path_factory.mktemp("python-port")
    tokens = folder / "tokens"
    tokens.write_text(f"py-caller {TOKEN}\n")
    harness = PortHarness(fake_gateway, folder / "state", tokens)
    try:
        yield harness
        assert_unjudged_lines_clean(harness)  # type: ignore[arg-type]
    finally:
        harness.proxy.process.stop()


# --- what a hostile client sends to the port --------------------------------------------------

SEGMENTS = [
    b"fal-ai", b"fast-sdxl", b"flux", b"dev", b"stream", b"requests", b"r1", b"status",
    b"cancel", b"emulator", b"echo", b"..", b".", b"%2e%2e", b"%2E%2e", b"%252e%252e", b"",
    b"%2F", b"evil.example", b"queue.fal.run", b"%00", b"%0d%0a", b";x", b"\xc3\xa9",
    b"@evil.example", b"fal-ai%2Ffast-sdxl", b"rest.fal.ai", b"%5c", b"\\",
]  # fmt: skip
PREFIXES = [b"/queue.fal.run", b"", b"/queue.fal.run/", b"/QUEUE.FAL.RUN", b"/queue.fal.run%2F"]


@st.composite
def paths(draw: st.DrawFn) -> bytes:
    prefix = draw(st.sampled_from(PREFIXES))
    segments = draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6))
    query = draw(st.sampled_from([b"", b"?logs=true", b"?x=%0d%0a", b"?fal_jwt_token=abc"]))
    return prefix + b"/" + b"/".join(segments) + query


@st.composite
def credentials(draw: st.DrawFn) -> tuple[list[tuple[bytes, bytes]], bool, tuple[str, ...]]:
    """Header lines carrying a credential, whether they prove the caller, the secrets in them."""
    wrong = draw(SECRETS)
    kind = draw(st.sampled_from(
        ["key", "key", "lower", "bearer", "bare", "wrong", "none", "twice", "other-header",
         "empty", "cookie"]))  # fmt: skip
    token = TOKEN.encode()
    options: dict[str, tuple[list[tuple[bytes, bytes]], bool]] = {
        "key": ([(b"authorization", b"Key " + token)], True),
        "lower": ([(b"authorization", b"key   " + token)], True),
        "bearer": ([(b"authorization", b"Bearer " + token)], True),
        "bare": ([(b"authorization", token)], True),
        "wrong": ([(b"authorization", b"Key " + wrong.encode())], False),
        "none": ([], False),
        "twice": ([(b"authorization", b"Key " + wrong.encode()),
                   (b"authorization", b"Key " + token)], False),
        "other-header": ([(b"x-proxy-authorization", b"Bearer " + token)], False),
        "empty": ([(b"authorization", b"Key ")], False),
        "cookie": ([(b"cookie", b"session=" + token)], False),
    }  # fmt: skip
    lines, proves = options[kind]
    return lines, proves, (TOKEN, wrong)


EXTRAS = [
    (b"x-fal-target-url", b"https://rest.fal.ai/tokens/"),
    (b"x-fal-target-url", b"https://evil.example/steal"),
    (b"cf-aig-authorization", b"Bearer client-cf-token-123456"),
    (b"cf-aig-byok-alias", b"someone-else"),
    (b"x-forwarded-for", b"10.9.8.7"),
    (b"accept-encoding", b"br, zstd"),
]


def expected_to_pass(path: bytes, proves: bool, method: str) -> bool:
    """Must the proxy serve it (a clean, allowed request by the right caller)? The oracle:
    a fal.run-shaped path of an allowed app, or ``/queue.fal.run/<allowed app>`` submitted."""
    if not proves or method != "POST":
        return False
    raw, _, _query = path.partition(b"?")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return False
    if "%" in text or "\\" in text or "//" in text or has_dot_segment(text) or ";" in text:
        return False
    if text.startswith("/queue.fal.run/"):
        app = text[len("/queue.fal.run") :]
        return "/requests/" not in app and app_allowed(app) and "@" not in app
    return app_allowed(text) and "@" not in text and "queue.fal.run" not in text


# Clean paths, so that a good share of the examples is served (the properties are then about
# what did reach the gateway, not only about refusals).
CLEAN = [
    b"/fal-ai/fast-sdxl", b"/emulator/echo", b"/fal-ai/flux/dev", b"/fal-ai/flux/dev/stream",
    b"/queue.fal.run/fal-ai/fast-sdxl", b"/queue.fal.run/fal-ai/flux/dev",
    b"/queue.fal.run/fal-ai/fast-sdxl/requests/00000000-0000-4000-8000-000000000000/status",
    b"/queue.fal.run/fal-ai/flux/requests/00000000-0000-4000-8000-000000000000/cancel",
]  # fmt: skip


@st.composite
def port_plans(draw: st.DrawFn) -> Plan:
    path = draw(st.one_of(st.sampled_from(CLEAN), paths()))
    method = draw(st.sampled_from(["POST", "POST", "GET", "PUT", "DELETE"]))
    lines, proves, secrets = draw(credentials())
    extras = draw(st.lists(st.sampled_from(EXTRAS), max_size=3))
    body = TINY_PROMPT if method in ("POST", "PUT") else b""
    head = [method.encode() + b" " + path + b" HTTP/1.1", b"host: " + HOSTPORT]
    head += [name + b": " + value for name, value in [*lines, *extras]]
    head += [b"content-type: application/json", b"connection: close"]
    if body:
        head.append(b"content-length: " + str(len(body)).encode())
    data = b"\r\n".join(head) + b"\r\n\r\n" + body
    refuse = () if proves else ("no valid caller credential",)
    # Only the clean runs of allowed apps are promised an answer from the gateway.
    expect = 200 if expected_to_pass(path, proves, method) and not extras else None
    return Plan(data, method=method, refuse=refuse, secrets=secrets, expect=expect)


def request(method: str, path: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    head = [method.encode() + b" " + path + b" HTTP/1.1", b"host: " + HOSTPORT,
            *(n + b": " + v for n, v in headers), b"content-type: application/json",
            b"connection: close", b"content-length: " + str(len(TINY_PROMPT)).encode()]  # fmt: skip
    return b"\r\n".join(head) + b"\r\n\r\n" + TINY_PROMPT


AS_CALLER = [(b"authorization", b"Key " + TOKEN.encode())]


@fuzz_settings(300)
@given(plan=port_plans())
@example(plan=Plan(request("POST", b"/fal-ai/fast-sdxl", AS_CALLER), method="POST",
                   expect=200, secrets=(TOKEN,)))  # fmt: skip
@example(plan=Plan(request("POST", b"/queue.fal.run/fal-ai/flux/dev", AS_CALLER), method="POST",
                   expect=200, secrets=(TOKEN,)))  # fmt: skip
@example(plan=Plan(request("POST", b"/queue.fal.run/../fal-ai/fast-sdxl", AS_CALLER),
                   method="POST", refuse=("dot segment",), secrets=(TOKEN,)))  # fmt: skip
@example(plan=Plan(request("POST", b"/fal-ai/fast-sdxl", []), method="POST",
                   refuse=("no credential",)))  # fmt: skip
def test_raw_requests_on_the_python_port(port_harness: PortHarness, plan: Plan) -> None:
    answer = port_harness.run(plan)
    # A served submit's URLs point at the port, never at fal.
    if plan.expect == 200 and isinstance(answer, dict) and "status_url" in answer:
        origin = f"https://127.0.0.1:{port_harness.port}/queue.fal.run/"
        for key in ("status_url", "response_url", "cancel_url"):
            assert answer[key].startswith(origin), answer


# --- what a hostile gateway answers on a rewritten route --------------------------------------
# Pure functions, no proxy: the answer as the relay reads it (``decoded``, then
# ``rewrite_queue_urls``), judged by fal-client's own parser (httpx's ``response.json()`` is
# ``json.loads(bytes)``, which reads UTF-8 with or without a BOM, UTF-16 and UTF-32).

ORIGIN = "https://127.0.0.1:8443"
URL_KEYS = ("status_url", "response_url", "cancel_url")
KEY_SPELLINGS = {
    "status_url": ['"status_url"', '"status\\u005furl"', '"\\u0073tatus_url"'],
    "response_url": ['"response_url"', '"response\\u005Furl"'],
    "cancel_url": ['"cancel_url"', '"\\u0063ancel_url"'],
}
URLS = [
    '"https://queue.fal.run/fal-ai/x/requests/r1/status"',
    '"https:\\/\\/queue.fal.run\\/fal-ai\\/x\\/requests\\/r1"',
    '"https://fal.run/fal-ai/x"',
    '"https://evil.example/steal"',
    '"https://evil\\u002eexample/steal"',
    '"http://queue.fal.run/x"',
    '"https://queue.fal.run@evil.example/x"',
    f'"{ORIGIN}/queue.fal.run/x"',  # already the proxy's: still the gateway's word, refused
    "null", "5", "true", '["https://queue.fal.run/x"]', '{"u": "https://evil.example"}',
]  # fmt: skip
OTHER_VALUES = [
    '"IN_QUEUE"', "1", "-0.5e-3", "1e400", "NaN", "-Infinity", "12345678901234567890",
    "9" * 5000, '"\\ud800"', '"\ud800"', "[" * 3000 + "]" * 3000, '{"status_url": "https://evil.example"}',
    '[{"cancel_url": "https://evil.example"}]', '"é"',
]  # fmt: skip
SPACES = ["", " ", "\n", "\r\n\t ", "\u00a0", "\ufeff"]  # the last two: not JSON whitespace
CODECS = ["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be",
          "utf-32", "utf-32-le", "utf-32-be"]  # fmt: skip


@st.composite
def answers(draw: st.DrawFn) -> bytes:
    """A queue answer a hostile gateway could send: members in any order, repeated, keys
    spelled with escapes, odd values, odd spacing, any encoding json reads, maybe gzipped."""
    members = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            key = draw(st.sampled_from(URL_KEYS))
            members.append((draw(st.sampled_from(KEY_SPELLINGS[key])), draw(st.sampled_from(URLS))))
        else:
            name = draw(st.sampled_from(['"request_id"', '"status"', '"logs"', '"metrics"']))
            members.append((name, draw(st.sampled_from(OTHER_VALUES))))
    space = st.sampled_from(SPACES)
    inner = ",".join(f"{draw(space)}{k}{draw(space)}:{draw(space)}{v}" for k, v in members)
    text = draw(space) + "{" + inner + draw(space) + "}" + draw(space)
    if draw(st.integers(0, 9)) == 0:
        text = f"[{text}]"  # a top-level array
    body = text.encode(draw(st.sampled_from(CODECS)), "surrogatepass")
    return body


def served_or_refused(body: bytes, coding: str) -> bytes | None:
    """What the relay sends on a rewritten route: the bytes, or None for a 502 (BadGateway,
    the only exception allowed)."""
    try:
        plain = decoded(body, coding)
        return rewrite_queue_urls(plain, ORIGIN) or plain
    except BadGateway as refused:
        assert refused.status == 502
        return None


def assert_only_here(sent: bytes) -> None:
    """What fal-client reads in ``sent`` names only this port's URLs (or none)."""
    try:
        answer = json.loads(sent)
    except (ValueError, RecursionError):
        return  # the client cannot read it either: nothing to follow
    if isinstance(answer, dict):
        for key in URL_KEYS:
            value = answer.get(key)
            assert value is None or (isinstance(value, str) and value.startswith(ORIGIN + "/")), (
                key,
                value,
            )


@fuzz_settings(300)
@given(body=answers(), gzipped=st.sampled_from([0, 0, 1, 2, 3]))
@example(body=b'{"status_url":"https://queue.fal.run/x","status_url":"https://evil.example"}',
         gzipped=0)  # fmt: skip
@example(body='{"status_url":"https://evil.example/x"}'.encode("utf-16"), gzipped=1)
@example(body=b'\xef\xbb\xbf{"status_url":"https://evil.example/x"}', gzipped=0)
@example(body=b'{"n":' + b"9" * 5000 + b',"status_url":"https://evil.example"}', gzipped=0)
def test_rewritten_answers_point_only_here(body: bytes, gzipped: int) -> None:
    """Every answer on a rewritten route is a 502 or bytes whose json.loads names only this
    port; plain, gzipped whole or split into members."""
    data, coding = body, ""
    if gzipped:
        cut = len(body) // gzipped + 1
        data = b"".join(gzip.compress(body[i : i + cut]) for i in range(0, len(body), cut))
        coding = "gzip"
    sent = served_or_refused(data, coding)
    event("refused" if sent is None else "served")
    if sent is not None:
        assert_only_here(sent)


@fuzz_settings(100)
@given(count=st.integers(1, MAX_GZIP_MEMBERS + 40), size=st.integers(0, 40))
@example(count=MAX_GZIP_MEMBERS, size=3)
@example(count=MAX_GZIP_MEMBERS + 1, size=0)
def test_gzip_members_are_counted_not_timed(count: int, size: int) -> None:
    """Up to MAX_GZIP_MEMBERS members decode to their concatenation; more are a 502 (bounded
    work, asserted by count, not by the clock)."""
    pieces = [bytes([65 + i % 26]) * ((size + i) % 41) for i in range(count)]
    body = b"".join(gzip.compress(p, mtime=0) for p in pieces)
    try:
        plain = decoded(body, "gzip")
    except BadGateway as refused:
        assert count > MAX_GZIP_MEMBERS and "gzip members" in refused.detail
    else:
        assert count <= MAX_GZIP_MEMBERS and plain == b"".join(pieces)


def test_a_good_answer_is_still_served_rewritten() -> None:
    """Not vacuous: fal's own answer (plain UTF-8, one gzip member) is rewritten, not refused."""
    base = "https://queue.fal.run/fal-ai/x/requests/r1"
    body = json.dumps({"request_id": "r1", "status_url": f"{base}/status",
                       "response_url": base, "cancel_url": f"{base}/cancel"}).encode()  # fmt: skip
    sent = served_or_refused(gzip.compress(body), "gzip")
    assert sent is not None
    assert json.loads(sent)["status_url"] == f"{ORIGIN}/queue.fal.run/fal-ai/x/requests/r1/status"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
TOKENS = ["{", "}", "[", "]", ",", ":", '"', "\\", "-", "0", "1", ".", "e", "+", " ", "\n",
          "null", "NaN", "-Infinity", "\u0661", "\x00", "\ufeff"]  # fmt: skip
EDITS = st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0, 2), st.sampled_from(TOKENS)), max_size=3
)


@fuzz_settings(300)
@given(value=JSON_VALUES, indent=st.sampled_from([None, 0, 2]), edits=EDITS)
def test_the_skipper_reads_whatever_json_reads(
    value: object, indent: int | None, edits: list[tuple[int, int, str]]
) -> None:
    """Differential: every value json.loads reads, the rewrite's own scanner reads to its end
    (else an answer could hide a URL member from the rewrite and still reach the client), and
    a foreign URL after it is refused."""
    text = json.dumps(value, indent=indent, ensure_ascii=False)
    for at, cut, token in edits:  # mutate: what json then still reads must still be read
        at %= len(text) + 1
        text = text[:at] + token + text[at + cut :]
    try:
        json.loads(text)
    except ValueError:
        return
    event("json reads the mutated text")
    start = len(text) - len(text.lstrip(" \t\n\r"))
    assert _skip_value(text, start) == len(text.rstrip(" \t\n\r"))
    body = f'{{"x": {text}, "status_url": "https://evil.example/x"}}'.encode(
        "utf-8", "surrogatepass"
    )
    with pytest.raises(BadGateway):
        rewrite_queue_urls(body, ORIGIN)
