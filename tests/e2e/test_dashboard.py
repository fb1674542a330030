"""The live dashboard on the operator's port (docs/dashboard.md), through a real proxy.

A known workload against the emulator (runs, a queue submit and its result, an SSE stream,
calls until a quota refuses one, another caller's calls up to 80 % of it, with prices and a
budget so spend shows), then:

* HTTP: ``/dashboard`` with its CSP, its static files, ``/dashboard/events`` streaming JSON
  snapshots (the first at once); with ``FAL_PROXY_ADMIN_TOKEN``: 401 + ``WWW-Authenticate:
  Basic`` without it, 200 with Basic (any user) and with Bearer; never on the public port.
* Chromium (``tests/sdk/dashboard.mjs``): the page, once it shows the workload, has the
  figures of a ``/metrics`` scrape and ``/usage/<caller>`` made at the same moment (the
  latency percentiles, the proxy's own work's included, as ``histogram_quantile`` gives
  them from the scrape's buckets); the caller at 80 % of the quota shown "near", the refused
  one "over"; no console error, no CSP violation; a full-page screenshot (copied to
  /tmp/dashboard-screenshots/).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.browser_support import require_browser_tools
from tests.conftest import ROOT, RunningProxy, token_callers
from tests.redis_support import free_port

SDXL = "/fal-ai/fast-sdxl"
ADMIN_TOKEN = "admin-SENTINEL-dash-8c1f2e7a"
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}
SCRIPT = ROOT / "tests" / "sdk" / "dashboard.mjs"
SCREENSHOTS = Path("/tmp/dashboard-screenshots")
DEADLINE = 15.0

pytestmark = pytest.mark.usefixtures("clear_of_window_edges")


def start(start_proxy: Any, tmp_path: Path, *, admin: bool) -> tuple[RunningProxy, str]:
    prices = tmp_path / "prices.toml"
    prices.write_text('[prices]\n"*" = 0.01\n', encoding="utf-8")
    port = free_port()
    env = {
        **token_callers(tmp_path, TOKENS),
        "FAL_PROXY_METRICS_PORT": str(port),
        "FAL_PROXY_QUOTAS": "*=5/day, *=$1/day",
        "FAL_PROXY_PRICES_FILE": str(prices),
    }
    if admin:
        env["FAL_PROXY_ADMIN_TOKEN"] = ADMIN_TOKEN
    return start_proxy(**env), f"http://127.0.0.1:{port}"


def as_caller(name: str, **extra: str) -> dict[str, str]:
    return {"x-proxy-authorization": f"Bearer {TOKENS[name]}", **extra}


def workload(proxy: RunningProxy) -> None:
    """Runs, a queue submit and its result, a stream, then runs until the quota (5 a day)
    refuses one of alice's; bob's 4 runs leave him at 80 % of it (near), not refused."""
    answers = []
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=DEADLINE) as c:

        def sdk(method: str, target: str, **kw: Any) -> httpx.Response:
            return c.request(method, "/api/fal/proxy", headers=as_caller(
                "alice", **{"x-fal-target-url": target}), **kw)  # fmt: skip

        answers.append(c.post(SDXL, json={"prompt": "a"}, headers=as_caller("alice")))
        for _ in range(4):
            bob = c.post(SDXL, json={"prompt": "b"}, headers=as_caller("bob"))
            assert bob.status_code == 200, bob.text
            answers.append(bob)
        submit = sdk("POST", "https://queue.fal.run/fal-ai/fast-sdxl", json={"prompt": "c"})
        assert submit.status_code == 200, submit.text
        job = submit.json()
        deadline = time.monotonic() + DEADLINE
        while sdk("GET", job["status_url"]).json()["status"] != "COMPLETED":
            assert time.monotonic() < deadline, "the emulated job never completed"
            time.sleep(0.02)  # poll interval: the job's completion is what is waited for
        answers += [submit, sdk("GET", job["response_url"])]
        with c.stream("POST", "/api/fal/proxy", json={"prompt": "d"}, headers=as_caller(
            "alice", **{"x-fal-target-url": "https://fal.run/emulator/sse/stream?n=2&gated=0",
                        "accept": "text/event-stream"})) as stream:  # fmt: skip
            assert "done" in stream.read().decode()
        answers.append(stream)
        for _ in range(6):  # the quota (5 a day) refuses one of these
            run = c.post(SDXL, json={"prompt": "e"}, headers=as_caller("alice"))
            answers.append(run)
            if run.status_code == 429:
                assert run.json()["message"] == "quota exceeded"
                break
        else:
            raise AssertionError("the quota never refused")
    proxy.lines_of(answers)  # every call's metrics are moved before its line is written


def scrape(operator: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The figures the dashboard shows, computed from a /metrics scrape."""
    text = httpx.get(f"{operator}/metrics", headers=headers, trust_env=False).text
    out: dict[str, Any] = {"requests": 0.0, "refusals": {}, "generations": {}, "units": {},
                           "spend": {}, "streams": 0.0, "sockets": None,
                           "breaker": None}  # fmt: skip
    by_app = {"fal_proxy_generations_total": "generations",
              "fal_proxy_billable_units_total": "units",
              "fal_proxy_spend_usd_total": "spend"}  # fmt: skip
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "fal_proxy_requests_total":
                out["requests"] += s.value
            elif s.name == "fal_proxy_refusals_total":
                out["refusals"][s.labels["reason"]] = s.value
            elif s.name in by_app:
                out[by_app[s.name]][s.labels["app"]] = s.value
            elif s.name == "fal_proxy_open_streams":
                out["streams"] += s.value
            elif s.name == "fal_proxy_open_websockets":
                out["sockets"] = s.value
            elif s.name == "fal_proxy_breaker_state":
                out["breaker"] = s.value
    return out


def buckets(operator: str, metric: str) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets from a /metrics scrape, summed over its labels:
    (upper bound, count), in order, +Inf last."""
    text = httpx.get(f"{operator}/metrics", trust_env=False).text
    summed: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == f"{metric}_bucket":
                le = float(s.labels["le"])
                summed[le] = summed.get(le, 0.0) + s.value
    return sorted(summed.items())


def histogram_quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """Prometheus's ``histogram_quantile`` (linear inside the bucket holding the rank; the
    +Inf bucket answers its lower bound), in ms rounded as the page's figures are."""
    total = cumulative[-1][1] if cumulative else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in cumulative:
        if count >= rank:
            seconds = lower if upper == float("inf") else (
                lower + (upper - lower) * (rank - below) / (count - below))  # fmt: skip
            return round(seconds * 1000, 3)
        lower, below = upper, count
    return round(lower * 1000, 3)


def near_rows(rows: list[dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """The near-or-over table by state: (limit, used, of, refused)."""
    return {r["state"]: (r["limit"], str(r["used"]), str(r["of"]), str(r["refused"])) for r in rows}


def events(operator: str, n: int, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The first ``n`` snapshots of /dashboard/events."""
    got: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{operator}/dashboard/events", headers=headers,
                      trust_env=False, timeout=DEADLINE) as stream:  # fmt: skip
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[len("data: ") :]))
                if len(got) == n:
                    break
    return got


def test_the_page_its_files_and_its_events(start_proxy, tmp_path: Path) -> None:
    proxy, operator = start(start_proxy, tmp_path, admin=False)
    workload(proxy)
    page = httpx.get(f"{operator}/dashboard", trust_env=False)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'",
                      "img-src 'self' data:", "connect-src 'self'"):  # fmt: skip
        assert directive in csp
    assert "unsafe" not in csp and "<script>" not in page.text and " style=" not in page.text
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        asset = httpx.get(f"{operator}/dashboard/static/{name}", trust_env=False)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        urls = set(re.findall(r"https?://[^\s\"'`)]+", asset.text))
        assert urls <= {"http://www.w3.org/2000/svg"}  # a namespace, never fetched: offline
    for bad in ("../routes.py", "index.html", "%2e%2e%2ffeed.py"):
        assert httpx.get(f"{operator}/dashboard/static/{bad}", trust_env=False).status_code == 404
    started = time.monotonic()
    first, second = events(operator, 2)
    assert second["live"]["seq"] > first["live"]["seq"]
    assert "series" in first and "series" not in second  # the hour's lines once per new point
    assert time.monotonic() - started < 5  # the first at once, then one a second
    live = second["live"]
    figures = scrape(operator)
    assert live["totals"]["requests"] == figures["requests"]
    assert live["totals"]["generations"] == figures["generations"]
    # alice refused by the quota ("over", the newest), bob left at 4 of 5 by his last run.
    rows = live["near_limits"]
    assert [r["state"] for r in rows] == ["over", "near"]
    assert near_rows(rows) == {"over": ("*=5/day", "5.0", "5.0", "1"),
                               "near": ("*=5/day", "4.0", "5.0", "0")}  # fmt: skip
    assert all("caller" not in r and len(r["tag"]) == 24 for r in rows)
    assert rows[0]["tag"] != rows[1]["tag"]
    text = json.dumps(second)
    assert "alice" not in text and '"bob"' not in text  # tags, not ids, without an admin token
    assert live["now"]["overhead_p50_ms"] is not None and "overhead_p99_ms" in second["live"]["now"]
    assert {"overhead_p50_ms", "overhead_p99_ms"} <= set(first["series"])
    # Never on the public port.
    for path in ("/dashboard", "/dashboard/events", "/dashboard/static/dashboard.js"):
        answer = httpx.get(f"{proxy.url}{path}", headers=as_caller("alice"), trust_env=False)
        assert answer.status_code != 200 and "fal-gateway-proxy dashboard" not in answer.text


def test_with_an_admin_token_basic_or_bearer_is_needed(start_proxy, tmp_path: Path) -> None:
    proxy, operator = start(start_proxy, tmp_path, admin=True)
    for path in ("/dashboard", "/dashboard/events", "/dashboard/static/dashboard.js"):
        refused = httpx.get(f"{operator}{path}", trust_env=False)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith('Basic realm="fal-gateway-proxy"')
    basic = base64.b64encode(f"anyone:{ADMIN_TOKEN}".encode()).decode()
    for authorization in (f"Basic {basic}", f"Bearer {ADMIN_TOKEN}"):
        page = httpx.get(f"{operator}/dashboard", headers={"authorization": authorization},
                         trust_env=False)  # fmt: skip
        assert page.status_code == 200
    (first,) = events(operator, 1, {"authorization": f"Basic {basic}"})
    assert first["live"]["ids_shown"] is True
    assert ADMIN_TOKEN not in proxy.process.json_lines().__repr__()


def test_chromium_shows_the_figures_of_metrics_and_usage(start_proxy, tmp_path: Path) -> None:
    node = require_browser_tools()
    started = time.monotonic()
    proxy, operator = start(start_proxy, tmp_path, admin=True)
    workload(proxy)
    before = scrape(operator)
    usage = {who: httpx.get(f"{operator}/usage/{who}", trust_env=False).json() for who in TOKENS}
    shot = tmp_path / "dashboard.png"
    driver = subprocess.run(
        [node, str(SCRIPT), f"{operator}/dashboard", str(shot), str(int(before["requests"])),
         f"ops:{ADMIN_TOKEN}"],
        cwd=SCRIPT.parent, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    report = json.loads(driver.stdout.strip().splitlines()[-1]) if driver.stdout else {}
    assert driver.returncode == 0, (driver.stdout, driver.stderr)
    after = scrape(operator)
    assert before == after, "the workload was over: nothing may move while the page is read"
    # Percentiles over the last minute: the proxy is younger, so over all its calls.
    assert time.monotonic() - started < 55, "too slow: the page's minute no longer holds them all"
    for metric, key in (("fal_proxy_request_duration_seconds", ""),
                        ("fal_proxy_upstream_duration_seconds", "upstream_"),
                        ("fal_proxy_overhead_seconds", "overhead_")):  # fmt: skip
        histogram = buckets(operator, metric)
        for q, name in ((0.5, f"{key}p50_ms"), (0.99, f"{key}p99_ms")):
            expected = histogram_quantile(q, histogram)
            assert expected is not None, metric
            assert float(report["figures"][name]) == pytest.approx(expected, abs=0.0011), name
    assert httpx.get(f"{operator}/usage/alice", trust_env=False).json() == usage["alice"]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOTS / "dashboard.png")
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert report["consoleErrors"] == [] and report["pageErrors"] == []
    assert report["cspViolations"] == [] and "script-src 'self'" in report["csp"]

    figures, body = report["figures"], report["body"]
    assert float(body["requestsTotal"]) == after["requests"]
    assert float(figures["streams_open"]) == after["streams"] == 0
    assert float(figures["sockets_open"]) == after["sockets"] == 0
    assert figures["breaker_state"] == "closed" and after["breaker"] == 0
    assert body["hourFull"] == "false"  # younger than an hour: the hour is since the start
    apps = {row["app"]: row for row in report["apps"]}
    assert set(apps) == {a for a, n in after["generations"].items() if n}
    for app, row in apps.items():
        assert float(row["generations"]) == float(row["totalGenerations"])
        assert float(row["totalGenerations"]) == after["generations"][app]
        assert float(row["totalUnits"]) == after["units"].get(app, 0.0)
        assert row["spend"] == row["totalSpend"]  # empty: the app has no spend counted
        assert (float(row["spend"]) if row["spend"] else None) == after["spend"].get(app)
    refusals = {row["reason"]: float(row["total"]) for row in report["refusals"]}
    assert refusals == {r: n for r, n in after["refusals"].items() if n}
    assert refusals["quota_exceeded"] == 1
    # /usage: what the callers did this month is what the page's apps add up to.
    for field, column in (("generations", "totalGenerations"), ("billable_units", "totalUnits"),
                          ("spend_usd", "totalSpend")):  # fmt: skip
        summed = sum(u["usage"]["apps"].get(SDXL[1:], {}).get(field, 0) for u in usage.values())
        assert float(apps[SDXL[1:]][column]) == pytest.approx(summed)
    # The quota's refusal and the caller near it, shown with the caller's id (an admin is
    # looking) and its tag.
    assert {r["caller"]: r["state"] for r in report["near"]} == {"alice": "over", "bob": "near"}
    assert near_rows(report["near"]) == {"over": ("*=5/day", "5", "5", "1"),
                                         "near": ("*=5/day", "4", "5", "0")}  # fmt: skip
    assert all(len(r["tag"]) == 24 for r in report["near"])
    assert report["charts"] >= 6
