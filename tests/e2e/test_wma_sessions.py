"""World-model (WebRTC) sessions end to end: the fal JS SDK's ``fal.realtime.open(wma(...))``
negotiates through ``proxyUrl`` with ``POST https://wma.fal.run/session`` (an SDP offer naming
its app in ``app_id``), ``/session/heartbeat`` every 5 s, and ``/ice``. The real proxy runs
against the emulator, which answers those calls and records what reached it.

A session is a generation of the app its body names: allowed apps, the hourly cap, quotas and
usage go by it. Heartbeats and ICE servers are requests of the minute only. Nothing else on
the host goes through.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.conftest import FAL_KEY, FakeGateway, RunningProxy, token_callers

SESSION = "https://wma.fal.run/session"
HEARTBEAT = "https://wma.fal.run/session/heartbeat"
ICE = "https://wma.fal.run/ice"
SDXL = "fal-ai/fast-sdxl"  # an app the emulator knows
OFFER_SDP = (
    "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    "a=candidate:1 1 udp 2122260223 192.0.2.7 54400 typ host\r\n"
)
ALICE = {"x-proxy-authorization": "Bearer alice-token-0123456789"}

pytestmark = pytest.mark.usefixtures("clear_of_window_edges")


def offer(app_id: str = SDXL) -> dict[str, str]:
    return {"app_id": app_id, "sdp": OFFER_SDP, "type": "offer"}


def sdk(
    proxy: RunningProxy,
    target: str,
    body: object = None,
    *,
    method: str = "POST",
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """One call as the SDK makes it through ``proxyUrl``."""
    if content is None and body is not None:
        content = json.dumps(body).encode()
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:
        return c.request(
            method,
            "/api/fal/proxy",
            content=content,
            headers={
                "x-fal-target-url": target,
                "content-type": "application/json",
                **(headers or {}),
            },
        )


def wma_upstream(gateway: FakeGateway) -> list[dict]:
    return [r for r in gateway.requests() if (r["target_url"] or "").startswith("https://wma.")]


@pytest.fixture
def sdxl_proxy(start_proxy) -> RunningProxy:
    return start_proxy(FAL_PROXY_ALLOWED_APPS=f"{SDXL},fal-ai/flux/*")


def test_a_session_goes_up_with_the_servers_key_and_the_checked_body(
    sdxl_proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    # Spaces, an extra key and the client's own key: none of it is what fal gets.
    sent = (
        b'{ "app_id" : "fal-ai/fast-sdxl", "sdp": ' + json.dumps(OFFER_SDP).encode()
        + b', "type": "offer", "extra": {"app_id": "fal-ai/kling-world"} }'
    )  # fmt: skip
    r = sdk(sdxl_proxy, SESSION, content=sent, headers={"authorization": "Key client-own-key"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["type"] == "answer" and answer["sdp"].startswith("v=0")
    up = fake_gateway.only_request()
    assert up["target_url"] == SESSION
    assert up["path"].endswith("/fal")  # target mode: the bare /fal URL, as rest.fal.ai
    assert up["header_map"]["authorization"] == f"Key {FAL_KEY}"
    assert up["header_map"]["content-type"] == "application/json"
    assert up["header_map"]["cf-aig-skip-cache"] == "true"
    assert json.loads(up["header_map"]["cf-aig-metadata"])["app"] == SDXL
    assert up["body"] == json.dumps(offer(), separators=(",", ":")).encode()
    line = sdxl_proxy.lines_of([r])[0]
    assert (line["route"], line["target_host"], line["target_path"]) == (
        "wma_session",
        "wma.fal.run",
        "/session",
    )

    # The session lives on with heartbeats; ICE servers come the same way.
    fake_gateway.clear()
    beat = sdk(sdxl_proxy, HEARTBEAT, {"session_id": answer["session_id"]})
    assert (beat.status_code, beat.json()) == (200, {})
    assert sdk(sdxl_proxy, HEARTBEAT, {"session_id": "no-such-session"}).status_code == 404
    ice = sdk(sdxl_proxy, ICE, {})
    assert ice.json() == {"ice_servers": [{"urls": "stun:stun.example:3478"}]}
    ups = fake_gateway.requests()
    assert [u["target_url"] for u in ups] == [HEARTBEAT, HEARTBEAT, ICE]
    assert all(u["header_map"]["authorization"] == f"Key {FAL_KEY}" for u in ups)
    assert (
        ups[0]["body"] == json.dumps({"session_id": answer["session_id"]}).replace(" ", "").encode()
    )


def test_a_session_for_an_app_not_allowed_never_goes_upstream(
    sdxl_proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    r = sdk(sdxl_proxy, SESSION, offer("fal-ai/kling-world"))
    assert r.status_code == 403, r.text
    assert r.json()["message"] == "app not allowed"
    assert "fal-ai/kling-world" in r.json()["detail"]
    assert sdxl_proxy.lines_of([r])[0]["error"] == "app_refused"
    assert fake_gateway.requests() == []


def test_a_session_counts_as_a_generation_of_its_app(
    start_proxy, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    proxy = start_proxy(
        **token_callers(tmp_path, {"alice": ALICE["x-proxy-authorization"].split()[1]}),
        FAL_PROXY_QUOTAS=f"{SDXL}=1/day",
    )
    first = sdk(proxy, SESSION, offer(), headers=ALICE)
    assert first.status_code == 200, first.text
    second = sdk(proxy, SESSION, offer(), headers=ALICE)
    assert second.status_code == 429, second.text
    assert second.json()["message"] == "quota exceeded"
    assert second.json()["quota"]["apps"] == SDXL
    assert len(wma_upstream(fake_gateway)) == 1  # the refused session never went up
    # The quota is the app's: another app's session passes; usage is under each app.
    assert sdk(proxy, SESSION, offer("fal-ai/flux/dev"), headers=ALICE).status_code == 200
    with httpx.Client(trust_env=False, timeout=10) as c:
        usage = c.get(f"{proxy.url}/api/fal/usage", headers=ALICE).json()
    apps = usage["usage"]["apps"]
    assert (apps[SDXL]["generations"], apps["fal-ai/flux"]["generations"]) == (1, 1)
    # Heartbeats and ICE servers are not generations: they pass with the quota used up.
    beat = sdk(proxy, HEARTBEAT, {"session_id": first.json()["session_id"]}, headers=ALICE)
    assert beat.status_code == 200, beat.text
    assert sdk(proxy, ICE, {}, headers=ALICE).status_code == 200


def test_heartbeats_and_ice_do_not_count_against_the_hourly_cap(
    start_proxy, fake_gateway: FakeGateway
) -> None:
    proxy = start_proxy(FAL_PROXY_SUBMITS_PER_HOUR="1")
    for _ in range(3):
        assert sdk(proxy, HEARTBEAT, {"session_id": "not-open"}).status_code == 404  # fal's
        assert sdk(proxy, ICE, {}).status_code == 200
    assert sdk(proxy, SESSION, offer()).status_code == 200  # the hour's one generation
    refused = sdk(proxy, SESSION, offer())
    assert refused.status_code == 429 and "per hour" in refused.json()["detail"]
    assert sdk(proxy, "https://fal.run/emulator/echo", {}).status_code == 429  # shared cap
    assert [u["target_url"] for u in fake_gateway.requests()] == [HEARTBEAT, ICE] * 3 + [SESSION]


@pytest.mark.parametrize(
    ("method", "target", "status", "words"),
    [
        ("POST", "https://wma.fal.run/", 403, "only /ice, /session, /session/heartbeat"),
        ("POST", "https://wma.fal.run/session/", 403, "only /ice"),
        ("POST", "https://wma.fal.run/sessions/abc", 403, "only /ice"),
        ("POST", "https://wma.fal.run/admin/keys", 403, "only /ice"),
        ("POST", "https://wma.fal.run/session?app_id=fal-ai/kling-world", 403, "no query"),
        ("POST", "https://wma.fal.run/ice?x=1", 403, "no query"),
        ("GET", SESSION, 405, "takes POST only"),
        ("PUT", HEARTBEAT, 405, "takes POST only"),
        ("DELETE", SESSION, 405, "takes POST only"),
        ("GET", ICE, 405, "takes POST only"),
    ],
)
def test_other_wma_paths_methods_and_queries_are_refused(
    sdxl_proxy: RunningProxy,
    fake_gateway: FakeGateway,
    method: str,
    target: str,
    status: int,
    words: str,
) -> None:
    r = sdk(sdxl_proxy, target, offer(), method=method)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    if status == 405:
        assert r.headers["allow"] == "POST"
    assert fake_gateway.requests() == []


def test_an_oversize_wma_body_is_a_413_before_anything_goes_upstream(
    sdxl_proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    big = offer()
    big["sdp"] = "a=x\r\n" * 14_000  # 70 KB: over the 64 KiB cap, far under the proxy's 100 MiB

    def chunks():  # no content-length: the cap is counted as the body comes
        yield json.dumps(big).encode()

    for content in (json.dumps(big).encode(), chunks()):
        with httpx.Client(base_url=sdxl_proxy.url, trust_env=False, timeout=10) as c:
            r = c.post("/api/fal/proxy", content=content, headers={"x-fal-target-url": SESSION})
        assert r.status_code == 413, r.text
        assert r.json()["detail"] == "a wma.fal.run call's body is at most 65536 bytes"
    assert fake_gateway.requests() == []


@pytest.mark.parametrize(
    ("target", "body"),
    [
        (
            SESSION,
            b'{"app_id":"fal-ai/kling-world","app_id":"fal-ai/fast-sdxl","sdp":"","type":"offer"}',
        ),
        (
            SESSION,
            b'{"APP_ID":"fal-ai/kling-world","app_id":"fal-ai/fast-sdxl","sdp":"","type":"offer"}',
        ),
        (SESSION, b'[{"app_id":"fal-ai/fast-sdxl","sdp":"","type":"offer"}]'),
        (SESSION, b'"fal-ai/fast-sdxl"'),
        (SESSION, b'\xef\xbb\xbf{"app_id":"fal-ai/fast-sdxl","sdp":"","type":"offer"}'),
        (SESSION, b'{"app_id":"fal-ai/%66ast-sdxl","sdp":"","type":"offer"}'),
        (SESSION, b""),
        (HEARTBEAT, b'{"session_id":"a","session_id":"b"}'),
        (HEARTBEAT, b'["a"]'),
    ],
)
def test_an_ambiguous_or_non_object_wma_body_is_a_400(
    sdxl_proxy: RunningProxy, fake_gateway: FakeGateway, target: str, body: bytes
) -> None:
    r = sdk(sdxl_proxy, target, content=body)
    assert r.status_code == 400, r.text
    assert sdxl_proxy.lines_of([r])[0]["error"] == "session_refused"
    assert fake_gateway.requests() == []


def test_the_emulator_answers_sessions_as_fal_would(fake_gateway: FakeGateway) -> None:
    """Straight to the emulated gateway: fal's answers, with the right key only."""
    key = {"authorization": f"Key {FAL_KEY}"}

    def call(target: str, body: object, headers: dict[str, str]) -> httpx.Response:
        return fake_gateway.client.post(
            "/v1/acct/gw/fal", json=body, headers={"x-fal-target-url": target, **headers}
        )

    opened = call(SESSION, offer(), key)
    assert opened.status_code == 200
    assert set(opened.json()) == {"session_id", "sdp", "type"}
    assert call(SESSION, offer(), {"authorization": "Key wrong"}).status_code == 401
    assert call(SESSION, offer("fal-ai/no-such-world"), key).status_code == 400
    assert call(HEARTBEAT, {"session_id": opened.json()["session_id"]}, key).json() == {}
    assert call(HEARTBEAT, {"session_id": "other"}, key).status_code == 404
    assert call(ICE, {}, key).json()["ice_servers"] == [{"urls": "stun:stun.example:3478"}]
    recorded = fake_gateway.requests()
    assert [r["target_url"] for r in recorded] == [
        SESSION,
        SESSION,
        SESSION,
        HEARTBEAT,
        HEARTBEAT,
        ICE,
    ]
