"""App policy table: every kind of call names its app differently."""

from __future__ import annotations

import json

import pytest

from proxy.errors import Forbidden, ProxyError
from proxy.policy.allowed_apps import AppPolicy, check_heartbeat
from proxy.policy.targets import resolve_target

POLICY = AppPolicy(
    ("fal-ai/flux/*", "fal-ai/fast-sdxl", "workflows/acme/*", "fal-ai/fast-lcm-diffusion/*")
)


def target(url: str):
    return resolve_target(
        "/api/fal/proxy", "", url, gateway_url="https://gw/v1/a/g/fal", proxy_route="/api/fal/proxy"
    )


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://fal.run/fal-ai/flux/dev", True),
        ("https://fal.run/fal-ai/flux/schnell/stream", True),
        ("https://fal.run/fal-ai/fast-sdxl", True),
        ("https://fal.run/fal-ai/fast-sdxl/stream", True),
        ("https://fal.run/fal-ai/fast-sdxl-turbo", False),
        ("https://fal.run/fal-ai/flux", False),
        ("https://fal.run/fal-ai/other", False),
        ("https://fal.run/evil/fal-ai/flux/dev", False),
        ("https://queue.fal.run/fal-ai/flux/dev", True),
        ("https://queue.fal.run/fal-ai/kling-video/v2", False),
        # status/result/cancel carry only owner/alias: allowed when an allowed app lives under it
        ("https://queue.fal.run/fal-ai/flux/requests/abc/status?logs=1", True),
        ("https://queue.fal.run/fal-ai/flux/requests/abc/status/stream", True),
        ("https://queue.fal.run/fal-ai/flux/requests/abc", True),
        ("https://queue.fal.run/fal-ai/flux/requests/abc/cancel", True),
        ("https://queue.fal.run/fal-ai/fast-sdxl/requests/abc", True),
        ("https://queue.fal.run/fal-ai/kling-video/requests/abc/status", False),
        ("https://queue.fal.run/workflows/acme/sticker", True),
        ("https://queue.fal.run/workflows/acme/sticker/requests/abc/status", True),
        ("https://queue.fal.run/workflows/other/x/requests/abc/status", False),
        ("https://fal.run/fal-ai/fast-lcm-diffusion/image-to-image/realtime", True),
        ("https://rest.fal.ai/storage/upload/initiate", True),  # names no app
        # The owner alone is not an app: it would open every app of that owner.
        ("https://queue.fal.run/fal-ai/requests/abc/status", False),
        ("https://queue.fal.run/fal-ai/requests/abc", False),
        ("https://queue.fal.run/workflows/acme/requests/abc", False),
        ("https://queue.fal.run/workflows/requests/abc", False),
    ],
)
def test_apps_per_kind_of_call(url: str, allowed: bool) -> None:
    if allowed:
        POLICY.check(target(url))
    else:
        with pytest.raises(Forbidden) as info:
            POLICY.check(target(url))
        assert info.value.reason == "app_refused"


def test_no_patterns_allow_everything() -> None:
    assert AppPolicy(()).check(target("https://fal.run/anything/at-all")) == "*"
    assert AppPolicy(("*",)).check(target("https://fal.run/anything/at-all")) == "*"
    assert AppPolicy(("*",)).allows_all and not POLICY.allows_all


def token(apps, expiration=120) -> bytes:
    return json.dumps({"allowed_apps": apps, "token_expiration": expiration}).encode()


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (token(["fast-lcm-diffusion"]), None, None),
        (token(["flux"]), None, None),  # alias of fal-ai/flux/*
        (token(["fast-sdxl"], 300), None, None),
        (token(["kling-video"]), 403, "app_refused"),
        (token(["fast-lcm-diffusion", "kling-video"]), 403, "app_refused"),
        (token(["fast-lcm-diffusion"], 301), 403, "token_refused"),
        (token(["fast-lcm-diffusion"], 0), 403, "token_refused"),
        (token(["fast-lcm-diffusion"], "120"), 403, "token_refused"),
        (token([]), 403, "token_refused"),
        (token("fast-lcm-diffusion"), 403, "token_refused"),
        # Malformed or ambiguous: fal might read it otherwise than the check did.
        (b"not json", 400, "token_refused"),
        (b'["a"]', 400, "token_refused"),
        (b'{"allowed_apps":["kling-video"],"allowed_apps":["fast-sdxl"]}', 400, "token_refused"),
        (b'{"Allowed_Apps":["kling-video"],"allowed_apps":["fast-sdxl"]}', 400, "token_refused"),
        (b'{"allowed_apps":["fast-sdxl"],"TOKEN_EXPIRATION":86400}', 400, "token_refused"),
        (b'\xef\xbb\xbf{"allowed_apps":["fast-sdxl"]}', 400, "token_refused"),  # UTF-8 BOM
        ('{"allowed_apps":["fast-sdxl"]}'.encode("utf-16"), 400, "token_refused"),
        ('{"allowed_apps":["fast-sdxl"]}'.encode("utf-32-le"), 400, "token_refused"),
        (b"[" * 30_000, 400, "token_refused"),  # RecursionError in json, unguarded
        (
            b'{"allowed_apps":["fast-sdxl"],"x":' + b"[" * 20 + b"]" * 20 + b"}",
            400,
            "token_refused",
        ),
    ],
)
def test_token_requests(body: bytes, status: int | None, reason: str | None) -> None:
    if reason is None:
        POLICY.check_token(body, 300)
    else:
        with pytest.raises(ProxyError) as info:
            POLICY.check_token(body, 300)
        assert (info.value.status, info.value.reason) == (status, reason)


def test_the_token_body_forwarded_is_only_what_was_checked() -> None:
    body = (
        b'{"allowed_apps": ["fast-sdxl"], "token_expiration": 60, "other": {"allowed_apps": ["x"]}}'
    )
    assert json.loads(POLICY.check_token(body, 300)) == {
        "allowed_apps": ["fast-sdxl"],
        "token_expiration": 60,
    }
    # No token_expiration: the SDK's 120 s, written out (fal's own default is not ours to guess).
    assert json.loads(POLICY.check_token(b'{"allowed_apps":["fast-sdxl"]}', 300)) == {
        "allowed_apps": ["fast-sdxl"],
        "token_expiration": 120,
    }


def test_token_expiration_is_capped_even_when_every_app_is_allowed() -> None:
    AppPolicy(()).check_token(token(["anything"]), 300)
    with pytest.raises(Forbidden):
        AppPolicy(()).check_token(token(["anything"], 3600), 300)


@pytest.mark.parametrize(
    ("url", "pattern"),
    [
        ("https://fal.run/fal-ai/flux/dev", "fal-ai/flux/*"),
        ("https://queue.fal.run/fal-ai/flux/requests/abc", "fal-ai/flux/*"),
        ("https://fal.run/fal-ai/fast-sdxl/stream", "fal-ai/fast-sdxl"),
        ("https://rest.fal.ai/tokens/", None),
    ],
)
def test_check_names_the_pattern_that_admitted(url: str, pattern: str | None) -> None:
    assert POLICY.check(target(url)) == pattern
    assert AppPolicy(()).check(target(url)) == ("*" if pattern else None)


# --- wma.fal.run world-model sessions: the app is in the offer's body ------------------------
def offer(app_id: object = "fal-ai/flux/world", **extra: object) -> bytes:
    return json.dumps({"app_id": app_id, "sdp": "v=0\r\n", "type": "offer", **extra}).encode()


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (offer(), None, None),  # fal-ai/flux/*
        (offer("fal-ai/fast-sdxl"), None, None),
        (offer("workflows/acme/world"), None, None),
        (offer("fal-ai/kling-world"), 403, "app_refused"),
        (offer("fal-ai"), 400, "session_refused"),  # owner alone is no endpoint id
        (offer("fal-ai/%66lux/dev"), 400, "session_refused"),  # respelt: one id, one spelling
        (offer("fal-ai//flux/dev"), 400, "session_refused"),
        (offer("fal-ai/flux/../kling"), 400, "session_refused"),
        (offer("/fal-ai/flux/dev"), 400, "session_refused"),
        (offer("fal-ai/flux/dev/"), 400, "session_refused"),
        (offer("fal-ai/flux/*"), 400, "session_refused"),
        (offer("fal-ai/flux/dev?x=1"), 400, "session_refused"),
        (offer("fal-ai/flux/d\u0435v"), 400, "session_refused"),  # Cyrillic "е"
        (offer(["fal-ai/flux/dev"]), 400, "session_refused"),
        (offer(None), 400, "session_refused"),
        (offer(type="answer"), 400, "session_refused"),
        (offer(sdp=1), 400, "session_refused"),
        (
            b'{"app_id":"fal-ai/kling-world","app_id":"fal-ai/flux/dev","sdp":"","type":"offer"}',
            400,
            "session_refused",
        ),
        (
            b'{"APP_ID":"fal-ai/kling-world","app_id":"fal-ai/flux/dev","sdp":"","type":"offer"}',
            400,
            "session_refused",
        ),
        (b"\xef\xbb\xbf" + offer(), 400, "session_refused"),
        (offer().decode().encode("utf-16"), 400, "session_refused"),
        (b'["fal-ai/flux/dev"]', 400, "session_refused"),
        (b"not json", 400, "session_refused"),
        (b"[" * 30_000, 400, "session_refused"),
    ],
)
def test_session_offers(body: bytes, status: int | None, reason: str | None) -> None:
    if reason is None:
        POLICY.check_session(body)
    else:
        with pytest.raises(ProxyError) as info:
            POLICY.check_session(body)
        assert (info.value.status, info.value.reason) == (status, reason)


def test_the_session_body_forwarded_is_only_what_was_checked() -> None:
    body = offer("fal-ai/flux/world", extra={"app_id": "fal-ai/kling-world"})
    pattern, app_id, forwarded = POLICY.check_session(body)
    assert (pattern, app_id) == ("fal-ai/flux/*", "fal-ai/flux/world")
    assert forwarded == b'{"app_id":"fal-ai/flux/world","sdp":"v=0\\r\\n","type":"offer"}'
    assert AppPolicy(()).check_session(offer("anyone/any-app"))[0] == "*"


@pytest.mark.parametrize(
    ("body", "forwarded"),
    [
        (b'{"session_id": "3f1c-ab", "other": 1}', b'{"session_id":"3f1c-ab"}'),
        (b'{"session_id":"a","session_id":"b"}', None),
        (b'{"Session_Id":"a","session_id":"b"}', None),
        (b'{"session_id":""}', None),
        (b'{"session_id":"a b"}', None),
        (b'{"session_id":7}', None),
        (b"[]", None),
        (b"", None),
    ],
)
def test_heartbeats(body: bytes, forwarded: bytes | None) -> None:
    if forwarded is not None:
        assert check_heartbeat(body) == forwarded
    else:
        with pytest.raises(ProxyError) as info:
            check_heartbeat(body)
        assert (info.value.status, info.value.reason) == (400, "session_refused")


def test_a_wma_call_names_no_app_in_its_target() -> None:
    """The session's app is in its body (check_session); the target alone is not refused."""
    for url in ("https://wma.fal.run/session", "https://wma.fal.run/ice"):
        assert POLICY.check(target(url)) is None
