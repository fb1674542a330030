"""Shared fixtures: real processes on real loopback sockets.

``fake_gateway`` runs the product's own offline emulator (``python -m proxy emulator``,
see ``proxy/emulator``) in its own process as the fake Cloudflare gateway + fal; it
records every request it receives. ``start_proxy`` runs the real ``python -m proxy``
command against it. Both bind port 0 and report
the port they got on a JSON line, so there is no free-port race.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.redis_support import RedisServer, stop_process

ROOT = Path(__file__).resolve().parent.parent
# Sentinels: if either string shows up in a response or a log line, a secret leaked.
FAL_KEY = "fal-SENTINEL-key-4b1d:secret-9e2c"
CF_TOKEN = "cf-SENTINEL-token-77aa"
PREFIX = "/v1/acct/gw/fal"  # any /v1/<account>/<gateway>/fal works on the emulator
START_TIMEOUT = 20.0


class Process:
    """A child process whose stdout lines are collected by a reader thread."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_json(self, predicate: Any, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Block until a JSON stdout line satisfies ``predicate``; return it."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(record, dict) and predicate(record):
                        return record
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and seen == len(self.lines)):
                    raise AssertionError(
                        "process did not log the expected line:\n" + "\n".join(self.lines)
                    )
                self._cond.wait(min(remaining, 0.5))

    def json_lines(self) -> list[dict[str, Any]]:
        out = []
        with self._cond:
            lines = list(self.lines)
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"unparsed": line})
        return out

    def stop(self) -> None:
        stop_process(self.proc)
        # Every line the process wrote is in ``lines`` once the reader has seen the end (a
        # grandchild still holding the pipe would keep it open: not waited for long).
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def child_env(**extra: str) -> dict[str, str]:
    """A clean environment: nothing from the developer's shell that could change behaviour."""
    env = {
        k: v
        for k, v in os.environ.items()
        # COVERAGE_*: coverage measures the child too (make test runs under coverage)
        if k in ("PATH", "HOME", "LANG", "SYSTEMROOT", "TMPDIR") or k.startswith("COVERAGE_")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class FakeGateway:
    process: Process
    port: int
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", trust_env=False)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    def requests(self, kind: str = "gateway") -> list[dict[str, Any]]:
        """What the emulated gateway received (``kind="upload"``: signed-URL uploads)."""
        records = [r for r in self.client.get("/_emulator/requests").json() if r["kind"] == kind]
        for record in records:
            record["body"] = base64.b64decode(record["body_b64"])
            record["header_map"] = {}
            for name, value in record["headers"]:
                record["header_map"].setdefault(name, value)
        return records

    def only_request(self) -> dict[str, Any]:
        records = self.requests()
        assert len(records) == 1, records
        return records[0]

    def events(self) -> list[str]:
        return self.client.get("/_emulator/events").json()

    def clear(self) -> None:
        self.client.delete("/_emulator/requests")

    def release(self, gate: str) -> None:
        self.client.post(f"/_emulator/gates/{gate}")

    def stop(self) -> None:
        self.client.close()
        self.process.stop()


# Emulated durations (queue wait, generation) shrunk 20x: a 3 s job takes 0.15 s.
TIME_SCALE = "0.05"


def start_fake_gateway(*extra_args: str) -> FakeGateway:
    process = Process(
        [
            sys.executable,
            "-m",
            "proxy",
            "emulator",
            "--port",
            "0",
            "--key",
            FAL_KEY,
            "--time-scale",
            TIME_SCALE,
            *extra_args,
        ],
        child_env(FAL_PROXY_LOG_FORMAT="json"),
    )
    line = process.wait_for_json(lambda r: r.get("event") == "listening")
    return FakeGateway(process, line["port"])


@pytest.fixture(scope="module")
def fake_gateway() -> Iterator[FakeGateway]:
    gateway = start_fake_gateway()
    yield gateway
    gateway.stop()


@pytest.fixture(autouse=True)
def _clear_fake(request: pytest.FixtureRequest) -> None:
    if "fake_gateway" in request.fixturenames:
        request.getfixturevalue("fake_gateway").clear()


@dataclass
class RunningProxy:
    process: Process
    url: str

    def logs(self) -> list[dict[str, Any]]:
        return self.process.json_lines()

    def request_logs(self) -> list[dict[str, Any]]:
        return [r for r in self.logs() if r.get("event") == "request"]

    def wait_for_request_log(self, request_id: str) -> dict[str, Any]:
        return self.process.wait_for_json(
            lambda r: r.get("event") == "request" and r.get("request_id") == request_id, timeout=10
        )

    def lines_of(self, responses: Iterable[httpx.Response]) -> list[dict[str, Any]]:
        """Each response's canonical line, waited for: the proxy writes it around its answer,
        but the test reads the log pipe on another thread, so it may not be in yet."""
        return [self.wait_for_request_log(r.headers["x-proxy-request-id"]) for r in responses]


def launch_proxy(gateway_url: str, **env: str) -> RunningProxy:
    base = {
        "FAL_KEY": FAL_KEY,
        "FAL_PROXY_GATEWAY_URL": gateway_url,
        "FAL_PROXY_LOG_FORMAT": "json",
    }
    base.update(env)
    process = Process([sys.executable, "-m", "proxy", "--port", "0"], child_env(**base))
    line = process.wait_for_json(lambda r: r.get("event") == "listening")
    return RunningProxy(process, f"http://127.0.0.1:{line['port']}")


def token_callers(directory: Path, tokens: dict[str, str]) -> dict[str, str]:
    """The settings of ``FAL_PROXY_AUTH=token`` for ``tokens`` (caller → token), written to
    a tokens file in ``directory``."""
    path = directory / "tokens"
    path.write_text("".join(f"{c} {t}\n" for c, t in tokens.items()), encoding="utf-8")
    return {"FAL_PROXY_AUTH": "token", "FAL_PROXY_CLIENT_TOKENS_FILE": str(path)}


@pytest.fixture
def start_proxy(fake_gateway: FakeGateway) -> Iterator[Any]:
    """Factory: start a proxy with extra environment settings; stopped after the test."""
    started: list[RunningProxy] = []

    def start(**env: str) -> RunningProxy:
        proxy = launch_proxy(fake_gateway.gateway_url, **env)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.process.stop()


@pytest.fixture(scope="module")
def proxy(fake_gateway: FakeGateway) -> Iterator[RunningProxy]:
    """One proxy for a whole module, with the default settings."""
    running = launch_proxy(fake_gateway.gateway_url)
    yield running
    running.process.stop()


@pytest.fixture
def client(proxy: RunningProxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:
        yield c


# --- Redis (the shared rate-limit store) --------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(0, tmp_path_factory.mktemp("redis") / "redis.log").start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server this test may stop and restart."""
    server = RedisServer(0, tmp_path / "redis.log").start()
    yield server
    server.stop()


@pytest.fixture
def clear_of_window_edges() -> None:
    """Start at least a few seconds before the next minute (and so hour, day, month).

    Rate windows are sliding window counters aligned to the minute and the hour, and
    quotas are calendar periods (proxy/windows.py): a burst that straddles an edge is
    weighed differently from one inside a window (a limit of 1 may admit a second call
    just after the edge). Tests that count to a limit start clear of an edge, so what
    they count is one window's answer; this waits at most ``WINDOW_MARGIN`` seconds.
    """
    into_minute = time.time() % 60
    if into_minute > 60 - WINDOW_MARGIN:
        time.sleep(60 - into_minute + 0.05)


WINDOW_MARGIN = 8.0
