"""HTTPS to the gateway, as in production, against the benchmark's fake gateway speaking TLS
with a trustme CA (``bench/fast_gateway.py --tls-dir``): the certificate is checked (against
the test-only ``FAL_PROXY_TEST_GATEWAY_CA_FILE``), and kept-alive connections mean one
handshake for many requests."""

from __future__ import annotations

import json
import ssl
import sys
import urllib.request
from pathlib import Path

import httpx

from tests.conftest import PREFIX, ROOT, Process, child_env, launch_proxy


def stats(port: int, ca: Path) -> dict[str, int]:
    context = ssl.create_default_context(cafile=str(ca))
    with urllib.request.urlopen(f"https://127.0.0.1:{port}{PREFIX}/_stats", context=context) as r:
        return json.loads(r.read())


def test_the_gateway_over_tls_one_handshake_for_many_requests(tmp_path: Path) -> None:
    gateway = Process(
        [sys.executable, str(ROOT / "bench" / "fast_gateway.py"), "--port", "0",
         "--tls-dir", str(tmp_path)], child_env(),
    )  # fmt: skip
    try:
        port = gateway.wait_for_json(lambda r: r.get("event") == "listening")["port"]
        ca = tmp_path / "ca.pem"
        url = f"https://127.0.0.1:{port}{PREFIX}"
        trusted = launch_proxy(url, FAL_PROXY_TEST_GATEWAY_CA_FILE=str(ca))
        untrusted = launch_proxy(url)  # the public roots only: the test CA is refused
        try:
            with httpx.Client(base_url=trusted.url, trust_env=False, timeout=10) as client:
                assert [client.post("/fal-ai/x", json={}).status_code for _ in range(20)] == [
                    200] * 20  # fmt: skip
            seen = stats(port, ca)
            assert seen["requests"] == 21 and seen["connections"] <= 2  # (and this stats call)
            refused = httpx.post(f"{untrusted.url}/fal-ai/x", json={}, trust_env=False)
            assert refused.status_code == 502
            assert refused.json()["message"] == "the gateway could not be reached"
        finally:
            trusted.process.stop()
            untrusted.process.stop()
    finally:
        gateway.stop()
