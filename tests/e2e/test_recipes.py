"""The README's dev-server recipes ("Behind your app's dev server"), run for real.

Two apps in ``tests/recipes/`` (installed by ``npm ci --prefix tests/recipes``, pinned by its
lockfile): ``vite-app/`` under Vite's dev server (``server.proxy``) and ``next-app/`` under
``next dev`` (``rewrites``), each configured exactly as the README says, with the proxy's URL
from ``FAL_PROXY_URL``. Both pages run ``shared/recipe-page.js``: the unmodified
``@fal-ai/client`` 1.10.1 with the *relative* ``proxyUrl`` ``/api/fal/proxy``, so every call
goes to the page's own origin and the dev server forwards it to the proxy (no CORS, nothing
in ``FAL_PROXY_ALLOWED_ORIGINS``). ``tests/recipes/drive.mjs`` drives each page in Debian's
headless Chromium and reports what the page saw and what it sent.

Per app, once (a module fixture), then asserted by three tests:

* ``fal.run``: the page gets the image; the call went to the page's origin, and the emulated
  gateway got it in path mode with the server's key;
* ``fal.subscribe`` with ``mode: "streaming"``: the emulator holds the queue and the driver
  releases each state only once the page has reported the state before it, so a dev server
  (or proxy) that buffered the status stream would leave the page with nothing to report and
  time out; the event stream reaches the page uncompressed (``Cache-Control: no-transform``);
* a realtime WebSocket opened on the page's own origin (``/fal-ai/<app>/realtime``), forwarded
  by the dev server to the proxy and bridged to the gateway: two msgpack frames, two msgpack
  answers, a clean close seen by the emulator;
* the SDK's direct realtime path, ``fal.realtime.connect`` with the README's ``tokenProvider``:
  the token comes from the proxy's ``/api/fal/realtime-token`` through the dev server, and the
  SDK opens ``wss://fal.run/<app>/realtime?fal_jwt_token=…`` itself. Chromium maps ``fal.run``
  to a TLS front on loopback (``--host-resolver-rules``), trusting only its certificate
  (``--ignore-certificate-errors-spki-list``, from ``trustme``); the front hands the bytes
  to the same emulator that issued the token, which serves a request addressed to
  ``fal.run`` as fal.run itself (:mod:`proxy.emulator.fal_names`) and accepts the socket only
  with that token.

Each page shows every answer (text and images) and the driver screenshots it once its images
have loaded: the paths are printed at the end of the run (also copied to
``/tmp/recipe-screenshots/<app>.png``).

Marked ``recipes``: ``make test`` leaves them out (pyproject's addopts ``-m "not recipes"``);
``make test-recipes`` installs the apps and runs them. Needs Chromium, node >= 20.19, and
``npm ci`` in ``tests/sdk`` (playwright-core) and ``tests/recipes``; without them the tests
fail (never skip).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.browser_support import require_browser_tools
from tests.conftest import (
    FAL_KEY,
    ROOT,
    FakeGateway,
    RunningProxy,
    child_env,
    launch_proxy,
    start_fake_gateway,
)

pytestmark = pytest.mark.recipes

RECIPES = ROOT / "tests" / "recipes"
MODULES = RECIPES / "node_modules"
DRIVER = RECIPES / "drive.mjs"
INSTALL_HINT = "run `make test-recipes` (it runs `npm ci --prefix tests/recipes`)"
ROUTE = "/api/fal/proxy"
RUN_APP = "fal-ai/flux/schnell"
SUBSCRIBE_APP = "fal-ai/flux/dev"
REALTIME_PATH = "/fal-ai/fast-lcm-diffusion/realtime"
SIZE = {"width": 64, "height": 64}
SOCKET_PROMPTS = ["first frame", "second frame"]
TOKEN_ROUTE = "/api/fal/realtime-token"
DIRECT_APP = "fal-ai/fast-sdxl"  # not the bridged socket's app: their events stay apart
DIRECT_PROMPTS = ["first direct frame", "second direct frame"]
SCREENSHOTS = Path("/tmp/recipe-screenshots")
SERVER_AUTH = f"Key {FAL_KEY}"
DEV_SERVER_START = 60.0  # to "ready"; the first page load then compiles (next dev: ~5 s)
DRIVER_TIMEOUT = 180


@dataclass(frozen=True)
class DevServer:
    """How to start one recipe app's dev server on a free loopback port."""

    name: str
    package: str  # whose version the test checks
    version: str
    args: tuple[str, ...]  # after `node`; the port is chosen by the server (port 0)

    def command(self, node: str) -> list[str]:
        return [node, *self.args]


SERVERS = {
    "vite": DevServer(
        "vite",
        "vite",
        "8.4.1",
        (
            str(MODULES / "vite" / "bin" / "vite.js"),
            str(RECIPES / "vite-app"),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--strictPort",
        ),
    ),
    "next": DevServer(
        "next",
        "next",
        "16.5.0",
        (
            str(MODULES / "next" / "dist" / "bin" / "next"),
            "dev",
            str(RECIPES / "next-app"),
            "--hostname",
            "127.0.0.1",
            "--port",
            "0",
        ),
    ),
}
LOCAL_URL = re.compile(r"Local:\s+(http://127\.0\.0\.1:\d+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class RunningDevServer:
    """A dev server in its own process group (next dev starts a child server: both stop)."""

    def __init__(self, server: DevServer, node: str, proxy_url: str, log: Path) -> None:
        env = child_env(FAL_PROXY_URL=proxy_url, NEXT_TELEMETRY_DISABLED="1", NO_COLOR="1")
        self.log = log
        self.proc = subprocess.Popen(
            server.command(node),
            cwd=RECIPES,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = self._wait_for_url()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(ANSI.sub("", line.rstrip("\n")))

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + DEV_SERVER_START
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if found := LOCAL_URL.search(line):
                    return found.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError("the dev server did not start:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.write_text("\n".join(self.lines) + "\n", encoding="utf-8")


def require_recipe_tools() -> str:
    node = require_browser_tools(("playwright-core",))
    for server in SERVERS.values():
        manifest = MODULES / server.package / "package.json"
        if not manifest.is_file():
            pytest.fail(f"{MODULES} has no {server.package}: {INSTALL_HINT}", pytrace=False)
        version = json.loads(manifest.read_text(encoding="utf-8"))["version"]
        assert version == server.version, f"{server.package} {version}: {INSTALL_HINT}"
    client = json.loads((MODULES / "@fal-ai" / "client" / "package.json").read_text("utf-8"))
    assert client["version"] == "1.10.1", client["version"]
    return node


class FalRunFront:
    """``fal.run``'s TLS on loopback: a certificate for ``fal.run`` from a throwaway CA
    (``trustme``), and every connection's decrypted bytes piped, unchanged, to the
    emulator's plain port, which sees ``Host: fal.run`` and answers as fal.run. Chromium
    reaches it with ``--host-resolver-rules=MAP fal.run 127.0.0.1:<port>`` and trusts just
    this certificate by its SPKI hash. Runs its own event loop on a thread."""

    def __init__(self, emulator_port: int) -> None:
        leaf = trustme.CA().issue_cert("fal.run")
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf.configure_cert(self.context)
        self.context.set_alpn_protocols(["http/1.1"])
        self.context.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
        cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
        spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        self.spki_sha256 = base64.b64encode(hashlib.sha256(spki).digest()).decode()
        self.emulator_port = emulator_port
        self.server_names: list[str | None] = []  # the SNI of each TLS connection
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the fal.run TLS front did not start"

    def chromium_args(self) -> list[str]:
        return [
            f"--host-resolver-rules=MAP fal.run 127.0.0.1:{self.port}",
            f"--ignore-certificate-errors-spki-list={self.spki_sha256}",
        ]

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._pipe, "127.0.0.1", 0, ssl=self.context)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.emulator_port)
        except OSError:
            writer.close()
            return

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer),
                             return_exceptions=True)  # fmt: skip

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@dataclass
class RecipeRun:
    """One app's page driven once: what the page reported and what the others saw."""

    app: str
    origin: str  # the dev server's: the page's own origin
    report: dict[str, Any]
    received: list[dict[str, Any]]  # what the emulated gateway received (HTTP)
    sockets: list[dict[str, Any]]  # the WebSocket handshakes it received
    direct_sockets: list[dict[str, Any]]  # ... and those addressed to fal.run itself
    events: list[str]
    proxy_logs: list[dict[str, Any]]
    emulator_url: str
    front: FalRunFront

    def page_requests(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.report["requests"] if r["url"].split("?")[0] == self.origin + path]


@pytest.fixture(scope="module")
def fake_gateway() -> Iterator[FakeGateway]:
    gateway = start_fake_gateway()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def fal_run_front(fake_gateway: FakeGateway) -> Iterator[FalRunFront]:
    front = FalRunFront(fake_gateway.port)
    yield front
    front.stop()


@pytest.fixture(scope="module")
def proxy(fake_gateway: FakeGateway) -> Iterator[RunningProxy]:
    """The proxy with its defaults: no origin listed (the page is same-origin)."""
    running = launch_proxy(fake_gateway.gateway_url)
    yield running
    running.process.stop()


@pytest.fixture(scope="module", params=sorted(SERVERS))
def recipe(
    request: pytest.FixtureRequest,
    fake_gateway: FakeGateway,
    fal_run_front: FalRunFront,
    proxy: RunningProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RecipeRun]:
    node = require_recipe_tools()
    server = SERVERS[request.param]
    directory = tmp_path_factory.mktemp(f"recipe-{server.name}")
    dev = RunningDevServer(server, node, proxy.url, directory / "dev-server.log")
    try:
        fake_gateway.clear()  # (also ends an earlier hold)
        held = fake_gateway.client.post("/_emulator/queue/hold")
        assert held.status_code == 200, held.text
        emulator_url = str(fake_gateway.client.base_url).rstrip("/")
        logged_before = len(proxy.process.lines)  # the proxy serves both apps in turn
        report = drive(node, directory, dev.url, emulator_url, fal_run_front)
        received = fake_gateway.requests()
        sockets = fake_gateway.requests("websocket")
        # The session's log line is written once both sides closed, and the emulator notes
        # the direct socket's close once it has it: wait for both.
        deadline = time.monotonic() + 10
        while not any(r.get("event") == "websocket" for r in proxy.logs()[logged_before:]):
            assert time.monotonic() < deadline, "the proxy logged no websocket session"
            time.sleep(0.05)
        while sum(e.startswith("ws-closed:") for e in fake_gateway.events()) < 2:
            assert time.monotonic() < deadline, f"no close of both sockets: {fake_gateway.events()}"
            time.sleep(0.05)
        yield RecipeRun(
            request.param,
            dev.url,
            report,
            received,
            sockets,
            fake_gateway.requests("direct-websocket"),
            fake_gateway.events(),
            proxy.logs()[logged_before:],
            emulator_url,
            fal_run_front,
        )
    finally:
        dev.stop()
        fake_gateway.clear()
        show_screenshot(request, server.name, directory / "page.png")


def show_screenshot(request: pytest.FixtureRequest, app: str, shot: Path) -> None:
    """Copy the page's screenshot to SCREENSHOTS and print both paths (past the capture)."""
    if not shot.is_file():
        return
    SCREENSHOTS.mkdir(exist_ok=True)
    kept = shutil.copyfile(shot, SCREENSHOTS / f"{app}.png")
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"recipe {app}: screenshot {shot} (copied to {kept})")


def drive(
    node: str, directory: Path, page_url: str, emulator_url: str, front: FalRunFront
) -> dict[str, Any]:
    spec = {
        "pageUrl": page_url + "/",
        "emulatorUrl": emulator_url,
        "screenshot": str(directory / "page.png"),
        "run": {"app": RUN_APP, "input": {"prompt": "a run", "image_size": SIZE}},
        "subscribe": {"app": SUBSCRIBE_APP, "input": {"prompt": "a subscribe", "image_size": SIZE}},
        "sockets": [
            {
                "name": "same-origin",
                "path": REALTIME_PATH,
                "inputs": [{"prompt": p, "image_size": SIZE} for p in SOCKET_PROMPTS],
            }
        ],
        "realtime": {
            "app": DIRECT_APP,
            "inputs": [{"prompt": p, "image_size": SIZE} for p in DIRECT_PROMPTS],
        },
        "chromiumArgs": front.chromium_args(),
        "keepBodiesOf": [TOKEN_ROUTE],
    }
    spec_path = directory / "spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    completed = subprocess.run(
        [node, str(DRIVER), str(spec_path)],
        cwd=RECIPES,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=DRIVER_TIMEOUT,
        check=False,
    )
    (directory / "report.json").write_text(completed.stdout, encoding="utf-8")
    try:
        report: dict[str, Any] = json.loads(completed.stdout)
    except ValueError:
        raise AssertionError(
            f"drive.mjs exited {completed.returncode} without a report:\n"
            f"{completed.stdout}\n{completed.stderr}"
        ) from None
    assert completed.returncode == 0 and report["ok"], (
        f"drive.mjs failed: {report.get('failure')}\n{json.dumps(report, indent=2)[:20000]}"
    )
    assert report["pageErrors"] == [], report["pageErrors"]
    assert report["consoleErrors"] == [], report["consoleErrors"]
    return report


def assert_same_origin_call(recipe: RecipeRun, call: dict[str, Any]) -> None:
    """A call of the SDK's route, as the browser made it and as the dev server answered it."""
    headers = call["requestHeaders"]
    assert call["status"] == 200, call
    assert headers.get("sec-fetch-site") == "same-origin", call  # no CORS, no preflight
    assert "authorization" not in headers, call  # no fal key in the page
    assert call["responseHeaders"].get("x-fal-request-id"), call


def assert_from_the_proxy(record: dict[str, Any]) -> None:
    assert record["header_map"].get("authorization") == SERVER_AUTH, record
    names = {name for name, _ in record["headers"]}
    assert not names & {"origin", "cookie", "x-forwarded-host"}, names  # stays at the proxy


def proxy_requests(recipe: RecipeRun) -> list[dict[str, Any]]:
    return [r for r in recipe.proxy_logs if r.get("event") == "request"]


# --- the tests -------------------------------------------------------------------------------


def test_fal_run_through_the_dev_server(recipe: RecipeRun) -> None:
    run = recipe.report["run"]
    assert run["error"] is None, run["error"]
    (image,) = run["data"]["images"]
    assert (image["width"], image["height"]) == (64, 64)
    assert image["url"].startswith(recipe.emulator_url + "/_emulator/files/"), image

    # The page called its own origin; the dev server answered with the proxy's answer.
    (call,) = [
        r
        for r in recipe.page_requests(ROUTE)
        if r["requestHeaders"].get("x-fal-target-url") == f"https://fal.run/{RUN_APP}"
    ]
    assert call["method"] == "POST", call
    assert_same_origin_call(recipe, call)
    assert call["responseHeaders"]["x-fal-request-id"] == run["requestId"]

    # The gateway got it in path mode, with the server's key and not the page's context.
    runs = [r for r in recipe.received if r["target_url"] is None]
    assert [(r["method"], r["path"].rsplit("/fal/", 1)[1]) for r in runs] == [("POST", RUN_APP)]
    assert_from_the_proxy(runs[0])
    assert json.loads(runs[0]["body"]) == {"prompt": "a run", "image_size": SIZE}
    line = next(r for r in proxy_requests(recipe) if r.get("fal_request_id") == run["requestId"])
    assert (line["route"], line["status"], line.get("error")) == ("run", 200, None), line


def test_subscribe_status_streams_live_through_the_dev_server(recipe: RecipeRun) -> None:
    subscribe = recipe.report["subscribe"]
    subscription = subscribe["subscription"]
    assert subscription["error"] is None, subscription["error"]
    request_id = subscription["requestId"]
    assert request_id and subscription["resultRequestId"] == request_id
    (image,) = subscription["data"]["images"]
    assert (image["width"], image["height"]) == (64, 64)

    # Each held state reached the page while the job was held in it: the driver released
    # IN_QUEUE only once the page had reported it (and nothing after it), then IN_PROGRESS.
    first, second = subscribe["steps"]
    assert first["waitedFor"] == "IN_QUEUE" and first["pageHad"] == ["IN_QUEUE"], first
    assert second["waitedFor"] == "IN_PROGRESS", second
    assert second["pageHad"] == ["IN_QUEUE", "IN_PROGRESS"], second
    for step in (first, second):
        assert step["release"]["body"] == {"released": {request_id: "IN_PROGRESS"}}, step
    statuses = subscription["statuses"]
    assert [s["status"] for s in statuses] == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    # ... and each next state only after its release was asked for.
    assert statuses[1]["at"] >= first["release"]["sentAt"], (statuses, first)
    assert statuses[2]["at"] >= second["release"]["sentAt"], (statuses, second)

    # The page: submit, one status stream, the result; all on its own origin.
    calls = [
        r
        for r in recipe.page_requests(ROUTE)
        if r["requestHeaders"].get("x-fal-target-url", "").startswith("https://queue.fal.run/")
    ]
    base = f"https://queue.fal.run/fal-ai/flux/requests/{request_id}"
    assert [(c["method"], c["requestHeaders"]["x-fal-target-url"]) for c in calls] == [
        ("POST", f"https://queue.fal.run/{SUBSCRIBE_APP}"),
        ("GET", f"{base}/status/stream?logs=0"),
        ("GET", base),
    ], calls
    for call in calls:
        assert_same_origin_call(recipe, call)
    stream = calls[1]["responseHeaders"]
    assert stream["content-type"].startswith("text/event-stream"), stream
    assert "no-transform" in stream.get("cache-control", ""), stream
    assert "content-encoding" not in stream, stream  # not compressed (so not buffered) on the way

    # The gateway: the same three queue calls, each with the server's key.
    queue = [r for r in recipe.received if (r["target_url"] or "").startswith("https://queue.")]
    assert [(r["method"], r["target_url"]) for r in queue] == [
        (c["method"], c["requestHeaders"]["x-fal-target-url"]) for c in calls
    ]
    for record in queue:
        assert_from_the_proxy(record)
    lines = [r for r in proxy_requests(recipe) if r.get("route") == "queue"]
    assert [(r["status"], r.get("error")) for r in lines] == [(200, None)] * 3, lines


def test_realtime_socket_through_the_dev_server(recipe: RecipeRun) -> None:
    socket = recipe.report["sockets"]["same-origin"]
    ws_origin = recipe.origin.replace("http://", "ws://", 1)
    assert socket["url"] == ws_origin + REALTIME_PATH
    assert socket["opened"] and socket["error"] is None, socket
    assert [r["prompt"] for r in socket["replies"]] == SOCKET_PROMPTS, socket["replies"]
    for reply in socket["replies"]:
        (image,) = reply["images"]
        assert {"width": image["width"], "height": image["height"]} == SIZE, reply
    assert socket["close"] == {"code": 1000, "reason": "done", "wasClean": True}, socket

    # The browser's side: binary (msgpack) frames, one answer per frame, on the page's origin.
    (seen,) = [w for w in recipe.report["websockets"] if w["url"] == ws_origin + REALTIME_PATH]
    assert [f["dir"] for f in seen["frames"]] == ["sent", "received"] * 2, seen
    assert all(f["bytes"] for f in seen["frames"]), seen  # binary, not text

    # The gateway: one handshake with the server's key, both messages, the page's close.
    (handshake,) = recipe.sockets
    assert handshake["path"].endswith("/fal" + REALTIME_PATH), handshake
    assert_from_the_proxy(handshake)
    app = REALTIME_PATH.strip("/").removesuffix("/realtime")
    own = [e for e in recipe.events if e in (f"ws-message:{app}", "ws-closed:1000:done")]
    assert own == [f"ws-message:{app}"] * 2 + ["ws-closed:1000:done"], recipe.events
    (line,) = [r for r in recipe.proxy_logs if r.get("event") == "websocket"]
    assert (line["generations"], line["client_close"], line["upstream_close"]) == (2, 1000, 1000)


def test_realtime_token_provider_socket_straight_to_fal(recipe: RecipeRun) -> None:
    realtime = recipe.report["realtime"]
    # No error while it ran; after its close() the SDK (1.10.1) reports its own close as one:
    # it closes with no code, so the browser reports 1005, and it calls onError for any close
    # but 1000.
    (closing,) = realtime["errors"]
    assert closing["afterClose"] and closing["status"] == 1005, realtime["errors"]
    assert [r["prompt"] for r in realtime["results"]] == DIRECT_PROMPTS, realtime["results"]
    for result in realtime["results"]:
        (image,) = result["images"]
        assert {"width": image["width"], "height": image["height"]} == SIZE, result
        assert image["url"].startswith("https://fal.run/_emulator/files/"), image

    # The tokenProvider's POST went to the page's origin and the dev server answered it with
    # the proxy's route's answer; the proxy made it the token call, with its own key.
    (call,) = recipe.page_requests(TOKEN_ROUTE)
    assert call["method"] == "POST", call
    assert_same_origin_call(recipe, call)
    token = json.loads(call["responseBody"])["token"]
    assert token.startswith("emu.") and FAL_KEY not in token, token
    (issued,) = [r for r in recipe.received if r["target_url"] == "https://rest.fal.ai/tokens/"]
    assert_from_the_proxy(issued)
    assert json.loads(issued["body"]) == {"allowed_apps": ["fast-sdxl"], "token_expiration": 120}
    (line,) = [r for r in proxy_requests(recipe) if r.get("route") == "token"]
    assert (line["status"], line.get("error")) == (201, None), line  # fal's, as logged

    # The SDK's socket: wss://fal.run itself, through the TLS front (SNI fal.run), with the
    # route's token and nothing else: the emulator accepted it as fal.run, by that token.
    url = f"wss://fal.run/{DIRECT_APP}/realtime?fal_jwt_token={token}"
    (seen,) = [w for w in recipe.report["websockets"] if w["url"].startswith("wss://")]
    assert seen["url"] == url, seen
    assert [f["dir"] for f in seen["frames"]] == ["sent", "received"] * 2, seen
    assert all(f["bytes"] for f in seen["frames"]), seen  # msgpack, binary
    assert "fal.run" in recipe.front.server_names, recipe.front.server_names
    (handshake,) = recipe.direct_sockets
    assert (handshake["path"], handshake["query"]) == (
        f"/{DIRECT_APP}/realtime",
        f"fal_jwt_token={token}",
    ), handshake
    assert handshake["header_map"]["host"] == "fal.run", handshake
    assert not {"authorization", "sec-websocket-protocol"} & set(handshake["header_map"])
    direct = [e for e in recipe.events if e == f"ws-message:{DIRECT_APP}"]
    assert direct == [f"ws-message:{DIRECT_APP}"] * 2, recipe.events
    (closed,) = [
        e for e in recipe.events if e.startswith("ws-closed:") and e != "ws-closed:1000:done"
    ]
    assert closed.startswith("ws-closed:1005:"), recipe.events  # the SDK's close(): no code

    # The page showed the answers: each image it shows loaded, the socket's from fal.run.
    shown = {i["src"]: (i["naturalWidth"], i["naturalHeight"]) for i in recipe.report["images"]}
    for result in realtime["results"]:
        assert shown[result["images"][0]["url"]] == (64, 64), shown

    # No fal key anywhere in the browser: no request carried one, no answer held one.
    for request in recipe.report["requests"]:
        assert "authorization" not in request.get("requestHeaders", {}), request
    assert FAL_KEY not in json.dumps(recipe.report)
