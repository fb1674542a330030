"""The usage routes (docs/quotas-and-usage.md, "Reading usage"): the operator's
``/usage/<caller>?plan=`` on the metrics port, and a caller's own route, moved by
``FAL_PROXY_USAGE_ROUTE`` and counted as a request of the minute
(``FAL_PROXY_RATE_LIMIT_RPM``). One proxy for the whole module; each test its own callers,
so the per-caller counts of one test never reach another's."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import FakeGateway, RunningProxy, launch_proxy, token_callers
from tests.redis_support import free_port

TOKENS = {
    "alice": "alice-token-0123456789",
    "bob": "bob-token-0123456789ab",
    "carol": "carol-token-0123456789",
    "dave": "dave-token-0123456789a",
}
RPM = 3
MOVED = "/my/usage"

pytestmark = pytest.mark.usefixtures("clear_of_window_edges")


def as_caller(caller: str) -> dict[str, str]:
    return {"x-proxy-authorization": f"Bearer {TOKENS[caller]}"}


@pytest.fixture(scope="module")
def usage_proxy(
    fake_gateway: FakeGateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningProxy, int]]:
    """(the proxy, its metrics port)."""
    folder = tmp_path_factory.mktemp("usage")
    plans = folder / "plans.toml"
    plans.write_text(
        '[plans]\nfree = "*=1/day"\npro = "*=5/day"\n\n[callers]\n"carol" = "free"\n',
        encoding="utf-8",
    )
    metrics_port = free_port()
    proxy = launch_proxy(
        fake_gateway.gateway_url,
        **token_callers(folder, TOKENS),
        FAL_PROXY_PLANS_FILE=str(plans),
        FAL_PROXY_QUOTAS="*=2/day",
        FAL_PROXY_RATE_LIMIT_RPM=str(RPM),
        FAL_PROXY_USAGE_ROUTE=MOVED,
        FAL_PROXY_METRICS_PORT=str(metrics_port),
    )
    yield proxy, metrics_port
    proxy.process.stop()


def quotas(report: dict[str, object]) -> list[tuple[str, int, int]]:
    return [(q["quota"], q["used"], q["remaining"]) for q in report["quotas"]]  # type: ignore[attr-defined]


def test_the_operator_reads_a_callers_usage_under_the_plan_named_by_plan(
    usage_proxy: tuple[RunningProxy, int],
) -> None:
    proxy, metrics_port = usage_proxy
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:
        assert c.post("/fal-ai/fast-sdxl", json={"prompt": "a cat"},
                      headers=as_caller("alice")).status_code == 200  # fmt: skip
    with httpx.Client(
        base_url=f"http://127.0.0.1:{metrics_port}", trust_env=False, timeout=10
    ) as admin:
        default = admin.get("/usage/alice").json()
        assert (default["caller"], default["plan"]) == ("alice", "default")
        assert quotas(default) == [("*=2/day", 1, 1)]
        # The plan a JWT claim would give: its quotas, with what the caller used.
        pro = admin.get("/usage/alice", params={"plan": "pro"}).json()
        assert (pro["caller"], pro["plan"]) == ("alice", "pro")
        assert quotas(pro) == [("*=5/day", 1, 4)]
        assert pro["usage"]["apps"] == default["usage"]["apps"]
        # A plan the file does not define: the default quotas, as for a claim.
        assert quotas(admin.get("/usage/alice", params={"plan": "gold"}).json()) == [
            ("*=2/day", 1, 1)
        ]
        # The file's [callers] entry wins over the plan asked for, as over a claim.
        carol = admin.get("/usage/carol", params={"plan": "pro"}).json()
        assert (carol["plan"], quotas(carol)) == ("free", [("*=1/day", 0, 1)])


def test_the_callers_own_usage_route_is_moved_and_counts_as_a_request_of_the_minute(
    usage_proxy: tuple[RunningProxy, int], fake_gateway: FakeGateway
) -> None:
    proxy, _ = usage_proxy
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:
        for _ in range(RPM):
            own = c.get(MOVED, headers=as_caller("bob"))
            assert own.status_code == 200 and own.json()["plan"] == "default"
        assert fake_gateway.requests() == []  # answered by the proxy itself
        # Each read was a request of the minute: the minute is used up, for reads and calls.
        over = c.get(MOVED, headers=as_caller("bob"))
        assert over.status_code == 429 and "retry-after" in over.headers
        assert c.post("/fal-ai/fast-sdxl", json={}, headers=as_caller("bob")).status_code == 429
        assert fake_gateway.requests() == []
        # The default path is no longer the usage route: an ordinary fal.run-shaped call.
        c.get("/api/fal/usage", headers=as_caller("dave"))
        (forwarded,) = fake_gateway.requests()
        assert forwarded["path"].endswith("/api/fal/usage")
