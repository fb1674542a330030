"""The WebSocket bridge under uvicorn, against an upstream that misbehaves at the handshake.

A raw-socket fake gateway (:class:`HandshakeServer`) reads each upgrade request the proxy
sends and answers it with canned bytes (Cloudflare's 520, a 503 with ``Retry-After``), or
holds it unanswered until the proxy drops the connection. What is checked is what uvicorn
makes of the bridge's answers: the status and headers that reach the client, and that no
line of the proxy's log is an error (uvicorn's "Exception in ASGI application", "ASGI
callable returned without sending handshake"). Waits are on events, with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import RunningProxy, launch_proxy

PATH = "/fal-ai/fast-lcm-diffusion/realtime"
DEADLINE = 10.0

Answer = Callable[[int], bytes | None]


class HandshakeServer:
    """A fake gateway on a raw socket: the ``n``-th request head (1-based) gets ``answer(n)``,
    or, when that is None, no answer at all until the proxy closes the connection
    (``dropped`` is then set)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.heads: list[bytes] = []
        self.seen = threading.Event()  # a request head arrived
        self.dropped = threading.Event()  # a held request's connection was closed by the proxy
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/acct/gw/fal"

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(60)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            self.heads.append(head)
            reply = self.answer(len(self.heads))
            self.seen.set()
            if reply is not None:
                conn.sendall(reply)
                return
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass
            self.dropped.set()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def http_answer(status: int, phrase: str, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status} {phrase}", *headers, f"content-length: {len(body)}", "", ""]
    return "\r\n".join(head).encode() + body


@pytest.fixture
def faulty() -> Iterator[Callable[..., tuple[HandshakeServer, RunningProxy]]]:
    """Factory: a fake gateway answering with ``answer`` and a proxy in front of it."""
    started: list[tuple[HandshakeServer, RunningProxy]] = []

    def start(answer: Answer, **env: str) -> tuple[HandshakeServer, RunningProxy]:
        server = HandshakeServer(answer)
        proxy = launch_proxy(server.gateway_url, **env)
        started.append((server, proxy))
        return server, proxy

    yield start
    for server, proxy in started:
        proxy.process.stop()
        server.close()


def ws_url(proxy: RunningProxy) -> str:
    return proxy.url.replace("http://", "ws://", 1) + PATH


async def refused(url: str) -> Any:
    """The HTTP response the proxy refused the upgrade with (fails if it accepted)."""
    try:
        async with connect(url, proxy=None, open_timeout=DEADLINE):
            pass
    except InvalidStatus as exc:
        return exc.response
    pytest.fail("the upgrade was accepted")


def websocket_lines(proxy: RunningProxy, count: int) -> list[dict[str, Any]]:
    proxy.process.wait_for_json(
        lambda _r: len([r for r in proxy.logs() if r.get("event") == "websocket"]) >= count,
        timeout=DEADLINE,
    )
    return [r for r in proxy.logs() if r.get("event") == "websocket"]


def assert_no_error_line(proxy: RunningProxy) -> None:
    bad = [
        r
        for r in proxy.logs()
        if r.get("level") in ("error", "critical") or "Traceback" in json.dumps(r)
    ]
    assert bad == [], bad


CLOUDFLARE_PAGE = b"<!DOCTYPE html><title>520: Web server is returning an unknown error</title>"


def test_a_non_standard_status_at_the_handshake_reaches_the_client_as_a_standard_one(
    faulty: Any,
) -> None:
    # uvicorn's legacy WebSocket implementation calls http.HTTPStatus(status) on the refusal:
    # relayed as it came, a 520 was a ValueError there, a traceback and a 500.
    statuses = [520, 530, 499]
    answers = [
        http_answer(s, "Cloudflare", CLOUDFLARE_PAGE, "content-type: text/html", "retry-after: 9")
        for s in statuses
    ]
    server, proxy = faulty(lambda n: answers[n - 1])

    async def go() -> list[Any]:
        return [await refused(ws_url(proxy)) for _ in statuses]

    responses = asyncio.run(go())
    for status, response in zip(statuses, responses, strict=True):
        assert response.status_code == 502
        assert response.headers["content-type"] == "application/json"
        assert response.headers["retry-after"] == "9"
        assert json.loads(response.body) == {
            "message": "the upstream refused the handshake",
            "detail": f"the upstream answered HTTP {status}, not a standard status",
        }
    assert len(server.heads) == len(statuses)
    lines = websocket_lines(proxy, len(statuses))
    assert [line["error"] for line in lines] == ["upstream_refused"] * len(statuses)
    assert_no_error_line(proxy)


def test_a_refusal_keeps_its_type_and_retry_after_and_nothing_else(faulty: Any) -> None:
    answer = http_answer(
        503, "Service Unavailable", b"<p>busy</p>",
        "content-type: text/html; charset=utf-8", "retry-after: 7",
        "location: /v1/acct/gw/fal/elsewhere", "set-cookie: session=upstream-secret",
        "www-authenticate: Key realm=fal",
    )  # fmt: skip
    _server, proxy = faulty(lambda _n: answer)
    response = asyncio.run(refused(ws_url(proxy)))
    assert response.status_code == 503
    assert response.body == b"<p>busy</p>"
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["retry-after"] == "7"
    for name in ("location", "set-cookie", "www-authenticate"):
        assert name not in response.headers
    websocket_lines(proxy, 1)  # the refusal's line is in, and any logged before it
    assert_no_error_line(proxy)


def upgrade_request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def test_a_client_gone_during_the_upstream_handshake_frees_its_slot_at_once(
    faulty: Any,
) -> None:
    # The first upstream handshake is never answered; the connect timeout (60 s) is far off.
    # The client leaving must end it now: the upstream connection dropped, the slot free (a
    # second socket is not refused 429 under FAL_PROXY_MAX_CONCURRENT=1), no error line.
    refusal = http_answer(403, "Forbidden", b"no", "content-type: text/plain")
    server, proxy = faulty(
        lambda n: None if n == 1 else refusal,
        FAL_PROXY_CONNECT_TIMEOUT="60",
        FAL_PROXY_MAX_CONCURRENT="1",
    )
    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as client:
        client.sendall(upgrade_request(port))
        assert server.seen.wait(DEADLINE), "the proxy never started the upstream handshake"
    assert server.dropped.wait(DEADLINE), "the upstream handshake outlived the client"
    (line,) = websocket_lines(proxy, 1)
    assert (line["error"], line["client_close"]) == ("client_gone", 1006)
    assert asyncio.run(refused(ws_url(proxy))).status_code == 403  # the upstream's: admitted
    websocket_lines(proxy, 2)  # its line is in, and any logged before it
    assert_no_error_line(proxy)
