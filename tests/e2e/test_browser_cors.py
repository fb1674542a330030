"""The real fal JS SDK in a real browser, calling the proxy cross-origin (CORS).

A page (``tests/browser_page/``) is served by a tiny static HTTP server in this process on
its own loopback port, so its origin (``http://127.0.0.1:<page port>``) is not the
proxy's (``http://127.0.0.1:<proxy port>``). Next to it sits ``fal-client.js``: the pinned
``@fal-ai/client`` (``tests/sdk/package-lock.json``) bundled by
``tests/sdk/build-demo-bundle.mjs`` into a temporary directory when this module starts.
``tests/sdk/browser-cors.mjs`` drives Debian's headless Chromium (playwright-core) through
``fal.subscribe("fal-ai/flux/schnell", ...)`` with the *string* ``proxyUrl``
``<proxy>/api/fal/proxy``, records the network at the DevTools-protocol level (which shows
CORS preflights and why the browser blocked a request) and screenshots the page.

What is proven, each time from three sides (the page, the browser's network, and what the
proxy logged and the emulated gateway received):

* a listed origin (``FAL_PROXY_ALLOWED_ORIGINS``) works: preflights answered 204 for the
  page's origin, responses readable (the SDK reads ``x-fal-request-id``), queue submit,
  status polls and result through the gateway, an image that loads;
* an origin that is not listed is refused: the preflight gets 403, the browser blocks the
  call, the SDK call fails in the page and nothing reaches the gateway;
* with ``FAL_PROXY_AUTH=token`` the page's ``requestMiddleware`` sends the caller token in
  ``x-proxy-authorization`` (which the preflight allows), the call succeeds and the proxy
  logs the caller; without the token, or with a wrong one, the page reads the 401 (errors
  carry CORS headers) and nothing reaches the gateway.

Needs Chromium (``apt-get install -y chromium``, or ``.ci/run``) and ``npm ci --prefix
tests/sdk``; without either the tests fail (never skip).
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
import pytest

from tests.browser_support import require_browser_tools
from tests.conftest import FAL_KEY, ROOT, FakeGateway, RunningProxy, child_env, start_fake_gateway

SDK_DIR = ROOT / "tests" / "sdk"
SCRIPT = SDK_DIR / "browser-cors.mjs"
BUILD_SCRIPT = SDK_DIR / "build-demo-bundle.mjs"
PAGE_DIR = ROOT / "tests" / "browser_page"
NODE_TIMEOUT = 60
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROUTE = "/api/fal/proxy"
ENDPOINT = "fal-ai/flux/schnell"
BROWSER_PACKAGES = ("playwright-core", "esbuild", "@fal-ai/client")
SUBMIT_TARGET = f"https://queue.fal.run/{ENDPOINT}"
REQUESTS_TARGET = "https://queue.fal.run/fal-ai/flux/requests"  # the SDK polls on owner/alias
PREFLIGHT_CORS_ERRORS = {"PreflightMissingAllowOriginHeader", "PreflightInvalidStatus"}
EMULATOR_TIME_SCALE = "0.2"
CALLER = "web-app"
TOKEN = "tok-browser-0123456789abcdef"
OTHER_TOKEN = "tok-other-caller-fedcba9876543210"


@pytest.fixture(scope="module")
def fake_gateway() -> Iterator[FakeGateway]:
    """The shared emulator fixture, on a slower clock (time scale 0.2 instead of 0.05).

    A job then spends 0.2 s IN_QUEUE and 0.4 s IN_PROGRESS, so the page's status polls
    (every 25 ms) see the job's progress even on a busy machine. ``start_proxy`` and the
    per-test clearing use this override.
    """
    gateway = start_fake_gateway("--time-scale", EMULATOR_TIME_SCALE)
    yield gateway
    gateway.stop()


# --- the page, served from its own origin ------------------------------------------------


class _PageHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map: ClassVar[dict[str, str]] = {
        ".html": "text/html; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
        "": "application/octet-stream",
    }

    def end_headers(self) -> None:
        self.send_header("cache-control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class PageServer:
    """A static HTTP server on 127.0.0.1:<any free port>, in a thread of this process."""

    def __init__(self, directory: Path) -> None:
        handler = functools.partial(_PageHandler, directory=str(directory))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"{self.origin}/index.html"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class Pages:
    """The page's two static servers, started on first use.

    Lazily, so that a missing Chromium or ``node_modules`` fails the test itself (with the
    install command) rather than erroring in a fixture.
    """

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._factory = tmp_path_factory
        self._site: Path | None = None
        self._servers: dict[str, PageServer] = {}

    def site(self) -> Path:
        """tests/browser_page/ plus fal-client.js, built now from the pinned npm package."""
        node = require_browser_tools(BROWSER_PACKAGES)
        if self._site is None:
            directory = self._factory.mktemp("browser-page")
            for name in ("index.html", "page.js"):
                shutil.copyfile(PAGE_DIR / name, directory / name)
            built = subprocess.run(
                [node, str(BUILD_SCRIPT), str(directory / "fal-client.js")],
                cwd=SDK_DIR,
                env=child_env(),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert built.returncode == 0, (
                f"build-demo-bundle.mjs failed:\n{built.stdout}\n{built.stderr}"
            )
            assert (
                "@fal-ai/client 1.10.1"
                in (directory / "fal-client.js").read_text(encoding="utf-8")[:400]
            )
            self._site = directory
        return self._site

    def server(self, name: str) -> PageServer:
        """The same page on its own port (its own origin) per ``name``."""
        site = self.site()
        if name not in self._servers:
            self._servers[name] = PageServer(site)
        return self._servers[name]

    def stop(self) -> None:
        for server in self._servers.values():
            server.stop()


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pages]:
    served = Pages(tmp_path_factory)
    yield served
    served.stop()


# --- driving the browser -------------------------------------------------------------------


def run_browser(tmp_path: Path, runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Run browser-cors.mjs over ``runs`` (in order, one browser); return the runs by name."""
    node = require_browser_tools(BROWSER_PACKAGES)
    for run in runs:
        run.setdefault("prompt", f"a lighthouse at dusk, {run['name']}")
        run.setdefault("screenshot", str(tmp_path / f"{run['name']}.png"))
    spec = tmp_path / "browser-spec.json"
    spec.write_text(json.dumps({"runs": runs}), encoding="utf-8")
    completed = subprocess.run(
        [node, str(SCRIPT), str(spec)],
        cwd=SDK_DIR,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        check=False,
    )
    (tmp_path / "browser-report.json").write_text(
        completed.stdout, encoding="utf-8"
    )  # kept for debugging
    try:
        report = json.loads(completed.stdout)
    except ValueError:
        raise AssertionError(
            f"browser-cors.mjs exited {completed.returncode} without a JSON report:\n"
            f"{completed.stdout}\n{completed.stderr}"
        ) from None
    assert completed.returncode == 0 and report["ok"], (
        f"browser-cors.mjs failed (exit {completed.returncode}):\n"
        f"{json.dumps(report, indent=2)}\n{completed.stderr}"
    )
    for run in report["runs"]:
        assert run["pageErrors"] == [], run["pageErrors"]
        assert_png(Path(run["screenshot"]))
    return {run["name"]: run for run in report["runs"]}


def assert_png(path: Path) -> None:
    assert path.is_file(), f"no screenshot at {path}"
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 0 and height > 0


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def proxy_traffic(
    run: dict[str, Any], proxy: RunningProxy
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(preflights, actual requests) the browser sent to the proxy's SDK route."""
    ours = [e for e in run["network"] if e["url"] and e["url"].startswith(proxy.url + ROUTE)]
    preflights = [e for e in ours if e["method"] == "OPTIONS"]
    actual = [e for e in ours if e["method"] != "OPTIONS"]
    return preflights, actual


def proxy_line(proxy: RunningProxy, entry: dict[str, Any]) -> dict[str, Any]:
    """The proxy's canonical log line for a request the browser recorded."""
    request_id = entry["responseHeaders"].get("x-proxy-request-id")
    assert request_id, entry
    return proxy.wait_for_request_log(request_id)


def assert_preflights_passed(
    preflights: list[dict[str, Any]],
    page_origin: str,
    proxy: RunningProxy,
    *,
    caller_header: bool = False,
) -> None:
    assert preflights, "the browser sent no CORS preflight to the proxy"
    for pre in preflights:
        assert pre["type"] == "Preflight", pre
        assert pre["requestHeaders"].get("origin") == page_origin, pre
        asked = {
            h.strip()
            for h in pre["requestHeaders"].get("access-control-request-headers", "").split(",")
        }
        assert "x-fal-target-url" in asked, pre
        assert ("x-proxy-authorization" in asked) == caller_header, pre
        assert pre["status"] == 204, pre
        assert pre["failed"] is None, pre
        headers = pre["responseHeaders"]
        assert headers.get("access-control-allow-origin") == page_origin, pre
        allowed = {h.strip() for h in headers.get("access-control-allow-headers", "").split(",")}
        assert asked <= allowed, (asked, allowed)
        assert "access-control-allow-credentials" not in headers, pre
        line = proxy_line(proxy, pre)
        assert line["method"] == "OPTIONS" and line["status"] == 204 and "error" not in line, line


def assert_subscribe_succeeded(
    run: dict[str, Any],
    page_origin: str,
    proxy: RunningProxy,
    fake_gateway: FakeGateway,
    *,
    caller_header: bool = False,
) -> str:
    """Everything a successful cross-origin fal.subscribe must show; returns the request id."""
    summary = run["summary"]
    assert summary["error"] is None, summary["error"]
    assert summary["ok"], summary
    assert summary["origin"] == page_origin

    # The page: statuses, logs, and a request id the SDK read from the x-fal-request-id
    # response header (an unexposed header reads as null, and requestId would be "").
    request_id = summary["requestId"]
    assert request_id, "the SDK could not read x-fal-request-id: the CORS answer does not expose it"
    assert request_id == summary["enqueuedRequestId"], summary
    assert summary["statuses"][0] == "SUBMITTING" and summary["statuses"][-1] == "COMPLETED", (
        summary["statuses"]
    )
    # The status polls showed the job's progress (IN_QUEUE for 0.2 s, then IN_PROGRESS for
    # 0.4 s at this module's emulator time scale; the page polls every 25 ms).
    assert set(summary["statuses"]) <= {"SUBMITTING", "IN_QUEUE", "IN_PROGRESS", "COMPLETED"}, (
        summary["statuses"]
    )
    assert "IN_PROGRESS" in summary["statuses"], summary["statuses"]
    assert summary["logs"], "no queue logs reached the page"

    # The image: produced by the emulator, loaded by the page, and really a 64x64 PNG.
    image = summary["image"]
    assert image["loaded"] and image["complete"], image
    assert (image["naturalWidth"], image["naturalHeight"]) == (64, 64), image
    assert origin_of(image["src"]) == origin_of(fake_gateway.gateway_url), image
    png = httpx.get(image["src"], timeout=10, trust_env=False)
    assert png.status_code == 200 and png.content[:8] == PNG_SIGNATURE, png

    # The network: preflighted, every call answered for this origin.
    preflights, actual = proxy_traffic(run, proxy)
    assert_preflights_passed(preflights, page_origin, proxy, caller_header=caller_header)
    assert [e["method"] for e in actual][:1] == ["POST"], actual
    assert {e["method"] for e in actual[1:]} == {"GET"}, actual
    for call in actual:
        assert call["status"] == 200 and call["failed"] is None, call
        assert call["requestHeaders"].get("origin") == page_origin, call
        headers = call["responseHeaders"]
        assert headers.get("access-control-allow-origin") == page_origin, call
        exposed = {h.strip() for h in headers.get("access-control-expose-headers", "").split(",")}
        assert "x-fal-request-id" in exposed, call
        assert "authorization" not in call["requestHeaders"], call  # no fal key in the page
        assert ("x-proxy-authorization" in call["requestHeaders"]) == caller_header, call
        line = proxy_line(proxy, call)
        assert (
            line["status"] == 200
            and line["route"] == "queue"
            and line["target_host"] == "queue.fal.run"
        ), line
    targets = [e["requestHeaders"].get("x-fal-target-url") for e in actual]
    assert targets[0] == SUBMIT_TARGET and len(targets) >= 3, targets
    assert set(targets[1:-1]) == {f"{REQUESTS_TARGET}/{request_id}/status?logs=1"}, targets
    assert targets[-1] == f"{REQUESTS_TARGET}/{request_id}", targets

    # The emulated gateway: exactly the calls the browser made, and nothing else.
    received = fake_gateway.requests()
    assert [(r["method"], r["target_url"]) for r in received] == [
        (e["method"], t) for e, t in zip(actual, targets, strict=True)
    ], (received, targets)
    submit = json.loads(received[0]["body"])
    assert submit["prompt"] == run["prompt"] and submit["image_size"] == {
        "width": 64,
        "height": 64,
    }, submit
    for record in received:
        assert record["header_map"].get("authorization") == f"Key {FAL_KEY}", (
            record
        )  # added by the proxy
        names = {name for name, _ in record["headers"]}
        assert not names & {"origin", "x-proxy-authorization"}, (
            names
        )  # browser context stays at the proxy
    return request_id


# --- the tests -------------------------------------------------------------------------------


def test_listed_origin_subscribes_cross_origin_through_the_proxy(
    start_proxy: Any, fake_gateway: FakeGateway, pages: Pages, tmp_path: Path
) -> None:
    app_page = pages.server("app")  # the web app's page: its origin is the one the proxy lists
    proxy = start_proxy(FAL_PROXY_ALLOWED_ORIGINS=app_page.origin)
    proxy_url = proxy.url + ROUTE
    assert origin_of(proxy_url) != app_page.origin  # cross-origin for real
    runs = run_browser(
        tmp_path, [{"name": "allowed", "pageUrl": app_page.url, "proxyUrl": proxy_url}]
    )
    run = runs["allowed"]
    print(f"screenshot: {run['screenshot']}")
    request_id = assert_subscribe_succeeded(run, app_page.origin, proxy, fake_gateway)
    assert run["consoleErrors"] == [], run["consoleErrors"]
    assert any(r.get("fal_request_id") == request_id for r in proxy.request_logs())


def test_unlisted_origin_is_refused_in_the_browser_and_nothing_goes_upstream(
    start_proxy: Any, fake_gateway: FakeGateway, pages: Pages, tmp_path: Path
) -> None:
    app_page = pages.server("app")
    other_page = pages.server(
        "other"
    )  # the very same page on a third port: an origin nobody listed
    assert other_page.origin != app_page.origin
    proxy = start_proxy(FAL_PROXY_ALLOWED_ORIGINS=app_page.origin)
    proxy_url = proxy.url + ROUTE
    runs = run_browser(
        tmp_path, [{"name": "unlisted", "pageUrl": other_page.url, "proxyUrl": proxy_url}]
    )
    run = runs["unlisted"]
    summary = run["summary"]

    # The page: the SDK call failed with the browser's opaque network error, not an answer.
    assert not summary["ok"] and summary["image"] is None and summary["requestId"] is None, summary
    error = summary["error"]
    assert error is not None and not error["isApiError"] and error["name"] == "TypeError", error
    assert error["message"] == "Failed to fetch", error
    assert summary["statuses"] == ["SUBMITTING", "FAILED"], summary

    # The network: the preflight was refused (403, no CORS headers) and the browser never
    # sent the POST itself.
    preflights, actual = proxy_traffic(run, proxy)
    assert len(preflights) == 1, run["network"]
    pre = preflights[0]
    assert pre["requestHeaders"].get("origin") == other_page.origin, pre
    assert pre["status"] == 403, pre
    assert "access-control-allow-origin" not in pre["responseHeaders"], pre
    assert len(actual) == 1, actual  # the POST the page asked for, blocked before sending
    post = actual[0]
    assert post["method"] == "POST" and post["status"] is None, post
    # Chromium names the first preflight check that failed (the missing allow-origin header).
    assert post["failed"] is not None and post["failed"]["corsError"] in PREFLIGHT_CORS_ERRORS, post
    assert any("blocked by CORS policy" in message for message in run["consoleErrors"]), run[
        "consoleErrors"
    ]

    # The proxy refused it on the origin check, and the gateway saw nothing.
    line = proxy_line(proxy, pre)
    assert (line["method"], line["status"], line["error"]) == ("OPTIONS", 403, "origin_refused"), (
        line
    )
    assert [r["status"] for r in proxy.request_logs()] == [403], proxy.request_logs()
    assert fake_gateway.requests() == []


def test_caller_token_from_request_middleware(
    start_proxy: Any, fake_gateway: FakeGateway, pages: Pages, tmp_path: Path
) -> None:
    app_page = pages.server("app")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(
        f"# caller-id token\n{CALLER} {TOKEN}\nsomeone-else {OTHER_TOKEN}\n", encoding="utf-8"
    )
    proxy = start_proxy(
        FAL_PROXY_ALLOWED_ORIGINS=app_page.origin,
        FAL_PROXY_AUTH="token",
        FAL_PROXY_CLIENT_TOKENS_FILE=str(tokens),
    )
    proxy_url = proxy.url + ROUTE

    # Refused first, so that anything the gateway then holds belongs to the good call.
    refused = run_browser(
        tmp_path,
        [
            {"name": "no-token", "pageUrl": app_page.url, "proxyUrl": proxy_url},
            {
                "name": "wrong-token",
                "pageUrl": app_page.url,
                "proxyUrl": proxy_url,
                "token": "tok-not-listed-00000000000000",
            },
        ],
    )
    for name, reason, header_sent in (
        ("no-token", "caller_missing", False),
        ("wrong-token", "caller_refused", True),
    ):
        run = refused[name]
        summary = run["summary"]
        error = summary["error"]
        # The page read the proxy's 401: its error answer carries the CORS headers.
        assert error is not None and error["isApiError"] and error["status"] == 401, (name, error)
        assert error["body"]["message"].startswith("caller"), (name, error)
        assert not summary["ok"] and summary["image"] is None, (name, summary)
        preflights, actual = proxy_traffic(run, proxy)
        assert_preflights_passed(preflights, app_page.origin, proxy, caller_header=header_sent)
        assert [(e["method"], e["status"]) for e in actual] == [("POST", 401)], (name, actual)
        assert actual[0]["responseHeaders"].get("access-control-allow-origin") == app_page.origin, (
            actual
        )
        line = proxy_line(proxy, actual[0])
        assert (line["status"], line["error"]) == (401, reason), line
        assert "caller" not in line, line
    assert fake_gateway.requests() == [], "a refused caller's request reached the gateway"

    allowed = run_browser(
        tmp_path,
        [
            {"name": "with-token", "pageUrl": app_page.url, "proxyUrl": proxy_url, "token": TOKEN},
        ],
    )
    run = allowed["with-token"]
    print(f"screenshot: {run['screenshot']}")
    request_id = assert_subscribe_succeeded(
        run, app_page.origin, proxy, fake_gateway, caller_header=True
    )
    _, actual = proxy_traffic(run, proxy)
    for call in actual:
        assert call["requestHeaders"]["x-proxy-authorization"] == f"Bearer {TOKEN}", call
        assert proxy_line(proxy, call).get("caller") == CALLER
    assert any(
        r.get("fal_request_id") == request_id and r.get("caller") == CALLER
        for r in proxy.request_logs()
    )
    # The token stays at the proxy: no log line carries it.
    assert TOKEN not in "\n".join(proxy.process.lines)


# --- a page that is not listed, with no SDK and no CORS: drive-by requests ---------------------


@pytest.mark.parametrize("listed", [False, True])
def test_a_drive_by_page_runs_nothing_through_the_proxy(
    start_proxy: Any, fake_gateway: FakeGateway, pages: Pages, tmp_path: Path, listed: bool
) -> None:
    """<img src>, no-cors GETs and a no-cors POST from another origin: what browsers send
    with them (Sec-Fetch-Site, Referer, Origin on the POST) keeps every one from reaching
    the gateway, unless the page's origin is listed."""
    page = pages.server("drive-by")
    proxy = start_proxy(**({"FAL_PROXY_ALLOWED_ORIGINS": page.origin} if listed else {}))
    runs = run_browser(
        tmp_path,
        [{"name": "drive-by", "kind": "driveby", "pageUrl": page.url, "proxyUrl": proxy.url}],
    )
    ours = [e for e in runs["drive-by"]["network"] if e["url"] and e["url"].startswith(proxy.url)]
    assert len(ours) == 4, ours  # the browser did send all four
    for entry in ours:
        assert entry["requestHeaders"].get("sec-fetch-site") == "same-site", entry  # another port
        line = proxy_line(proxy, entry)
        if listed:
            # The page's own listed origin: the no-referrer GET still has no way to prove it.
            expected = "origin_refused" if "no-referrer" in entry["url"] else None
        else:
            expected = "origin_refused"
        assert line.get("error") == expected, (entry["url"], line)
    prompts = sorted(
        json.loads(r["body"]).get("prompt", "") if r["body"] else r["query"]
        for r in fake_gateway.requests()
    )
    if listed:
        assert len(prompts) == 3, prompts
    else:
        assert prompts == [], prompts
