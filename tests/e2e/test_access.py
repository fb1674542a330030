"""Access policies end to end: origins, callers, apps, limits, sizes, client addresses.

Each policy is exercised through the running proxy, allowed and refused, and every
refusal is checked to have sent nothing upstream (the emulator recorded nothing).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from tests.conftest import FakeGateway, RunningProxy, launch_proxy

ECHO = "/emulator/echo"
APP = "https://app.example.com"

pytestmark = pytest.mark.usefixtures("clear_of_window_edges")


def post(proxy: RunningProxy, path: str = ECHO, **kwargs) -> httpx.Response:
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:
        return c.post(path, json=kwargs.pop("json", {}), **kwargs)


def line_for(proxy: RunningProxy, r: httpx.Response) -> dict:
    return proxy.wait_for_request_log(r.headers["x-proxy-request-id"])


# --- origins ------------------------------------------------------------------------------


@pytest.fixture
def cors_proxy(start_proxy) -> RunningProxy:
    return start_proxy(
        FAL_PROXY_ALLOWED_ORIGINS=f"{APP}, http://localhost:3000",
        FAL_PROXY_CORS_EXTRA_HEADERS="x-custom",
    )


def test_preflight_from_a_listed_origin_allows_the_sdk_headers(
    cors_proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    with httpx.Client(base_url=cors_proxy.url, trust_env=False) as c:
        r = c.options(
            "/api/fal/proxy",
            headers={
                "origin": APP,
                "access-control-request-method": "POST",
                "access-control-request-headers": (
                    "content-type,x-fal-target-url,x-fal-queue-priority"
                ),
            },
        )
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == APP
    allowed = r.headers["access-control-allow-headers"].split(", ")
    assert {
        "content-type",
        "x-fal-target-url",
        "x-fal-queue-priority",
        "x-custom",
        "x-proxy-authorization",
    } <= set(allowed)
    assert "POST" in r.headers["access-control-allow-methods"]
    assert fake_gateway.requests() == []


def test_actual_request_from_a_listed_origin_exposes_the_fal_headers(
    cors_proxy: RunningProxy,
) -> None:
    r = post(cors_proxy, headers={"origin": APP})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == APP
    assert (
        r.headers["access-control-expose-headers"]
        == "x-fal-request-id, x-fal-request-timeout-type, x-fal-billable-units"
    )
    refused = post(cors_proxy, "/api/fal/proxy", headers={"origin": APP})  # errors carry CORS too
    assert refused.status_code == 400 and refused.headers["access-control-allow-origin"] == APP


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "null", "https://app.example.com.evil.example"]
)
def test_other_origins_are_refused_before_anything_goes_upstream(
    cors_proxy: RunningProxy, fake_gateway: FakeGateway, origin: str
) -> None:
    r = post(
        cors_proxy, headers={"origin": origin}
    )  # a "simple" cross-site POST needs no preflight
    assert r.status_code == 403 and r.json()["message"] == "origin not allowed"
    assert "access-control-allow-origin" not in r.headers
    with httpx.Client(base_url=cors_proxy.url, trust_env=False) as c:
        pre = c.options(
            "/api/fal/proxy", headers={"origin": origin, "access-control-request-method": "POST"}
        )
    assert pre.status_code == 403
    assert fake_gateway.requests() == []
    assert line_for(cors_proxy, r)["error"] == "origin_refused"


def test_same_origin_and_no_origin_pass(cors_proxy: RunningProxy) -> None:
    assert post(cors_proxy, headers={"origin": cors_proxy.url}).status_code == 200
    assert post(cors_proxy).status_code == 200


def test_dns_rebinding_is_not_same_origin(proxy: RunningProxy, fake_gateway: FakeGateway) -> None:
    # evil.example re-pointed at 127.0.0.1: the browser sends matching Host and Origin.
    port = proxy.url.rsplit(":", 1)[1]
    r = post(
        proxy, headers={"host": f"evil.example:{port}", "origin": f"http://evil.example:{port}"}
    )
    assert r.status_code == 403 and r.json()["message"] == "origin not allowed"
    assert fake_gateway.requests() == []


def test_by_default_no_cross_origin_page_may_call(proxy: RunningProxy) -> None:
    assert post(proxy, headers={"origin": APP}).status_code == 403


# --- callers ------------------------------------------------------------------------------

TOKEN = "tok-web-0123456789abcdef"


@pytest.fixture
def token_proxy(start_proxy, tmp_path: Path) -> RunningProxy:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"web-app {TOKEN}\n")
    return start_proxy(FAL_PROXY_AUTH="token", FAL_PROXY_CLIENT_TOKENS_FILE=str(tokens))


def test_token_callers(token_proxy: RunningProxy, fake_gateway: FakeGateway) -> None:
    missing = post(token_proxy)
    wrong = post(token_proxy, headers={"x-proxy-authorization": "Bearer tok-nope-0123456789abcdef"})
    fal_style = post(
        token_proxy, headers={"authorization": f"Bearer {TOKEN}"}
    )  # not the caller header
    assert [r.status_code for r in (missing, wrong, fal_style)] == [401, 401, 401]
    assert fake_gateway.requests() == []
    ok = post(token_proxy, headers={"x-proxy-authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    seen = fake_gateway.only_request()["header_map"]
    assert "x-proxy-authorization" not in seen  # the caller's credential stays here
    assert line_for(token_proxy, ok)["caller"] == "web-app"
    token_proxy.lines_of([missing, wrong, fal_style])  # every line in before the search
    assert all(TOKEN not in json.dumps(line) for line in token_proxy.logs())


def test_jwt_callers(start_proxy, fake_gateway: FakeGateway) -> None:
    secret = "j" * 40
    proxy = start_proxy(
        FAL_PROXY_AUTH="jwt",
        FAL_PROXY_JWT_SECRET=secret,
        FAL_PROXY_JWT_AUDIENCE="fal-proxy",
        FAL_PROXY_AUTH_HEADER="x-session",
    )
    good = jwt.encode(
        {"sub": "user-42", "aud": "fal-proxy", "exp": int(time.time()) + 60}, secret, "HS256"
    )
    expired = jwt.encode(
        {"sub": "user-42", "aud": "fal-proxy", "exp": int(time.time()) - 600}, secret, "HS256"
    )
    other_aud = jwt.encode(
        {"sub": "user-42", "aud": "x", "exp": int(time.time()) + 60}, secret, "HS256"
    )
    for bad in (expired, other_aud):
        assert post(proxy, headers={"x-session": f"Bearer {bad}"}).status_code == 401
    assert fake_gateway.requests() == []
    ok = post(proxy, headers={"x-session": f"Bearer {good}"})
    assert ok.status_code == 200 and line_for(proxy, ok)["caller"] == "user-42"
    assert "x-session" not in fake_gateway.only_request()["header_map"]  # the session never leaves


# --- apps ---------------------------------------------------------------------------------


def test_allowed_apps_apply_to_every_kind_of_call(start_proxy, fake_gateway: FakeGateway) -> None:
    proxy = start_proxy(
        FAL_PROXY_ALLOWED_APPS="fal-ai/flux/*, fal-ai/fast-lcm-diffusion/*",
        FAL_PROXY_TOKEN_MAX_EXPIRATION="300",
    )
    tiny = {"prompt": "cat", "image_size": {"width": 16, "height": 16}}
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:

        def sdk(method: str, target: str, body=None) -> httpx.Response:
            return c.request(
                method,
                "/api/fal/proxy",
                headers={"x-fal-target-url": target},
                content=json.dumps(body).encode() if body is not None else None,
            )

        assert c.post("/fal-ai/flux/schnell", json=tiny).status_code == 200
        submit = sdk("POST", "https://queue.fal.run/fal-ai/flux/dev", tiny)
        assert submit.status_code == 200
        status = sdk("GET", submit.json()["status_url"])
        assert status.status_code == 200
        token = sdk(
            "POST",
            "https://rest.fal.ai/tokens/",
            {"allowed_apps": ["fast-lcm-diffusion"], "token_expiration": 120},
        )
        assert token.status_code == 201
        allowed = len(fake_gateway.requests())
        refused = [
            c.post("/fal-ai/fast-sdxl", json=tiny),
            sdk("POST", "https://fal.run/fal-ai/fast-sdxl/stream", tiny),
            sdk("POST", "https://queue.fal.run/fal-ai/fast-sdxl", tiny),
            sdk("GET", "https://queue.fal.run/fal-ai/fast-sdxl/requests/abc/status"),
            sdk("PUT", "https://queue.fal.run/fal-ai/fast-sdxl/requests/abc/cancel"),
            sdk(
                "POST",
                "https://rest.fal.ai/tokens/",
                {"allowed_apps": ["fast-sdxl"], "token_expiration": 120},
            ),
            sdk(
                "POST",
                "https://rest.fal.ai/tokens/",
                {"allowed_apps": ["fast-lcm-diffusion"], "token_expiration": 3600},
            ),
        ]
    assert [r.status_code for r in refused] == [403] * len(refused)
    assert all(r.json()["detail"] for r in refused)
    assert len(fake_gateway.requests()) == allowed  # nothing more went upstream


def test_every_app_allowed_by_default_with_a_warning(proxy: RunningProxy) -> None:
    assert any(
        line.get("setting") == "FAL_PROXY_ALLOWED_APPS" and line["level"] == "warning"
        for line in proxy.logs()
    )


def test_open_auth_on_a_public_address_warns_when_allowed(start_proxy) -> None:
    # Refused without the opt-in (test_cli); with it, still said at every start.
    proxy = start_proxy(FAL_PROXY_HOST="0.0.0.0", FAL_PROXY_ALLOW_UNAUTHENTICATED="true")
    assert any(
        line.get("setting") == "FAL_PROXY_AUTH" and line["level"] == "warning"
        for line in proxy.logs()
    )


# --- rate limits --------------------------------------------------------------------------


def test_requests_per_minute(start_proxy, fake_gateway: FakeGateway) -> None:
    proxy = start_proxy(FAL_PROXY_RATE_LIMIT_RPM="3")
    codes = [post(proxy).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    limited = post(proxy)
    assert int(limited.headers["retry-after"]) >= 1
    assert "requests per minute" in limited.json()["message"] + limited.json()["detail"]
    assert len(fake_gateway.requests()) == 3


def test_concurrent_requests(start_proxy, fake_gateway: FakeGateway) -> None:
    proxy = start_proxy(FAL_PROXY_MAX_CONCURRENT="1")
    results: list[int] = []
    holder = threading.Thread(
        target=lambda: results.append(post(proxy, "/emulator/hang").status_code)
    )
    holder.start()
    deadline = time.monotonic() + 5
    while not fake_gateway.requests():  # wait until the first request is really in flight
        assert time.monotonic() < deadline
        time.sleep(0.02)
    second = post(proxy)
    assert second.status_code == 429 and second.headers["retry-after"]
    fake_gateway.release("hang")
    holder.join(10)
    assert results == [200]
    assert post(proxy).status_code == 200  # the slot was given back


GENERATIONS = [  # (method, x-fal-target-url or None for a fal.run path, path, body)
    ("POST", "https://queue.fal.run/fal-ai/flux/dev", None, {"prompt": "cat"}),  # queue submit
    ("POST", None, "/fal-ai/flux/dev", {"prompt": "cat"}),  # sync run
    ("GET", None, "/fal-ai/flux/dev?prompt=cat", None),  # a GET on fal.run runs the model too
    ("POST", "https://fal.run/fal-ai/flux/dev/stream", None, {"prompt": "cat"}),
    (
        "POST",
        "https://queue.fal.run/fal-ai/flux/requests/abc",
        None,
        {"prompt": "cat"},
    ),  # not status/cancel
    ("PUT", "https://queue.fal.run/fal-ai/flux/requests/abc", None, {}),
    ("GET", "https://queue.fal.run/fal-ai/flux/dev", None, None),
    (
        "POST",
        "https://rest.fal.ai/tokens/",
        None,
        {"allowed_apps": ["flux"], "token_expiration": 60},
    ),
]


@pytest.fixture(scope="module")
def capped_proxy(fake_gateway: FakeGateway) -> Iterator[RunningProxy]:
    """One proxy for every kind of generation: each case is its own client (a forwarded
    address of its own, from a trusted peer), so each has its own hourly cap of 1."""
    running = launch_proxy(
        fake_gateway.gateway_url,
        FAL_PROXY_SUBMITS_PER_HOUR="1",
        FAL_PROXY_ALLOWED_APPS="fal-ai/flux/*",
        FAL_PROXY_TRUSTED_PROXIES="127.0.0.1",
    )
    yield running
    running.process.stop()


@pytest.mark.parametrize(("n", "method", "target", "path", "body"), [
    (n, *call) for n, call in enumerate(GENERATIONS, 1)
])  # fmt: skip
def test_every_call_that_can_start_a_generation_counts_against_the_hourly_cap(
    capped_proxy: RunningProxy,
    fake_gateway: FakeGateway,
    n: int,
    method: str,
    target: str | None,
    path: str | None,
    body: object,
) -> None:
    client = {"x-forwarded-for": f"203.0.113.{n}"}
    with httpx.Client(base_url=capped_proxy.url, trust_env=False, timeout=10) as c:

        def call() -> httpx.Response:
            content = json.dumps(body).encode() if body is not None else None
            if target is None:
                return c.request(method, path or "/", content=content, headers=client)
            return c.request(
                method,
                "/api/fal/proxy",
                headers={**client, "x-fal-target-url": target},
                content=content,
            )

        first = call()
        assert first.status_code != 429, first.text
        assert len(fake_gateway.requests()) == 1  # the first went up: it counted
        refused = call()
        assert refused.status_code == 429, refused.text
        assert "per hour" in refused.json()["detail"]
    assert len(fake_gateway.requests()) == 1  # the refused one never went upstream


def test_reading_and_cancelling_a_request_are_not_generations(start_proxy) -> None:
    proxy = start_proxy(FAL_PROXY_SUBMITS_PER_HOUR="1")
    tiny = {"prompt": "cat", "image_size": {"width": 16, "height": 16}}
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:

        def sdk(method: str, target: str, body=None) -> httpx.Response:
            return c.request(
                method,
                "/api/fal/proxy",
                headers={"x-fal-target-url": target},
                content=json.dumps(body).encode() if body is not None else None,
            )

        first = sdk("POST", "https://queue.fal.run/fal-ai/flux/dev", tiny)
        assert first.status_code == 200
        assert sdk("POST", "https://queue.fal.run/fal-ai/flux/dev", tiny).status_code == 429
        urls = first.json()
        for _ in range(3):  # polling, the result and cancelling start nothing
            assert sdk("GET", urls["status_url"]).status_code == 200
            assert sdk("GET", urls["status_url"] + "/stream").status_code != 429
            assert sdk("GET", urls["response_url"]).status_code != 429
            assert sdk("PUT", urls["cancel_url"]).status_code != 429
        assert c.post("/emulator/echo", json={}).status_code == 429  # a sync run is one


def test_limits_are_per_client_ip_without_auth_and_forwarded_for_needs_a_trusted_peer(
    start_proxy,
) -> None:
    trusting = start_proxy(FAL_PROXY_RATE_LIMIT_RPM="1", FAL_PROXY_TRUSTED_PROXIES="127.0.0.1")
    a = post(trusting, headers={"x-forwarded-for": "198.51.100.1"})
    b = post(trusting, headers={"x-forwarded-for": "198.51.100.2"})
    assert (a.status_code, b.status_code) == (200, 200)
    assert line_for(trusting, a)["client_ip"] == "198.51.100.1"
    assert post(trusting, headers={"x-forwarded-for": "198.51.100.1"}).status_code == 429
    untrusting = start_proxy(FAL_PROXY_RATE_LIMIT_RPM="1")
    first = post(untrusting, headers={"x-forwarded-for": "198.51.100.1"})
    assert line_for(untrusting, first)["client_ip"] == "127.0.0.1"
    assert post(untrusting, headers={"x-forwarded-for": "198.51.100.2"}).status_code == 429


def test_an_untrusted_peer_that_keeps_forwarding_is_warned_about_once(start_proxy) -> None:
    """A web server in front of the proxy, not listed in FAL_PROXY_TRUSTED_PROXIES, makes
    all its users one client: said once, after a few requests, never per request."""
    untrusting = start_proxy(FAL_PROXY_RATE_LIMIT_RPM="0")
    answers = [post(untrusting, headers={"x-forwarded-for": f"198.51.100.{n}"}) for n in range(45)]
    untrusting.lines_of(answers)  # every call's line in, and so any warning logged before it
    warnings = [
        line for line in untrusting.logs() if line.get("event") == "x_forwarded_for_ignored"
    ]
    assert len(warnings) == 1
    assert warnings[0]["peer"] == "127.0.0.1" and "FAL_PROXY_TRUSTED_PROXIES" in warnings[0]["hint"]
    assert warnings[0]["level"] == "warning"
    trusting = start_proxy(FAL_PROXY_RATE_LIMIT_RPM="0", FAL_PROXY_TRUSTED_PROXIES="127.0.0.1")
    answers = [post(trusting, headers={"x-forwarded-for": f"198.51.100.{n}"}) for n in range(45)]
    trusting.lines_of(answers)  # every call's line in, and so any warning logged before it
    assert not [line for line in trusting.logs() if line.get("event") == "x_forwarded_for_ignored"]


# --- sizes --------------------------------------------------------------------------------


def test_url_and_header_sizes(start_proxy, fake_gateway: FakeGateway) -> None:
    proxy = start_proxy(FAL_PROXY_MAX_URL_BYTES="512", FAL_PROXY_MAX_HEADER_BYTES="2048")
    assert post(proxy, ECHO + "?q=" + "a" * 600).status_code == 414
    assert post(proxy, headers={"x-fal-runner-hint": "h" * 3000}).status_code == 431
    assert fake_gateway.requests() == []
    assert post(proxy, ECHO + "?q=" + "a" * 100).status_code == 200


# --- limits shared in Redis ---------------------------------------------------------------


def fresh_db(redis_server, db: int) -> str:
    """A Redis database of the session server that no other test uses, emptied."""
    import redis

    with redis.Redis(port=redis_server.port, db=db) as client:
        client.flushdb()
    return f"redis://127.0.0.1:{redis_server.port}/{db}"


def test_two_proxy_processes_share_one_limit_in_redis(
    start_proxy, redis_server, fake_gateway: FakeGateway
) -> None:
    # The requests-per-minute window, shared. (Not a concurrency of 1 as well: a replica
    # gives a slot back to Redis within FLUSH_DELAY, so a caller's next call on the other
    # replica sooner than that would find it held; the test below covers concurrency.)
    url = fresh_db(redis_server, 7)
    a = start_proxy(FAL_PROXY_REDIS_URL=url, FAL_PROXY_RATE_LIMIT_RPM="3")
    b = start_proxy(FAL_PROXY_REDIS_URL=url, FAL_PROXY_RATE_LIMIT_RPM="3")
    assert [post(p).status_code for p in (a, b, a, b)] == [200, 200, 200, 429]
    assert post(a).status_code == 429  # the count is one, whichever replica asks
    assert len(fake_gateway.requests()) == 3


def test_concurrency_is_shared_across_replicas(
    start_proxy, redis_server, fake_gateway: FakeGateway
) -> None:
    url = fresh_db(redis_server, 8)
    a = start_proxy(FAL_PROXY_REDIS_URL=url, FAL_PROXY_MAX_CONCURRENT="1")
    b = start_proxy(FAL_PROXY_REDIS_URL=url, FAL_PROXY_MAX_CONCURRENT="1")
    results: list[int] = []
    holder = threading.Thread(target=lambda: results.append(post(a, "/emulator/hang").status_code))
    holder.start()
    deadline = time.monotonic() + 5
    while not fake_gateway.requests():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert post(b).status_code == 429  # the slot is held on the other replica
    fake_gateway.release("hang")
    holder.join(10)
    assert results == [200]
    # The other replica gives the slot back to Redis within FLUSH_DELAY (20 ms) of its
    # answer: b is admitted once it has (a refused call spends nothing, so asking again is
    # harmless), and never later than the deadline.
    deadline = time.monotonic() + 5
    while (status := post(b).status_code) == 429 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert status == 200


def test_redis_going_away_fails_closed_by_default_or_open_when_asked(
    start_proxy, own_redis
) -> None:
    closed = start_proxy(FAL_PROXY_REDIS_URL=own_redis.url)
    opened = start_proxy(FAL_PROXY_REDIS_URL=own_redis.url, FAL_PROXY_REDIS_FAILURE="open")
    assert (post(closed).status_code, post(opened).status_code) == (200, 200)
    own_redis.stop()
    refused = post(closed)
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["message"] == "rate limiter unavailable"
    assert post(opened).status_code == 200  # serves, and says so in its log
    # Logged before the answer was sent, but read from the child's stdout by another thread.
    opened.process.wait_for_json(lambda r: r.get("event") == "limiter_unavailable", timeout=10)
