"""Target resolution table: valid and hostile targets side by side."""

from __future__ import annotations

import pytest

from proxy.errors import BadRequest, Forbidden, MethodNotAllowed, NotFound
from proxy.policy.targets import (
    check_method,
    queue_request_id,
    resolve_target,
    starts_generation,
)

GW = "https://gateway.ai.cloudflare.com/v1/acct/gw/fal"
ROUTE = "/api/fal/proxy"


def resolve(target: str | None, path: str = ROUTE, query: str = ""):
    return resolve_target(path, query, target, gateway_url=GW, proxy_route=ROUTE)


VALID = [
    # (x-fal-target-url, kind, upstream URL, x-fal-target-url sent upstream)
    ("https://fal.run/fal-ai/fast-sdxl", "run", f"{GW}/fal-ai/fast-sdxl", None),
    (
        "https://fal.run/fal-ai/fast-sdxl?prompt=cat&n=2",
        "run",
        f"{GW}/fal-ai/fast-sdxl?prompt=cat&n=2",
        None,
    ),
    ("https://FAL.RUN/fal-ai/x/custom?q=1", "run", f"{GW}/fal-ai/x/custom?q=1", None),
    ("https://fal.run:443/fal-ai/x", "run", f"{GW}/fal-ai/x", None),
    (
        "https://fal.run/fal-ai/llavav15-13b/stream",
        "stream",
        f"{GW}/fal-ai/llavav15-13b/stream",
        None,
    ),
    # A trailing "/" (the SDK adds one to URL-shaped ids) is not an empty segment.
    ("https://fal.run/fal-ai/x/", "run", f"{GW}/fal-ai/x/", None),
    ("https://fal.run/fal-ai/v1.5/x", "run", f"{GW}/fal-ai/v1.5/x", None),
    (
        "https://queue.fal.run/fal-ai/flux/dev?fal_webhook=https%3A%2F%2Fexample.com%2Fhook%3Fa%3Db",
        "queue",
        GW,
        "https://queue.fal.run/fal-ai/flux/dev?fal_webhook=https%3A%2F%2Fexample.com%2Fhook%3Fa%3Db",
    ),
    (
        "https://queue.fal.run/fal-ai/flux/requests/req-123/status?logs=1",
        "queue",
        GW,
        "https://queue.fal.run/fal-ai/flux/requests/req-123/status?logs=1",
    ),
    (
        "https://queue.fal.run/workflows/fal-ai/sdxl-sticker",
        "queue",
        GW,
        "https://queue.fal.run/workflows/fal-ai/sdxl-sticker",
    ),
    (
        "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3",
        "storage",
        GW,
        "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3",
    ),
    (
        "https://rest.fal.ai/storage/upload/initiate-multipart?storage_type=fal-cdn-v3",
        "storage",
        GW,
        "https://rest.fal.ai/storage/upload/initiate-multipart?storage_type=fal-cdn-v3",
    ),
    ("https://rest.fal.ai/tokens/", "token", GW, "https://rest.fal.ai/tokens/"),
    # fal's backup domains: the same service, sent as the primary hosts.
    ("https://falrun.com/fal-ai/fast-sdxl", "run", f"{GW}/fal-ai/fast-sdxl", None),
    ("https://FALRUN.COM:443/fal-ai/x/stream", "stream", f"{GW}/fal-ai/x/stream", None),
    (
        "https://queue.falrun.com/fal-ai/flux/dev",
        "queue",
        GW,
        "https://queue.fal.run/fal-ai/flux/dev",
    ),
]


@pytest.mark.parametrize(
    ("header", "kind", "upstream", "sent_target"), VALID, ids=[v[0] for v in VALID]
)
def test_allowed_targets_resolve(
    header: str, kind: str, upstream: str, sent_target: str | None
) -> None:
    target = resolve(header)
    assert (target.kind, target.upstream_url, target.target_url) == (kind, upstream, sent_target)


HOSTILE = [
    # (x-fal-target-url, expected error, words the detail must contain)
    ("", BadRequest, "empty"),
    ("fal.run/fal-ai/x", BadRequest, "absolute"),
    ("/fal-ai/x", BadRequest, "absolute"),
    ("garbage string", BadRequest, "spaces"),
    ("https://fal.run/fal-ai/x\r\nx-evil: 1", BadRequest, "control"),
    ("https://fal.run/fal-ai/\x00x", BadRequest, "control"),
    ("https://fal.run/fal-ai/caf\u00e9", BadRequest, "non-ASCII"),
    ("https://fal.run\\@evil.com/x", BadRequest, "backslash"),
    ("https://fal.run/fal-ai/x#frag", BadRequest, "fragment"),
    ("https://fal.run/" + "a" * 17000, BadRequest, "longer"),
    ("http://fal.run/fal-ai/x", Forbidden, "https"),
    ("ftp://fal.run/fal-ai/x", Forbidden, "https"),
    ("wss://fal.run/fal-ai/x", Forbidden, "https"),
    ("https://example.com/x", Forbidden, "example.com"),
    ("https://fal.run.evil.com/x", Forbidden, "fal.run.evil.com"),
    ("https://evilfal.run/x", Forbidden, "evilfal.run"),
    ("https://api.fal.run/x", Forbidden, "api.fal.run"),
    ("https://fal.run./fal-ai/x", Forbidden, "fal.run."),
    ("https://fal.ai/x", Forbidden, "fal.ai"),
    ("https://fal.run:8443/fal-ai/x", Forbidden, "port"),
    ("https://fal.run:/fal-ai/x", Forbidden, "port"),
    ("https://user:pass@fal.run/fal-ai/x", Forbidden, "user info"),
    ("https://fal.run@evil.com/x", Forbidden, "user info"),
    ("https://127.0.0.1/x", Forbidden, "127.0.0.1"),
    ("https://[::1]/x", Forbidden, "IP address"),
    ("https:///fal-ai/x", BadRequest, "no host"),
    ("https://fal.run//evil.com/x", BadRequest, "leading '//'"),
    ("https://fal.run/%2F%2Fevil.com/x", BadRequest, "leading '//'"),
    ("https://fal.run/%5Cevil.com/x", BadRequest, "backslash"),
    ("https://fal.run/fal-ai/..%3Fx", BadRequest, "dot segments"),
    ("https://fal.run/fal-ai/..%23", BadRequest, "dot segments"),
    ("https://fal.run/fal-ai/..;x/y", BadRequest, "dot segments"),
    ("https://fal.run/fal-ai/%2525252e%2525252e/x", BadRequest, "three levels"),
    ("https://fal.run", Forbidden, "no fal app"),
    ("https://fal.run/", Forbidden, "no fal app"),
    ("https://queue.fal.run/", Forbidden, "no fal app"),
    ("https://rest.fal.ai/keys/", Forbidden, "only"),
    ("https://rest.fal.ai/tokens", Forbidden, "only"),
    ("https://rest.fal.ai/storage/upload/complete-multipart", Forbidden, "only"),
    ("https://fal.run/fal-ai/../../other/x", BadRequest, "dot segments"),
    ("https://fal.run/fal-ai/%2e%2e/x", BadRequest, "dot segments"),
    ("https://fal.run/fal-ai/%2E%2e/x", BadRequest, "dot segments"),
    ("https://fal.run/fal-ai/.%2e/x", BadRequest, "dot segments"),
    ("https://fal.run/fal-ai/%252e%252e/x", BadRequest, "dot segments"),
    ("https://fal.run/fal-ai/..%2fx", BadRequest, "dot segments"),
    ("https://fal.run/fal-ai/x/.", BadRequest, "dot segments"),
    ("https://queue.fal.run/../openai/v1", BadRequest, "dot segments"),
    ("https://fal.run/fal-ai/x%0d%0aevil", BadRequest, "control"),
    ("https://fal.run/fal-ai/x%00", BadRequest, "control"),
    ("https://fal.run/fal-ai/x%7F", BadRequest, "control"),
    ("https://fal.run/fal-ai/x%250a", BadRequest, "control"),
]


@pytest.mark.parametrize(
    ("header", "error", "words"), HOSTILE, ids=[repr(h[0])[:60] for h in HOSTILE]
)
def test_hostile_targets_are_refused(header: str, error: type, words: str) -> None:
    with pytest.raises(error) as info:
        resolve(header)
    assert words in info.value.detail


PATHS = [
    # fal.run-shaped requests: (path, query, upstream URL)
    ("/fal-ai/fast-sdxl", "x=1", f"{GW}/fal-ai/fast-sdxl?x=1"),
    ("/fal-ai/fast-sdxl", "", f"{GW}/fal-ai/fast-sdxl"),
    ("/fal-ai/a/b", "prompt=a%20cat%0A", f"{GW}/fal-ai/a/b?prompt=a%20cat%0A"),
    ("/fal-ai/x/stream", "", f"{GW}/fal-ai/x/stream"),
]


@pytest.mark.parametrize(("path", "query", "upstream"), PATHS)
def test_fal_run_shaped_paths_go_to_the_gateway_path(path: str, query: str, upstream: str) -> None:
    target = resolve(None, path, query)
    assert target.host == "fal.run"
    assert target.upstream_url == upstream
    assert target.target_url is None


@pytest.mark.parametrize(
    ("path", "error"),
    [
        (ROUTE, BadRequest),
        ("/", NotFound),
        ("/fal-ai/../x", BadRequest),
        ("/fal-ai/%2e%2e/x", BadRequest),
        ("/fal-ai/x%0a", BadRequest),
        ("/fal-ai/x\x7f", BadRequest),
        ("*openai/chat/completions", BadRequest),
        ("//evil.com/x", BadRequest),
        ("/\\evil.com/x", BadRequest),
        ("/%5Cevil.com", BadRequest),
        (ROUTE + "/", BadRequest),
    ],
)
def test_bad_paths_are_refused(path: str, error: type) -> None:
    with pytest.raises(error):
        resolve(None, path)


def test_missing_target_on_the_proxy_route_says_which_header() -> None:
    with pytest.raises(BadRequest) as info:
        resolve(None, ROUTE)
    assert info.value.message == "missing x-fal-target-url header"


@pytest.mark.parametrize(
    "path", ["/api/fal/proxy/fal-ai/fast-lcm-diffusion/realtime", "/api/fal/proxy/fal-ai/x"]
)
def test_a_path_under_the_sdk_route_is_no_app(path: str) -> None:
    """A socket on the SDK route (or a dev server that kept the route in front) is refused,
    not forwarded as the app "api/fal"."""
    with pytest.raises(NotFound) as info:
        resolve(None, path)
    assert "/api/fal/proxy" in info.value.detail and "/<app id>/realtime" in info.value.detail


def test_any_path_with_a_target_header_is_the_sdk_protocol() -> None:
    target = resolve("https://queue.fal.run/fal-ai/x", "/some/other/proxy/path")
    assert target.kind == "queue"
    assert target.target_url == "https://queue.fal.run/fal-ai/x"


@pytest.mark.parametrize(
    ("method", "url", "generation"),
    [
        ("POST", "https://fal.run/fal-ai/flux/dev", True),
        ("GET", "https://fal.run/fal-ai/flux/dev", True),  # the SDK's method "get" runs the model
        ("PUT", "https://fal.run/fal-ai/flux/dev", True),
        ("POST", "https://fal.run/fal-ai/flux/dev/stream", True),
        ("POST", "https://queue.fal.run/fal-ai/flux/dev", True),
        ("GET", "https://queue.fal.run/fal-ai/flux/dev", True),
        ("POST", "https://queue.fal.run/fal-ai/flux/requests/abc", True),
        ("POST", "https://queue.fal.run/fal-ai/flux/requests/abc/status", True),
        ("PUT", "https://queue.fal.run/fal-ai/flux/requests/abc", True),
        ("DELETE", "https://queue.fal.run/fal-ai/flux/requests/abc", True),
        ("GET", "https://queue.fal.run/fal-ai/flux/requests/abc/other", True),
        ("GET", "https://queue.fal.run/fal-ai/flux/requests/abc", False),  # result
        ("GET", "https://queue.fal.run/fal-ai/flux/requests/abc/status?logs=1", False),
        ("GET", "https://queue.fal.run/fal-ai/flux/requests/abc/status/stream", False),
        ("HEAD", "https://queue.fal.run/fal-ai/flux/requests/abc/status", False),
        ("PUT", "https://queue.fal.run/fal-ai/flux/requests/abc/cancel", False),
        ("GET", "https://queue.fal.run/workflows/acme/x/requests/abc/status", False),
        ("POST", "https://rest.fal.ai/tokens/", True),  # a realtime token runs the app
        ("POST", "https://rest.fal.ai/storage/upload/initiate", False),
    ],
)
def test_which_calls_can_start_a_generation(method: str, url: str, generation: bool) -> None:
    assert starts_generation(method, resolve(url)) == generation


RID = "d95bafc8-f2a4-427b-9cf4-bb99f4bea973"
QUEUE = "https://queue.fal.run/fal-ai/flux"


@pytest.mark.parametrize(
    ("url", "request_id"),
    [
        (f"{QUEUE}/requests/{RID}/status", RID),
        (f"{QUEUE}/requests/{RID}/status?logs=1", RID),
        (f"{QUEUE}/requests/{RID}/status/stream", RID),
        (f"{QUEUE}/requests/{RID}", RID),
        (f"{QUEUE}/requests/{RID}/", RID),
        (f"{QUEUE}/requests/{RID}/cancel", RID),
        (f"{QUEUE}/requests/{RID.upper()}/anything/else", RID),
        (f"https://queue.fal.run/workflows/fal-ai/sdxl/requests/{RID}", RID),
        (f"https://queue.falrun.com/fal-ai/flux/requests/{RID}", RID),
        (f"{QUEUE}/dev", None),  # a submit
        (f"{QUEUE}/requester/dev", None),
        (f"https://fal.run/fal-ai/flux/requests/{RID}", None),  # runs the model: no request
        ("https://rest.fal.ai/storage/upload/initiate", None),
    ],
)
def test_the_request_id_a_queue_call_names(url: str, request_id: str | None) -> None:
    assert queue_request_id(resolve(url)) == request_id


@pytest.mark.parametrize(
    "url",
    [
        f"{QUEUE}/requests",  # no id
        f"{QUEUE}/requests?request_id={RID}",
        f"{QUEUE}/requests/not-a-uuid/status",
        f"{QUEUE}/requests/x/requests/{RID}/status",  # two "requests": which counts?
        f"{QUEUE}/requests/{RID}/requests/x",
        f"https://queue.fal.run/fal-ai/requests/requests/{RID}",
        f"{QUEUE}/REQUESTS/{RID}/status",
        f"{QUEUE}/requests;x/{RID}/status",
        f"{QUEUE}/requests/{{{RID}}}/status",
        f"{QUEUE}/requests/urn:uuid:{RID}/status",
        f"{QUEUE}/requests/{RID.replace('-', '')}/status",
        f"{QUEUE}/requests/{RID};v=1/status",
        f"{QUEUE}/requests/x{RID}",
    ],
)
def test_a_request_named_any_other_way_than_the_sdks_is_refused(url: str) -> None:
    with pytest.raises(BadRequest, match="invalid queue request path"):
        queue_request_id(resolve(url))


@pytest.mark.parametrize(
    ("method", "url", "error"),
    [
        ("POST", "https://rest.fal.ai/tokens/", None),
        ("POST", "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3", None),
        ("GET", "https://rest.fal.ai/tokens/", MethodNotAllowed),
        ("PUT", "https://rest.fal.ai/storage/upload/initiate", MethodNotAllowed),
        ("POST", "https://rest.fal.ai/tokens/?allowed_apps=x", BadRequest),
        ("GET", "https://fal.run/fal-ai/flux/dev", None),
        ("DELETE", "https://queue.fal.run/fal-ai/flux/requests/a", None),
    ],
)
def test_rest_calls_are_posts_and_tokens_have_no_query(
    method: str, url: str, error: type | None
) -> None:
    if error is None:
        check_method(method, resolve(url))
    else:
        with pytest.raises(error):
            check_method(method, resolve(url))


# --- one endpoint id, one spelling ----------------------------------------------------------
# Allowed apps and quotas match the raw path; the gateway decodes and merges it before fal
# routes it. Each of these would run fal-ai/flux/dev while matching no fal-ai/flux/* quota,
# so every fal.run / queue path with a percent-escape or an empty segment is refused.
ODD_ENDPOINT_PATHS = [
    "/fal-ai/%66lux/dev",  # unreserved letter escaped
    "/fal-ai/fl%75x/dev",
    "/fal-ai/FL%55X/dev",
    "/fal-ai/flux%2Fdev",  # encoded slash
    "/fal-ai/flux%2fdev",
    "/fal%2Dai/flux/dev",  # encoded hyphen
    "/fal-ai/flux/dev%2Estream",  # encoded dot (not a dot segment)
    "/fal-ai/flux/%64ev",
    "/fal-ai/flux/dev%7E",  # encoded tilde
    "/fal-ai/flux/dev%3Fx=1",  # encoded "?": would end the id once decoded
    "/fal-ai/flux/dev%20",  # any other escape too: endpoint ids are plain
    "/fal-ai//flux/dev",  # empty segment
    "/fal-ai/flux//dev",
    "/fal-ai/flux/dev//stream",
    "/fal-ai/flux/dev/requests/%72eq-1/status",  # queue request paths too
    "/fal-ai/flux/requests/req-1//status",
    "/fal-ai/%66lux/requests/req-1",
    "/fal-ai/flux%2Frequests/req-1/status",
]


@pytest.mark.parametrize("path", ODD_ENDPOINT_PATHS)
@pytest.mark.parametrize(
    "host", ["fal.run", "queue.fal.run", "falrun.com", "queue.falrun.com", "FAL.RUN"]
)
def test_oddly_spelled_endpoint_ids_are_refused_in_the_target_header(host: str, path: str) -> None:
    for route in (ROUTE, "/fal-ai/fast-sdxl"):
        with pytest.raises(BadRequest) as info:
            resolve(f"https://{host}{path}?logs=1", route)
        assert info.value.status == 400
        assert info.value.message == "invalid path"
        assert "written plainly" in info.value.detail
        assert "percent-encoding" in info.value.detail and "'//'" in info.value.detail


@pytest.mark.parametrize("path", ODD_ENDPOINT_PATHS)
def test_oddly_spelled_endpoint_ids_are_refused_on_fal_run_shaped_paths(path: str) -> None:
    with pytest.raises(BadRequest) as info:
        resolve(None, path, "x=1")
    assert "written plainly" in info.value.detail


@pytest.mark.parametrize(
    "target",
    [
        "https://fal.run/fal-ai/flux/dev",
        "https://fal.run/fal-ai/flux/dev/",
        "https://queue.fal.run/fal-ai/flux/dev/requests/764cabcf-b745-4b3e-ae38-1200304cf45b/status",
        "https://queue.fal.run/fal-ai/flux/requests/req-1/cancel",
        "https://queue.fal.run/workflows/fal-ai/sdxl-sticker",
        "https://fal.run/fal-ai/v1.5_x~y/x",
    ],
)
def test_plain_endpoint_ids_pass(target: str) -> None:
    assert resolve(target).fal_url == target


def test_queries_may_still_be_percent_encoded() -> None:
    """Only the path is the endpoint id: the query reaches fal byte for byte."""
    query = "fal_webhook=https%3A%2F%2Fexample.com%2F%2Fhook%3Fa%3D%66&p=a%20b"
    target = resolve(f"https://queue.fal.run/fal-ai/flux/dev?{query}")
    assert target.query == query
    assert target.target_url == f"https://queue.fal.run/fal-ai/flux/dev?{query}"
    run = resolve(None, "/fal-ai/flux/dev", query)
    assert run.upstream_url == f"{GW}/fal-ai/flux/dev?{query}"


def test_storage_and_token_paths_are_unaffected() -> None:
    # rest.fal.ai paths are matched exactly; an odd spelling there is refused as before.
    with pytest.raises(Forbidden):
        resolve("https://rest.fal.ai/storage/upload/%69nitiate")


# --- wma.fal.run: world-model (WebRTC) session negotiation ----------------------------------
# Three POSTs, exactly these paths, no query, no port but 443; sent in target mode, as
# rest.fal.ai is. Everything else on the host is refused.
WMA_VALID = [
    ("https://wma.fal.run/session", "wma_session", "/session"),
    ("https://wma.fal.run/session/heartbeat", "wma_heartbeat", "/session/heartbeat"),
    ("https://wma.fal.run/ice", "wma_ice", "/ice"),
    ("https://WMA.FAL.RUN:443/session", "wma_session", "/session"),
]


@pytest.mark.parametrize(("url", "kind", "path"), WMA_VALID, ids=[v[0] for v in WMA_VALID])
def test_wma_session_calls_resolve_in_target_mode(url: str, kind: str, path: str) -> None:
    target = resolve(url)
    assert (target.kind, target.host, target.path) == (kind, "wma.fal.run", path)
    assert (target.upstream_url, target.target_url) == (GW, f"https://wma.fal.run{path}")
    check_method("POST", target)


WMA_HOSTILE = [
    # (x-fal-target-url, expected error, words the detail must contain)
    ("https://wma.fal.run/", Forbidden, "only /ice, /session, /session/heartbeat"),
    ("https://wma.fal.run", Forbidden, "only"),
    ("https://wma.fal.run/session/", Forbidden, "only"),
    ("https://wma.fal.run/Session", Forbidden, "only"),
    ("https://wma.fal.run/sessions", Forbidden, "only"),
    ("https://wma.fal.run/session/abc", Forbidden, "only"),
    ("https://wma.fal.run/session/heartbeat/", Forbidden, "only"),
    ("https://wma.fal.run/session/%68eartbeat", Forbidden, "only"),
    ("https://wma.fal.run/ice/", Forbidden, "only"),
    ("https://wma.fal.run/fal-ai/world/session", Forbidden, "only"),
    ("https://wma.fal.run/admin", Forbidden, "only"),
    ("https://wma.fal.run/session?app_id=fal-ai/other", Forbidden, "no query"),
    ("https://wma.fal.run/session/heartbeat?x=1", Forbidden, "no query"),
    ("https://wma.fal.run/ice?x", Forbidden, "no query"),
    ("https://wma.fal.run/session/../tokens/", BadRequest, "dot segments"),
    ("https://wma.fal.run/%2e%2e/session", BadRequest, "dot segments"),
    ("https://wma.fal.run//evil.com/session", BadRequest, "leading '//'"),
]


@pytest.mark.parametrize(("header", "error", "words"), WMA_HOSTILE, ids=[h[0] for h in WMA_HOSTILE])
def test_other_wma_targets_are_refused(header: str, error: type, words: str) -> None:
    with pytest.raises(error) as info:
        resolve(header)
    assert words in info.value.detail


def test_the_wma_host_keeps_every_generic_target_rule() -> None:
    """Served now, but only as https on 443, no user info, and under its own name."""
    assert resolve("https://wma.fal.run/session").kind == "wma_session"
    for header, words in [
        ("https://wma.fal.run:8443/session", "port"),
        ("https://wma.fal.run:80/session", "port"),
        ("http://wma.fal.run/session", "https"),
        ("wss://wma.fal.run/session", "https"),
        ("https://user@wma.fal.run/session", "user info"),
        ("https://wma.fal.run.evil.com/session", "wma.fal.run.evil.com"),
        ("https://wma.falrun.com/session", "wma.falrun.com"),
        ("https://wma.fal.ai/session", "wma.fal.ai"),
    ]:
        with pytest.raises(Forbidden) as info:
            resolve(header)
        assert words in info.value.detail, header


@pytest.mark.parametrize("url", [v[0] for v in WMA_VALID])
@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "PATCH", "DELETE"])
def test_wma_calls_are_posts_only(method: str, url: str) -> None:
    with pytest.raises(MethodNotAllowed) as info:
        check_method(method, resolve(url))
    assert info.value.status == 405
    assert "wma.fal.run takes POST only" in info.value.detail


@pytest.mark.parametrize(
    ("url", "generation"),
    [
        ("https://wma.fal.run/session", True),  # a new session: fal bills it
        ("https://wma.fal.run/session/heartbeat", False),
        ("https://wma.fal.run/ice", False),
    ],
)
def test_only_a_new_wma_session_is_a_generation(url: str, generation: bool) -> None:
    assert starts_generation("POST", resolve(url)) == generation
