"""``FAL_PROXY_FALLBACK=direct`` (docs/gateway-modes.md, "Staying up when the gateway is down"):
``FAL_PROXY_FALLBACK_WINDOW`` (failures in a row open the breaker only within the window),
and the one ``gateway_probe``: once the open period is over, one call probes the gateway
while the others keep going straight to fal, and its answer closes the breaker.

The emulator plays the gateway (``/_emulator/outage``: Cloudflare 5xx pages) and fal itself
(``FAL_PROXY_TEST_FAL_ORIGIN``). One proxy per configuration.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import FakeGateway, RunningProxy, launch_proxy

WINDOW = 0.5
OPEN_SECONDS = 0.5
DEADLINE = 15.0
EVENTS = ("gateway_bypassed", "gateway_probe", "gateway_restored")


def fallback_env(gateway: FakeGateway, **settings: str) -> dict[str, str]:
    return {
        "FAL_PROXY_FALLBACK": "direct",
        "FAL_PROXY_TEST_FAL_ORIGIN": f"http://127.0.0.1:{gateway.port}/_fal",
        **settings,
    }


@pytest.fixture(scope="module")
def windowed_proxy(fake_gateway: FakeGateway) -> Iterator[RunningProxy]:
    """2 failures within WINDOW open it; once open, it stays open for the module."""
    proxy = launch_proxy(fake_gateway.gateway_url, **fallback_env(
        fake_gateway, FAL_PROXY_FALLBACK_FAILURES="2", FAL_PROXY_FALLBACK_WINDOW=str(WINDOW),
        FAL_PROXY_FALLBACK_SECONDS="3600",
    ))  # fmt: skip
    yield proxy
    proxy.process.stop()


@pytest.fixture(scope="module")
def probing_proxy(fake_gateway: FakeGateway) -> Iterator[RunningProxy]:
    """1 failure opens it, for OPEN_SECONDS; then one call probes."""
    proxy = launch_proxy(fake_gateway.gateway_url, **fallback_env(
        fake_gateway, FAL_PROXY_FALLBACK_FAILURES="1",
        FAL_PROXY_FALLBACK_SECONDS=str(OPEN_SECONDS),
    ))  # fmt: skip
    yield proxy
    proxy.process.stop()


@pytest.fixture
def outage(fake_gateway: FakeGateway) -> Iterator[None]:
    fake_gateway.client.post("/_emulator/outage?status=502")
    yield
    fake_gateway.client.delete("/_emulator/outage")


def run(proxy: RunningProxy, path: str = "/emulator/echo") -> httpx.Response:
    return httpx.post(f"{proxy.url}{path}", json={"prompt": "a cat"}, trust_env=False,
                      timeout=15)  # fmt: skip


def bypassed(proxy: RunningProxy) -> float:
    """The gauge: the breaker's state is set before the call that changed it is answered."""
    text = httpx.get(f"{proxy.url}/metrics", trust_env=False).text
    (line,) = [x for x in text.splitlines() if x.startswith("fal_proxy_gateway_bypassed ")]
    return float(line.split()[1])


def changes(proxy: RunningProxy, last: str) -> list[tuple[str, str, str]]:
    """Every change of way logged, once the ``last`` one has come through the proxy's stdout
    (written before the answer that follows it, but read on another thread)."""
    proxy.process.wait_for_json(lambda line: line.get("event") == last, timeout=DEADLINE)
    return [(line["event"], line["previous"], line["state"]) for line in proxy.logs()
            if line.get("event") in EVENTS]  # fmt: skip


def until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)  # poll interval; the condition is what is waited for


def test_failures_further_apart_than_the_window_do_not_open_the_breaker(
    windowed_proxy: RunningProxy, fake_gateway: FakeGateway, outage: None
) -> None:
    assert run(windowed_proxy).status_code == 502
    answered = time.monotonic()
    # The proxy counted the first failure before answering it and counts the second after
    # it is sent: they are at least this far apart.
    until(lambda: time.monotonic() - answered > WINDOW + 0.1, "the window to pass")
    assert run(windowed_proxy).status_code == 502
    assert bypassed(windowed_proxy) == 0  # 2 in a row, but not within the window
    # The next failures follow at once: 2 within the window open it (on a slow machine a
    # pair may still straddle it: the next pair is tried).
    for _ in range(5):
        assert run(windowed_proxy).status_code == 502
        if bypassed(windowed_proxy) == 1:
            break
    assert bypassed(windowed_proxy) == 1
    assert changes(windowed_proxy, "gateway_bypassed") == [("gateway_bypassed", "closed", "open")]
    assert len(fake_gateway.requests()) >= 3 and fake_gateway.requests("direct") == []
    assert run(windowed_proxy).status_code == 200  # now straight to fal
    assert len(fake_gateway.requests("direct")) == 1


def test_one_call_probes_the_gateway_while_the_others_go_straight_to_fal(
    probing_proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    fake_gateway.client.post("/_emulator/outage?status=502")
    try:
        assert run(probing_proxy).status_code == 502  # opens the breaker
        opened = time.monotonic()
    finally:
        fake_gateway.client.delete("/_emulator/outage")
    assert bypassed(probing_proxy) == 1
    until(lambda: time.monotonic() - opened > OPEN_SECONDS + 0.1, "the open period to end")
    # The first call after it is the probe: through the gateway, held there.
    probe: list[httpx.Response] = []
    holder = threading.Thread(target=lambda: probe.append(run(probing_proxy, "/emulator/hang")))
    holder.start()
    try:
        until(lambda: any(r["path"].endswith("/emulator/hang") for r in fake_gateway.requests()),
              "the probe reached the gateway")  # fmt: skip
        assert changes(probing_proxy, "gateway_probe")[-1] == ("gateway_probe", "open", "half_open")
        # While it is out, every other call goes straight to fal: one probe at a time.
        assert [run(probing_proxy).status_code for _ in range(3)] == [200] * 3
        assert len(fake_gateway.requests("direct")) == 3
        assert len(fake_gateway.requests()) == 2  # the failure and the probe
    finally:
        fake_gateway.release("hang")
        holder.join(DEADLINE)
    assert [r.status_code for r in probe] == [200]
    # The probe's answer closed the breaker: calls go through the gateway again.
    assert changes(probing_proxy, "gateway_restored") == [
        ("gateway_bypassed", "closed", "open"),
        ("gateway_probe", "open", "half_open"),
        ("gateway_restored", "half_open", "closed"),
    ]
    assert bypassed(probing_proxy) == 0
    assert run(probing_proxy).status_code == 200
    assert len(fake_gateway.requests()) == 3 and len(fake_gateway.requests("direct")) == 3
