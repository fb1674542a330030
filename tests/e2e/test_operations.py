"""Operating the proxy: readiness, and key rotation without dropping traffic."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

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


def test_a_rotated_key_file_is_used_without_dropping_traffic(
    start_proxy, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    key_file = tmp_path / "fal_key"
    key_file.write_text("old-key-revoked\n")
    proxy = start_proxy(
        FAL_KEY="", FAL_KEY_FILE=str(key_file), FAL_PROXY_SECRET_RELOAD_SECONDS="0.2"
    )
    statuses: list[int] = []
    answers: list[httpx.Response] = []
    stop = threading.Event()

    def traffic() -> None:  # requests keep flowing through the rotation
        with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:
            while not stop.is_set():
                answers.append(c.post("/emulator/echo", json={}))
                statuses.append(answers[-1].status_code)

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
    assert statuses[statuses.index(200) :] == [200] * (len(statuses) - statuses.index(200))
    proxy.lines_of(answers)  # every call's line in, and the reload's, logged before a 200
    assert any(line.get("event") == "secret_reloaded" for line in proxy.logs())
    assert all(FAL_KEY not in str(line) for line in proxy.logs())


def test_a_rotated_key_that_start_up_would_refuse_is_not_used(
    start_proxy, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    key_file = tmp_path / "fal_key"
    key_file.write_text(FAL_KEY + "\n")
    proxy = start_proxy(
        FAL_KEY="", FAL_KEY_FILE=str(key_file), FAL_PROXY_SECRET_RELOAD_SECONDS="0.2"
    )
    key_file.write_text("new-key\r\nx-evil: 1\n")  # a header injection, one reader later
    proxy.process.wait_for_json(
        lambda line: line.get("event") == "secret_file_unusable", timeout=10
    )
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:
        answer = c.post("/emulator/echo", json={})
        assert answer.status_code == 200  # still the old, good key
    proxy.lines_of([answer])  # and a reload logged before it is in
    sent = fake_gateway.requests()[-1]["header_map"]
    assert sent["authorization"] == f"Key {FAL_KEY}" and "x-evil" not in sent
    assert not any(line.get("event") == "secret_reloaded" for line in proxy.logs())
    [warning] = [line for line in proxy.logs() if line.get("event") == "secret_file_unusable"][:1]
    assert "FAL_KEY_FILE" in warning["problem"] and "new-key" not in str(warning)


def _check(*args: str, **env: str):
    import subprocess
    import sys

    from tests.conftest import ROOT, child_env

    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", *args],
        cwd=ROOT,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_prints_the_settings_with_secrets_masked(fake_gateway: FakeGateway) -> None:
    out = _check(
        FAL_KEY="sk-SENTINEL-check",
        CF_AIG_TOKEN="cf-SENTINEL-check",
        FAL_PROXY_GATEWAY_URL=fake_gateway.gateway_url,
        FAL_PROXY_REDIS_URL="redis://:pw-SENTINEL@h:1/0",
    )
    assert out.returncode == 0, out.stderr
    assert "configuration: valid" in out.stdout and "fal_key = ********" in out.stdout
    assert "SENTINEL" not in out.stdout + out.stderr


def test_check_probe_reports_the_gateway(fake_gateway: FakeGateway) -> None:
    good = _check("--probe", FAL_KEY=FAL_KEY, FAL_PROXY_GATEWAY_URL=fake_gateway.gateway_url)
    assert good.returncode == 0 and "ok    gateway: took the credentials" in good.stdout
    unreachable = _check(
        "--probe", FAL_KEY=FAL_KEY, FAL_PROXY_GATEWAY_URL="http://127.0.0.1:9/v1/a/g/fal"
    )
    assert unreachable.returncode == 1
    assert "FAIL  gateway: http://127.0.0.1:9/v1/a/g/fal not reachable" in unreachable.stdout


def test_check_probe_names_a_refused_gateway_token() -> None:
    from tests.conftest import start_fake_gateway

    gateway = start_fake_gateway("--cf-token", "the-right-one")
    try:
        out = _check(
            "--probe",
            FAL_KEY=FAL_KEY,
            CF_AIG_TOKEN="wrong",
            FAL_PROXY_GATEWAY_URL=gateway.gateway_url,
        )
    finally:
        gateway.stop()
    assert out.returncode == 1 and "2009" in out.stdout and "CF_AIG_TOKEN" in out.stdout


def test_check_refuses_bad_configuration_with_one_line() -> None:
    out = _check(FAL_KEY="k")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "CF_ACCOUNT_ID" in out.stderr


@pytest.mark.usefixtures("clear_of_window_edges")
def test_metrics_in_prometheus_format(start_proxy, fake_gateway: FakeGateway) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    proxy = start_proxy(FAL_PROXY_RATE_LIMIT_RPM="3")
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:
        for _ in range(2):
            assert c.post("/emulator/echo", json={}).status_code == 200
        assert (
            c.post(
                "/api/fal/proxy", headers={"x-fal-target-url": "https://evil.example/"}
            ).status_code
            == 403
        )
        assert c.post("/emulator/echo", json={}).status_code == 200
        assert c.post("/emulator/echo", json={}).status_code == 429  # a refusal is not counted: 4th
        text = c.get("/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert (
        samples[
            (
                "fal_proxy_requests_total",
                (("app", "emulator/echo"), ("route", "run"), ("status", "2xx")),
            )
        ]
        == 3
    )
    assert samples[("fal_proxy_refusals_total", (("reason", "target_refused"),))] == 1
    assert samples[("fal_proxy_refusals_total", (("reason", "rate_limited"),))] == 1
    assert samples[("fal_proxy_request_duration_seconds_count", (("route", "run"),))] >= 3
    assert samples[("fal_proxy_upstream_ttfb_seconds_count", (("route", "run"),))] == 3
    assert samples[("fal_proxy_body_bytes_total", (("direction", "out"),))] > 0
    assert ("fal_proxy_in_flight_requests", ()) in samples and (
        "fal_proxy_open_websockets",
        (),
    ) in samples
    assert fake_gateway.requests() and "/metrics" not in str(fake_gateway.requests())


def test_sigterm_lets_a_running_stream_finish_then_exits_0(
    start_proxy, fake_gateway: FakeGateway
) -> None:
    import signal

    proxy = start_proxy(FAL_PROXY_DRAIN_SECONDS="20")
    with (
        httpx.Client(base_url=proxy.url, trust_env=False, timeout=httpx.Timeout(20, read=10)) as c,
        c.stream("POST", "/emulator/sse?n=3", json={}) as r,
    ):
        lines = r.iter_lines()
        assert next(lines) == 'data: {"n": 1}'
        proxy.process.proc.send_signal(signal.SIGTERM)  # mid-stream
        proxy.process.wait_for_json(
            lambda line: "Shutting down" in str(line.get("event")), timeout=10
        )
        # No new connections meanwhile: the listening socket is closed, so a connect is
        # refused outright (a connection accepted and left unanswered would be a timeout).
        with (
            httpx.Client(trust_env=False, timeout=10) as other,
            pytest.raises(httpx.ConnectError) as refused,
        ):
            other.get(proxy.url + "/healthz")
        assert "refused" in str(refused.value).lower(), refused.value
        fake_gateway.release("sse-2")
        fake_gateway.release("sse-3")
        rest = [line for line in lines if line]
    assert rest == ['data: {"n": 2}', "event: done", 'data: {"n": 3}']  # not cut by the shutdown
    assert proxy.process.proc.wait(15) == 0


def test_a_stream_cut_when_the_drain_runs_out_is_logged_as_cut_without_a_traceback(
    start_proxy, fake_gateway: FakeGateway
) -> None:
    import signal

    proxy = start_proxy(FAL_PROXY_DRAIN_SECONDS="1")
    with (
        httpx.Client(base_url=proxy.url, trust_env=False, timeout=httpx.Timeout(20, read=10)) as c,
        c.stream("POST", "/emulator/stall", json={}) as r,  # one event, then nothing
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
        proxy.process.proc.send_signal(signal.SIGTERM)
        with pytest.raises(httpx.RemoteProtocolError):  # cut: no last chunk
            for _ in lines:
                pass
    assert proxy.process.proc.wait(15) == 0
    proxy.process.stop()  # (stdout is read to its end: every line it wrote is in)
    [line] = [r for r in proxy.request_logs() if r.get("target_path") == "/emulator/stall"]
    assert line["error"] == "shutdown" and line["level"] == "warning"
    text = "\n".join(proxy.process.lines)
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-3000:]
    fake_gateway.release("stall")


def test_metrics_can_live_on_a_port_of_their_own(start_proxy) -> None:
    from tests.redis_support import free_port

    port = free_port()
    proxy = start_proxy(FAL_PROXY_METRICS_PORT=str(port))
    with httpx.Client(trust_env=False, timeout=10) as c:
        assert c.get(f"{proxy.url}/metrics").status_code == 404  # not on the public port
        c.post(f"{proxy.url}/emulator/echo", json={})
        text = c.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'fal_proxy_requests_total{app="emulator/echo",route="run",status="2xx"} 1.0' in text


# --- the operator port listens on FAL_PROXY_METRICS_HOST (loopback by default) --------------


def _answers(url: str) -> bool:
    try:
        with httpx.Client(trust_env=False, timeout=5) as c:
            c.get(url)
    except httpx.ConnectError:
        return False
    return True


def test_the_metrics_port_answers_on_loopback_only_by_default(start_proxy) -> None:
    from tests.redis_support import free_port

    port = free_port()
    proxy = start_proxy(
        FAL_PROXY_HOST="0.0.0.0", FAL_PROXY_ALLOW_UNAUTHENTICATED="true",
        FAL_PROXY_METRICS_PORT=str(port),
    )  # fmt: skip
    public = int(proxy.url.rsplit(":", 1)[1])
    # Linux routes all of 127.0.0.0/8 to lo: 127.0.0.2 stands for another address of the host.
    assert httpx.get(f"http://127.0.0.2:{public}/healthz", trust_env=False).status_code == 200
    assert httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False).status_code == 200
    assert not _answers(f"http://127.0.0.2:{port}/metrics")
    assert not _answers(f"http://127.0.0.2:{port}/usage/anyone")
    proxy.process.wait_for_json(lambda r: r.get("event") == "metrics")  # after "listening"
    (line,) = [r for r in proxy.logs() if r.get("event") == "metrics"]
    assert line["url"] == f"http://127.0.0.1:{port}/metrics"
    # The opt-in starts it, and the start-up warning still says so.
    assert any(r.get("setting") == "FAL_PROXY_AUTH" and r["level"] == "warning"
               for r in proxy.logs())  # fmt: skip


def test_the_metrics_port_answers_elsewhere_when_told(start_proxy) -> None:
    from tests.redis_support import free_port

    port = free_port()
    start_proxy(FAL_PROXY_METRICS_PORT=str(port), FAL_PROXY_METRICS_HOST="0.0.0.0")
    assert httpx.get(f"http://127.0.0.2:{port}/metrics", trust_env=False).status_code == 200


@pytest.mark.parametrize("value", ["ops.internal", "192.0.2.1"])  # not an address; not ours
def test_a_bad_metrics_host_stops_start_up_with_one_line(value: str) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT, child_env
    from tests.redis_support import free_port

    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--port", "0"],
        cwd=ROOT,
        env=child_env(
            FAL_KEY=FAL_KEY,
            FAL_PROXY_GATEWAY_URL="http://127.0.0.1:9/v1/a/g/fal",
            FAL_PROXY_METRICS_PORT=str(free_port()),
            FAL_PROXY_METRICS_HOST=value,
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "FAL_PROXY_METRICS_HOST" in done.stderr


def test_the_python_tls_port_drops_a_client_that_never_finishes_the_tls_close(
    start_proxy, tmp_path: Path
) -> None:
    """The answer is sent, the proxy sends close_notify, the client never answers it: the
    connection is dropped after the bound (here FAL_PROXY_HEADER_TIMEOUT, 1 s), not after
    asyncio's 30 s default."""
    import socket
    import ssl

    from tests.redis_support import free_port

    port = free_port()
    proxy = start_proxy(
        FAL_PROXY_PYTHON_SDK_PORT=str(port), FAL_PROXY_STATE_DIR=str(tmp_path),
        FAL_PROXY_HEADER_TIMEOUT="1",
    )  # fmt: skip
    proxy.process.wait_for_json(lambda r: r.get("event") == "python_sdk")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", port), timeout=40) as sock:

        def feed() -> bool:
            data = sock.recv(65536)
            incoming.write(data) if data else incoming.write_eof()
            return bool(data)

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                assert feed(), "closed during the handshake"
        tls.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        sock.sendall(outgoing.read())
        answer = b""
        while True:  # until the proxy's close_notify (or its EOF)
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                if not feed():
                    break
                continue
            except ssl.SSLZeroReturnError:
                break
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        started = time.monotonic()
        while sock.recv(65536):  # never answer the close_notify: wait for the TCP close
            pass
        waited = time.monotonic() - started
    assert waited < 5, f"held {waited:.1f} s after the answer"
