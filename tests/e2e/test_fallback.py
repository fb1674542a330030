"""``FAL_PROXY_FALLBACK=direct`` end to end: the emulator plays both the gateway and fal itself
(``/_fal/<host>``, ``FAL_PROXY_TEST_FAL_ORIGIN``), and the gateway fails in the two ways that
are its own: its port refuses connections (nothing was sent: retried straight to fal), or it
answers Cloudflare 5xx pages (the request may have reached it: never repeated). After N such
failures the breaker opens; after ``FAL_PROXY_FALLBACK_SECONDS`` one call probes the gateway
and its answer closes it. The fal JS SDK sees no error while its calls switch way.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import msgpack
from websockets.sync.client import connect as ws_connect

from tests.conftest import (
    FAL_KEY,
    PREFIX,
    FakeGateway,
    RunningProxy,
    launch_proxy,
    start_fake_gateway,
)
from tests.e2e.test_sdk_node import run_sdk
from tests.redis_support import free_port

SERVER_AUTH = f"Key {FAL_KEY}"


def fallback_env(gateway: FakeGateway, failures: int = 3) -> dict[str, str]:
    return {
        "FAL_PROXY_FALLBACK": "direct",
        "FAL_PROXY_FALLBACK_FAILURES": str(failures),
        "FAL_PROXY_FALLBACK_SECONDS": "1",
        "FAL_PROXY_TEST_FAL_ORIGIN": f"http://127.0.0.1:{gateway.port}/_fal",
    }


def run(proxy: RunningProxy) -> httpx.Response:
    return httpx.post(f"{proxy.url}/fal-ai/fast-sdxl", json={"prompt": "a cat"},
                      trust_env=False, timeout=15)  # fmt: skip


def lines(proxy: RunningProxy, event: str) -> list[dict[str, Any]]:
    return [line for line in proxy.logs() if line.get("event") == event]


def bypassed(proxy: RunningProxy) -> float:
    text = httpx.get(f"{proxy.url}/metrics", trust_env=False).text
    (line,) = [x for x in text.splitlines() if x.startswith("fal_proxy_gateway_bypassed ")]
    return float(line.split()[1])


def assert_direct(record: dict[str, Any]) -> None:
    """Straight to fal: fal's key, none of the gateway's headers."""
    names = [name.lower() for name, _ in record["headers"]]
    assert [v for n, v in record["headers"] if n.lower() == "authorization"] == [SERVER_AUTH]
    assert not [n for n in names if n.startswith("cf-aig-") or n == "x-fal-target-url"], names


def until(condition: Any, what: str, timeout: float = 15.0) -> None:
    """Poll ``condition`` (each poll does real work, e.g. sends a call) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)  # poll interval; the condition is what is waited for


def test_a_refused_gateway_sends_calls_straight_to_fal_and_back_after_the_probe(
    fake_gateway: FakeGateway,
) -> None:
    port = free_port()  # nothing listens there yet: every connection is refused
    proxy = launch_proxy(f"http://127.0.0.1:{port}{PREFIX}", **fallback_env(fake_gateway))
    revived: FakeGateway | None = None
    try:
        # Each call's gateway connection fails: it never left, so it goes to fal directly.
        assert [run(proxy).status_code for _ in range(5)] == [200] * 5
        direct = fake_gateway.requests("direct")
        assert [r["path"] for r in direct] == ["/_fal/fal.run/fal-ai/fast-sdxl"] * 5
        for record in direct:
            assert_direct(record)
        requests = [r for r in proxy.request_logs() if r.get("route") == "run"]
        assert [r.get("via") for r in requests] == ["direct"] * 5
        (opened,) = lines(proxy, "gateway_bypassed")  # said once
        assert opened["state"] == "open" and bypassed(proxy) == 1
        assert httpx.get(f"{proxy.url}/readyz", trust_env=False).status_code == 200  # serving
        # A socket goes straight to fal too while the breaker is open.
        url = proxy.url.replace("http://", "ws://") + "/fal-ai/fast-lcm-diffusion/realtime"
        with ws_connect(url) as socket:
            socket.send(msgpack.packb({"prompt": "a cat"}))
            assert msgpack.unpackb(socket.recv(timeout=10))["images"]
        (sock,) = fake_gateway.requests("direct-websocket")
        assert sock["path"] == "/_fal/fal.run/fal-ai/fast-lcm-diffusion/realtime"
        assert_direct(sock)
        # The gateway comes back: after FAL_PROXY_FALLBACK_SECONDS one call probes it.
        revived = start_fake_gateway("--port", str(port))
        until(lambda: run(proxy).status_code == 200 and bool(revived.requests()),
              "a call probed the revived gateway")  # fmt: skip
        (closed,) = lines(proxy, "gateway_restored")
        assert closed["state"] == "closed" and bypassed(proxy) == 0
        revived.clear()
        fake_gateway.clear()
        assert run(proxy).status_code == 200
        (through,) = revived.requests()
        assert (
            through["path"] == f"{PREFIX}/fal-ai/fast-sdxl"
            and fake_gateway.requests("direct") == []
        )
    finally:
        proxy.process.stop()
        if revived is not None:
            revived.stop()


def test_a_gateway_5xx_page_is_never_repeated_and_opens_the_breaker(
    start_proxy: Any, fake_gateway: FakeGateway
) -> None:
    proxy = start_proxy(**fallback_env(fake_gateway, failures=2))
    fake_gateway.client.post("/_emulator/outage?status=502")
    try:
        for _ in range(2):  # reached the gateway, which failed: relayed, not sent again
            failed = run(proxy)
            assert failed.status_code == 502 and "Cloudflare" in failed.text
        assert len(fake_gateway.requests()) == 2 and fake_gateway.requests("direct") == []
        assert [line["state"] for line in lines(proxy, "gateway_bypassed")] == ["open"]
        # Open: calls go straight to fal, the queue's too (submit, status, result).
        assert run(proxy).status_code == 200
        submit = httpx.post(
            f"{proxy.url}/api/fal/proxy", json={"prompt": "a cat"}, trust_env=False,
            headers={"x-fal-target-url": "https://queue.fal.run/fal-ai/flux/dev"},
        )  # fmt: skip
        assert submit.status_code == 200
        status = httpx.get(f"{proxy.url}/api/fal/proxy", trust_env=False,
                           headers={"x-fal-target-url": submit.json()["status_url"]})  # fmt: skip
        assert status.status_code == 200
        direct = fake_gateway.requests("direct")
        assert [r["target_url"].split("?")[0] for r in direct] == [
            "https://fal.run/fal-ai/fast-sdxl",
            "https://queue.fal.run/fal-ai/flux/dev",
            submit.json()["status_url"],
        ]
        for record in direct:
            assert_direct(record)
        assert len(fake_gateway.requests()) == 2  # nothing more through the gateway
    finally:
        fake_gateway.client.delete("/_emulator/outage")
    # The outage is over: the probe closes the breaker.
    until(lambda: run(proxy).status_code == 200 and bool(lines(proxy, "gateway_restored")),
          "the probe closed the breaker")  # fmt: skip
    assert bypassed(proxy) == 0


def test_the_fal_sdk_sees_no_error_while_the_gateway_refuses(fake_gateway: FakeGateway) -> None:
    port = free_port()  # refused: every call switches to the direct path under the SDK
    proxy = launch_proxy(f"http://127.0.0.1:{port}{PREFIX}", **fallback_env(fake_gateway))
    try:
        for scenario in ("run_post", "queue_status_result_cancel"):
            outcome = run_sdk(proxy, fake_gateway, scenario)
            assert outcome["ok"], json.dumps(outcome)[:2000]
        assert fake_gateway.requests("direct")
        assert not [r for r in proxy.request_logs() if r["status"] >= 500]
    finally:
        proxy.process.stop()
