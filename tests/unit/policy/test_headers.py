"""Header policy table: what goes upstream, what comes back."""

from __future__ import annotations

import pytest

from proxy.policy.headers import (
    CLIENT_PROXY_ID,
    InjectedHeaders,
    downstream_response_headers,
    trace_headers,
    upstream_request_headers,
    with_trace,
)
from proxy.policy.targets import resolve_target

GW = "https://gw/v1/a/g/fal"
INJECTED = InjectedHeaders(authorization="Key server-key", cf_aig_authorization="Bearer cf-token")


def target(url: str):
    return resolve_target("/api/fal/proxy", "", url, gateway_url=GW, proxy_route="/api/fal/proxy")


def upstream(
    client: list[tuple[str, str]], url: str = "https://fal.run/fal-ai/x", method: str = "POST"
):
    raw = [(k.encode(), v.encode()) for k, v in client]
    return upstream_request_headers(raw, target(url), INJECTED, method=method, request_id="rid")


def names(headers: list[tuple[str, str]]) -> list[str]:
    return [k for k, _ in headers]


FORWARDED = [
    ("content-type", "application/json"),
    ("accept", "application/json, text/event-stream"),
    ("user-agent", "@fal-ai/client/1.10.1"),
    ("accept-encoding", "gzip, deflate"),
    ("content-length", "16"),
    ("x-fal-queue-priority", "low"),
    ("x-fal-runner-hint", "h1"),
    ("x-fal-request-timeout", "30"),
    ("x-fal-object-lifecycle-preference", '{"expiration_duration_seconds":60}'),
    ("x-fal-object-lifecycle", '{"expiration_duration_seconds":3600}'),
    ("x-custom", "v"),
]


@pytest.mark.parametrize(("name", "value"), FORWARDED)
def test_fal_and_content_headers_are_forwarded_verbatim(name: str, value: str) -> None:
    assert (name, value) in upstream([(name, value)])


DROPPED = [
    ("authorization", "Key client-key"),
    ("authorization", "Bearer user-jwt"),
    ("cookie", "session=1"),
    ("host", "proxy.local"),
    ("connection", "keep-alive"),
    ("keep-alive", "timeout=5"),
    ("te", "trailers"),
    ("trailer", "x"),
    ("transfer-encoding", "chunked"),
    ("upgrade", "websocket"),
    ("proxy-authorization", "Basic x"),
    ("proxy-connection", "keep-alive"),
    ("expect", "100-continue"),
    ("forwarded", "for=1.2.3.4"),
    ("x-forwarded-for", "1.2.3.4"),
    ("x-forwarded-host", "evil"),
    ("x-real-ip", "1.2.3.4"),
    ("cf-connecting-ip", "1.2.3.4"),
    ("origin", "https://app.example"),
    ("referer", "https://app.example/page"),
    ("sec-fetch-mode", "cors"),
    ("x-stainless-os", "linux"),
    ("x-fal-target-url", "https://evil.example/"),
    ("x-fal-client-proxy", "spoofed"),
    ("x-proxy-authorization", "Bearer caller"),
    ("cf-aig-authorization", "Bearer client-token"),
    ("cf-aig-byok-alias", "other"),
    ("cf-aig-cache-key", "shared"),
    ("cf-aig-cache-ttl", "3600"),
    ("cf-aig-metadata", "{}"),
    ("cf-aig-custom-cost", "{}"),
    ("cf-aig-collect-log", "false"),
    ("cf-aig-max-attempts", "5"),
    ("cf-aig-skip-cache", "false"),
    ("cf-aig-some-future-header", "x"),
    ("cf-cache-ttl", "2592000"),
    ("cf-skip-cache", "false"),
    ("cf-cache-key", "shared"),
]


@pytest.mark.parametrize(("name", "value"), DROPPED)
def test_client_controlled_headers_never_reach_the_gateway(name: str, value: str) -> None:
    out = upstream([(name, value)])
    assert (name, value) not in out


def test_headers_named_in_connection_are_dropped() -> None:
    out = upstream([("connection", "x-hop, Keep-Alive"), ("x-hop", "1"), ("x-other", "2")])
    assert "x-hop" not in names(out)
    assert ("x-other", "2") in out


def test_proxy_sets_its_own_credentials_once() -> None:
    out = upstream([("authorization", "Key client"), ("Authorization", "Key client2")])
    assert [v for k, v in out if k == "authorization"] == ["Key server-key"]
    assert [v for k, v in out if k == "cf-aig-authorization"] == ["Bearer cf-token"]
    assert ("x-fal-client-proxy", CLIENT_PROXY_ID) in out
    assert ("cf-aig-event-id", "rid") in out


def test_no_gateway_token_header_without_a_token() -> None:
    injected = InjectedHeaders(authorization="Key k", cf_aig_authorization=None)
    out = upstream_request_headers(
        [], target("https://fal.run/fal-ai/x"), injected, method="GET", request_id="r"
    )
    assert "cf-aig-authorization" not in names(out)
    assert "server-key" not in repr(INJECTED)


@pytest.mark.parametrize(
    ("url", "method", "target_header", "skip_cache", "max_attempts"),
    [
        ("https://fal.run/fal-ai/x", "POST", False, False, True),
        ("https://fal.run/fal-ai/x", "GET", False, False, True),
        ("https://fal.run/fal-ai/x/stream", "POST", False, True, True),
        ("https://queue.fal.run/fal-ai/x", "POST", True, True, True),
        ("https://queue.fal.run/fal-ai/x/requests/r/status", "GET", True, True, True),
        ("https://rest.fal.ai/tokens/", "POST", True, True, True),
        ("https://rest.fal.ai/storage/upload/initiate", "POST", True, True, True),
    ],
)
def test_gateway_controls_per_kind(
    url: str, method: str, target_header: bool, skip_cache: bool, max_attempts: bool
) -> None:
    out = upstream([], url, method)
    assert (("x-fal-target-url", url) in out) is target_header
    assert (("cf-aig-skip-cache", "true") in out) is skip_cache
    assert (("cf-aig-max-attempts", "1") in out) is max_attempts


def test_client_may_opt_out_of_the_cache() -> None:
    out = upstream([("cf-aig-skip-cache", "TRUE")], "https://fal.run/fal-ai/x", "GET")
    assert out.count(("cf-aig-skip-cache", "true")) == 1


def test_response_headers() -> None:
    raw = [
        (b"Content-Type", b"application/json"),
        (b"Content-Encoding", b"gzip"),
        (b"Content-Length", b"42"),
        (b"X-Fal-Request-Id", b"req-1"),
        (b"x-fal-request-timeout-type", b"user"),
        (b"cf-aig-log-id", b"log-1"),
        (b"cf-aig-cache-status", b"MISS"),
        (b"Set-Cookie", b"a=1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"x-hop"),
        (b"x-hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Alt-Svc", b'h3=":443"'),
    ]
    out = downstream_response_headers(raw, status=200, request_id="rid")
    assert out == [
        (b"content-type", b"application/json"),
        (b"content-encoding", b"gzip"),
        (b"content-length", b"42"),
        (b"x-fal-request-id", b"req-1"),
        (b"x-fal-request-timeout-type", b"user"),
        (b"cf-aig-log-id", b"log-1"),
        (b"cf-aig-cache-status", b"MISS"),
        (b"x-proxy-request-id", b"rid"),
    ]


@pytest.mark.parametrize(("status", "kept"), [(200, True), (404, True), (204, False), (304, False)])
def test_bodiless_responses_lose_their_content_length(status: int, kept: bool) -> None:
    out = downstream_response_headers([(b"content-length", b"1234")], status=status, request_id="r")
    assert ((b"content-length", b"1234") in out) is kept


def test_non_ascii_header_values_travel_unchanged() -> None:
    out = upstream_request_headers(
        [(b"x-fal-runner-hint", "café".encode())],
        target("https://fal.run/fal-ai/x"),
        INJECTED,
        method="POST",
        request_id="r",
    )
    assert ("x-fal-runner-hint", "café") in out
    with pytest.raises(UnicodeDecodeError):
        upstream_request_headers(
            [(b"x-a", b"\xff")],
            target("https://fal.run/fal-ai/x"),
            INJECTED,
            method="POST",
            request_id="r",
        )


def test_injected_credentials_are_masked_in_any_repr() -> None:
    from proxy.config.settings import Settings

    injected = Settings.from_env(
        {"FAL_KEY": "sk-abc", "CF_AIG_TOKEN": "tok-xyz", "FAL_PROXY_GATEWAY_URL": "http://h/x"}
    ).injected_headers()
    out = upstream_request_headers(
        [], target("https://fal.run/fal-ai/x"), injected, method="GET", request_id="r"
    )
    assert ("authorization", "Key sk-abc") in out  # the wire value is intact
    assert "sk-abc" not in repr(out) and "tok-xyz" not in repr(out)


@pytest.mark.parametrize(
    ("body", "encoding", "expected"),
    [
        (
            b'{"success":false,"error":[{"code":2009,"message":"Unauthorized"}]}',
            "",
            "cf_gateway_unauthorized_2009",
        ),
        (b'[{"code":2009,"message":"Unauthorized"}]', "", "cf_gateway_unauthorized_2009"),
        (b'{"name":"AiGatewayError","internalCode":2009}', "", "cf_gateway_unauthorized_2009"),
        (b'{"detail":"Invalid fal key"}', "", None),
        (b'{"detail":"request 2009 failed"}', "", None),
    ],
)
def test_gateway_401_is_told_from_a_fal_401_even_compressed(
    body: bytes, encoding: str, expected
) -> None:
    import gzip
    import zlib

    from proxy.upstream.failures import gateway_auth_error as _gateway_auth_error

    assert _gateway_auth_error(body, encoding) == expected
    assert _gateway_auth_error(gzip.compress(body), "gzip") == expected
    assert _gateway_auth_error(zlib.compress(body), "deflate") == expected
    assert _gateway_auth_error(b"not gzip at all", "gzip") is None


def test_a_configured_caller_header_is_never_forwarded() -> None:
    injected = InjectedHeaders(
        authorization="Key k", cf_aig_authorization=None, caller_header="x-session"
    )
    out = upstream_request_headers(
        [(b"x-session", b"Bearer user-jwt")],
        target("https://fal.run/fal-ai/x"),
        injected,
        method="POST",
        request_id="r",
    )
    assert "x-session" not in names(out)


def test_header_names_with_underscores_never_travel() -> None:
    sent = upstream(
        [
            ("cf_aig_authorization", "Bearer mine"),
            ("x_fal_target_url", "https://evil"),
            ("Authorization_", "Key mine"),
            ("x-custom_header", "1"),
            ("x-kept", "1"),
        ]
    )
    assert [n for n in names(sent) if "_" in n] == []
    assert "x-kept" in names(sent)


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        ([(b"cache-control", b"no-cache")], b"no-cache, no-transform"),
        ([], b"no-cache, no-transform"),
        ([(b"cache-control", b"private, max-age=0")],
         b"no-cache, private, max-age=0, no-transform"),
        ([(b"Cache-Control", b"no-store, No-Transform")], b"no-store, No-Transform"),
        ([(b"cache-control", b"no-cache"), (b"cache-control", b"private")],
         b"no-cache, private, no-transform"),
        ([(b"x-accel-buffering", b"yes")], b"no-cache, no-transform"),
    ],
)  # fmt: skip
def test_an_event_stream_is_marked_live_for_what_sits_in_between(
    upstream: list[tuple[bytes, bytes]], expected: bytes
) -> None:
    """No proxy or dev server between us and the browser may compress or buffer it."""
    raw = [(b"content-type", b"text/event-stream; charset=utf-8"), *upstream]
    out = downstream_response_headers(raw, status=200, request_id="r")
    assert [v for n, v in out if n == b"cache-control"] == [expected]
    assert [v for n, v in out if n == b"x-accel-buffering"] == [b"no"]


def test_other_answers_keep_their_cache_control() -> None:
    raw = [(b"content-type", b"application/json"), (b"cache-control", b"max-age=60")]
    out = downstream_response_headers(raw, status=200, request_id="r")
    assert (b"cache-control", b"max-age=60") in out and b"x-accel-buffering" not in dict(out)


# --- W3C trace context and the gateway's OTel headers (tracing: proxy/observe/tracing.py) ----

TRACE_ID, SPAN_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7


def test_tracing_off_the_clients_trace_context_passes_as_sent() -> None:
    # What the policy did before tracing existed, and still does with tracing off.
    sent = [("traceparent", f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"), ("tracestate", "v=1")]
    out = dict(upstream(sent))
    assert out["traceparent"] == sent[0][1] and out["tracestate"] == "v=1"


def test_a_clients_cf_aig_otel_headers_never_reach_the_gateway() -> None:
    out = names(upstream([("cf-aig-otel-trace-id", "a" * 32),
                          ("cf-aig-otel-parent-span-id", "b" * 16)]))  # fmt: skip
    assert not any(n.startswith("cf-aig-otel") for n in out)


@pytest.mark.parametrize(
    ("sampled", "gateway", "expected"),
    [
        (True, True, [
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ("tracestate", "v=1"),
            ("cf-aig-otel-trace-id", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("cf-aig-otel-parent-span-id", "00f067aa0ba902b7"),
        ]),
        # Not sampled: the gateway is not asked to join a trace nobody exports.
        (False, True, [
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
            ("tracestate", "v=1"),
        ]),
        # Straight to fal: no gateway headers.
        (True, False, [
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ("tracestate", "v=1"),
        ]),
    ],
)  # fmt: skip
def test_trace_headers(sampled: bool, gateway: bool, expected: list[tuple[str, str]]) -> None:
    got = trace_headers(TRACE_ID, SPAN_ID, sampled=sampled, tracestate="v=1", gateway=gateway)
    assert got == expected


def test_trace_headers_small_ids_are_zero_padded_lower_hex() -> None:
    got = dict(trace_headers(1, 2, sampled=True))
    assert got["cf-aig-otel-trace-id"] == "0" * 31 + "1"
    assert got["cf-aig-otel-parent-span-id"] == "0" * 15 + "2"
    assert "tracestate" not in got


def test_trace_headers_match_the_w3c_propagator() -> None:
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from opentelemetry.trace.span import TraceState

    for sampled in (True, False):
        context = SpanContext(TRACE_ID, SPAN_ID, is_remote=False,
                              trace_flags=TraceFlags(1 if sampled else 0),
                              trace_state=TraceState([("v", "1")]))  # fmt: skip
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(
            carrier, set_span_in_context(NonRecordingSpan(context))
        )
        ours = dict(trace_headers(TRACE_ID, SPAN_ID, sampled=sampled, tracestate="v=1"))
        assert ours["traceparent"] == carrier["traceparent"]
        assert ours["tracestate"] == carrier["tracestate"]


def test_tracing_on_the_proxys_span_replaces_the_clients_parent() -> None:
    sent = [("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01"), ("tracestate", "c=1"),
            ("content-type", "application/json")]  # fmt: skip
    ours = trace_headers(TRACE_ID, SPAN_ID, sampled=True)
    out = with_trace(upstream(sent), ours)
    assert [v for n, v in out if n == "traceparent"] == [ours[0][1]]
    assert "tracestate" not in names(out)  # the span's own tracestate (none here) replaces it
    assert ("content-type", "application/json") in out
