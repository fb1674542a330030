"""The dashboard's rings and snapshots (proxy/dashboard/feed.py) on a fake clock: rates from
counter differences, percentiles from bucket differences, the hour's per-app figures, and
memory that stays bounded however long it runs and however many callers are refused."""

from __future__ import annotations

import base64
import json

import pytest

from proxy.dashboard.feed import (
    BOUNDS,
    COARSE_POINTS,
    Feed,
    Keys,
    NearLimits,
    Viewer,
    quantile,
)
from proxy.dashboard.routes import credential
from proxy.errors import BudgetExceeded, QuotaExceeded, RateLimited
from proxy.limits import QuotaNear
from proxy.limits.quotas import Quota
from proxy.observe.metrics import Metrics
from proxy.policy.metadata import CallerTags


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def feed(clock: Clock, *, show_ids: bool = False) -> tuple[Feed, Metrics, NearLimits]:
    metrics = Metrics()
    near = NearLimits(CallerTags("hash", b"k" * 32), clock=clock)
    return (
        Feed(metrics, near, show_ids=show_ids, breaker=False, workers=1, clock=clock),
        metrics,
        near,
    )


def call(metrics: Metrics, status: int = 200, seconds: float = 0.2, error: str | None = None,
         app: str = "fal-ai/fast-sdxl") -> None:  # fmt: skip
    metrics.observe("run", status, app, seconds, None, 10, 10, error)


def quota_refusal(limit: int = 3) -> QuotaExceeded:
    return QuotaExceeded(apps="*", limit=limit, period="day", described=f"{limit} per day",
                         resets_at="2027-01-01T00:00:00Z", retry_after=5)  # fmt: skip


def test_quantile_interpolates_inside_a_bucket_as_prometheus_does() -> None:
    counts = [0.0] * len(BOUNDS)
    i = BOUNDS.index(0.25)
    for j in range(i, len(BOUNDS)):
        counts[j] = 100.0  # 100 observations in (0.1, 0.25]
    assert quantile(0.5, counts) == pytest.approx(0.175)
    assert quantile(0.99, counts) == pytest.approx(0.1 + 0.15 * 0.99)
    assert quantile(0.5, [0.0] * len(BOUNDS)) is None
    top = [0.0] * (len(BOUNDS) - 1) + [4.0]  # only in +Inf: the last finite bound
    assert quantile(0.99, top) == BOUNDS[-2]


def test_rates_percentiles_and_the_hour_come_from_counter_differences() -> None:
    clock = Clock()
    dash, metrics, _ = feed(clock)
    dash.sample(clock.t, live=False)
    for _ in range(20):
        call(metrics)
        metrics.observe_generation("fal-ai/fast-sdxl")
        metrics.observe_units("fal-ai/fast-sdxl", 1.0, 10_000)
    for _ in range(5):
        call(metrics, status=429, seconds=0.001, error="quota_exceeded", app="none")
    clock.t += 10
    current = dash.sample(clock.t, live=True)
    live = dash.live(clock.t, current)
    assert live["now"]["rps"] == pytest.approx(2.5)  # 25 requests in 10 s
    assert live["now"]["error_pct"] == pytest.approx(20.0)
    assert 100 < live["now"]["p99_ms"] <= 250
    assert live["totals"]["requests"] == 25
    assert live["totals"]["refusals"] == {"quota_exceeded": 5}
    assert live["hour"]["generations"] == {"fal-ai/fast-sdxl": 20}
    assert live["hour"]["billable_units"] == {"fal-ai/fast-sdxl": 20}
    assert live["hour"]["spend_usd"] == {"fal-ai/fast-sdxl": pytest.approx(0.2)}
    assert live["hour"]["full"] is False
    series = dash.series()
    assert series["rps"] == [pytest.approx(2.5)] and series["refusals"]["quota_exceeded"] == [5]
    # Quiet for a while: the rate falls to 0, the totals stay.
    for _ in range(3):
        clock.t += 10
        current = dash.sample(clock.t, live=True)
    live = dash.live(clock.t, current)
    assert live["now"]["rps"] == 0 and live["totals"]["requests"] == 25


def test_the_proxys_own_work_has_its_percentiles_beside_the_whole_calls() -> None:
    clock = Clock()
    dash, metrics, _ = feed(clock)
    dash.sample(clock.t, live=False)
    for _ in range(99):
        metrics.observe_overhead("run", 0.002)  # in (0, 0.005]
    metrics.observe_overhead("queue", 0.3)  # in (0.25, 0.5]
    metrics.observe_overhead("run", -0.001)  # a clock's rounding: counted as 0
    clock.t += 10
    current = dash.sample(clock.t, live=True)
    now = dash.live(clock.t, current)["now"]
    # 101 observations over both routes, 100 of them in (0, 5 ms]: interpolated there.
    assert now["overhead_p50_ms"] == pytest.approx(5 * 50.5 / 100)
    assert now["overhead_p99_ms"] == pytest.approx(5 * 99.99 / 100, abs=1e-3)
    assert now["p50_ms"] is None  # nothing else observed: the figures are apart
    series = dash.series()
    assert series["overhead_p50_ms"] == [now["overhead_p50_ms"]]
    assert series["overhead_p99_ms"] == [now["overhead_p99_ms"]]
    buckets = {s.labels["le"]: s.value for s in next(iter(metrics.overhead.collect())).samples
               if s.name.endswith("_bucket") and s.labels["route"] == "run"}  # fmt: skip
    assert buckets["0.005"] == 100  # the negative one clamped to 0


def test_the_hour_forgets_what_is_older_than_an_hour_and_memory_is_bounded() -> None:
    clock = Clock()
    dash, metrics, _ = feed(clock)
    dash.sample(clock.t, live=False)
    for _ in range(7):
        metrics.observe_generation("fal-ai/old")
    for _ in range(2 * COARSE_POINTS):  # two hours at 10 s
        clock.t += 10
        dash.sample(clock.t, live=True)
    metrics.observe_generation("fal-ai/new")
    clock.t += 10
    current = dash.sample(clock.t, live=True)
    live = dash.live(clock.t, current)
    assert live["hour"]["full"] is True
    assert live["hour"]["generations"] == {"fal-ai/old": 0, "fal-ai/new": 1}
    assert live["totals"]["generations"] == {"fal-ai/old": 7, "fal-ai/new": 1}
    assert len(dash.coarse) == COARSE_POINTS and len(dash.fine) <= 61
    assert len(dash.series()["t"]) == COARSE_POINTS - 1


def test_keys_are_capped() -> None:
    keys = Keys(limit=3)
    packed = keys.pack({"a": 1, "b": 2, "c": 3, "d": 4})
    assert list(packed) == [1, 2, 3] and keys.dropped == 1 and keys.names == ["a", "b", "c"]
    assert list(keys.pack({"a": 5})) == [5, 0, 0]


def test_near_limits_keeps_the_latest_pairs_by_tag_and_ids_only_for_an_admin() -> None:
    clock = Clock()
    near = NearLimits(CallerTags("hash", b"k" * 32), size=50, clock=clock)
    for i in range(500):  # many callers: still 50 entries
        near.refused(f"caller-{i}", quota_refusal())
    assert len(near.entries) == 50
    near.refused("caller-499", quota_refusal())
    rows = near.rows(ids=False)
    assert rows[0]["refused"] == 2 and rows[0]["limit"] == "*=3/day"
    assert "caller" not in rows[0] and len(rows[0]["tag"]) == 24
    assert "caller-499" not in json.dumps(rows)
    assert near.rows(ids=True)[0]["caller"] == "caller-499"
    budget = BudgetExceeded(apps="*", period="day", described="$0.03 per day", limit_usd=0.03,
                            spent_usd=0.03, spent="$0.03", estimate=None,
                            resets_at="2027-01-01T00:00:00Z", retry_after=5)  # fmt: skip
    near.refused("spender", budget)
    top = near.rows(ids=True)[0]
    assert (top["kind"], top["limit"], top["used"], top["of"]) == ("budget", "*=$0.03/day",
                                                                   0.03, 0.03)  # fmt: skip
    near.refused("x", RateLimited("rate limit exceeded"))  # not a quota's: ignored
    assert near.rows(ids=True)[0]["caller"] == "spender"


def test_near_reports_and_refusals_share_a_row_near_then_over() -> None:
    clock = Clock()
    near = NearLimits(CallerTags("hash", b"k" * 32), clock=clock)
    near.report("alice", QuotaNear(Quota("*", 3, "day"), 3))  # admitted: 3 of 3 used
    (row,) = near.rows(ids=True)
    assert (row["state"], row["limit"], row["used"], row["of"], row["refused"]) == (
        "near", "*=3/day", 3.0, 3.0, 0)  # fmt: skip
    clock.t += 5
    near.refused("alice", quota_refusal(3))  # the next call: refused, the same row
    (row,) = near.rows(ids=True)
    assert (row["state"], row["refused"], row["at"]) == ("over", 1, clock.t)
    near.report("alice", QuotaNear(Quota("*", 3, "day"), 3))  # a new period, say
    assert near.rows(ids=True)[0]["state"] == "near" and near.rows(ids=True)[0]["refused"] == 1
    # A budget: micro-dollars shown as dollars, named as its refusal names it.
    budget = Quota("*", 30_000, "day", money=True)
    near.report("spender", QuotaNear(budget, 25_000))
    top = near.rows(ids=False)[0]
    assert (top["kind"], top["limit"], top["used"], top["of"], top["state"]) == (
        "budget", "*=$0.03/day", 0.025, 0.03, "near")  # fmt: skip
    near.refused("spender", BudgetExceeded(
        apps="*", period="day", described="$0.03 per day", limit_usd=0.03, spent_usd=0.029,
        spent="$0.029", estimate="$0.002", resets_at="2027-01-01T00:00:00Z", retry_after=5,
    ))  # fmt: skip
    assert len(near.entries) == 2 and near.rows(ids=False)[0]["state"] == "over"
    big = Quota("*", 1_000_000, "month")
    near.report("bob", QuotaNear(big, 800_000))
    near.refused("bob", QuotaExceeded(apps="*", limit=1_000_000, period="month",
                                      described="1000000 per month",
                                      resets_at="2027-01-01T00:00:00Z", retry_after=5))  # fmt: skip
    assert near.rows(ids=True)[0]["limit"] == "*=1000000/month" and len(near.entries) == 3


def test_a_page_gets_the_series_once_per_new_point_and_a_slow_page_skips() -> None:
    clock = Clock()
    dash, _, _ = feed(clock)
    dash.sample(clock.t, live=False)
    viewer = Viewer()
    first = json.loads(dash.message(clock.t, dash.sample(clock.t, live=True), viewer))
    assert "series" in first
    clock.t += 1
    again = json.loads(dash.message(clock.t, dash.sample(clock.t, live=True), viewer))
    assert "series" not in again
    for i in range(5):
        viewer.put(str(i))
    assert viewer.queue.qsize() == 2 and viewer.queue.get_nowait() == "3"


def test_credentials_bearer_and_basic_with_any_user() -> None:
    assert credential(b"Bearer tok-123") == b"tok-123"
    assert credential(b"basic " + base64.b64encode(b"anyone:tok:123")) == b"tok:123"
    assert credential(b"Basic not-base64!") == b""
    assert credential(b"Digest x") == b""
    assert credential(b"Bearer " + b"a" * 5000) == b""
