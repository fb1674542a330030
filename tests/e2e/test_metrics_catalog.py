"""Every metric the shipped dashboard and alert rules use exists in a real proxy's /metrics.

A real proxy (limits in a real Redis, the gateway fallback on) answers a run, an SSE stream
and a WebSocket; its ``/metrics`` is scraped and each metric name read out of the PromQL of
``deploy/grafana/*.json`` and ``deploy/prometheus/alerts.yml`` must be one of its sample
names exactly (``_total``, ``_bucket``, ``_count``, ``_sum`` included): a misspelt name, or a
metric renamed in the code, fails here. The new gauges are checked for sensible values too.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from tests.conftest import FakeGateway, RunningProxy
from tests.redis_support import RedisServer

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

# PromQL words that look like identifiers and are not metrics.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan", "atan2"}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][\w:]*)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions
    (followed by ``(``), keywords, label names (inside ``{}`` or a grouping clause), range
    durations or dashboard variables."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("{}", text)
    text = _GROUPING.sub(" ", text)
    text = _RANGE.sub("[]", text)
    text = _VARIABLE.sub("1", text)
    return {name for name in _IDENT.findall(text) if name.lower() not in KEYWORDS}


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = []

    def panels(items: list[dict[str, Any]]) -> None:
        for panel in items:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            panels(panel.get("panels", []))

    panels(dashboard["panels"])
    return exprs


def used_metrics() -> dict[str, set[str]]:
    """Each metric name used, and the files using it."""
    used: dict[str, set[str]] = {}
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        names = set().union(*(metric_names(e) for e in dashboard_exprs(dashboard)))
        for variable in dashboard["templating"]["list"]:
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query or "")
            names |= set(_LABEL_VALUES.findall(text))
        for name in names:
            used.setdefault(name, set()).add(path.name)
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            for name in metric_names(rule["expr"]):
                used.setdefault(name, set()).add(f"{ALERTS.name}:{rule['alert']}")
    return used


def test_metric_names_are_read_out_of_promql_exactly() -> None:
    expr = (
        'sum by (job, le) (rate(fal_proxy_requestz_total{route=~"a|b",x="rate(y)"}[5m] offset 1h))'
        " / on (job) group_left (app) max_over_time(fal_proxy_gauge[$__rate_interval])"
        " > 1e3 and histogram_quantile(0.99, x_bucket) unless process_open_fds == bool 0"
    )
    assert metric_names(expr) == {"fal_proxy_requestz_total", "fal_proxy_gauge", "x_bucket",
                                  "process_open_fds"}  # fmt: skip
    assert metric_names("sum without (instance) (up)") == {"up"}


def test_the_dashboard_is_portable() -> None:
    assert DASHBOARDS, "no dashboard in deploy/grafana"
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        assert dashboard["schemaVersion"] >= 36
        assert "uid" not in dashboard or dashboard["uid"] in (None, "")
        (source,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
        assert source["name"] == "datasource" and source["query"] == "prometheus"
        # Every data source is the variable: no UID of the author's Grafana.
        uids = re.findall(r'"uid":\s*"([^"]*)"', path.read_text(encoding="utf-8"))
        assert uids and set(uids) == {"${datasource}"}
        titles = [p["title"] for p in dashboard["panels"]]
        assert len(titles) == len(set(titles))


def test_every_rule_says_how_long_how_bad_and_what_to_check() -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == {
        "GatewayBypassed", "HighErrorRatio", "HighP99Latency", "BudgetsOrQuotasRunningOut",
        "RedisUnreachable", "WorkersRestarting", "EventLoopLagHigh",
    }  # fmt: skip
    for rule in rules:
        assert rule["for"] and rule["labels"]["severity"] in ("warning", "critical"), rule
        assert rule["annotations"]["summary"] and "docs/" in rule["annotations"]["description"]


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``; a labelled metric with no sample yet (a counter of spend
    before any priced call) as its names with no labels and the value None."""
    text = httpx.get(f"{url}/metrics", trust_env=False, timeout=10).text
    samples: dict[Any, Any] = {}
    for family in text_string_to_metric_families(text):
        for suffix in () if family.samples else SUFFIXES[family.type]:
            samples[(family.name + suffix, ())] = None
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def poll_scrape(url: str, check: Any, what: str) -> dict[Any, float]:
    """Scrape until ``check(samples)`` holds (a timer's sample, a batch's answer), at most 10 s."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(url)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


async def _echo_over_websocket(proxy: RunningProxy) -> None:
    url = proxy.url.replace("http://", "ws://", 1) + "/emulator/echo/realtime"
    async with connect(url, proxy=None, open_timeout=10, close_timeout=5) as ws:
        await ws.send(json.dumps({"prompt": "dog"}))
        assert "dog" in await asyncio.wait_for(ws.recv(), 10)


def test_every_metric_the_dashboard_and_alerts_use_is_in_metrics(
    start_proxy, own_redis: RedisServer, fake_gateway: FakeGateway
) -> None:
    used = used_metrics()
    assert {"fal_proxy_requests_total", "process_open_fds"} <= used.keys()
    proxy = start_proxy(
        FAL_PROXY_REDIS_URL=own_redis.url,
        FAL_PROXY_RATE_LIMIT_RPM="1000",
        FAL_PROXY_FALLBACK="direct",
    )
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:
        run = c.post("/emulator/echo", json={"prompt": "hi"})
        assert run.status_code == 200
        refused = c.post("/api/fal/proxy", headers={"x-fal-target-url": "https://evil.example/"})
        assert refused.status_code == 403
        with c.stream(
            "POST", "/api/fal/proxy", json={"prompt": "hi"},
            headers={"x-fal-target-url": "https://fal.run/emulator/sse/stream?n=1",
                     "accept": "text/event-stream"},
        ) as stream:  # fmt: skip
            assert stream.headers["content-type"] == "text/event-stream"
            assert "done" in stream.read().decode()
            streamed = stream
    # Each call's gauges and histograms are moved before its log line is written.
    proxy.lines_of([run, refused, streamed])
    asyncio.run(asyncio.wait_for(_echo_over_websocket(proxy), 30))
    proxy.process.wait_for_json(lambda r: r.get("event") == "websocket", timeout=10)

    def ready(samples: dict[Any, float]) -> bool:  # a lag timer ran; a Redis batch answered
        return (
            samples.get(("fal_proxy_event_loop_lag_seconds_count", ()), 0) > 0
            and samples.get(("fal_proxy_redis_script_seconds_count", ()), 0) > 0
        )

    samples = poll_scrape(proxy.url, ready, "the lag timer and a Redis batch")
    names = {name for name, _ in samples}
    missing = {name: files for name, files in used.items() if name not in names}
    assert not missing, f"used by the dashboard or alerts, not in /metrics: {missing}"

    # The new metrics, after a run, a stream and a socket, all ended.
    assert value(samples, "fal_proxy_open_streams", route="stream") == 0
    assert value(samples, "fal_proxy_open_streams", route="queue") == 0
    assert value(samples, "fal_proxy_open_websockets") == 0
    assert value(samples, "fal_proxy_upstream_duration_seconds_count", route="run") == 1
    assert value(samples, "fal_proxy_upstream_duration_seconds_count", route="stream") == 1
    assert 0 <= value(samples, "fal_proxy_event_loop_lag_last_seconds") < 1
    assert value(samples, "fal_proxy_breaker_state") == 0
    assert value(samples, "fal_proxy_breaker_last_change_timestamp_seconds") == 0
    assert value(samples, "fal_proxy_breaker_transitions_total", state="open") == 0
    assert value(samples, "fal_proxy_redis_errors_total") == 0
    assert value(samples, "fal_proxy_refusals_total", reason="target_refused") == 1
    assert value(samples, "fal_proxy_worker_restarts_total") == 0
    assert value(samples, "fal_proxy_workers") == 1
    assert value(samples, "process_open_fds") > 0
    assert value(samples, "process_resident_memory_bytes") > 10 * 1024 * 1024
    assert value(samples, "process_start_time_seconds") > time.time() - 600
    pool = value(samples, "fal_proxy_upstream_connections", state="idle") + value(
        samples, "fal_proxy_upstream_connections", state="in_use"
    )
    assert pool >= 1  # the run's and the stream's kept-alive connections to the gateway


def test_every_worker_reports_the_supervisors_restarts(fake_gateway: FakeGateway) -> None:
    from tests.e2e.test_workers import exited, running_workers, wait_until

    def scrapes(url: str, count: int) -> list[dict[Any, float]]:
        # A new connection each: the kernel spreads them over the workers.
        return [scrape(url) for _ in range(count)]

    with running_workers(fake_gateway) as workers:
        original = set(workers.listening_pids())
        for samples in scrapes(workers.url, 4):
            assert value(samples, "fal_proxy_worker_restarts_total") == 0
            assert value(samples, "fal_proxy_workers") == 2
        victim = min(original)
        os.kill(victim, signal.SIGKILL)  # as the OOM killer does
        wait_until(lambda: exited(victim), 5, "the worker to die")
        [replacement] = [p for p in workers.wait_for_listening(3) if p not in original]
        answers = scrapes(workers.url, 20)
        # The survivor (started before the restart) and the replacement both say 1.
        assert {value(s, "fal_proxy_worker_restarts_total") for s in answers} == {1}
        assert len({value(s, "process_start_time_seconds") for s in answers}) == 2
        assert replacement != victim
