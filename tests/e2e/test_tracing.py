"""OpenTelemetry tracing end to end: a real proxy exporting over OTLP/HTTP to a receiver in this
process (loopback) that decodes each ``ExportTraceServiceRequest``, and the emulated gateway
recording what the proxy sent it (``traceparent``, ``cf-aig-otel-*``)."""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from websockets.asyncio.client import connect

from tests.conftest import (
    CF_TOKEN,
    FAL_KEY,
    ROOT,
    FakeGateway,
    RunningProxy,
    child_env,
    token_callers,
)

DEADLINE = 10.0
CALLER, CALLER_TOKEN = "alice@example.com", "tok-trace-0123456789abcdef"
OTLP_SECRET = "otlp-SENTINEL-apikey-5d1e"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
INCOMING = f"00-{TRACE_ID}-{PARENT_ID}-01"


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent: str
    kind: int
    attributes: dict[str, Any]
    events: list[str]
    status: int
    resource: dict[str, Any]


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


class Receiver:
    """An OTLP/HTTP receiver on loopback: POST /v1/traces, protobuf decoded; the raw bodies
    and request headers kept (for the secrets check)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.spans: list[Span] = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                spans = []
                for rs in request.resource_spans:
                    resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            spans.append(Span(
                                s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                s.kind, {a.key: _value(a.value) for a in s.attributes},
                                [e.name for e in s.events], s.status.code, resource,
                            ))  # fmt: skip
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
                with receiver.cond:
                    receiver.path = self.path
                    receiver.bodies.append(body)
                    receiver.headers.append(dict(self.headers.items()))
                    receiver.spans += spans
                    receiver.cond.notify_all()

            def log_message(self, *args: Any) -> None:
                pass

        self.path = ""
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self, what: str, check: Callable[[list[Span]], Any]) -> Any:
        deadline = time.monotonic() + DEADLINE
        with self.cond:
            while not (found := check(list(self.spans))):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"the receiver never got {what}: {self.spans}")
                self.cond.wait(remaining)
        return found

    def trace(self, trace_id: str, names: set[str]) -> dict[str, Span]:
        """The spans of ``trace_id`` once every name in ``names`` arrived, by name."""

        def complete(spans: list[Span]) -> dict[str, Span] | None:
            mine = {s.name: s for s in spans if s.trace_id == trace_id}
            return mine if names <= mine.keys() else None

        found: dict[str, Span] = self.wait(f"the spans {sorted(names)}", complete)
        return found

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def tracing_env(receiver: Receiver, tmp_path: Any) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_HEADERS": f"x-api-key={OTLP_SECRET}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        **token_callers(tmp_path, {CALLER: CALLER_TOKEN}),
        "CF_AIG_TOKEN": CF_TOKEN,
    }


def post(proxy: RunningProxy, path: str = "/fal-ai/flux/dev", **headers: str) -> httpx.Response:
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=DEADLINE) as c:
        caller = {"x-proxy-authorization": f"Bearer {CALLER_TOKEN}"}
        return c.post(path, json={"prompt": "a cat"}, headers={**caller, **headers})


PHASES = {"admission", "upstream", "relay"}


def test_a_call_continues_the_clients_trace_and_the_gateway_joins_it(
    start_proxy: Any, fake_gateway: FakeGateway, receiver: Receiver, tmp_path: Any
) -> None:
    proxy = start_proxy(**tracing_env(receiver, tmp_path))
    r = post(proxy, traceparent=INCOMING, tracestate="vendor=abc")
    assert r.status_code == 200, r.text
    spans = receiver.trace(TRACE_ID, {"fal-gateway-proxy run", *PHASES})
    server = spans["fal-gateway-proxy run"]
    assert server.parent == PARENT_ID  # the client's span is the server span's parent
    assert server.kind == 2  # SERVER
    for name in PHASES:
        assert spans[name].parent == server.span_id, name
    assert spans["upstream"].kind == 3  # CLIENT
    attrs = server.attributes
    assert attrs["fal_proxy.route"] == "run"
    assert attrs["http.request.method"] == "POST"
    assert attrs["http.response.status_code"] == 200
    assert attrs["fal_proxy.upstream_status"] == 200
    assert attrs["fal_proxy.target_path"] == "/fal-ai/flux/dev"
    assert attrs["fal_proxy.request_id"] == r.headers["x-proxy-request-id"]
    assert attrs["fal.request_id"] == r.headers["x-fal-request-id"]
    assert len(attrs["fal_proxy.caller_tag"]) == 24  # the keyed hash, as in cf-aig-metadata
    assert "fal_proxy.caller" not in attrs and "fal_proxy.client_ip" not in attrs
    assert spans["upstream"].attributes["http.response.status_code"] == 200
    assert server.resource["service.name"] == "fal-gateway-proxy"

    # The gateway got the upstream span as its parent: W3C and Cloudflare's own headers.
    sent = fake_gateway.only_request()["header_map"]
    upstream = spans["upstream"]
    assert sent["traceparent"] == f"00-{TRACE_ID}-{upstream.span_id}-01"
    assert sent["tracestate"] == "vendor=abc"
    assert sent["cf-aig-otel-trace-id"] == TRACE_ID
    assert sent["cf-aig-otel-parent-span-id"] == upstream.span_id
    # the gateway's log row and the span name the same call
    metadata = sent["cf-aig-metadata"]
    assert attrs["fal_proxy.caller_tag"] in metadata

    # No secret anywhere in what was exported (bytes as sent), nor the caller's id.
    proxy.process.stop()  # flushed at shutdown
    raw = b"".join(receiver.bodies)
    for secret in (FAL_KEY, CF_TOKEN, CALLER_TOKEN, CALLER, OTLP_SECRET):
        assert secret.encode() not in raw, secret
    # The exporter sent its headers (the API key) to the receiver, and never logged them.
    assert receiver.headers[0]["x-api-key"] == OTLP_SECRET
    assert receiver.path == "/v1/traces"
    logs = "\n".join(proxy.process.lines)
    assert OTLP_SECRET not in logs
    assert any(line.get("event") == "tracing" for line in proxy.logs())


def test_a_call_without_traceparent_starts_a_trace(
    start_proxy: Any, fake_gateway: FakeGateway, receiver: Receiver, tmp_path: Any
) -> None:
    proxy = start_proxy(**tracing_env(receiver, tmp_path))
    assert post(proxy).status_code == 200
    sent = fake_gateway.only_request()["header_map"]
    trace_id = sent["cf-aig-otel-trace-id"]
    spans = receiver.trace(trace_id, {"fal-gateway-proxy run", *PHASES})
    assert spans["fal-gateway-proxy run"].parent == ""  # a root
    assert sent["traceparent"] == f"00-{trace_id}-{spans['upstream'].span_id}-01"


def test_a_refused_call_has_its_span_and_sends_nothing(
    start_proxy: Any, fake_gateway: FakeGateway, receiver: Receiver, tmp_path: Any
) -> None:
    proxy = start_proxy(**tracing_env(receiver, tmp_path))
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=DEADLINE) as c:
        r = c.post("/fal-ai/flux/dev", json={}, headers={"traceparent": INCOMING})
    assert r.status_code == 401
    spans = receiver.trace(TRACE_ID, {"fal-gateway-proxy", "admission"})
    server = spans["fal-gateway-proxy"]
    assert server.attributes["http.response.status_code"] == 401
    assert server.attributes["error.type"] == r.json()["detail"] or server.attributes["error.type"]
    assert spans["admission"].parent == server.span_id
    assert fake_gateway.requests() == []


def test_a_streamed_call_has_its_spans(
    start_proxy: Any, fake_gateway: FakeGateway, receiver: Receiver, tmp_path: Any
) -> None:
    proxy = start_proxy(**tracing_env(receiver, tmp_path))
    headers = {"x-fal-target-url": "https://fal.run/emulator/sse/stream?n=2",
               "accept": "text/event-stream", "traceparent": INCOMING,
               "x-proxy-authorization": f"Bearer {CALLER_TOKEN}"}  # fmt: skip
    with (
        httpx.Client(base_url=proxy.url, trust_env=False, timeout=DEADLINE) as c,
        c.stream("POST", "/api/fal/proxy", json={"prompt": "hi"}, headers=headers) as r,
    ):
        lines = r.iter_lines()
        assert next(lines) == 'data: {"n": 1}'
        fake_gateway.release("sse-2")
        rest = list(lines)
    assert 'data: {"n": 2}' in rest
    spans = receiver.trace(TRACE_ID, {"fal-gateway-proxy stream", *PHASES})
    server = spans["fal-gateway-proxy stream"]
    assert server.attributes["fal_proxy.bytes_out"] > 0
    assert spans["relay"].parent == spans["upstream"].parent == server.span_id
    sent = fake_gateway.only_request()["header_map"]
    assert sent["cf-aig-otel-parent-span-id"] == spans["upstream"].span_id


def test_a_websocket_session_has_its_spans(
    start_proxy: Any, fake_gateway: FakeGateway, receiver: Receiver, tmp_path: Any
) -> None:
    proxy = start_proxy(**tracing_env(receiver, tmp_path))
    url = proxy.url.replace("http://", "ws://", 1) + "/emulator/echo/realtime"

    async def session() -> None:
        async with connect(url, proxy=None, open_timeout=DEADLINE,
                           additional_headers={"traceparent": INCOMING,
                                               "x-proxy-authorization": f"Bearer {CALLER_TOKEN}"},
                           ) as ws:  # fmt: skip
            await ws.send(json.dumps({"prompt": "dog"}))
            answer = await asyncio.wait_for(ws.recv(), DEADLINE)
            assert json.loads(answer) == {"input": {"prompt": "dog"}}

    asyncio.run(session())
    spans = receiver.trace(TRACE_ID, {"fal-gateway-proxy websocket", *PHASES})
    server = spans["fal-gateway-proxy websocket"]
    assert server.parent == PARENT_ID
    assert server.attributes["fal_proxy.frames_in"] == 1
    for name in PHASES:
        assert spans[name].parent == server.span_id, name
    (record,) = fake_gateway.requests("websocket")
    sent = record["header_map"]
    assert sent["traceparent"] == f"00-{TRACE_ID}-{spans['upstream'].span_id}-01"
    assert sent["cf-aig-otel-trace-id"] == TRACE_ID
    assert sent["cf-aig-otel-parent-span-id"] == spans["upstream"].span_id


def test_off_by_default_nothing_exported_and_the_clients_traceparent_passes(
    start_proxy: Any, fake_gateway: FakeGateway, receiver: Receiver, tmp_path: Any
) -> None:
    # No OTEL_EXPORTER_OTLP_ENDPOINT: tracing off, as before tracing existed: the client's
    # trace context goes upstream as sent, the proxy adds none of its own.
    env = {k: v for k, v in tracing_env(receiver, tmp_path).items()
           if k != "OTEL_EXPORTER_OTLP_ENDPOINT"}  # fmt: skip
    proxy = start_proxy(**env)
    assert post(proxy, traceparent=INCOMING, tracestate="vendor=abc").status_code == 200
    sent = fake_gateway.only_request()["header_map"]
    assert sent["traceparent"] == INCOMING and sent["tracestate"] == "vendor=abc"
    assert not any(name.startswith("cf-aig-otel") for name in sent)
    proxy.process.stop()
    assert receiver.bodies == []
    assert not any(line.get("event", "").startswith("tracing") for line in proxy.logs())


def test_a_receiver_that_is_down_never_fails_a_call(
    start_proxy: Any, fake_gateway: FakeGateway, tmp_path: Any
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    proxy = start_proxy(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://user:{OTLP_SECRET}@127.0.0.1:{dead}",
        OTEL_EXPORTER_OTLP_TIMEOUT="1",
        OTEL_BSP_SCHEDULE_DELAY="20",
        **token_callers(tmp_path, {CALLER: CALLER_TOKEN}),
    )
    for _ in range(5):
        assert post(proxy).status_code == 200
        time.sleep(0.05)  # (paces the calls over several export batches; no race hidden)
    proxy.process.wait_for_json(lambda r: r.get("event") == "tracing_export_failed")
    for _ in range(3):
        assert post(proxy).status_code == 200
    started = time.monotonic()
    proxy.process.stop()
    assert time.monotonic() - started < 8  # the flush at shutdown is bounded
    warnings = [r for r in proxy.logs() if r.get("event") == "tracing_export_failed"]
    assert len(warnings) == 1
    assert OTLP_SECRET not in "\n".join(proxy.process.lines)


def test_a_wrong_endpoint_url_never_fails_a_call(
    start_proxy: Any, fake_gateway: FakeGateway, tmp_path: Any
) -> None:
    # A URL that answers 404 (the emulator, not an OTLP receiver): spans dropped, one warning.
    wrong = f"http://127.0.0.1:{fake_gateway.port}/no/such/otlp"
    proxy = start_proxy(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=wrong, OTEL_BSP_SCHEDULE_DELAY="20",
                        **token_callers(tmp_path, {CALLER: CALLER_TOKEN}))  # fmt: skip
    for _ in range(3):
        assert post(proxy).status_code == 200
    proxy.process.wait_for_json(lambda r: r.get("event") == "tracing_export_failed")
    assert post(proxy).status_code == 200
    proxy.process.stop()
    assert proxy.process.proc.returncode == 0
    warnings = [r for r in proxy.logs() if r.get("event") == "tracing_export_failed"]
    assert len(warnings) == 1


def test_an_endpoint_that_is_not_a_url_stops_the_start_naming_the_variable(
    fake_gateway: FakeGateway,
) -> None:
    env = child_env(FAL_KEY=FAL_KEY, FAL_PROXY_GATEWAY_URL=fake_gateway.gateway_url,
                    OTEL_EXPORTER_OTLP_ENDPOINT="http://[::1")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "proxy", "--port", "0"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in done.stderr and "Traceback" not in done.stderr
