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

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, example, given, note
from hypothesis import strategies as st

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
