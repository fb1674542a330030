"""The demo as a container runs it: ``FAL_PROXY_HOST=0.0.0.0`` (the image's ENV) and reached
under another address than the one it logs, as a browser on the host reaches a published
port. Linux routes all of 127/8 to loopback, so 127.0.0.2 stands for "not the address the
demo knows itself by". The page, and a generated image through the calls the page's SDK
makes, load from there; the image's URL is a path on the page's own origin, which the
page's CSP allows. (tests/e2e/test_demo_browser.py runs the same flow in Chromium.)"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Process, child_env

ELSEWHERE = "127.0.0.2"
QUEUE = "https://queue.fal.run/fal-ai/flux/schnell"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def start_demo(*args: str, **env: str) -> tuple[Process, dict[str, Any]]:
    process = Process(
        [sys.executable, "-m", "proxy", "demo", "--port", "0", "--time-scale", "0.05", *args],
        child_env(FAL_PROXY_LOG_FORMAT="json", **env),
    )
    try:
        line = process.wait_for_json(
            lambda r: r.get("event") == "listening" and r.get("role") == "proxy"
        )
    except BaseException:
        process.stop()
        raise
    return process, line


@pytest.fixture(scope="module")
def everywhere() -> Iterator[tuple[Process, dict[str, Any]]]:
    process, line = start_demo(FAL_PROXY_HOST="0.0.0.0")
    try:
        yield process, line
    finally:
        process.stop()


def csp_sources(page: str, directive: str) -> list[str]:
    (policy,) = re.findall(r'http-equiv="Content-Security-Policy"\s+content="([^"]*)"', page)
    for part in policy.split(";"):
        name, *sources = part.split()
        if name == directive:
            return sources
    raise AssertionError(f"no {directive} in {policy}")


def test_the_demo_listens_where_FAL_PROXY_HOST_says(
    everywhere: tuple[Process, dict[str, Any]],
) -> None:
    process, line = everywhere
    assert line["host"] == "0.0.0.0", line
    # What the log tells the user to open answers (not http://0.0.0.0:…).
    assert line["url"] == f"http://127.0.0.1:{line['port']}", line
    page = process.wait_for_json(lambda r: str(r.get("event", "")).startswith("demo page"))
    assert "0.0.0.0" not in page["url"], page
    gateway = process.wait_for_json(lambda r: r.get("role") == "emulator")
    assert gateway["gateway_url"].startswith("http://127.0.0.1:"), gateway


def test_the_page_and_its_image_load_from_another_address(
    everywhere: tuple[Process, dict[str, Any]],
) -> None:
    process, line = everywhere
    origin = f"http://{ELSEWHERE}:{line['port']}"
    # The browser's headers: a same-origin page under the address it was opened at.
    browser = {"origin": origin, "referer": f"{origin}/", "sec-fetch-site": "same-origin"}
    with httpx.Client(base_url=origin, trust_env=False, timeout=10) as client:
        page = client.get("/")
        assert page.status_code == 200, page.text
        img_src = csp_sources(page.text, "img-src")
        assert "'self'" in img_src and not any("0.0.0.0" in s for s in img_src), img_src

        # fal.subscribe's calls: submit, status until COMPLETED, result; all on /api/fal/proxy.
        sdk = {**browser, "content-type": "application/json", "accept": "application/json"}
        submitted = client.post(
            "/api/fal/proxy",
            headers={**sdk, "x-fal-target-url": QUEUE},
            json={"prompt": "a harbour at dawn", "num_images": 1},
        )
        assert submitted.status_code == 200, submitted.text
        request_id = submitted.json()["request_id"]
        base = f"https://queue.fal.run/fal-ai/flux/requests/{request_id}"
        deadline = time.monotonic() + 20
        while True:
            status = client.get(
                "/api/fal/proxy", headers={**sdk, "x-fal-target-url": f"{base}/status"}
            )
            assert status.status_code == 200, status.text
            if status.json()["status"] == "COMPLETED":
                break
            assert time.monotonic() < deadline, status.text
            time.sleep(0.05)
        result = client.get("/api/fal/proxy", headers={**sdk, "x-fal-target-url": base})
        assert result.status_code == 200, result.text
        url = result.json()["images"][0]["url"]
        # A path on the page's origin: the browser resolves it against what it opened.
        assert url.startswith("/") and not url.startswith("//"), url
        image = client.get(url, headers={**browser, "sec-fetch-dest": "image"})
    assert image.status_code == 200, image.text
    assert image.headers["content-type"] == "image/png" and image.content[:8] == PNG_SIGNATURE
    errors = [r for r in process.json_lines() if r.get("level") in ("error", "critical")]
    assert errors == [], errors


def test_the_host_flag_wins_over_FAL_PROXY_HOST() -> None:
    process, line = start_demo("--host", "127.0.0.1", FAL_PROXY_HOST="0.0.0.0")
    try:
        assert line["host"] == "127.0.0.1", line
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{ELSEWHERE}:{line['port']}/healthz", trust_env=False, timeout=5)
        ok = httpx.get(f"http://127.0.0.1:{line['port']}/healthz", trust_env=False, timeout=5)
        assert ok.status_code == 200
    finally:
        process.stop()
