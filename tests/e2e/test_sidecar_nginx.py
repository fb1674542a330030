"""The shipped sidecar front, for real: client → nginx (deploy/nginx/fal-proxy.conf) → proxy.

nginx runs the shipped server block, changed only where a test must differ (its listen
address, the proxy's port; pid, logs and temp files in a tmp dir), on 127.0.0.2. Clients
connect from 127.0.0.3 and 127.0.0.4; the proxy trusts loopback exactly as the manifests
set it (FAL_PROXY_TRUSTED_PROXIES), so it must see each browser's own address, never
nginx's, and a forged X-Forwarded-For must change nothing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, FakeGateway, RunningProxy
from tests.redis_support import free_port, stop_process

CONF = ROOT / "deploy" / "nginx" / "fal-proxy.conf"
TRUSTED = "127.0.0.1/32,::1/128"  # what deploy/k8s/sidecar-pod.yaml and the compose file set
NGINX_HOST = "127.0.0.2"
BROWSER, OTHER_BROWSER = "127.0.0.3", "127.0.0.4"
ECHO = {"x-fal-target-url": "https://fal.run/emulator/echo"}
TOKEN = "tok-web-0123456789abcdef"
BODY, JSON = b'{"prompt": "cat"}', "application/json"

WRAPPER = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/fal-proxy.conf;
}}
"""


def adapted(conf: str, listen: str, proxy_port: int) -> str:
    """The shipped conf with what a test must change; each token must still be there."""
    for old, new in (
        ("listen 8080;", f"listen {listen};"),
        ("proxy_pass http://127.0.0.1:8787;", f"proxy_pass http://127.0.0.1:{proxy_port};"),
    ):
        assert conf.count(old) == 1, f"{old!r} is no longer in {CONF.name}: update this test"
        conf = conf.replace(old, new)
    return conf


@dataclass
class Front:
    proxy: RunningProxy
    url: str

    def client(self, source: str = BROWSER, timeout: httpx.Timeout | float = 10) -> httpx.Client:
        transport = httpx.HTTPTransport(local_address=source)
        return httpx.Client(
            base_url=self.url, transport=transport, trust_env=False, timeout=timeout
        )

    def client_ip(self, r: httpx.Response) -> str:
        return self.proxy.wait_for_request_log(r.headers["x-proxy-request-id"])["client_ip"]


def start_nginx(directory: Path, proxy_port: int) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if binary is None:
        pytest.fail(
            "nginx is not installed: apt-get install nginx-light (.ci/run installs it when missing)"
        )
    (directory / "nginx.conf").write_text(WRAPPER.format(dir=directory))
    for _attempt in range(5):  # the free port may be taken before nginx binds it
        port = free_port()
        listen = f"{NGINX_HOST}:{port}"
        (directory / "fal-proxy.conf").write_text(adapted(CONF.read_text(), listen, proxy_port))
        with (directory / "stderr.log").open("ab") as out:  # errors before error_log opens
            proc = subprocess.Popen(
                [binary, "-p", str(directory), "-c", str(directory / "nginx.conf")],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection((NGINX_HOST, port), timeout=1).close()
                return proc, f"http://{listen}"
            except OSError:
                time.sleep(0.02)
        stop_process(proc)
    logs = [
        p.read_text() for p in (directory / "stderr.log", directory / "error.log") if p.exists()
    ]
    pytest.fail("nginx did not start:\n" + "\n".join(logs))


@pytest.fixture
def front(start_proxy, tmp_path: Path) -> Iterator[Callable[..., Front]]:
    """Factory: a proxy with the manifests' trusted proxies (and ``env``), nginx before it."""
    started: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> Front:
        proxy = start_proxy(FAL_PROXY_TRUSTED_PROXIES=TRUSTED, **env)
        directory = tmp_path / f"nginx{len(started)}"
        directory.mkdir()
        proc, url = start_nginx(directory, int(proxy.url.rsplit(":", 1)[1]))
        started.append(proc)
        return Front(proxy, url)

    yield start
    for proc in started:
        stop_process(proc)


def test_the_proxy_sees_the_browser_not_nginx_and_not_a_forged_address(
    front, fake_gateway: FakeGateway
) -> None:
    site = front(FAL_PROXY_RATE_LIMIT_RPM="10")
    with site.client() as c:
        r = c.post("/api/fal/proxy", content=BODY, headers={**ECHO, "content-type": JSON})
        forged = c.post(
            "/api/fal/proxy", json={}, headers={**ECHO, "x-forwarded-for": "198.51.100.7"}
        )
        usage = c.get("/api/fal/usage")
    assert (r.status_code, forged.status_code, usage.status_code) == (200, 200, 200)
    assert site.client_ip(r) == BROWSER
    assert site.client_ip(forged) == BROWSER
    first, _ = fake_gateway.requests()
    assert first["path"].endswith("/emulator/echo") and first["body"] == BODY
    assert "x-forwarded-for" not in first["header_map"]


def test_each_browser_has_its_own_rate_limit(front, clear_of_window_edges: None) -> None:
    site = front(FAL_PROXY_RATE_LIMIT_RPM="1")
    with site.client(BROWSER) as a, site.client(OTHER_BROWSER) as b:
        calls = [c.post("/api/fal/proxy", json={}, headers=ECHO) for c in (a, b, a, b)]
    assert [r.status_code for r in calls] == [200, 200, 429, 429]
    assert [site.client_ip(r) for r in calls[:2]] == [BROWSER, OTHER_BROWSER]


def test_a_same_origin_page_with_a_caller_credential_passes(front, tmp_path: Path) -> None:
    """Host reaches the proxy as the browser sent it (port included), so the page's own
    origin is same-origin; X-Proxy-Authorization, the caller's credential, gets through."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"web-app {TOKEN}\n")
    site = front(FAL_PROXY_AUTH="token", FAL_PROXY_CLIENT_TOKENS_FILE=str(tokens))
    page = {"origin": site.url, "sec-fetch-site": "same-origin", "referer": site.url + "/"}
    with site.client() as c:
        anonymous = c.post("/api/fal/proxy", json={}, headers={**ECHO, **page})
        signed = {**ECHO, **page, "x-proxy-authorization": f"Bearer {TOKEN}"}
        ok = c.post("/api/fal/proxy", json={}, headers=signed)
        cross = c.post("/api/fal/proxy", json={}, headers={**signed, "origin": "http://evil.test"})
    assert (anonymous.status_code, ok.status_code, cross.status_code) == (401, 200, 403)
    assert site.proxy.wait_for_request_log(ok.headers["x-proxy-request-id"])["caller"] == "web-app"


def test_sse_arrives_event_by_event_through_nginx(front, fake_gateway: FakeGateway) -> None:
    # The fake sends event n only once the test releases gate sse-n: a buffering nginx
    # would hold event 1 back, and the read would time out.
    site = front()
    with (
        site.client(timeout=httpx.Timeout(10, read=5)) as c,
        c.stream(
            "POST",
            "/api/fal/proxy",
            json={"prompt": "hi"},
            headers={
                "x-fal-target-url": "https://fal.run/emulator/sse/stream?n=3",
                "accept": "text/event-stream",
            },
        ) as r,
    ):
        assert r.headers["content-type"] == "text/event-stream"
        lines = r.iter_lines()
        assert [next(lines), next(lines)] == ['data: {"n": 1}', ""]
        fake_gateway.release("sse-2")
        assert [next(lines), next(lines)] == ['data: {"n": 2}', ""]
        fake_gateway.release("sse-3")
        assert [next(lines), next(lines)] == ["event: done", 'data: {"n": 3}']
