"""``FAL_PROXY_FALLBACK=direct`` end to end: the emulator plays both the gateway and fal itself
(``/_fal/<host>``, ``FAL_PROXY_TEST_FAL_ORIGIN``), and the gateway fails in the two ways that
are its own: its port refuses connections (nothing was sent: retried straight to fal), or it
answers Cloudflare 5xx pages (the request may have reached it: never repeated). After N such
failures the breaker opens; after ``FAL_PROXY_FALLBACK_SECONDS`` one call probes the gateway
and its answer closes it. The fal JS SDK sees no error while its calls switch way.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import httpx
import msgpack
import pytest
from websockets.exceptions import InvalidStatus
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


def fallback_env(
    gateway: FakeGateway, failures: int = 3, open_seconds: float = 1
) -> dict[str, str]:
    """``open_seconds``: 1 where a test waits for the probe; a test whose assertions need
    the breaker to stay open (no probe among its calls, however slow the machine) asks for
    far more than it can take."""
    return {
        "FAL_PROXY_FALLBACK": "direct",
        "FAL_PROXY_FALLBACK_FAILURES": str(failures),
        "FAL_PROXY_FALLBACK_SECONDS": str(open_seconds),
        "FAL_PROXY_TEST_FAL_ORIGIN": f"http://127.0.0.1:{gateway.port}/_fal",
    }


def run(proxy: RunningProxy) -> httpx.Response:
    return httpx.post(f"{proxy.url}/fal-ai/fast-sdxl", json={"prompt": "a cat"},
                      trust_env=False, timeout=15)  # fmt: skip


def lines(proxy: RunningProxy, event: str) -> list[dict[str, Any]]:
    return [line for line in proxy.logs() if line.get("event") == event]


def logged(proxy: RunningProxy, event: str) -> list[dict[str, Any]]:
    """The ``event`` lines, once the first has come through the proxy's stdout (the proxy
    writes it before its answer, but the test reads that pipe on another thread)."""
    proxy.process.wait_for_json(lambda line: line.get("event") == event, timeout=10)
    return lines(proxy, event)


BREAKER_EVENTS = ("gateway_bypassed", "gateway_probe", "gateway_restored")


def breaker_changes(proxy: RunningProxy) -> list[tuple[str, str]]:
    """Every change of way the proxy logged, in order, as (previous, state); asserted to be
    one unbroken chain from "closed": each change logged once, none missing."""
    changes = [(line["previous"], line["state"]) for line in proxy.logs()
               if line.get("event") in BREAKER_EVENTS]  # fmt: skip
    state = "closed"
    for previous, new in changes:
        assert previous == state and new != previous, changes
        state = new
    return changes


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
        answers = [run(proxy) for _ in range(5)]
        assert [r.status_code for r in answers] == [200] * 5
        direct = fake_gateway.requests("direct")
        assert [r["path"] for r in direct] == ["/_fal/fal.run/fal-ai/fast-sdxl"] * 5
        for record in direct:
            assert_direct(record)
        # Each call's own line, waited for (the log pipe is read on another thread).
        requests = [proxy.wait_for_request_log(r.headers["x-proxy-request-id"]) for r in answers]
        assert [r.get("via") for r in requests] == ["direct"] * 5
        # Opened once by the failures; if the machine was slow enough for the open period to
        # pass, a probe (refused too: it also went straight to fal) reopened it, each change
        # logged once.
        logged(proxy, "gateway_bypassed")
        changes = breaker_changes(proxy)
        assert changes[0] == ("closed", "open")
        assert set(changes[1:]) <= {("open", "half_open"), ("half_open", "open")}, changes
        assert bypassed(proxy) == 1
        assert httpx.get(f"{proxy.url}/readyz", trust_env=False).status_code == 200  # serving
        # A socket goes straight to fal too while the breaker is open.
        url = proxy.url.replace("http://", "ws://") + "/fal-ai/fast-lcm-diffusion/realtime"
        with ws_connect(url) as socket_:
            socket_.send(msgpack.packb({"prompt": "a cat"}))
            assert msgpack.unpackb(socket_.recv(timeout=10))["images"]
        (sock,) = fake_gateway.requests("direct-websocket")
        assert sock["path"] == "/_fal/fal.run/fal-ai/fast-lcm-diffusion/realtime"
        assert_direct(sock)
        # The gateway comes back: after FAL_PROXY_FALLBACK_SECONDS one call probes it.
        revived = start_fake_gateway("--port", str(port))
        until(lambda: run(proxy).status_code == 200 and bool(revived.requests()),
              "a call probed the revived gateway")  # fmt: skip
        (closed,) = logged(proxy, "gateway_restored")
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
    # Open for the whole test: every call below goes straight to fal, none is a probe.
    proxy = start_proxy(**fallback_env(fake_gateway, failures=2, open_seconds=3600))
    fake_gateway.client.post("/_emulator/outage?status=502")
    try:
        for _ in range(2):  # reached the gateway, which failed: relayed, not sent again
            failed = run(proxy)
            assert failed.status_code == 502 and "Cloudflare" in failed.text
        assert len(fake_gateway.requests()) == 2 and fake_gateway.requests("direct") == []
        assert [line["state"] for line in logged(proxy, "gateway_bypassed")] == ["open"]
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


@pytest.mark.parametrize("status", [504, 524])
def test_a_caller_cannot_open_the_breaker_with_slow_runs(
    start_proxy: Any, fake_gateway: FakeGateway, status: int
) -> None:
    """A run the gateway (504) or Cloudflare's edge (524) timed out waiting for fal is the
    caller's slow run, which any caller can produce: it never counts as the gateway failing."""
    proxy = start_proxy(**fallback_env(fake_gateway, failures=2, open_seconds=3600))
    fake_gateway.client.post(f"/_emulator/outage?status={status}")
    try:
        assert [run(proxy).status_code for _ in range(4)] == [status] * 4
    finally:
        fake_gateway.client.delete("/_emulator/outage")
    last = run(proxy)
    assert last.status_code == 200
    assert len(fake_gateway.requests()) == 5 and fake_gateway.requests("direct") == []
    proxy.lines_of([last])  # a change is logged during its call: every one is in
    assert breaker_changes(proxy) == [] and bypassed(proxy) == 0


def test_after_a_5xx_outage_the_probe_closes_the_breaker(
    start_proxy: Any, fake_gateway: FakeGateway
) -> None:
    proxy = start_proxy(**fallback_env(fake_gateway, failures=1))
    fake_gateway.client.post("/_emulator/outage?status=502")
    try:
        assert run(proxy).status_code == 502  # opens the breaker
    finally:
        fake_gateway.client.delete("/_emulator/outage")
    # The outage is over: whenever the open period ends, the next call probes and closes it.
    until(lambda: run(proxy).status_code == 200 and bool(lines(proxy, "gateway_restored")),
          "the probe closed the breaker")  # fmt: skip
    assert breaker_changes(proxy) == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert bypassed(proxy) == 0


def test_the_fal_sdk_sees_no_error_while_the_gateway_refuses(fake_gateway: FakeGateway) -> None:
    port = free_port()  # refused: every call switches to the direct path under the SDK
    proxy = launch_proxy(f"http://127.0.0.1:{port}{PREFIX}", **fallback_env(fake_gateway))
    try:
        for scenario in ("run_post", "queue_status_result_cancel"):
            outcome = run_sdk(proxy, fake_gateway, scenario)
            assert outcome["ok"], json.dumps(outcome)[:2000]
        assert fake_gateway.requests("direct")
        proxy.process.stop()  # (stdout is read to its end: every line it wrote is in)
        assert not [r for r in proxy.request_logs() if r["status"] >= 500]
    finally:
        proxy.process.stop()


# --- never twice, and only the gateway's own failures (found by a review) ------------------


class OneShotGateway:
    """A raw TCP 'gateway': answers the first request, reads the whole second one on the same
    kept-alive connection, then closes it unanswered; ``stay`` keeps its port listening (and
    answers anything more), else it goes away (later connections refused)."""

    ANSWER = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
              b"x-fal-request-id: r1\r\ncontent-length: 11\r\n\r\n{\"ok\":true}")  # fmt: skip

    def __init__(self, *, stay: bool) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.stay = stay
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def read_request(self, conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        return data.split(b"\r\n")[0]

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        self.received.append(self.read_request(conn))
        conn.sendall(self.ANSWER)
        self.received.append(self.read_request(conn))  # it has the whole request...
        if not self.stay:
            self.listener.close()  # ...and goes away
            conn.close()
            return
        conn.close()  # ...and drops the connection, staying up: a resend would come here
        self.listener.settimeout(3)
        try:
            again, _ = self.listener.accept()
        except OSError:
            return
        self.received.append(self.read_request(again))
        again.sendall(self.ANSWER)
        again.close()


def test_a_get_that_reached_the_gateway_is_never_sent_again(fake_gateway: FakeGateway) -> None:
    """aiohttp would resend a GET on a new connection when a kept-alive one closes under it,
    even after the gateway read it (a GET on fal.run runs the model); and with the fallback,
    that resend's refused connection looked like 'never left': a third send, to fal."""
    for stay in (False, True):
        gateway = OneShotGateway(stay=stay)
        env = fallback_env(fake_gateway) if not stay else {}
        proxy = launch_proxy(f"http://127.0.0.1:{gateway.port}{PREFIX}", **env)
        try:
            get = f"{proxy.url}/emulator/echo?prompt="
            assert httpx.get(get + "a", trust_env=False, timeout=15).status_code == 200
            second = httpx.get(get + "b", trust_env=False, timeout=15)
            assert second.status_code == 502  # the gateway dropped it: said, not hidden
            gateway.thread.join(10)
            sent = f"GET {PREFIX}/emulator/echo?prompt=b HTTP/1.1".encode()
            assert gateway.received.count(sent) == 1, gateway.received
            assert fake_gateway.requests("direct") == []
        finally:
            proxy.process.stop()
            gateway.listener.close()


def test_waiting_for_the_proxys_own_pool_is_not_a_gateway_failure(
    start_proxy: Any, fake_gateway: FakeGateway
) -> None:
    """FAL_PROXY_UPSTREAM_CONNECTIONS full: a call that waits past the connect timeout for a
    free connection gets a timeout, but the gateway did nothing wrong: not counted."""
    proxy = start_proxy(FAL_PROXY_UPSTREAM_CONNECTIONS="1", FAL_PROXY_CONNECT_TIMEOUT="1",
                        **fallback_env(fake_gateway, failures=2))  # fmt: skip
    holder = threading.Thread(target=lambda: httpx.post(
        f"{proxy.url}/emulator/hang", json={}, trust_env=False, timeout=60))  # fmt: skip
    holder.start()
    try:
        until(lambda: bool(fake_gateway.requests()), "the hanging call holds the one connection")
        answers = [run(proxy) for _ in range(2)]
        statuses = [r.status_code for r in answers]
        assert statuses == [504, 504]  # the proxy's own congestion, said as a timeout
    finally:
        fake_gateway.release("hang")
        holder.join()
    proxy.lines_of(answers)  # a change is logged during its call: any is in
    assert lines(proxy, "gateway_bypassed") == [] and bypassed(proxy) == 0
    fake_gateway.clear()
    assert run(proxy).status_code == 200 and fake_gateway.requests("direct") == []


def test_a_realtime_direct_socket_never_speaks_for_the_gateway(
    start_proxy: Any, fake_gateway: FakeGateway
) -> None:
    """With FAL_PROXY_REALTIME_DIRECT, realtime sockets go to fal whatever the breaker says:
    fal answering one must not close the breaker on a gateway that is still down."""
    proxy = start_proxy(FAL_PROXY_REALTIME_DIRECT="true", **fallback_env(fake_gateway, failures=2))
    fake_gateway.client.post("/_emulator/outage?status=502")
    try:
        assert [run(proxy).status_code for _ in range(2)] == [502, 502]
        opened = time.monotonic()
        until(lambda: time.monotonic() - opened > 1.1, "FAL_PROXY_FALLBACK_SECONDS to pass")
        url = proxy.url.replace("http://", "ws://") + "/fal-ai/fast-lcm-diffusion/realtime"
        with ws_connect(url) as socket_:
            socket_.send(msgpack.packb({"prompt": "a cat"}))
            assert msgpack.unpackb(socket_.recv(timeout=10))["images"]
        proxy.process.wait_for_json(lambda line: line.get("event") == "websocket", timeout=10)
        assert lines(proxy, "gateway_restored") == []
        # The next call is the probe: the gateway is still down, so it reopens.
        probe = run(proxy)
        assert probe.status_code == 502
        proxy.lines_of([probe])
        assert lines(proxy, "gateway_restored") == [] and bypassed(proxy) == 1
        assert run(proxy).status_code == 200  # direct again
    finally:
        fake_gateway.client.delete("/_emulator/outage")


def test_a_gateway_socket_refused_with_a_5xx_page_counts(
    start_proxy: Any, fake_gateway: FakeGateway
) -> None:
    proxy = start_proxy(**fallback_env(fake_gateway, failures=1, open_seconds=3600))
    fake_gateway.client.post("/_emulator/outage?status=503")
    try:
        url = proxy.url.replace("http://", "ws://") + "/fal-ai/fast-lcm-diffusion/realtime"
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(url)
        assert refused.value.response.status_code == 503
        assert [line["state"] for line in logged(proxy, "gateway_bypassed")] == ["open"]
        with ws_connect(url) as socket_:  # now straight to fal
            socket_.send(msgpack.packb({"prompt": "a cat"}))
            assert msgpack.unpackb(socket_.recv(timeout=10))["images"]
        assert fake_gateway.requests("direct-websocket")
    finally:
        fake_gateway.client.delete("/_emulator/outage")


def test_a_gateway_whose_tls_handshake_hangs_is_counted_and_bypassed(
    fake_gateway: FakeGateway,
) -> None:
    """The connection never became one (the handshake timed out): it never left."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepts TCP (the kernel does), never speaks TLS
    port = listener.getsockname()[1]
    proxy = launch_proxy(f"https://127.0.0.1:{port}{PREFIX}", FAL_PROXY_CONNECT_TIMEOUT="1",
                         **fallback_env(fake_gateway, failures=1))  # fmt: skip
    try:
        assert run(proxy).status_code == 200
        assert fake_gateway.requests("direct") and logged(proxy, "gateway_bypassed")
    finally:
        proxy.process.stop()
        listener.close()
