"""fal's Python client (``fal-client`` 1.0.3, pinned in the test extras), unmodified, through
the proxy's TLS port (``FAL_PROXY_PYTHON_SDK_PORT``).

Each test runs tests/python_client/scenarios.py in its own process whose whole environment is
``PATH``, an empty ``HOME`` and what ``fal-gateway-proxy python-env`` printed: the client
reaches the proxy by ``FAL_RUN_HOST`` / ``FAL_QUEUE_RUN_HOST`` and trusts it by
``SSL_CERT_FILE`` (the proxy's own local CA). Then both ends are checked: what the client
returned, and what the emulated gateway received (path mode for runs, ``x-fal-target-url``
for queue calls, the server's key and never the client's ``FAL_KEY``, every poll).

The emulator gzips its queue answers (``--gzip-queue``), so every rewritten answer here was
decoded by the proxy first.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config.python_port import FAL_KEY_PLACEHOLDER
from proxy.config.tls_certs import ensure_certificates
from tests.conftest import (
    FAL_KEY,
    PREFIX,
    ROOT,
    FakeGateway,
    RunningProxy,
    child_env,
    launch_proxy,
    start_fake_gateway,
)
from tests.redis_support import free_port

SCRIPT = ROOT / "tests" / "python_client" / "scenarios.py"
SERVER_AUTH = f"Key {FAL_KEY}"
APP = "fal-ai/fast-sdxl"
QUEUE = "https://queue.fal.run"


@pytest.fixture(scope="module")
def fake_gateway() -> Iterator[FakeGateway]:
    gateway = start_fake_gateway("--gzip-queue")
    yield gateway
    gateway.stop()


@dataclass
class PythonPort:
    proxy: RunningProxy
    env: dict[str, str]  # what python-env printed
    settings: dict[str, str]
    home: Path

    @property
    def origin(self) -> str:
        return f"https://{self.env['FAL_RUN_HOST']}"

    def run(self, scenario: str, *args: str, **extra: str) -> dict[str, Any]:
        """The scenario in a fresh process with only the python-env variables (and ``extra``)."""
        env = {"PATH": os.environ["PATH"], "HOME": str(self.home), **self.env, **extra}
        done = subprocess.run(
            [sys.executable, str(SCRIPT), scenario, *args],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])


def python_env(settings: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "python-env", *flags],
        env=child_env(**settings), capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def env_of(output: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.splitlines())


def start_python_port(gateway: FakeGateway, state: Path, home: Path, **extra: str) -> PythonPort:
    settings = {
        "FAL_KEY": FAL_KEY,
        "FAL_PROXY_GATEWAY_URL": gateway.gateway_url,
        "FAL_PROXY_PYTHON_SDK_PORT": str(free_port()),
        "FAL_PROXY_STATE_DIR": str(state),
        "FAL_PROXY_ALLOWED_APPS": "fal-ai/*",
        **extra,
    }
    proxy = launch_proxy(gateway.gateway_url, **settings)
    proxy.process.wait_for_json(lambda r: r.get("event") == "python_sdk")
    printed = python_env(settings)
    assert printed.returncode == 0, printed.stderr
    return PythonPort(proxy, env_of(printed.stdout), settings, home)


@pytest.fixture(scope="module")
def port(
    fake_gateway: FakeGateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PythonPort]:
    running = start_python_port(
        fake_gateway, tmp_path_factory.mktemp("state"), tmp_path_factory.mktemp("home")
    )
    yield running
    running.proxy.process.stop()


def headers_of(record: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in record["headers"]:
        out.setdefault(name, []).append(value)
    return out


def assert_server_credentials_only(records: list[dict[str, Any]]) -> None:
    """Every upstream request carried the server's key, once, and nothing of the client's."""
    assert records
    for record in records:
        headers = headers_of(record)
        assert headers["authorization"] == [SERVER_AUTH], record["path"]
        flat = json.dumps(record["headers"])
        assert FAL_KEY_PLACEHOLDER not in flat
        assert "x-proxy-authorization" not in headers


def hold_queue(gateway: FakeGateway) -> dict[str, str]:
    """Hold the emulator's queue (the next test's clear ends it); the scenario's
    ``EMULATOR_URL``, for it to release what the test held."""
    assert gateway.client.post("/_emulator/queue/hold").json() == {"holding": True}
    return {"EMULATOR_URL": f"http://127.0.0.1:{gateway.port}"}


def queue_records(gateway: FakeGateway) -> list[dict[str, Any]]:
    return [r for r in gateway.requests() if (r["target_url"] or "").startswith(QUEUE)]


# --- what python-env prints -------------------------------------------------------------------


def test_python_env_prints_what_points_the_client_at_the_port(port: PythonPort) -> None:
    number = port.settings["FAL_PROXY_PYTHON_SDK_PORT"]
    bundle = Path(port.settings["FAL_PROXY_STATE_DIR"]) / "ca-bundle.pem"
    assert port.env == {
        "FAL_RUN_HOST": f"127.0.0.1:{number}",
        "FAL_QUEUE_RUN_HOST": f"127.0.0.1:{number}/queue.fal.run",
        "SSL_CERT_FILE": str(bundle),
        "FAL_KEY": FAL_KEY_PLACEHOLDER,
    }
    exported = python_env(port.settings, "--export")
    assert exported.stdout.splitlines()[0] == f"export FAL_RUN_HOST=127.0.0.1:{number}"
    # The shell takes the lines as they are: eval them and print the environment back.
    shell = subprocess.run(
        ["sh", "-c", exported.stdout + 'printf "%s\\n" "$FAL_QUEUE_RUN_HOST" "$SSL_CERT_FILE"'],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert shell.stdout.splitlines() == [port.env["FAL_QUEUE_RUN_HOST"], str(bundle)]


def test_python_env_without_the_port_names_the_variable(port: PythonPort) -> None:
    settings = {k: v for k, v in port.settings.items() if k != "FAL_PROXY_PYTHON_SDK_PORT"}
    done = python_env(settings)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "FAL_PROXY_PYTHON_SDK_PORT" in done.stderr


def test_python_env_needs_only_what_identifies_the_proxy(port: PythonPort) -> None:
    """From another shell: no fal key, no gateway, just the port and the proxy's state."""
    wanted = ("FAL_PROXY_PYTHON_SDK_PORT", "FAL_PROXY_STATE_DIR")
    done = python_env({k: v for k, v in port.settings.items() if k in wanted})
    assert done.returncode == 0, done.stderr
    assert env_of(done.stdout) == port.env


def test_python_env_never_hands_out_a_ca_the_running_proxy_does_not_serve(
    port: PythonPort, tmp_path: Path
) -> None:
    """Another user or shell (another state directory): its own CA exists there, but the
    running port's certificate is not signed by it. One line, exit 2, nothing printed;
    and with no CA at all, none is made."""
    other = tmp_path / "other-state"
    made = python_env({**port.settings, "FAL_PROXY_STATE_DIR": str(other)})
    assert made.returncode == 2 and "no local CA" in made.stderr and not other.exists()
    # A CA of its own there, as a proxy run by another user would have made.
    ensure_certificates(other, ["127.0.0.1", "localhost"])
    done = python_env({**port.settings, "FAL_PROXY_STATE_DIR": str(other)})
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    number = port.settings["FAL_PROXY_PYTHON_SDK_PORT"]
    assert f"the proxy on 127.0.0.1:{number} serves a certificate that" in line
    assert "FAL_PROXY_STATE_DIR" in line


def test_python_env_with_no_proxy_running_says_start_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ensure_certificates(state, ["127.0.0.1", "localhost"])
    done = python_env({"FAL_PROXY_PYTHON_SDK_PORT": str(free_port()),
                       "FAL_PROXY_STATE_DIR": str(state)})  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert "FAL_PROXY_PYTHON_SDK_PORT: no TLS answer on 127.0.0.1:" in line
    assert "start the proxy first" in line


def test_python_env_help_says_what_does_not_go_through_the_proxy() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "python-env", "--help"],
        env=child_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    text = " ".join(done.stdout.split())
    assert "upload_file" in text and "use_jwt=True" in text and "use_jwt=False" in text
    assert "encode_file" in text


# --- runs ---------------------------------------------------------------------------------


def test_run_goes_in_path_mode_with_the_server_key(
    port: PythonPort, fake_gateway: FakeGateway
) -> None:
    out = port.run("run")
    assert out["result"]["images"][0]["url"]
    record = fake_gateway.only_request()
    assert record["path"] == f"{PREFIX}/{APP}" and record["method"] == "POST"
    assert record["target_url"] is None and "x-fal-target-url" not in headers_of(record)
    assert json.loads(record["body"]) == {"prompt": "a cat"}
    assert headers_of(record)["user-agent"][0].startswith("fal-client/1.0.3")
    assert_server_credentials_only([record])


def test_run_with_a_path(port: PythonPort, fake_gateway: FakeGateway) -> None:
    out = port.run("run_path")
    assert out["result"]["images"]
    assert fake_gateway.only_request()["path"] == f"{PREFIX}/fal-ai/flux/dev"


def test_stream_delivers_every_event(port: PythonPort, fake_gateway: FakeGateway) -> None:
    events = port.run("stream")["events"]
    assert [e.get("step") for e in events[:-1]] == list(range(1, len(events)))
    assert events[-1]["images"]
    record = fake_gateway.only_request()
    assert record["path"] == f"{PREFIX}/fal-ai/flux/dev/stream"
    assert_server_credentials_only([record])


def test_invalid_input_reaches_the_client_as_422(
    port: PythonPort, fake_gateway: FakeGateway
) -> None:
    out = port.run("invalid_input")
    assert out["http_error"] == 422
    assert len(fake_gateway.requests()) == 1


def test_a_refused_app_reaches_the_client_as_403_and_nothing_goes_upstream(
    port: PythonPort, fake_gateway: FakeGateway
) -> None:
    out = port.run("refused_app", "someone/else")
    assert out["http_error"] == 403 and "FAL_PROXY_ALLOWED_APPS" in out["message"]
    assert fake_gateway.requests() == []
    line = port.proxy.wait_for_request_log(out["request_id"])
    assert line["status"] == 403 and line["error"] == "app_refused"


# --- the queue ------------------------------------------------------------------------------


def test_subscribe_sees_every_status_and_every_poll_comes_through_the_proxy(
    port: PythonPort, fake_gateway: FakeGateway
) -> None:
    # Held: Queued until the client has seen it, then InProgress until it has seen that.
    out = port.run("subscribe", **hold_queue(fake_gateway))
    names = [u["status"] for u in out["updates"]]
    assert names[0] == "Queued" and names[-1] == "Completed" and "InProgress" in names
    assert names == sorted(names, key=["Queued", "InProgress", "Completed"].index)
    assert any(u["logs"] for u in out["updates"] if u["status"] == "Completed")
    assert out["result"]["images"]
    records = queue_records(fake_gateway)
    submit, *polls, result = records
    assert submit["method"] == "POST" and submit["target_url"] == f"{QUEUE}/{APP}"
    assert submit["path"] == PREFIX  # target mode: the gateway's /fal, fal's URL in the header
    # One status poll upstream per status the client saw (then get()'s own poll, without
    # logs), and the result: all via the proxy.
    assert all("/status?logs=" in p["target_url"] for p in polls)
    assert len([p for p in polls if p["target_url"].endswith("?logs=true")]) == len(names)
    assert result["target_url"].startswith(f"{QUEUE}/{APP}/requests/")
    request_id = result["target_url"].rsplit("/", 1)[1]
    assert out["released"] == [{request_id: "IN_PROGRESS"}] * 2  # both stops were held
    assert_server_credentials_only(records)
    # The client asked in gzip (the proxy's choice: it must read these) and got it rewritten.
    assert headers_of(submit)["accept-encoding"] == ["gzip, deflate"]


def test_submit_status_result_use_the_rewritten_urls(
    port: PythonPort, fake_gateway: FakeGateway
) -> None:
    out = port.run("submit_status_result")
    request = out["request_id"]
    base = f"{port.origin}/queue.fal.run/{APP}/requests/{request}"
    assert out["urls"] == {
        "status_url": f"{base}/status",
        "response_url": base,
        "cancel_url": f"{base}/cancel",
    }
    assert out["statuses"][-1] == "Completed"
    assert out["logs"][0]["message"] == "Loading model (emulated)"
    assert out["result"] == out["again"] and out["result"]["images"]
    targets = [r["target_url"] for r in queue_records(fake_gateway)]
    assert targets.count(f"{QUEUE}/{APP}/requests/{request}") == 2  # get() and result()
    # The gateway itself answered with fal's own URLs: the proxy pointed them at its port.
    emulated = httpx.get(
        f"http://127.0.0.1:{fake_gateway.port}{PREFIX}",
        headers={"x-fal-target-url": f"{QUEUE}/{APP}/requests/{request}/status",
                 "authorization": SERVER_AUTH},
    ).json()  # fmt: skip
    assert emulated["status_url"] == f"{QUEUE}/{APP}/requests/{request}/status"


def test_cancel_goes_through_the_proxy(port: PythonPort, fake_gateway: FakeGateway) -> None:
    hold_queue(fake_gateway)  # the cancel finds the job in the queue, however slow the run
    out = port.run("cancel")
    assert "http_error" not in out, out  # 202 CANCELLATION_REQUESTED, not ALREADY_COMPLETED
    assert out["status"] == "Completed" and out["by_id"] == "Completed"
    cancels = [r for r in queue_records(fake_gateway) if r["method"] == "PUT"]
    assert [r["target_url"] for r in cancels] == [
        f"{QUEUE}/{APP}/requests/{out['request_id']}/cancel"
    ]
    assert_server_credentials_only(cancels)


# --- sockets --------------------------------------------------------------------------------


def test_realtime_without_jwt_is_bridged_with_msgpack_both_ways(
    port: PythonPort, fake_gateway: FakeGateway
) -> None:
    out = port.run("realtime")
    assert out["result"]["images"][0]["url"]
    assert out["second"]["type"] == "x-fal-error" and out["second"]["error"] == "INVALID_INPUT"
    (socket,) = fake_gateway.requests("websocket")
    assert socket["path"] == f"{PREFIX}/fal-ai/fast-lcm-diffusion/realtime"
    assert_server_credentials_only([socket])


def test_ws_connect_is_bridged(port: PythonPort, fake_gateway: FakeGateway) -> None:
    out = port.run("ws_connect")
    assert out["result"]["images"]
    (socket,) = fake_gateway.requests("websocket")
    assert_server_credentials_only([socket])


# --- the async client -------------------------------------------------------------------------


def test_the_async_client_does_the_same_calls(port: PythonPort, fake_gateway: FakeGateway) -> None:
    # EMULATOR_URL: the scenario holds the job it cancels, and only that one.
    out = port.run("async_calls", EMULATOR_URL=f"http://127.0.0.1:{fake_gateway.port}")
    assert "http_error" not in out, out
    assert out["run"]["images"] and out["subscribe"]["images"] and out["result"]["images"]
    assert out["updates"][-1] == "Completed" and out["statuses"][-1] == "Completed"
    assert out["cancelled"] == "Completed"
    assert out["events"] > 1 and out["realtime"]["images"]
    assert out["status_url"].startswith(f"{port.origin}/queue.fal.run/{APP}/requests/")
    assert_server_credentials_only(fake_gateway.requests() + fake_gateway.requests("websocket"))


# --- callers --------------------------------------------------------------------------------


def test_with_caller_tokens_the_clients_fal_key_is_its_caller_credential(
    fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    token = "alice-token-0123456789abcdef"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {token}\n")
    running = start_python_port(
        fake_gateway, tmp_path / "state", tmp_path, FAL_PROXY_AUTH="token",
        FAL_PROXY_CLIENT_TOKENS_FILE=str(tokens), FAL_PROXY_LOG_LEVEL="debug",
    )  # fmt: skip
    try:
        assert "FAL_KEY" not in running.env  # the caller's own credential goes there
        assert running.run("run", FAL_KEY=token)["result"]["images"]
        out = running.run("submit_status_result", FAL_KEY=token)
        assert out["result"]["images"]
        assert running.run("realtime", FAL_KEY=token)["result"]["images"]
        refused = running.run("run", FAL_KEY="mallory-token-0123456789")
        assert refused["http_error"] == 401
        # The caller reads their own usage on the same port, with the same credential.
        with tls_client(running) as client:
            usage = client.get("/api/fal/usage", headers={"authorization": f"Key {token}"})
            assert usage.status_code == 200
            assert usage.json()["usage"]["apps"]
            anonymous = client.get("/api/fal/usage")
            assert anonymous.status_code == 401
        records = fake_gateway.requests() + fake_gateway.requests("websocket")
        assert_server_credentials_only(records)
        assert token not in json.dumps([r["headers"] for r in records])
        running.proxy.process.stop()  # (stdout is read to its end: every line it wrote is in)
        callers = {r.get("caller") for r in running.proxy.request_logs() if r["status"] < 400}
        assert callers == {"alice"}
        # Not in any line, at debug level, from any logger (websockets' handshake included).
        everything = "\n".join(running.proxy.process.lines)
        assert "handshake" in everything.lower() or "websocket" in everything
        assert token not in everything and FAL_KEY not in everything
    finally:
        running.proxy.process.stop()


# --- attacks on the port --------------------------------------------------------------------


def tls_client(port: PythonPort) -> httpx.Client:
    trusted = ssl.create_default_context(cafile=port.env["SSL_CERT_FILE"])
    return httpx.Client(base_url=port.origin, verify=trusted, trust_env=False, timeout=10)


def raw_post(port: PythonPort, path: str) -> tuple[int, dict[str, Any]]:
    """A POST with ``path`` sent as written (http.client does not normalise dot segments)."""
    trusted = ssl.create_default_context(cafile=port.env["SSL_CERT_FILE"])
    host, number = port.env["FAL_RUN_HOST"].rsplit(":", 1)
    connection = http.client.HTTPSConnection(host, int(number), context=trusted, timeout=10)
    try:
        connection.request("POST", path, body=b"{}", headers={"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize(
    "path",
    [
        "/queue.fal.run/../fal-ai/fast-sdxl",
        "/queue.fal.run/%2e%2e/%2e%2e/v1/other/gw/openai",
        "/queue.fal.run//evil.example/x",
        "/queue.fal.run/%2F%2Fevil.example/x",
        "/queue.fal.run",
        "/queue.fal.run/",
        "/%2e%2e/%2e%2e/openai/chat",
    ],
)
def test_hostile_paths_on_the_port_are_refused_and_nothing_goes_upstream(
    port: PythonPort, fake_gateway: FakeGateway, path: str
) -> None:
    status, body = raw_post(port, path)
    assert status in (400, 403, 404), body
    assert set(body) == {"message", "detail"}
    assert fake_gateway.requests() == []


def test_a_target_header_sent_to_the_port_is_ignored_and_dropped(
    port: PythonPort, fake_gateway: FakeGateway
) -> None:
    """The target on this port is the path's: a client's own x-fal-target-url (here a
    realtime token, which the port's path does not name) changes nothing."""
    with tls_client(port) as client:
        response = client.post(
            f"/{APP}", json={"prompt": "a cat"},
            headers={"x-fal-target-url": "https://rest.fal.ai/tokens/",
                     "authorization": "Key whatever"},
        )  # fmt: skip
    assert response.status_code == 200
    record = fake_gateway.only_request()
    assert record["path"] == f"{PREFIX}/{APP}" and record["target_url"] is None
    assert_server_credentials_only([record])


def test_the_main_port_leaves_queue_answers_alone(
    port: PythonPort, fake_gateway: FakeGateway
) -> None:
    """The JS SDK rebuilds the URLs itself: only the Python port rewrites them."""
    response = httpx.post(
        f"{port.proxy.url}/api/fal/proxy", json={"prompt": "a cat"},
        headers={"x-fal-target-url": f"{QUEUE}/{APP}"}, trust_env=False,
    )  # fmt: skip
    assert response.json()["status_url"].startswith(f"{QUEUE}/{APP}/requests/")


def test_plain_http_and_garbage_on_the_tls_port_harm_nothing(port: PythonPort) -> None:
    import socket

    number = int(port.settings["FAL_PROXY_PYTHON_SDK_PORT"])
    for payload in (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05hello",
                    b"\x00" * 1024):  # fmt: skip
        with socket.create_connection(("127.0.0.1", number), timeout=5) as raw:
            raw.sendall(payload)
            try:
                got = raw.recv(1024)
            except ConnectionResetError:
                got = b""  # closed with a reset: no answer either
            # Closed by the proxy (or a TLS alert record first), never served; a proxy that
            # kept the connection open fails here by the socket's timeout.
            assert got == b"" or got.startswith(b"\x15\x03"), got
    with httpx.Client(verify=False, trust_env=False) as unverified:  # the port still serves
        assert unverified.get(f"{port.origin}/healthz").status_code == 200
    with pytest.raises(httpx.ConnectError):  # and without the CA, a client refuses it
        httpx.get(f"{port.origin}/healthz", trust_env=False)
    # A call of its own, answered after the garbage: once its line is in, so is any before it.
    port.proxy.lines_of([httpx.get(f"{port.proxy.url}/api/fal/proxy", trust_env=False)])
    text = "\n".join(json.dumps(line) for line in port.proxy.logs())
    assert "Traceback" not in text and '"level": "error"' not in text.replace('":"', '": "')


# --- start-up -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"FAL_PROXY_TLS_CERT_FILE": "/nonexistent/c.pem",
          "FAL_PROXY_TLS_KEY_FILE": "/nonexistent/k.pem"}, "FAL_PROXY_TLS_CERT_FILE"),
        ({"FAL_PROXY_TLS_CERT_FILE": "/nonexistent/c.pem"}, "FAL_PROXY_TLS_KEY_FILE"),
        ({"FAL_PROXY_STATE_DIR": "/dev/null/state"}, "FAL_PROXY_STATE_DIR"),
        ({"FAL_PROXY_PYTHON_SDK_HOST": "https://x"}, "FAL_PROXY_PYTHON_SDK_HOST"),
        ({"FAL_PROXY_PORT": "18443", "FAL_PROXY_PYTHON_SDK_PORT": "18443"},
         "FAL_PROXY_PYTHON_SDK_PORT"),
    ],
)  # fmt: skip
def test_bad_port_settings_stop_the_start_with_one_line(
    fake_gateway: FakeGateway, extra: dict[str, str], named: str
) -> None:
    env = {
        "FAL_KEY": FAL_KEY,
        "FAL_PROXY_GATEWAY_URL": fake_gateway.gateway_url,
        "FAL_PROXY_PYTHON_SDK_PORT": str(free_port()),
        **extra,
    }
    done = subprocess.run(
        [sys.executable, "-m", "proxy"], env=child_env(**env), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fal-gateway-proxy: error: ")
    assert named in lines[0]


def test_the_port_works_with_several_workers(fake_gateway: FakeGateway, tmp_path: Path) -> None:
    """Each worker serves the TLS port too (the certificate made once, by the supervisor)."""
    from tests.conftest import Process

    settings = {
        "FAL_KEY": FAL_KEY,
        "FAL_PROXY_GATEWAY_URL": fake_gateway.gateway_url,
        "FAL_PROXY_PYTHON_SDK_PORT": str(free_port()),
        "FAL_PROXY_STATE_DIR": str(tmp_path / "state"),
        "FAL_PROXY_LOG_FORMAT": "json",
    }
    process = Process([sys.executable, "-m", "proxy", "--port", "0", "--workers", "2"],
                      child_env(**settings))  # fmt: skip
    try:
        pids = set()
        for _ in range(2):
            line = process.wait_for_json(
                lambda r: r.get("event") == "python_sdk" and r.get("pid") not in pids
            )
            pids.add(line.get("pid"))
        printed = python_env(settings)
        running = PythonPort(RunningProxy(process, ""), env_of(printed.stdout), settings, tmp_path)
        out = running.run("submit_status_result")
        assert out["result"]["images"] and out["statuses"][-1] == "Completed"
        assert_server_credentials_only(queue_records(fake_gateway))
    finally:
        process.stop()


@pytest.mark.parametrize("home", ["writable", "/proc/nonexistent"])
def test_several_workers_without_the_port_make_no_certificate(
    fake_gateway: FakeGateway, tmp_path: Path, home: str
) -> None:
    """No Python port, no CA: nothing written to HOME, and a HOME nobody can write (the image's
    /nonexistent, a read-only root) does not stop the start (found by a review)."""
    from tests.conftest import Process

    where = str(tmp_path) if home == "writable" else home
    env = child_env(FAL_KEY=FAL_KEY, FAL_PROXY_GATEWAY_URL=fake_gateway.gateway_url,
                    FAL_PROXY_WORKERS="2", FAL_PROXY_LOG_FORMAT="json", HOME=where)  # fmt: skip
    process = Process([sys.executable, "-m", "proxy", "--port", "0"], env)
    try:
        first = process.wait_for_json(lambda r: r.get("event") == "listening")
        process.wait_for_json(
            lambda r: r.get("event") == "listening" and r.get("pid") != first.get("pid")
        )
    finally:
        process.stop()
    assert not list(tmp_path.rglob("*.pem"))


def caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    """``error`` is, or was raised from, a ``kind``."""
    seen: BaseException | None = error
    while seen is not None and not isinstance(seen, kind):
        seen = seen.__cause__ or seen.__context__
    return seen is not None


def test_sigterm_drains_a_stream_on_the_tls_port(fake_gateway: FakeGateway, tmp_path: Path) -> None:
    """The TLS socket is the same server's: SIGTERM stops new TLS connections, lets the open
    stream finish, and the process exits 0."""
    running = start_python_port(
        fake_gateway, tmp_path / "state", tmp_path, FAL_PROXY_DRAIN_SECONDS="20",
        FAL_PROXY_ALLOWED_APPS="*",
    )  # fmt: skip
    try:
        with (
            tls_client(running) as client,
            client.stream("POST", "/emulator/sse?n=3&gated=1", json={}) as response,
        ):
            lines = response.iter_lines()
            assert next(lines) == 'data: {"n": 1}'
            running.proxy.process.proc.send_signal(signal.SIGTERM)
            running.proxy.process.wait_for_json(lambda r: r.get("event") == "Shutting down")
            # New TLS connections are refused: the listening socket is closed.
            with tls_client(running) as other, pytest.raises(httpx.ConnectError) as refused:
                other.get("/healthz", timeout=2)
            assert caused_by(refused.value, ConnectionRefusedError), repr(refused.value)
            fake_gateway.release("sse-2")
            fake_gateway.release("sse-3")
            rest = [line for line in lines if line]
        assert rest == ['data: {"n": 2}', "event: done", 'data: {"n": 3}']
        assert running.proxy.process.proc.wait(15) == 0
    finally:
        running.proxy.process.stop()


def test_a_tls_handshake_that_never_ends_is_cut_at_the_header_timeout(
    fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    import socket
    import time

    running = start_python_port(fake_gateway, tmp_path / "state", tmp_path,
                                FAL_PROXY_HEADER_TIMEOUT="1")  # fmt: skip
    number = int(running.settings["FAL_PROXY_PYTHON_SDK_PORT"])
    try:
        with socket.create_connection(("127.0.0.1", number), timeout=10) as raw:
            started = time.monotonic()
            raw.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and no more
            assert raw.recv(100) == b""  # closed by the proxy
            assert time.monotonic() - started < 5
    finally:
        running.proxy.process.stop()
