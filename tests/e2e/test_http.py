"""End to end over real sockets: client → proxy (uvicorn process) → fake gateway process.

Every test asserts on what the fake gateway actually received.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import time

import httpx
import pytest

from proxy.emulator.faults import pattern_block
from tests.conftest import CF_TOKEN, FAL_KEY, PREFIX, FakeGateway, RunningProxy, start_fake_gateway

JSON = {"content-type": "application/json"}


def test_fal_run_shaped_post_goes_to_the_gateway_path_with_the_server_key(
    client: httpx.Client, fake_gateway: FakeGateway
) -> None:
    body = b'{"prompt": "cat",  "n": 1}'  # odd spacing: must not be re-serialised
    r = client.post(
        "/fal-ai/fast-sdxl?x=1",
        content=body,
        headers={
            **JSON,
            "authorization": "Key client-key",
            "user-agent": "ua-test",
            "cookie": "c=1",
        },
    )
    assert r.status_code == 200
    assert r.json()["images"][0]["content_type"] == "image/png"
    assert r.headers["x-fal-request-id"] and r.headers["cf-aig-cache-status"] == "MISS"
    seen = fake_gateway.only_request()
    assert (seen["method"], seen["path"], seen["query"]) == (
        "POST",
        f"{PREFIX}/fal-ai/fast-sdxl",
        "x=1",
    )
    assert seen["body"] == body
    h = seen["header_map"]
    assert h["authorization"] == f"Key {FAL_KEY}"
    assert [v for k, v in seen["headers"] if k == "authorization"] == [f"Key {FAL_KEY}"]
    assert h["content-type"] == "application/json"
    assert h["user-agent"] == "ua-test"
    assert h["x-fal-client-proxy"].startswith("fal-gateway-proxy/")
    assert "cookie" not in h and "x-fal-target-url" not in h


def test_sdk_queue_submit_goes_to_the_bare_gateway_url_with_the_target_header(
    client: httpx.Client, fake_gateway: FakeGateway
) -> None:
    target = (
        "https://queue.fal.run/fal-ai/flux/dev?fal_webhook=https%3A%2F%2Fexample.com%2Fhook%3Fa%3Db"
    )
    r = client.post(
        "/api/fal/proxy?ignored=1",
        content=b'{"prompt":"cat"}',
        headers={
            **JSON,
            "x-fal-target-url": target,
            "x-fal-queue-priority": "low",
            "x-fal-runner-hint": "h1",
            "x-fal-request-timeout": "30",
            "x-custom": "v",
        },
    )
    assert r.status_code == 200
    assert r.json()["request_id"] == r.headers["x-fal-request-id"]
    seen = fake_gateway.only_request()
    assert (seen["path"], seen["query"], seen["target_url"]) == (PREFIX, "", target)
    h = seen["header_map"]
    for name, value in [
        ("x-fal-queue-priority", "low"),
        ("x-fal-runner-hint", "h1"),
        ("x-fal-request-timeout", "30"),
        ("x-custom", "v"),
        ("cf-aig-skip-cache", "true"),
        ("cf-aig-max-attempts", "1"),
    ]:
        assert h[name] == value


def test_queue_status_get_and_bodyless_cancel(
    client: httpx.Client, fake_gateway: FakeGateway
) -> None:
    # Held in the emulator's queue (the next test's clear ends it): the status says IN_QUEUE
    # and the cancel finds the job there, however slow the machine.
    fake_gateway.client.post("/_emulator/queue/hold").raise_for_status()
    submit = client.post(
        "/api/fal/proxy",
        json={"prompt": "cat"},
        headers={"x-fal-target-url": "https://queue.fal.run/fal-ai/flux/dev"},
    )
    request_id = submit.json()["request_id"]
    status = f"https://queue.fal.run/fal-ai/flux/requests/{request_id}/status?logs=1"
    assert (
        client.get("/api/fal/proxy", headers={"x-fal-target-url": status}).json()["status"]
        == "IN_QUEUE"
    )
    cancel = f"https://queue.fal.run/fal-ai/flux/requests/{request_id}/cancel"
    r = client.put(
        "/api/fal/proxy", headers={"x-fal-target-url": cancel, **JSON, "content-length": "0"}
    )
    assert (r.status_code, r.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    _, get, put = fake_gateway.requests()
    assert (get["method"], get["target_url"], get["body_len"]) == ("GET", status, 0)
    assert (put["method"], put["target_url"], put["body_len"]) == ("PUT", cancel, 0)


def test_get_run_keeps_the_query_verbatim(client: httpx.Client, fake_gateway: FakeGateway) -> None:
    target = "https://fal.run/fal-ai/fast-sdxl?prompt=a%20cat%2Fdog&n=2"
    assert client.get("/api/fal/proxy", headers={"x-fal-target-url": target}).status_code == 200
    seen = fake_gateway.only_request()
    assert (seen["method"], seen["path"], seen["query"]) == (
        "GET",
        f"{PREFIX}/fal-ai/fast-sdxl",
        "prompt=a%20cat%2Fdog&n=2",
    )
    assert seen["target_url"] is None


def test_head_is_forwarded_without_a_body(client: httpx.Client, fake_gateway: FakeGateway) -> None:
    r = client.head("/emulator/echo")
    assert r.status_code == 200 and r.content == b""
    assert fake_gateway.only_request()["method"] == "HEAD"


@pytest.mark.parametrize(
    ("path", "status", "check"),
    [
        ("/emulator/status/422", 422, lambda r: r.json()["detail"][0]["loc"] == ["body", "prompt"]),
        ("/emulator/status/500", 500, lambda r: r.json() == {"detail": "boom"}),
        ("/emulator/status/504", 504, lambda r: r.headers["x-fal-request-timeout-type"] == "user"),
        ("/emulator/text404", 404, lambda r: r.text == "no such app"),
    ],
)
def test_upstream_errors_pass_through_with_their_status(
    client: httpx.Client, path: str, status: int, check
) -> None:
    r = client.post(path, json={})
    assert r.status_code == status
    assert check(r)
    assert r.headers["x-fal-request-id"]


@pytest.mark.parametrize(
    ("path", "headers", "status", "message"),
    [
        ("/api/fal/proxy", {}, 400, "missing x-fal-target-url header"),
        (
            "/api/fal/proxy",
            {"x-fal-target-url": "https://example.com/x"},
            403,
            "target not allowed",
        ),
        (
            "/api/fal/proxy",
            {"x-fal-target-url": "https://fal.run.evil.com/x"},
            403,
            "target not allowed",
        ),
        ("/api/fal/proxy", {"x-fal-target-url": "http://fal.run/x"}, 403, "target not allowed"),
        (
            "/api/fal/proxy",
            {"x-fal-target-url": "https://fal.run:8443/x"},
            403,
            "target not allowed",
        ),
        ("/api/fal/proxy", {"x-fal-target-url": "garbage string"}, 400, "invalid x-fal-target-url"),
        (
            "/x",
            {"x-fal-target-url": "https://fal.run/fal-ai/%2e%2e/%2e%2e/openai"},
            400,
            "invalid path",
        ),
        ("/fal-ai/%2e%2e/%2e%2e/openai", {}, 400, "invalid path"),
        ("/fal-ai/x%0d%0aevil", {}, 400, "invalid path"),
        ("/", {}, 404, "nothing to forward"),
    ],
)
def test_refused_requests_get_a_json_reason_and_send_nothing_upstream(
    client: httpx.Client,
    fake_gateway: FakeGateway,
    path: str,
    headers: dict,
    status: int,
    message: str,
) -> None:
    r = client.post(path, headers=headers, content=b"{}")
    assert r.status_code == status
    assert r.json()["message"] == message and r.json()["detail"]
    assert fake_gateway.requests() == []


@pytest.mark.parametrize("method", ["DELETE", "PATCH"])
def test_other_sdk_methods_are_forwarded(
    client: httpx.Client, fake_gateway: FakeGateway, method: str
) -> None:
    r = client.request(
        method,
        "/api/fal/proxy",
        headers={"x-fal-target-url": "https://fal.run/emulator/echo"},
        content=b"{}",
    )
    assert r.status_code == 200
    assert fake_gateway.only_request()["method"] == method


@pytest.mark.parametrize("method", ["TRACE", "OPTIONS", "PROPFIND"])
def test_methods_fal_does_not_take_are_refused(
    client: httpx.Client, fake_gateway: FakeGateway, method: str
) -> None:
    r = client.request(method, "/fal-ai/x")
    assert r.status_code == 405 and "GET" in r.headers["allow"]
    assert r.json()["message"] == f"method {method} not allowed"
    assert fake_gateway.requests() == []


def test_sse_events_arrive_before_the_upstream_has_produced_the_next(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    # The fake sends event n only after the test releases gate sse-n. If the proxy buffered,
    # event 1 would never arrive before the release and the read would time out.
    timeout = httpx.Timeout(10, read=5)
    with (
        httpx.Client(base_url=proxy.url, trust_env=False, timeout=timeout) as c,
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
        assert next(lines) == 'data: {"n": 1}'
        assert next(lines) == ""
        fake_gateway.release("sse-2")
        assert next(lines) == 'data: {"n": 2}'
        assert next(lines) == ""
        fake_gateway.release("sse-3")
        assert [next(lines), next(lines)] == ["event: done", 'data: {"n": 3}']
    seen = fake_gateway.only_request()
    assert "text/event-stream" in seen["header_map"]["accept"]
    assert seen["header_map"]["cf-aig-skip-cache"] == "true"


def _rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


def _reset_peak_rss(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def test_64_mib_download_streams_with_bounded_memory(
    proxy: RunningProxy, client: httpx.Client
) -> None:
    size = 64 * 1024 * 1024
    pid = proxy.process.proc.pid
    client.get("/emulator/bytes?size=1024")  # warm up the pool
    _reset_peak_rss(pid)
    before = _rss_kib(pid, "VmRSS")
    digest, received = hashlib.sha256(), 0
    with client.stream("GET", f"/emulator/bytes?size={size}") as r:
        assert r.headers["content-length"] == str(size)
        for chunk in r.iter_raw():
            digest.update(chunk)
            received += len(chunk)
    block = pattern_block()
    expected = hashlib.sha256(block * (size // len(block))).hexdigest()
    assert (received, digest.hexdigest()) == (size, expected)
    grown_mib = (_rss_kib(pid, "VmHWM") - before) / 1024
    assert grown_mib < 24, f"proxy RSS grew by {grown_mib:.1f} MiB while moving 64 MiB"


def test_32_mib_upload_streams_with_bounded_memory(
    proxy: RunningProxy, client: httpx.Client
) -> None:
    size, piece = 32 * 1024 * 1024, pattern_block()
    pid = proxy.process.proc.pid
    _reset_peak_rss(pid)
    before = _rss_kib(pid, "VmRSS")

    def body():  # a generator: httpx sends it chunked, the proxy must stream it on
        for _ in range(size // len(piece)):
            yield piece

    r = client.post(
        "/emulator/sink", content=body(), headers={"content-type": "application/octet-stream"}
    )
    assert r.status_code == 200
    assert r.json() == {
        "len": size,
        "sha256": hashlib.sha256(piece * (size // len(piece))).hexdigest(),
    }
    grown_mib = (_rss_kib(pid, "VmHWM") - before) / 1024
    assert grown_mib < 24, f"proxy RSS grew by {grown_mib:.1f} MiB while moving 32 MiB"


def test_binary_body_with_content_length_is_forwarded_byte_for_byte(
    client: httpx.Client, fake_gateway: FakeGateway
) -> None:
    body = bytes(range(256)) * 300
    r = client.post(
        "/emulator/sink", content=body, headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
    seen = fake_gateway.only_request()
    assert seen["header_map"]["content-length"] == str(len(body))
    assert seen["header_map"]["content-type"] == "multipart/form-data; boundary=x"


def test_compressed_bodies_pass_through_untouched(proxy: RunningProxy) -> None:
    with httpx.Client(base_url=proxy.url, trust_env=False) as c:
        r = c.get("/emulator/gzip", headers={"accept-encoding": "gzip"})
        assert r.headers["content-encoding"] == "gzip"
        assert int(r.headers["content-length"]) < 2000  # still the compressed size
        assert r.json()["compressed"] is True  # and the client decodes it
        with c.stream("GET", "/emulator/gzip", headers={"accept-encoding": "gzip"}) as raw:
            assert json.loads(gzip.decompress(b"".join(raw.iter_raw())))["compressed"] is True


def test_cookies_and_hop_headers_are_dropped_and_never_carried_over(
    client: httpx.Client, fake_gateway: FakeGateway
) -> None:
    first = client.get("/emulator/cookie")
    assert "set-cookie" not in first.headers
    client.cookies.clear()
    second = client.get("/emulator/cookie")
    assert second.json()["cookie_seen"] == ""  # the proxy's upstream client kept no jar
    hop = client.get("/emulator/hop")
    assert hop.headers["x-end-to-end"] == "kept"
    for name in ("x-custom-hop", "keep-alive", "alt-svc"):
        assert name not in hop.headers
    assert all("cookie" not in r["header_map"] for r in fake_gateway.requests())


def test_a_header_repeated_in_another_case_reaches_the_gateway_every_time(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    """aiohttp merges request headers by exact name (`_prepare_headers`): ``X-Trace`` then
    ``x-trace`` would go out as one. The server and the header policy both lower-case
    names (a change that kept the client's case would need its own fix), so every value,
    in order, reaches the gateway."""
    import socket

    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /fal-ai/fast-sdxl HTTP/1.1\r\nhost: x\r\ncontent-length: 14\r\n"
            b"X-Trace: one\r\nx-trace: two\r\nX-TRACE: three\r\nconnection: close\r\n\r\n"
            b'{"prompt":"x"}'
        )
        response = b""
        while data := sock.recv(65536):
            response += data
    assert response.startswith(b"HTTP/1.1 200 "), response[:200]
    [seen] = fake_gateway.requests()
    assert [v for k, v in seen["headers"] if k.lower() == "x-trace"] == ["one", "two", "three"]


def test_client_abort_mid_stream_closes_the_upstream_request(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    with (
        httpx.Client(base_url=proxy.url, trust_env=False, timeout=5) as c,
        c.stream("POST", "/emulator/stall", json={}) as r,
    ):
        request_id = r.headers["x-proxy-request-id"]
        assert next(r.iter_lines()) == 'data: {"n": 1}'
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 5
    while not any(e.startswith("disconnected:stall") for e in fake_gateway.events()):
        assert time.monotonic() < deadline, (
            "the upstream request was not closed after the client left"
        )
        time.sleep(0.05)
    line = proxy.wait_for_request_log(request_id)
    assert (line["status"], line["error"]) == (499, "client_gone")


def test_client_abort_while_waiting_for_headers_closes_the_upstream_request(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    with (
        httpx.Client(base_url=proxy.url, trust_env=False, timeout=httpx.Timeout(5, read=0.5)) as c,
        pytest.raises(httpx.ReadTimeout),
    ):
        c.post("/emulator/hang", json={})
    deadline = time.monotonic() + 5
    while not any(e.startswith("disconnected:hang") for e in fake_gateway.events()):
        assert time.monotonic() < deadline, (
            "the upstream request was not closed after the client left"
        )
        time.sleep(0.05)


def test_upstream_dying_mid_body_is_an_error_for_the_client_not_a_clean_end(
    proxy: RunningProxy, client: httpx.Client
) -> None:
    with pytest.raises(httpx.RemoteProtocolError), client.stream("GET", "/emulator/die") as r:
        request_id = r.headers["x-proxy-request-id"]
        for _ in r.iter_raw():
            pass
    line = proxy.wait_for_request_log(request_id)
    assert (line["status"], line["error"]) == (200, "upstream_unavailable")
    assert line["bytes_out"] == 10


def test_stalled_upload_from_the_client_is_408(start_proxy, fake_gateway: FakeGateway) -> None:
    import socket

    proxy = start_proxy(FAL_PROXY_IDLE_TIMEOUT="0.5")
    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /emulator/sink HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            b"4\r\nabcd\r\n"
        )
        # ...then send nothing more: the proxy must give up and answer.
        response = b""
        while b"\r\n\r\n" not in response or not response.endswith(b"}"):
            data = sock.recv(65536)
            assert data, f"connection closed early: {response!r}"
            response += data
    assert response.startswith(b"HTTP/1.1 408 ")
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["message"] == "request body stalled"
    assert (
        fake_gateway.requests() == []
    )  # the fake records a request only once its body is complete


def test_gateway_that_stops_reading_the_upload_is_504(
    start_proxy, fake_gateway: FakeGateway
) -> None:
    proxy = start_proxy(FAL_PROXY_IDLE_TIMEOUT="0.5")
    chunk = b"x" * (1024 * 1024)
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=20) as c:
        r = c.post("/emulator/noread", content=iter([chunk] * 64))
    assert r.status_code == 504
    assert r.json()["message"] == "the gateway stopped reading the request body"
    fake_gateway.release("noread")


def test_304_with_a_content_length_passes_and_the_connection_stays_usable(
    client: httpx.Client,
) -> None:
    r = client.get("/emulator/notmodified", headers={"if-none-match": '"v1"'})
    assert r.status_code == 304 and r.headers["etag"] == '"v1"'
    assert "content-length" not in r.headers
    # The same client connection serves the next call. (The emulator's uvicorn resets its end
    # of the upstream connection after a 304 that promised a body; a call that cannot start a
    # generation, like this status read, is sent again on a fresh one; a run would get a 502.)
    status = client.get(
        "/api/fal/proxy",
        headers={"x-fal-target-url": "https://queue.fal.run/fal-ai/flux/requests/none/status"},
    )
    assert status.status_code == 404 and status.json()["detail"] == "Request not found"


def test_body_over_the_limit_is_refused(start_proxy, fake_gateway: FakeGateway) -> None:
    proxy = start_proxy(FAL_PROXY_MAX_BODY_BYTES="1000")
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=5) as c:
        declared = c.post("/emulator/sink", content=b"x" * 2000)
        assert (
            declared.status_code == 413 and declared.json()["message"] == "request body too large"
        )
        streamed = c.post("/emulator/sink", content=iter([b"x" * 600, b"x" * 600]))
        assert streamed.status_code == 413
        assert c.post("/emulator/sink", content=b"x" * 1000).status_code == 200
    assert [r["body_len"] for r in fake_gateway.requests()] == [1000]


def test_unreachable_gateway_is_502_and_slow_gateway_is_504(start_proxy) -> None:
    closed = start_proxy(FAL_PROXY_GATEWAY_URL="http://127.0.0.1:9/v1/acct/gw/fal")
    with httpx.Client(base_url=closed.url, trust_env=False, timeout=10) as c:
        r = c.post("/fal-ai/x", json={})
    assert r.status_code == 502
    assert r.json()["message"] == "the gateway could not be reached"
    slow = start_proxy(FAL_PROXY_FIRST_BYTE_TIMEOUT="0.3")
    with httpx.Client(base_url=slow.url, trust_env=False, timeout=10) as c:
        r = c.post("/emulator/hang", json={})
    assert r.status_code == 504
    assert "0.3s" in r.json()["detail"]


def test_gateway_401_code_2009_is_logged_as_a_gateway_credential_problem() -> None:
    from tests.conftest import launch_proxy

    gateway = start_fake_gateway("--cf-token", "the-right-token")
    proxy = launch_proxy(gateway.gateway_url, CF_AIG_TOKEN=CF_TOKEN)
    try:
        with httpx.Client(base_url=proxy.url, trust_env=False, timeout=5) as c:
            r = c.post("/fal-ai/x", json={})
        assert r.status_code == 401
        assert r.json()["error"][0]["code"] == 2009
        assert gateway.only_request()["header_map"]["cf-aig-authorization"] == f"Bearer {CF_TOKEN}"
        line = proxy.wait_for_request_log(r.headers["x-proxy-request-id"])
        assert line["gateway_error"] == "cf_gateway_unauthorized_2009"
        assert line["level"] == "warning" and "CF_AIG_TOKEN" in line["hint"]
    finally:
        proxy.process.stop()
        gateway.stop()


def test_fal_401_is_not_mistaken_for_a_gateway_problem(start_proxy) -> None:
    proxy = start_proxy(FAL_KEY="wrong-key")
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=5) as c:
        r = c.post("/fal-ai/x", json={})
    assert r.status_code == 401
    assert "gateway_error" not in proxy.wait_for_request_log(r.headers["x-proxy-request-id"])


def test_canonical_log_line_per_request(proxy: RunningProxy, client: httpx.Client) -> None:
    target = (
        "https://queue.fal.run/fal-ai/flux/dev?fal_webhook=https%3A%2F%2Fx.com%2F%3Fsecret%3Dabc"
    )
    r = client.post("/api/fal/proxy", headers={"x-fal-target-url": target}, json={"prompt": "p"})
    line = proxy.wait_for_request_log(r.headers["x-proxy-request-id"])
    assert line["route"] == "queue" and line["method"] == "POST"
    assert (line["target_host"], line["target_path"]) == ("queue.fal.run", "/fal-ai/flux/dev")
    assert line["target_query"] == "fal_webhook=[redacted]"
    assert (line["status"], line["upstream_status"]) == (200, 200)
    assert line["bytes_in"] == len(b'{"prompt":"p"}') and line["bytes_out"] == int(
        r.headers["content-length"]
    )
    assert line["fal_request_id"] == r.headers["x-fal-request-id"]
    assert line["cf_aig_log_id"] == r.headers["cf-aig-log-id"]
    assert line["ttfb_ms"] > 0 and line["duration_ms"] >= line["ttfb_ms"]
    assert "secret" not in json.dumps(line)


def test_secrets_never_reach_the_client_or_the_logs(
    proxy: RunningProxy, client: httpx.Client
) -> None:
    responses = [
        client.post("/emulator/echo", json={}),
        client.post("/api/fal/proxy", json={}),
        client.post("/api/fal/proxy", headers={"x-fal-target-url": "https://evil.com/"}, json={}),
        client.post("/emulator/status/500", json={}),
        client.get("/emulator/hop"),
    ]
    for r in responses:  # every call's line is in before the logs are searched
        proxy.wait_for_request_log(r.headers["x-proxy-request-id"])
    for secret in (FAL_KEY, FAL_KEY.split(":")[1], "SENTINEL"):
        for r in responses:
            assert secret not in r.text
            assert all(secret not in v for v in r.headers.values())
        assert all(secret not in json.dumps(line) for line in proxy.logs())


def test_healthz(client: httpx.Client, fake_gateway: FakeGateway) -> None:
    r = client.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    assert fake_gateway.requests() == []


def test_curl_against_the_fal_run_shape(proxy: RunningProxy, fake_gateway: FakeGateway) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is not installed (.ci/run installs it)"
    out = subprocess.run(
        [
            curl,
            "-sS",
            "--fail-with-body",
            "-H",
            "content-type: application/json",
            "-d",
            '{"prompt":"a cat"}',
            f"{proxy.url}/emulator/echo",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    assert json.loads(out) == {"input": {"prompt": "a cat"}}
    assert fake_gateway.only_request()["path"] == f"{PREFIX}/emulator/echo"
