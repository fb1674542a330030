"""Operating the proxy: readiness, and key rotation without dropping traffic."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from tests.conftest import FAL_KEY, FakeGateway


def test_readyz_is_ready_when_the_proxy_is(client: httpx.Client, fake_gateway: FakeGateway) -> None:
    r = client.get("/readyz")
    assert (r.status_code, r.json()) == (200, {"status": "ready"})
    assert fake_gateway.requests() == []


def test_readyz_says_when_redis_is_unreachable(start_proxy) -> None:
    proxy = start_proxy(FAL_PROXY_REDIS_URL="redis://127.0.0.1:9/0")
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "Redis" in " ".join(r.json()["problems"])
        assert c.get("/healthz").status_code == 200  # alive, just not ready


def test_a_rotated_key_file_is_used_without_dropping_traffic(start_proxy, fake_gateway: FakeGateway, tmp_path: Path) -> None:
    key_file = tmp_path / "fal_key"
    key_file.write_text("old-key-revoked\n")
    proxy = start_proxy(FAL_KEY="", FAL_KEY_FILE=str(key_file), FAL_PROXY_SECRET_RELOAD_SECONDS="0.2")
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:  # requests keep flowing through the rotation
        with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:
            while not stop.is_set():
                statuses.append(c.post("/emulator/echo", json={}).status_code)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        deadline = time.monotonic() + 5
        while not statuses:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert statuses[0] == 401  # the emulator does not know the old key
        key_file.write_text(FAL_KEY + "\n")  # the operator updates the mounted secret
        deadline = time.monotonic() + 10
        while not statuses or statuses[-1] != 200:
            assert time.monotonic() < deadline, "the new key was not picked up"
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(10)
    assert set(statuses) <= {401, 200}  # every request answered: nothing dropped
    assert statuses[statuses.index(200):] == [200] * (len(statuses) - statuses.index(200))
    assert any(line.get("event") == "secret_reloaded" for line in proxy.logs())
    assert all(FAL_KEY not in str(line) for line in proxy.logs())
