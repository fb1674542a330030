"""Quotas and usage end to end: through the running proxy, in memory and in Redis.

Each caller's generations are counted per calendar period against the quotas of their
plan; over quota is a 429 that names the quota and never reaches the gateway. Usage
(generations and fal's billable units) is read by the caller on the public port and by
the operator on the metrics port. With Redis, two proxies share every count.
"""

from __future__ import annotations

import calendar
import time
from pathlib import Path

import httpx
import jwt
import pytest

from tests.conftest import FakeGateway, RunningProxy, token_callers
from tests.redis_support import RedisServer, free_port

SDXL = "/fal-ai/fast-sdxl"
FLUX = "/fal-ai/flux/dev"
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}
SECRET = "s" * 40

pytestmark = pytest.mark.usefixtures("clear_of_window_edges")


def tokens_file(tmp_path: Path) -> str:
    return token_callers(tmp_path, TOKENS)["FAL_PROXY_CLIENT_TOKENS_FILE"]


def as_caller(caller: str) -> dict[str, str]:
    return {"x-proxy-authorization": f"Bearer {TOKENS[caller]}"}


def run(proxy: RunningProxy, path: str, headers: dict[str, str]) -> httpx.Response:
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=20) as c:
        return c.post(path, json={"prompt": "a lighthouse"}, headers=headers)


def get(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=20) as c:
        return c.get(url, headers=headers or {})


def seconds_to_midnight_utc() -> float:
    now = time.time()
    return (int(now // 86400) + 1) * 86400 - now


def generations_upstream(gateway: FakeGateway, path: str) -> int:
    return sum(1 for r in gateway.requests() if r["path"].endswith(path))


@pytest.fixture
def quota_proxy(start_proxy, tmp_path: Path) -> RunningProxy:
    return start_proxy(
        FAL_PROXY_AUTH="token",
        FAL_PROXY_CLIENT_TOKENS_FILE=tokens_file(tmp_path),
        FAL_PROXY_QUOTAS="fal-ai/fast-sdxl=2/day, *=3/month",
        FAL_PROXY_METRICS_PORT=str(free_port()),
    )


def test_a_quota_refuses_once_used_up_and_names_itself(
    quota_proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    for _ in range(2):
        assert run(quota_proxy, SDXL, as_caller("alice")).status_code == 200
    refused = run(quota_proxy, SDXL, as_caller("alice"))
    assert refused.status_code == 429
    body = refused.json()
    assert body["message"] == "quota exceeded"
    assert body["quota"] == {
        "apps": "fal-ai/fast-sdxl",
        "limit": 2,
        "period": "day",
        "resets_at": time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime(time.time() + 86400)),
    }
    assert "2 generations per day for fal-ai/fast-sdxl" in body["detail"]
    # Retry-After points at midnight UTC (the test may straddle a second).
    assert abs(int(refused.headers["retry-after"]) - seconds_to_midnight_utc()) <= 2
    assert generations_upstream(fake_gateway, SDXL) == 2  # the refused one never went up
    line = quota_proxy.wait_for_request_log(refused.headers["x-proxy-request-id"])
    assert line["error"] == "quota_exceeded" and line["caller"] == "alice"

    # Another app still has room in the month (3): one more, then the month is used up.
    assert run(quota_proxy, FLUX, as_caller("alice")).status_code == 200
    month = run(quota_proxy, FLUX, as_caller("alice"))
    assert month.status_code == 429 and month.json()["quota"]["period"] == "month"
    # Bob has his own quotas; calls that start no generation are never counted.
    assert run(quota_proxy, SDXL, as_caller("bob")).status_code == 200
    with httpx.Client(base_url=quota_proxy.url, trust_env=False, timeout=20) as c:
        status = c.get(
            "/api/fal/proxy",
            headers={
                **as_caller("alice"),
                "x-fal-target-url": "https://queue.fal.run/fal-ai/fast-sdxl/requests/r1/status",
            },
        )
    assert status.status_code != 429


def test_callers_read_their_own_usage_and_the_operator_reads_anyones(
    quota_proxy: RunningProxy, tmp_path: Path
) -> None:
    for _ in range(2):
        assert run(quota_proxy, SDXL, as_caller("alice")).status_code == 200
    own = get(f"{quota_proxy.url}/api/fal/usage", as_caller("alice"))
    assert own.status_code == 200 and own.headers["cache-control"] == "no-store"
    report = own.json()
    assert "caller" not in report  # never echoed on the public port
    assert report["plan"] == "default"
    day, month = report["quotas"]
    assert (day["apps"], day["used"], day["remaining"], day["limit"]) == (
        "fal-ai/fast-sdxl",
        2,
        0,
        2,
    )
    assert (month["apps"], month["used"], month["remaining"]) == ("*", 2, 1)
    assert report["usage"]["apps"] == {
        # 1 unit per image; no FAL_PROXY_PRICES_FILE, so no spend
        "fal-ai/fast-sdxl": {"generations": 2, "billable_units": 2.0, "spend_usd": 0.0}
    }
    # Reading usage is not a generation.
    assert get(f"{quota_proxy.url}/api/fal/usage", as_caller("alice")).json() == report
    # Without a credential: 401, as for any proxied call.
    assert get(f"{quota_proxy.url}/api/fal/usage").status_code == 401

    metrics_port = int(
        quota_proxy.process.wait_for_json(lambda line: line.get("event") == "metrics")["url"]
        .rsplit(":", 1)[1]
        .split("/")[0]
    )
    anyone = get(f"http://127.0.0.1:{metrics_port}/usage/alice").json()
    assert anyone["caller"] == "alice" and anyone["quotas"] == report["quotas"]
    assert get(f"http://127.0.0.1:{metrics_port}/usage/bob").json()["usage"]["apps"] == {}
    # The operator's route is not on the public port.
    public = get(f"{quota_proxy.url}/usage/alice", as_caller("alice"))
    assert "quotas" not in public.text
    # Prometheus: by app, never by caller.
    text = get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert 'fal_proxy_generations_total{app="fal-ai/fast-sdxl"} 2.0' in text
    assert 'fal_proxy_billable_units_total{app="fal-ai/fast-sdxl"} 2.0' in text
    assert "alice" not in text


def test_plans_from_a_file_and_from_a_jwt_claim(
    start_proxy, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    plans = tmp_path / "plans.toml"
    plans.write_text(
        '[plans]\nfree = "*=1/day"\npro = "*=3/day"\n\n[callers]\n"vip" = "pro"\n',
        encoding="utf-8",
    )
    proxy = start_proxy(
        FAL_PROXY_AUTH="jwt",
        FAL_PROXY_JWT_SECRET=SECRET,
        FAL_PROXY_JWT_PLAN_CLAIM="plan",
        FAL_PROXY_PLANS_FILE=str(plans),
        FAL_PROXY_QUOTAS="*=0/day",  # no plan: no generations at all
    )

    def bearer(sub: str, plan: str | None = None) -> dict[str, str]:
        claims = {"sub": sub, "exp": int(time.time()) + 600, **({"plan": plan} if plan else {})}
        return {"x-proxy-authorization": f"Bearer {jwt.encode(claims, SECRET, 'HS256')}"}

    def allowed(headers: dict[str, str]) -> int:
        count = 0
        for _ in range(5):
            before = generations_upstream(fake_gateway, SDXL)
            r = run(proxy, SDXL, headers)
            if r.status_code == 429:
                assert r.json()["message"] == "quota exceeded"
                assert generations_upstream(fake_gateway, SDXL) == before  # never went up
                return count
            assert r.status_code == 200
            assert generations_upstream(fake_gateway, SDXL) == before + 1
            count += 1
        return count

    assert allowed(bearer("u-free", "free")) == 1
    assert allowed(bearer("u-pro", "pro")) == 3
    assert allowed(bearer("u-none")) == 0
    assert allowed(bearer("vip", "free")) == 3  # the file's [callers] wins over the claim
    assert allowed(bearer("u-odd", "enterprise")) == 0  # unknown plan: the default quotas
    proxy.process.wait_for_json(lambda line: line.get("event") == "unknown_plan")  # said once
    assert [line["plan"] for line in proxy.logs() if line.get("event") == "unknown_plan"] == [
        "enterprise"
    ]
    # Moving plan keeps what was used: u-free used 1 of today's; as pro, 2 are left.
    assert allowed(bearer("u-free", "pro")) == 2
    assert len(fake_gateway.requests()) == 1 + 3 + 3 + 2  # the admitted calls, and only them


def test_bad_quota_settings_name_the_variable(start_proxy, tmp_path: Path) -> None:
    from tests.e2e.test_cli import run_cli

    out = run_cli("check", FAL_KEY="k", FAL_PROXY_GATEWAY_URL="http://h/x", FAL_PROXY_QUOTAS="*=5")
    assert out.returncode == 2 and "FAL_PROXY_QUOTAS" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    bad = tmp_path / "plans.toml"
    bad.write_text('[callers]\n"x" = "gold"\n', encoding="utf-8")
    out = run_cli(
        "check", FAL_KEY="k", FAL_PROXY_GATEWAY_URL="http://h/x", FAL_PROXY_PLANS_FILE=str(bad)
    )
    assert out.returncode == 2 and "FAL_PROXY_PLANS_FILE" in out.stderr


# --- Redis: every replica shares the counts -------------------------------------------------


def test_two_proxies_share_quotas_and_usage_in_redis(
    start_proxy, fake_gateway: FakeGateway, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = {
        "FAL_PROXY_AUTH": "token",
        "FAL_PROXY_CLIENT_TOKENS_FILE": tokens_file(tmp_path),
        "FAL_PROXY_QUOTAS": "fal-ai/fast-sdxl=3/day",
        "FAL_PROXY_REDIS_URL": redis_server.url,
    }
    first, second = start_proxy(**env), start_proxy(**env)
    assert run(first, SDXL, as_caller("alice")).status_code == 200
    assert run(second, SDXL, as_caller("alice")).status_code == 200
    assert run(first, SDXL, as_caller("alice")).status_code == 200
    refused = run(second, SDXL, as_caller("alice"))
    assert refused.status_code == 429 and refused.json()["quota"]["limit"] == 3
    assert generations_upstream(fake_gateway, SDXL) == 3
    for proxy in (first, second):
        report = get(f"{proxy.url}/api/fal/usage", as_caller("alice")).json()
        assert report["quotas"][0]["used"] == 3
        deadline = time.monotonic() + 5  # units are owed to Redis for up to 20 ms
        while report["usage"]["apps"]["fal-ai/fast-sdxl"]["billable_units"] < 3:
            assert time.monotonic() < deadline, report
            time.sleep(0.02)
            report = get(f"{proxy.url}/api/fal/usage", as_caller("alice")).json()
        assert report["usage"]["apps"]["fal-ai/fast-sdxl"]["generations"] == 3
    keys = [k for k in redis_server.keys() if ":q:" in k]  # noqa: SIM118 - runs KEYS *
    assert keys and not any("alice" in k for k in keys)
    assert all(redis_server.client().ttl(k) > 0 for k in keys)


@pytest.mark.parametrize("failure", ["closed", "open"])
def test_redis_going_away_under_each_failure_mode(
    start_proxy, own_redis: RedisServer, tmp_path: Path, failure: str
) -> None:
    proxy = start_proxy(
        FAL_PROXY_AUTH="token",
        FAL_PROXY_CLIENT_TOKENS_FILE=tokens_file(tmp_path),
        FAL_PROXY_QUOTAS="*=1/day",
        FAL_PROXY_REDIS_URL=own_redis.url,
        FAL_PROXY_REDIS_FAILURE=failure,
    )
    assert run(proxy, SDXL, as_caller("alice")).status_code == 200
    assert run(proxy, SDXL, as_caller("alice")).status_code == 429
    own_redis.stop()
    r = run(proxy, SDXL, as_caller("alice"))
    if failure == "closed":
        assert r.status_code == 503 and r.json()["message"] == "rate limiter unavailable"
        assert int(r.headers["retry-after"]) > 0
    else:
        assert r.status_code == 200  # admitted unchecked, with a warning
    usage = get(f"{proxy.url}/api/fal/usage", as_caller("alice"))
    assert usage.status_code == 503 and "message" in usage.json()
    own_redis.start()  # same port: the proxy reconnects, and the count survived nothing
    assert run(proxy, SDXL, as_caller("alice")).status_code == 200  # Redis lost its data


def test_a_month_quota_resets_at_the_next_month_in_retry_after(start_proxy, tmp_path: Path) -> None:
    proxy = start_proxy(
        FAL_PROXY_AUTH="token",
        FAL_PROXY_CLIENT_TOKENS_FILE=tokens_file(tmp_path),
        FAL_PROXY_QUOTAS="*=0/month",
    )
    r = run(proxy, SDXL, as_caller("bob"))
    year, month = time.gmtime()[:2]
    after = (year, month + 1) if month < 12 else (year + 1, 1)
    reset = calendar.timegm((*after, 1, 0, 0, 0))
    assert r.status_code == 429
    assert abs(int(r.headers["retry-after"]) - (reset - time.time())) <= 2


def test_the_usage_route_refuses_what_any_proxied_call_would(
    quota_proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    url = f"{quota_proxy.url}/api/fal/usage"
    with httpx.Client(trust_env=False, timeout=20) as c:
        # A page on another site cannot read a user's usage (nor spend a request of theirs).
        cross = c.get(url, headers={**as_caller("alice"), "origin": "https://evil.example"})
        assert cross.status_code == 403 and cross.json()["message"]
        drive_by = c.get(url, headers={"sec-fetch-site": "cross-site", **as_caller("alice")})
        assert drive_by.status_code == 403
        posted = c.post(url, headers=as_caller("alice"))
        assert posted.status_code == 405
        wrong = c.get(url, headers={"x-proxy-authorization": "Bearer wrong-token-000000"})
        assert wrong.status_code == 401
        head = c.head(url, headers=as_caller("alice"))
        assert head.status_code == 200 and head.content == b""
    assert fake_gateway.requests() == []  # the usage route never goes upstream
    quota_proxy.lines_of([cross, drive_by, posted, wrong, head])
    lines = [line for line in quota_proxy.request_logs() if line.get("route") == "usage"]
    assert {line["status"] for line in lines} == {403, 405, 401, 200}
    assert all("alice-token" not in str(line) for line in quota_proxy.logs())


ODD_FLUX_SPELLINGS = (
    "/fal-ai/%66lux/dev",
    "/fal-ai/fl%75x/dev",
    "/fal-ai/flux%2Fdev",
    "/fal%2Dai/flux/dev",
    "/fal-ai//flux/dev",
)


def test_odd_spellings_of_an_app_over_quota_are_refused_and_never_go_upstream(
    start_proxy, tmp_path: Path, fake_gateway: FakeGateway
) -> None:
    """The gateway decodes ``%66lux`` and merges ``//`` before fal routes the call, so each
    spelling below would run fal-ai/flux/dev; quotas match the id as written, so each is
    refused (400) before anything is sent, rather than counted only against ``*``."""
    proxy = start_proxy(
        FAL_PROXY_AUTH="token",
        FAL_PROXY_CLIENT_TOKENS_FILE=tokens_file(tmp_path),
        FAL_PROXY_QUOTAS="fal-ai/flux/*=2/day, *=100/day",
    )
    for _ in range(2):
        assert run(proxy, FLUX, as_caller("alice")).status_code == 200
    assert run(proxy, FLUX, as_caller("alice")).status_code == 429
    seen = len(fake_gateway.requests())
    assert seen == 2

    failures = []
    for spelling in ODD_FLUX_SPELLINGS:
        shapes: tuple[tuple[str, dict[str, str]], ...] = (
            (spelling, {}),  # fal.run-shaped
            ("/api/fal/proxy", {"x-fal-target-url": f"https://fal.run{spelling}"}),
            ("/api/fal/proxy", {"x-fal-target-url": f"https://queue.fal.run{spelling}"}),
            (
                "/api/fal/proxy",
                {"x-fal-target-url": f"https://queue.fal.run{spelling}/requests/r1/status"},
            ),
        )
        for path, extra in shapes:
            response = run(proxy, path, {**as_caller("alice"), **extra})
            where = f"{path} {extra}: {response.status_code} {response.text[:200]}"
            if response.status_code != 400:
                failures.append(f"not refused: {where}")
                continue
            body = response.json()
            if body.get("message") != "invalid path" or "written plainly" not in body.get(
                "detail", ""
            ):
                failures.append(f"unclear refusal: {where}")
    assert not failures, "\n".join(failures)
    assert len(fake_gateway.requests()) == seen  # nothing new reached the gateway
    assert generations_upstream(fake_gateway, FLUX) == 2
    # Still over quota: the refused spellings neither slipped through nor reset anything.
    assert run(proxy, FLUX, as_caller("alice")).status_code == 429
    assert run(proxy, SDXL, as_caller("alice")).status_code == 200
