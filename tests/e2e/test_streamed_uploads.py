"""A streamed upload (a chunked body, not in hand when its gateway connection fails) gets a
502 and is never sent again: not to the gateway, and not straight to fal either, even with
``FAL_PROXY_FALLBACK=direct`` (docs/gateway-modes.md, "Never twice")."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import PREFIX, FakeGateway, RunningProxy, launch_proxy
from tests.redis_support import free_port

DEADLINE = 15.0


# --- a streamed upload whose gateway connection fails ---------------------------------------


class DroppingGateway:
    """A raw TCP 'gateway' that reads each request head and closes the connection unanswered,
    recording every head it read, in the order connections were made."""

    MARKER = b"MARKER / HTTP/1.1"

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.heads: list[bytes] = []
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    pass
                with self._lock:
                    self.heads.append(data.split(b"\r\n")[0])

    def attempts(self) -> list[bytes]:
        """Every request head read before now. Connections are accepted in the order they were
        made, so once a marker sent now has been read, so has every earlier connection
        (a resend made before the proxy answered, in particular)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as marker:
            marker.sendall(self.MARKER + b"\r\n\r\n")
            deadline = time.monotonic() + DEADLINE
            while True:
                with self._lock:
                    if self.MARKER in self.heads:
                        return [h for h in self.heads if h != self.MARKER]
                assert time.monotonic() < deadline, "the gateway never read the marker"
                time.sleep(0.01)  # poll interval; the marker's arrival is what is waited for

    def close(self) -> None:
        self.listener.close()


def fallback_env(fake_gateway: FakeGateway) -> dict[str, str]:
    """The fallback on, its breaker never opening within a test (failures need not count)."""
    return {
        "FAL_PROXY_FALLBACK": "direct",
        "FAL_PROXY_FALLBACK_FAILURES": "1000",
        "FAL_PROXY_TEST_FAL_ORIGIN": f"http://127.0.0.1:{fake_gateway.port}/_fal",
    }


@pytest.fixture(scope="module")
def dropping_gateway() -> Iterator[DroppingGateway]:
    gateway = DroppingGateway()
    yield gateway
    gateway.close()


@pytest.fixture(scope="module")
def proxy_to_dropping_gateway(
    fake_gateway: FakeGateway, dropping_gateway: DroppingGateway
) -> Iterator[RunningProxy]:
    proxy = launch_proxy(f"http://127.0.0.1:{dropping_gateway.port}{PREFIX}",
                         **fallback_env(fake_gateway))  # fmt: skip
    yield proxy
    proxy.process.stop()


@pytest.fixture(scope="module")
def proxy_to_refusing_gateway(fake_gateway: FakeGateway) -> Iterator[RunningProxy]:
    port = free_port()  # nothing listens there: every connection is refused
    proxy = launch_proxy(f"http://127.0.0.1:{port}{PREFIX}", **fallback_env(fake_gateway))
    yield proxy
    proxy.process.stop()


def streamed_upload(proxy: RunningProxy) -> tuple[int, bytes]:
    """A chunked upload whose first chunk is sent and whose end is held back until the proxy
    has answered: its body is never whole in the proxy's hands. Returns (status, body)."""
    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /fal-ai/fast-sdxl HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            b"content-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            b"10\r\n" + b"u" * 16 + b"\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"the proxy closed without an answer: {answer!r}"
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(int(line.split(b":")[1]) for line in lines
                      if line.lower().startswith(b"content-length:"))  # fmt: skip
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), body


def test_a_streamed_upload_the_gateway_dropped_is_a_502_sent_once(
    proxy_to_dropping_gateway: RunningProxy,
    dropping_gateway: DroppingGateway,
    fake_gateway: FakeGateway,
) -> None:
    status, body = streamed_upload(proxy_to_dropping_gateway)
    assert status == 502, body
    assert dropping_gateway.attempts() == [f"POST {PREFIX}/fal-ai/fast-sdxl HTTP/1.1".encode()]
    assert fake_gateway.requests("direct") == []


def test_a_streamed_upload_whose_gateway_connection_failed_is_not_sent_to_fal(
    proxy_to_refusing_gateway: RunningProxy, fake_gateway: FakeGateway
) -> None:
    """Its connection failed before anything left (a call in hand would go straight to fal),
    but the body's first chunk is consumed: it is a 502, and fal never sees it."""
    status, body = streamed_upload(proxy_to_refusing_gateway)
    assert status == 502, body
    assert fake_gateway.requests("direct") == []
    # The same call with its body in hand does go straight to fal: the fallback is on.
    whole = httpx.post(f"{proxy_to_refusing_gateway.url}/fal-ai/fast-sdxl",
                       json={"prompt": "a cat"}, trust_env=False, timeout=10)  # fmt: skip
    assert whole.status_code == 200
    assert [r["path"] for r in fake_gateway.requests("direct")] == [
        "/_fal/fal.run/fal-ai/fast-sdxl"]  # fmt: skip
