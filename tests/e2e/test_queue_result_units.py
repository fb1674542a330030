"""fal's ``x-fal-billable-units`` on a queue result is the cost of one generation: a client
that fetches the result twice has not spent twice, in its usage or in the metrics
(docs/quotas-and-usage.md, "Reading usage"). Across replicas sharing Redis:
tests/e2e/test_limits_redis_batches.py::test_a_fal_requests_units_count_once_across_replicas."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import FakeGateway, RunningProxy, launch_proxy
from tests.redis_support import free_port

TOKEN = "units-token-0123456789"
DEADLINE = 15.0
METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def units_proxy(
    fake_gateway: FakeGateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningProxy]:
    tokens = tmp_path_factory.mktemp("units") / "tokens"
    tokens.write_text(f"payer {TOKEN}\n", encoding="utf-8")
    proxy = launch_proxy(
        fake_gateway.gateway_url,
        FAL_PROXY_AUTH="token",
        FAL_PROXY_CLIENT_TOKENS_FILE=str(tokens),
        FAL_PROXY_METRICS_PORT=str(METRICS_PORT),
    )
    yield proxy
    proxy.process.stop()


def test_a_queue_result_fetched_twice_is_billed_once(units_proxy: RunningProxy) -> None:
    caller = {"x-proxy-authorization": f"Bearer {TOKEN}"}

    def sdk(method: str, target: str, **kwargs: object) -> httpx.Response:
        return c.request(method, "/api/fal/proxy", headers={**caller, "x-fal-target-url": target},
                         **kwargs)  # type: ignore[arg-type]  # fmt: skip

    with httpx.Client(base_url=units_proxy.url, trust_env=False, timeout=10) as c:
        submit = sdk("POST", "https://queue.fal.run/fal-ai/fast-sdxl", json={"prompt": "a cat"})
        assert submit.status_code == 200, submit.text
        job = submit.json()
        deadline = time.monotonic() + DEADLINE
        while sdk("GET", job["status_url"]).json()["status"] != "COMPLETED":
            assert time.monotonic() < deadline, "the emulated job never completed"
            time.sleep(0.02)  # poll interval: the job's completion is what is waited for
        first, again = sdk("GET", job["response_url"]), sdk("GET", job["response_url"])
        assert first.status_code == again.status_code == 200
        units = float(first.headers["x-fal-billable-units"])
        assert units > 0 and again.headers["x-fal-billable-units"] == first.headers[
            "x-fal-billable-units"]  # fmt: skip
        for response in (first, again):  # units are recorded once each answer is through
            units_proxy.wait_for_request_log(response.headers["x-proxy-request-id"])
        usage = c.get("/api/fal/usage", headers=caller).json()["usage"]["apps"]
    # No FAL_PROXY_PRICES_FILE: units, and no spend.
    assert usage == {"fal-ai/fast-sdxl": {"generations": 1, "billable_units": units,
                                          "spend_usd": 0.0}}  # fmt: skip
    metrics = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", trust_env=False).text
    assert f'fal_proxy_billable_units_total{{app="fal-ai/fast-sdxl"}} {units}' in metrics
