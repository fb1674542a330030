"""proxy.observe.tracing: when tracing is on, where it exports, what a span says; and a call's
spans in memory (the SDK's in-memory exporter), parented as the e2e test sees them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.observe import tracing
from proxy.policy.metadata import CallerTags


@pytest.mark.parametrize(
    ("env", "endpoint"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c/x"}, "http://c/x"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT":
          "http://b/t"}, "http://b/t"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a", "OTEL_SDK_DISABLED": "true"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, None),
        ({"OTEL_SERVICE_NAME": "x"}, None),  # a name alone turns nothing on
    ],
)  # fmt: skip
def test_on_only_with_an_endpoint(env: dict[str, str], endpoint: str | None) -> None:
    assert tracing.endpoint_from_env(env) == endpoint


def test_off_start_returns_none_and_imports_no_sdk() -> None:
    code = (
        "import sys; from proxy.observe import tracing; assert tracing.start({}) is None; "
        "assert tracing.active() is None; "
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pw@collector:4318/v1/traces?token=x", "http://collector:4318/v1/traces"),
        ("https://[::1]:4318/v1/traces", "https://[::1]:4318/v1/traces"),
        ("http://c/v1/traces", "http://c/v1/traces"),
    ],
)
def test_the_endpoint_is_shown_without_credentials(url: str, shown: str) -> None:
    assert tracing.shown_endpoint(url) == shown


@pytest.mark.parametrize(
    ("url", "bad"),
    [("http://c:4318", False), ("https://c", False), ("http://[::1", True),
     ("c:4318", True), ("grpc://c:4317", True), ("http://c:port", True)],
)  # fmt: skip
def test_an_endpoint_that_cannot_be_one(url: str, bad: bool) -> None:
    problem = tracing.endpoint_problem(url)
    assert (problem is not None) == bad
    if problem is not None:
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" in problem


def test_the_exporters_header_values_are_secrets() -> None:
    env = {"OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=abc%20def,other=v",
           "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=Bearer tok"}  # fmt: skip
    assert set(tracing.header_secrets(env)) == {"abc%20def", "abc def", "v", "Bearer tok"}


def test_check_line_names_the_url_never_the_headers() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://u:pw@c:4318",
           "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=SECRET", "OTEL_TRACES_SAMPLER":
           "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}  # fmt: skip
    line = tracing.describe(env)
    assert line == ("tracing: on, OTLP/HTTP to http://c:4318/v1/traces (service "
                    "fal-gateway-proxy, sampler parentbased_traceidratio 0.1)")  # fmt: skip
    assert tracing.describe({}).startswith("tracing: off")


def test_span_attributes_are_the_line_without_the_caller() -> None:
    fields = {"request_id": "r1", "method": "POST", "route": "run", "status": 502,
              "upstream_status": None, "caller": "alice@example.com", "client_ip": "10.0.0.1",
              "fal_request_id": "f1", "cf_aig_log_id": "l1", "error": "upstream_unreachable",
              "request_policy": ["x-fal-queue-priority"], "bytes_out": 3}  # fmt: skip
    assert tracing.span_attributes(fields) == {
        "fal_proxy.request_id": "r1",
        "http.request.method": "POST",
        "fal_proxy.route": "run",
        "http.response.status_code": 502,
        "fal.request_id": "f1",
        "cf_aig_log_id": "l1",
        "error.type": "upstream_unreachable",
        "fal_proxy.request_policy": ["x-fal-queue-priority"],
        "fal_proxy.bytes_out": 3,
    }


def in_memory(mode: str = "hash") -> tuple[tracing.Tracing, InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    on = tracing.Tracing(provider, provider.get_tracer("t"), "http://c/v1/traces")
    on.use_tags(CallerTags(mode, b"k" * 32))
    return on, exported


def test_a_calls_spans_and_its_upstream_headers() -> None:
    on, exported = in_memory()
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    call = on.call([(b"Traceparent", incoming.encode()), (b"host", b"x")])
    headers = dict(call.upstream())
    call.event("request_body_sent")
    call.answered(200)
    call.end({"route": "run", "status": 200, "caller": "alice"}, status=200, caller_key="alice")
    spans = {s.name: s for s in exported.get_finished_spans()}
    assert set(spans) == {"fal-gateway-proxy run", "admission", "upstream", "relay"}
    server = spans["fal-gateway-proxy run"]
    assert server.parent is not None and server.parent.span_id == 0x00F067AA0BA902B7
    for name in ("admission", "upstream", "relay"):
        parent = spans[name].parent
        assert parent is not None and parent.span_id == server.context.span_id
    upstream = spans["upstream"]
    assert headers["cf-aig-otel-parent-span-id"] == f"{upstream.context.span_id:016x}"
    assert headers["cf-aig-otel-trace-id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert [e.name for e in upstream.events] == ["request_body_sent"]
    assert upstream.attributes is not None
    assert upstream.attributes["http.response.status_code"] == 200
    attrs = dict(server.attributes or {})
    assert attrs["fal_proxy.caller_tag"] == CallerTags("hash", b"k" * 32).tag("alice")
    assert "alice" not in str(attrs)


@pytest.mark.parametrize(("mode", "tagged"), [("raw", True), ("off", False)])
def test_raw_caller_metadata_still_gives_spans_only_the_hash(mode: str, tagged: bool) -> None:
    on, exported = in_memory(mode)
    on.call([]).end({"route": "run"}, status=200, caller_key="alice")
    span = next(s for s in exported.get_finished_spans() if s.name.startswith("fal"))
    tag = (span.attributes or {}).get("fal_proxy.caller_tag")
    assert tag == (CallerTags("hash", b"k" * 32).tag("alice") if tagged else None)


@pytest.mark.parametrize(
    ("status", "error", "failed"),
    [(200, None, False), (401, "unauthenticated", False), (502, "upstream_error", True),
     (None, "internal", True), (None, "client_gone", False), (None, None, False)],
)  # fmt: skip
def test_the_span_is_an_error_for_5xx_and_failures_with_no_answer(
    status: int | None, error: str | None, failed: bool
) -> None:
    from opentelemetry.trace import StatusCode

    on, exported = in_memory()
    on.call([]).end({"route": "run", "error": error}, status=status)
    server = next(s for s in exported.get_finished_spans() if s.name.startswith("fal"))
    assert (server.status.status_code is StatusCode.ERROR) == failed


def test_an_unsampled_call_sends_no_gateway_headers() -> None:
    on, _ = in_memory()
    call = on.call([(b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")])
    headers = dict(call.upstream())
    assert headers["traceparent"].endswith("-00")
    assert not any(n.startswith("cf-aig-otel") for n in headers)
