"""The demo page in a real browser: ``fal-gateway-proxy demo`` + headless Chromium.

``python -m proxy demo --port 0 --emulator-port 0`` runs the proxy with the offline fal +
AI Gateway emulator behind it and serves the demo page at ``/``. ``tests/sdk/browser-demo.mjs``
(playwright-core driving Debian's ``/usr/bin/chromium``) opens the page, types a prompt,
clicks Generate and waits for the image. The page uses the bundled ``@fal-ai/client``
with the *string* ``proxyUrl: "/api/fal/proxy"``, so this proves the browser path: every
SDK call goes to the proxy's SDK route, which forwards it (``x-fal-target-url``) to the
emulated ``queue.fal.run``; the proxy's request log shows it.

Needs Chromium (``apt-get install -y chromium``, or ``.ci/run``) and ``npm ci --prefix
tests/sdk``; without either the tests fail (never skip).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.browser_support import require_browser_tools
from tests.conftest import ROOT, Process, child_env

SDK_DIR = ROOT / "tests" / "sdk"
SCRIPT = SDK_DIR / "browser-demo.mjs"
NODE_TIMEOUT = 90
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


@dataclass
class Demo:
    process: Process
    url: str

    def logs(self) -> list[dict[str, Any]]:
        return self.process.json_lines()

    def wait_for(self, predicate: Any, timeout: float = 10) -> dict[str, Any]:
        return self.process.wait_for_json(predicate, timeout=timeout)


def demo_port_args() -> list[str]:
    """``--port 0``, plus ``--emulator-port 0`` if the emulator is served on a port of its own."""
    shown = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--help"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return ["--port", "0", *(["--emulator-port", "0"] if "--emulator-port" in shown else [])]


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    require_browser_tools()
    process = Process(
        [sys.executable, "-m", "proxy", "demo", *demo_port_args()],
        child_env(FAL_PROXY_LOG_FORMAT="json"),
    )
    try:
        line = process.wait_for_json(
            lambda r: r.get("event") == "listening" and r.get("role") == "proxy"
        )
        yield Demo(process, line["url"].rstrip("/"))
        # At teardown, so after every test that used the demo, whatever order they ran in.
        assert_logged_no_errors(process)
    finally:
        process.stop()


def assert_logged_no_errors(process: Process) -> None:
    errors = [r for r in process.json_lines() if r.get("level") in ("error", "critical")]
    assert errors == [], errors


def run_browser(
    demo: Demo, screenshot: Path, prompt: str | None = None, *flags: str
) -> dict[str, Any]:
    node = require_browser_tools()
    completed = subprocess.run(
        [
            node,
            str(SCRIPT),
            *flags,
            f"{demo.url}/",
            str(screenshot),
            *([prompt] if prompt is not None else []),
        ],
        cwd=SDK_DIR,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        check=False,
    )
    try:
        report = json.loads(completed.stdout)
    except ValueError:
        raise AssertionError(
            f"browser-demo.mjs exited {completed.returncode} without a JSON report:\n"
            f"{completed.stdout}\n{completed.stderr}"
        ) from None
    assert completed.returncode == 0 and report["ok"], (
        f"browser-demo.mjs failed (exit {completed.returncode}):\n"
        f"{json.dumps(report, indent=2)}\n{completed.stderr}"
        f"\ndemo process output:\n" + "\n".join(demo.process.lines)
    )
    return report


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def assert_png(path: Path) -> None:
    assert path.is_file(), f"no screenshot at {path}"
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 0 and height > 0


def queue_requests(demo: Demo) -> list[dict[str, Any]]:
    return [r for r in demo.logs() if r.get("event") == "request" and r.get("route") == "queue"]


def test_demo_mode_is_announced_loudly(demo: Demo) -> None:
    warning = demo.wait_for(lambda r: "DEMO" in str(r.get("event", "")))
    assert warning.get("level") == "warning", warning


def test_page_generates_an_image_through_the_proxy(demo: Demo, tmp_path: Path) -> None:
    screenshot = tmp_path / "demo.png"
    report = run_browser(demo, screenshot, PROMPT)
    print(f"screenshot: {screenshot}")

    # What the user sees.
    assert report["image"]["naturalWidth"] > 0, report["image"]
    assert report["image"]["complete"]
    assert {"IN_PROGRESS", "COMPLETED"} <= set(report["statuses"]), report["statuses"]
    assert report["finalStatus"] == "COMPLETED"
    assert report["logs"] and all(entry["message"] for entry in report["logs"]), report["logs"]
    request_id = report["requestId"]
    assert request_id, "no request id shown"
    assert report["error"] is None
    assert "no real fal call is made" in report["bannerText"]
    assert report["consoleErrors"] == [] and report["pageErrors"] == [], report
    assert_png(screenshot)

    # What the browser fetched: the page, its files and the SDK route on the proxy's
    # origin, and the generated image from wherever the result said (the emulator).
    page_origin = origin(demo.url)
    image_origin = origin(report["image"]["src"])
    for request in report["requests"]:
        assert origin(request["url"]) in {page_origin, image_origin}, request
        assert request["status"] == 200, request
    paths = [urlsplit(r["url"]).path for r in report["requests"] if origin(r["url"]) == page_origin]
    assert {"/", "/demo/demo.js", "/demo/demo.css", "/demo/fal-client.js"} <= set(paths), paths
    sdk_calls = [r for r in report["requests"] if urlsplit(r["url"]).path == "/api/fal/proxy"]
    assert sdk_calls and sdk_calls[0]["method"] == "POST", sdk_calls
    assert [r["method"] for r in sdk_calls[1:]] == ["GET"] * (len(sdk_calls) - 1), sdk_calls

    # What the proxy did: the SDK route forwarded the queue calls to queue.fal.run.
    demo.wait_for(
        lambda r: (
            r.get("event") == "request"
            and r.get("route") == "queue"
            and request_id in str(r.get("target_path", ""))
            and not str(r.get("target_path")).endswith("/status")
        )
    )
    ours = [
        r
        for r in queue_requests(demo)
        if r.get("method") == "POST" or request_id in str(r.get("target_path"))
    ]
    assert ours, demo.logs()
    assert all(r.get("target_host") == "queue.fal.run" for r in ours), ours
    assert any(r.get("method") == "POST" and r.get("status") == 200 for r in ours), ours
    assert any(str(r.get("target_path", "")).endswith("/status") for r in ours), ours
    assert len(ours) >= len(sdk_calls), (ours, sdk_calls)


def test_empty_prompt_shows_the_validation_error(demo: Demo, tmp_path: Path) -> None:
    screenshot = tmp_path / "demo-error.png"
    report = run_browser(demo, screenshot, None, "--empty-prompt")
    assert "ValidationError (HTTP 422)" in report["error"], report["error"]
    assert report["image"] is None
    assert report["finalStatus"] == "FAILED"
    assert report["pageErrors"] == []
    assert_png(screenshot)
    sdk_calls = [r for r in report["requests"] if urlsplit(r["url"]).path == "/api/fal/proxy"]
    assert [(r["method"], r["status"]) for r in sdk_calls] == [("POST", 422)], sdk_calls
    refused = demo.wait_for(
        lambda r: (
            r.get("event") == "request" and r.get("route") == "queue" and r.get("status") == 422
        )
    )
    assert refused.get("target_host") == "queue.fal.run" and refused.get("method") == "POST", (
        refused
    )


JAVASCRIPT = {"text/javascript", "application/javascript"}  # module scripts need one of these


@pytest.mark.parametrize(
    ("path", "types"),
    [
        ("/", {"text/html"}),
        ("/demo/demo.js", JAVASCRIPT),
        ("/demo/fal-client.js", JAVASCRIPT),
        ("/demo/demo.css", {"text/css"}),
    ],
)
def test_page_files_are_served_with_their_types(demo: Demo, path: str, types: set[str]) -> None:
    with httpx.Client(base_url=demo.url, trust_env=False, timeout=10) as client:
        response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0].strip() in types, response.headers


def test_a_missing_page_file_is_a_plain_404(demo: Demo) -> None:
    with httpx.Client(base_url=demo.url, trust_env=False, timeout=10) as client:
        response = client.get("/demo/no-such-file.js")
    assert response.status_code == 404


def test_the_page_works_bound_everywhere_and_opened_elsewhere(tmp_path: Path) -> None:
    """As in a container: FAL_PROXY_HOST=0.0.0.0 (the image's), and the browser opens another
    address than the demo logs (127.0.0.2, as the host's name for a published port). The
    image comes from the page's own origin and the CSP lets it in."""
    require_browser_tools()
    process = Process(
        [sys.executable, "-m", "proxy", "demo", *demo_port_args()],
        child_env(FAL_PROXY_LOG_FORMAT="json", FAL_PROXY_HOST="0.0.0.0"),
    )
    try:
        line = process.wait_for_json(
            lambda r: r.get("event") == "listening" and r.get("role") == "proxy"
        )
        assert line["host"] == "0.0.0.0", line
        elsewhere = Demo(process, f"http://127.0.0.2:{line['port']}")
        report = run_browser(elsewhere, tmp_path / "elsewhere.png", PROMPT)
        assert report["image"]["naturalWidth"] > 0 and report["image"]["complete"], report
        assert origin(report["image"]["src"]) == elsewhere.url, report["image"]
        assert report["consoleErrors"] == [] and report["pageErrors"] == [], report
        assert all(origin(r["url"]) == elsewhere.url for r in report["requests"]), report
        assert_logged_no_errors(process)
    finally:
        process.stop()
