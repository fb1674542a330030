"""Budgets in dollars end to end: through the running proxy, in memory and in Redis.

A budget (``*=$0.03/day``) counts spend: fal's billable units (the emulator answers one per
image) × the app's price (``FAL_PROXY_PRICES_FILE``). A call reserves its estimate when it is
admitted and settles ``cost - estimate`` when fal's units arrive (a queue submit's
reservation waits for its result), so a caller can exceed a budget only by what calls in
flight cost beyond their estimates (proxy/limits/spend.py).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FakeGateway, RunningProxy, token_callers
from tests.redis_support import RedisServer, free_port

SDXL = "/fal-ai/fast-sdxl"
FLUX = "fal-ai/flux/dev"
TOKENS = {"spender": "spender-token-0123456789", "other": "other-token-0123456789ab"}
DEADLINE = 15.0

pytestmark = pytest.mark.usefixtures("clear_of_window_edges")


def as_caller(caller: str) -> dict[str, str]:
    return {"x-proxy-authorization": f"Bearer {TOKENS[caller]}"}


def prices_file(tmp_path: Path, text: str = '[prices]\n"*" = 0.01\n') -> str:
    path = tmp_path / "prices.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def budget_env(tmp_path: Path, quotas: str, **extra: str) -> dict[str, str]:
    return {
        **token_callers(tmp_path, TOKENS),
        "FAL_PROXY_QUOTAS": quotas,
        "FAL_PROXY_PRICES_FILE": prices_file(tmp_path),
        **extra,
    }


def run(proxy: RunningProxy, caller: str, images: int = 1) -> httpx.Response:
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=20) as c:
        return c.post(SDXL, json={"prompt": "a lighthouse", "num_images": images},
                      headers=as_caller(caller))  # fmt: skip


def usage(proxy: RunningProxy, caller: str) -> dict[str, Any]:
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=20) as c:
        answer = c.get("/api/fal/usage", headers=as_caller(caller))
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def settled(proxy: RunningProxy, caller: str, spent: float) -> dict[str, Any]:
    """The caller's usage once its budget shows ``spent`` (settlements are owed to Redis
    for up to 20 ms; in memory they are there when the answer's log line is)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        report = usage(proxy, caller)
        if report["budgets"][0]["spent_usd"] == pytest.approx(spent):
            return report
        assert time.monotonic() < deadline, report
        time.sleep(0.02)  # what is waited for is Redis having the settlement


def test_a_budget_of_three_cents_refuses_the_fourth_one_cent_call(
    start_proxy, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    metrics_port = free_port()
    proxy = start_proxy(**budget_env(tmp_path, "*=$0.03/day",
                                     FAL_PROXY_METRICS_PORT=str(metrics_port)))  # fmt: skip
    for _ in range(3):
        answer = run(proxy, "spender")
        assert answer.status_code == 200, answer.text
        line = proxy.wait_for_request_log(answer.headers["x-proxy-request-id"])
        assert (line["billable_units"], line["cost_usd"]) == (1.0, 0.01)
    refused = run(proxy, "spender")
    assert refused.status_code == 429, refused.text
    body = refused.json()
    assert body["message"] == "budget exceeded"
    assert body["budget"]["limit_usd"] == 0.03 and body["budget"]["spent_usd"] == 0.03
    assert body["budget"]["period"] == "day" and body["budget"]["apps"] == "*"
    assert "$0.03 per day: $0.03 spent" in body["detail"] and "resets at" in body["detail"]
    assert 0 < int(refused.headers["retry-after"]) <= 86400
    line = proxy.wait_for_request_log(refused.headers["x-proxy-request-id"])
    assert line["error"] == "budget_exceeded"
    assert sum(1 for r in fake_gateway.requests() if r["path"].endswith(SDXL)) == 3
    # Another caller has a budget of their own.
    assert run(proxy, "other").status_code == 200
    report = usage(proxy, "spender")
    assert report["budgets"] == [{
        "budget": "*=$0.03/day", "apps": "*", "period": "day", "limit_usd": 0.03,
        "spent_usd": 0.03, "remaining_usd": 0.0, "resets_at": body["budget"]["resets_at"],
    }]  # fmt: skip
    assert report["usage"]["spend_usd"] == 0.03
    assert report["usage"]["apps"]["fal-ai/fast-sdxl"] == {
        "generations": 3, "billable_units": 3.0, "spend_usd": 0.03}  # fmt: skip
    metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", trust_env=False).text
    assert 'fal_proxy_spend_usd_total{app="fal-ai/fast-sdxl"} 0.04' in metrics  # both callers
    assert "spender" not in metrics


def test_a_call_that_costs_more_than_its_estimate_settles_the_difference(
    start_proxy, tmp_path: Path
) -> None:
    proxy = start_proxy(**budget_env(tmp_path, "*=$0.05/day"))
    four = run(proxy, "spender", images=4)  # estimated at one unit, costs four
    assert four.status_code == 200
    proxy.wait_for_request_log(four.headers["x-proxy-request-id"])
    assert usage(proxy, "spender")["budgets"][0]["spent_usd"] == 0.04
    # The endpoint's last cost (4 units) is its estimate now: $0.04 does not fit in $0.01.
    refused = run(proxy, "spender")
    assert refused.status_code == 429
    assert "this call is estimated at $0.04" in refused.json()["detail"]


def test_a_failed_call_gives_its_estimate_back(
    start_proxy, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    proxy = start_proxy(**budget_env(tmp_path, "*=$0.01/day"))
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=20) as c:
        failed = c.post(SDXL, json={"prompt": 7}, headers=as_caller("spender"))  # 422 at fal
    assert failed.status_code == 422
    proxy.wait_for_request_log(failed.headers["x-proxy-request-id"])
    assert usage(proxy, "spender")["budgets"][0]["spent_usd"] == 0.0
    assert run(proxy, "spender").status_code == 200  # the cent is still there


def test_an_app_with_no_price_counts_units_only_and_is_said_at_start_up(
    start_proxy, tmp_path: Path
) -> None:
    env = budget_env(tmp_path, "*=$0.01/day")
    env["FAL_PROXY_PRICES_FILE"] = prices_file(tmp_path, '[prices]\n"fal-ai/flux/*" = 0.01\n')
    proxy = start_proxy(**env)
    warning = proxy.process.wait_for_json(lambda j: j.get("event") == "budget_unpriced_apps")
    assert warning["budget"] == "*=$0.01/day" and "FAL_PROXY_PRICES_FILE" in warning["note"]
    for _ in range(2):  # fast-sdxl has no price: no spend, never refused by the budget
        assert run(proxy, "spender").status_code == 200
    report = usage(proxy, "spender")
    assert report["budgets"][0]["spent_usd"] == 0.0
    assert report["usage"]["apps"]["fal-ai/fast-sdxl"]["billable_units"] == 2.0


def _queue_burst(proxies: list[RunningProxy], fake_gateway: FakeGateway, calls: int,
                 images: int) -> tuple[list[httpx.Response], list[httpx.Response]]:  # fmt: skip
    """``calls`` queue submits at once (spread over ``proxies``) while the emulator holds
    every job: all are in flight together. Then the jobs are released and each admitted
    one's result fetched, which brings its units."""
    headers = {**as_caller("spender"), "x-fal-target-url": f"https://queue.fal.run/{FLUX}"}
    assert fake_gateway.client.post("/_emulator/queue/hold").json() == {"holding": True}

    def submit(n: int) -> httpx.Response:
        with httpx.Client(base_url=proxies[n % len(proxies)].url, trust_env=False,
                          timeout=20) as c:  # fmt: skip
            return c.post("/api/fal/proxy", headers=headers,
                          json={"prompt": f"call {n}", "num_images": images})  # fmt: skip

    with ThreadPoolExecutor(calls) as pool:
        answers = list(pool.map(submit, range(calls)))
    fake_gateway.client.delete("/_emulator/queue/hold")
    for _ in range(2):  # held jobs stop in the queue, then in progress
        fake_gateway.client.post("/_emulator/queue/release")
    results = []
    for n, answer in enumerate(answers):
        if answer.status_code != 200:
            continue
        job = answer.json()
        with httpx.Client(base_url=proxies[n % len(proxies)].url, trust_env=False,
                          timeout=20) as c:  # fmt: skip

            def fetch(url: str) -> httpx.Response:
                return c.get("/api/fal/proxy", headers={**headers, "x-fal-target-url": url})

            deadline = time.monotonic() + DEADLINE
            while (status := fetch(job["status_url"])).json().get("status") != "COMPLETED":
                assert status.status_code == 200 and time.monotonic() < deadline, status.text
                time.sleep(0.02)  # the released job's completion is what is waited for
            results.append(fetch(job["response_url"]))
    return answers, results


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_fifty_concurrent_calls_overshoot_by_at_most_their_estimates_errors(
    start_proxy, fake_gateway: FakeGateway, redis_server: RedisServer, tmp_path: Path,
    store: str,
) -> None:  # fmt: skip
    """$0.10 at $0.01/unit; 50 queue submits at once, each estimated at one unit (the
    endpoint's first call) but costing three (three images). Admission keeps the estimates
    within the budget: exactly 10 are admitted, and the spend ends at 10 × $0.03: the
    overshoot ($0.20) is the sum of cost - estimate over the calls in flight, the bound."""
    extra = {"FAL_PROXY_CONCURRENT": "0", "FAL_PROXY_RATE_LIMIT_RPM": "0"}
    if store == "redis":
        extra["FAL_PROXY_REDIS_URL"] = redis_server.url
    env = budget_env(tmp_path, "*=$0.10/day", **extra)
    proxies = [start_proxy(**env)] + ([start_proxy(**env)] if store == "redis" else [])
    answers, results = _queue_burst(proxies, fake_gateway, 50, images=3)
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 10 + [429] * 40, statuses
    assert all(r.status_code == 200 and r.headers["x-fal-billable-units"] == "3" for r in results)
    for proxy in proxies:
        report = settled(proxy, "spender", 0.30)
        assert report["usage"]["apps"]["fal-ai/flux"]["spend_usd"] == pytest.approx(0.30)
    budget = report["budgets"][0]
    overshoot = budget["spent_usd"] - budget["limit_usd"]
    assert overshoot == pytest.approx(10 * (0.03 - 0.01))  # Σ (cost - estimate), no more
    assert run(proxies[0], "spender").status_code == 429
