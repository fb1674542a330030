"""A first hour's mistakes, each explained where the user looks: the answer's body says what
to change, and the proxy's log line is a warning naming the setting.

Real processes: the proxy under uvicorn, the emulator as the gateway and fal.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from proxy.forward.handler import fal_key_hint
from tests.conftest import FakeGateway, RunningProxy, launch_proxy

PAGE = "http://localhost:3000"  # a dev server's page, not listed


@pytest.fixture(scope="module")
def wrong_key(fake_gateway: FakeGateway) -> Iterator[RunningProxy]:
    """A proxy holding a fal key fal does not know, and a body cap of 100 bytes."""
    running = launch_proxy(fake_gateway.gateway_url, FAL_KEY="wrong-id:wrong-secret",
                           FAL_PROXY_MAX_BODY_BYTES="100")  # fmt: skip
    yield running
    running.process.stop()


def post(proxy: RunningProxy, **kwargs: object) -> httpx.Response:
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:
        return c.post("/fal-ai/fast-sdxl", **kwargs)  # type: ignore[arg-type]


def test_a_wrong_fal_key_is_logged_as_a_warning_naming_fal_key(
    wrong_key: RunningProxy, fake_gateway: FakeGateway
) -> None:
    answer = post(wrong_key, json={"prompt": "x"})
    assert answer.status_code == 401  # fal's own answer, relayed
    line = wrong_key.wait_for_request_log(answer.headers["x-proxy-request-id"])
    assert line["level"] == "warning" and line["upstream_status"] == 401
    assert line["hint"] == "fal refused the proxy's key (wrong or revoked): check FAL_KEY"
    assert "wrong-secret" not in json.dumps(line)
    assert len(fake_gateway.requests()) == 1


@pytest.mark.parametrize(
    ("mode", "python_port", "names"),
    [
        ("key", False, "check FAL_KEY"),
        ("key", True, "check the proxy's FAL_KEY (not the client's placeholder key)"),
        ("byok", False, "CF_AIG_BYOK_ALIAS"),
        ("unified", False, "FAL_PROXY_UNIFIED_BILLING"),
    ],
)
def test_the_hint_for_falls_401_names_the_key_the_proxy_sent(
    mode: str, python_port: bool, names: str
) -> None:
    assert names in fal_key_hint(mode, python_port)


def test_a_page_from_an_unlisted_origin_is_told_what_to_set(
    wrong_key: RunningProxy, fake_gateway: FakeGateway
) -> None:
    """The simple request's 403 says which origin and which setting; the preflight still
    fails (no CORS headers); both log lines are warnings naming the origin."""
    refused = post(wrong_key, json={"prompt": "x"}, headers={"origin": PAGE})
    assert refused.status_code == 403
    detail = refused.json()["detail"]
    assert PAGE in detail and f"FAL_PROXY_ALLOWED_ORIGINS={PAGE}" in detail
    with httpx.Client(base_url=wrong_key.url, trust_env=False, timeout=10) as c:
        preflight = c.options("/api/fal/proxy", headers={
            "origin": PAGE, "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, x-fal-target-url",
        })  # fmt: skip
    assert preflight.status_code == 403
    assert "access-control-allow-origin" not in preflight.headers
    for answer in (refused, preflight):
        line = wrong_key.wait_for_request_log(answer.headers["x-proxy-request-id"])
        assert (line["level"], line["error"], line["origin"]) == ("warning", "origin_refused", PAGE)
        assert "FAL_PROXY_ALLOWED_ORIGINS" in line["hint"]
    assert fake_gateway.requests() == []


def test_a_body_over_the_cap_names_fal_proxy_max_body_bytes(
    wrong_key: RunningProxy, fake_gateway: FakeGateway
) -> None:
    answer = post(wrong_key, content=b"x" * 1000, headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert "FAL_PROXY_MAX_BODY_BYTES" in answer.json()["detail"]
    line = wrong_key.wait_for_request_log(answer.headers["x-proxy-request-id"])
    assert line["level"] == "warning" and "FAL_PROXY_MAX_BODY_BYTES" in line["hint"]
    assert fake_gateway.requests() == []


def test_library_lines_come_out_in_the_proxys_own_json_shape(wrong_key: RunningProxy) -> None:
    """uvicorn's lines (and any library's) are compact JSON like ours, with the same keys,
    plus the logger that wrote them."""
    raw = [line for line in list(wrong_key.process.lines) if line.startswith("{")]
    library = [json.loads(line) for line in raw if '"logger":"uvicorn.error"' in line]
    assert library, raw
    for line in raw:
        record = json.loads(line)
        assert {"event", "level", "timestamp"} <= record.keys(), line
        assert line == json.dumps(record, separators=(",", ":"), ensure_ascii=False), line


# --- behind a dev server on the same machine ------------------------------------------------


def test_a_dev_servers_rewrite_keeps_the_pages_origin_same_origin(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    """Next.js rewrites (Vite with changeOrigin) put the proxy's address in Host and the
    page's in X-Forwarded-Host: from loopback, that is the page's own origin, no listing
    needed. The same headers without the forwarded host are a cross-origin page."""
    forwarded = {"origin": PAGE, "x-forwarded-host": "localhost:3000",
                 "x-forwarded-proto": "http", "x-forwarded-port": "3000"}  # fmt: skip
    assert post(proxy, json={"prompt": "x"}, headers=forwarded).status_code == 200
    assert post(proxy, json={"prompt": "x"}, headers={"origin": PAGE}).status_code == 403
    assert len(fake_gateway.requests()) == 1


def test_a_status_stream_is_marked_for_no_buffering_in_between(proxy: RunningProxy) -> None:
    with (
        httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c,
        c.stream("POST", "/fal-ai/fast-sdxl/stream", json={"prompt": "x"}) as answer,
    ):
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert "no-transform" in answer.headers["cache-control"]
        assert answer.headers["x-accel-buffering"] == "no"
        answer.read()


def test_a_socket_on_the_sdk_route_is_refused_at_the_proxy(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    url = proxy.url.replace("http://", "ws://", 1) + "/api/fal/proxy/fal-ai/fast-lcm/realtime"

    async def handshake() -> int:
        try:
            async with connect(url, proxy=None, open_timeout=10):
                pass
        except InvalidStatus as exc:
            return exc.response.status_code
        pytest.fail("a socket on the SDK route was accepted")

    assert asyncio.run(handshake()) == 404
    assert fake_gateway.requests("websocket") == []
