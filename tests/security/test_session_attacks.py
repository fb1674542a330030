"""Attacks on the surface added in one session: budgets, plan request policy, reloads, the
operator port's admin API and dashboard, tracing.

Each test is one attack and passes when the defence holds; each failed on the code before
its fix. Real processes on loopback: the proxy under uvicorn, the emulator as the gateway
and fal (it records every request it receives, and ``disconnected:<gate>:<id>`` when a
client leaves a waiting behaviour).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FakeGateway, RunningProxy, token_callers

TOKENS = {"cutter": "cutter-token-0123456789ab"}
DEADLINE = 10.0

pytestmark = pytest.mark.usefixtures("clear_of_window_edges")


def as_caller(name: str) -> dict[str, str]:
    return {"x-proxy-authorization": f"Bearer {TOKENS[name]}"}


def budget_env(tmp_path: Path, quotas: str) -> dict[str, str]:
    prices = tmp_path / "prices.toml"
    prices.write_text('[prices]\n"*" = 0.01\n', encoding="utf-8")
    return {
        **token_callers(tmp_path, TOKENS),
        "FAL_PROXY_QUOTAS": quotas,
        "FAL_PROXY_PRICES_FILE": str(prices),
    }


def usage(proxy: RunningProxy, name: str) -> dict[str, Any]:
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:
        answer = c.get("/api/fal/usage", headers=as_caller(name))
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def wait_until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)  # polling what another process records, not hiding a race


def test_a_caller_who_hangs_up_after_the_body_went_up_keeps_paying_its_estimate(
    start_proxy, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    """Send a whole call, wait until fal has it, hang up before the answer: fal may run (a
    queue submit is enqueued, a run goes on, a webhook gets the result), so the estimate
    must stay charged. It used to be given back: a caller with a $0.01 budget could start
    any number of generations by hanging up on each."""
    proxy = start_proxy(**budget_env(tmp_path, "*=$0.01/day"))
    port = int(proxy.url.rsplit(":", 1)[1])
    body = b'{"prompt": "a lighthouse"}'
    token = TOKENS["cutter"]
    head = (
        f"POST /emulator/hang HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"x-proxy-authorization: Bearer {token}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head + body)
        wait_until(
            lambda: any(r["path"].endswith("/emulator/hang") for r in fake_gateway.requests()),
            "the call reached fal",
        )
    # The proxy sees the client leave, cancels upstream, and writes the call's line.
    proxy.process.wait_for_json(
        lambda r: r.get("event") == "request" and r.get("error") == "client_gone"
    )
    assert usage(proxy, "cutter")["budgets"][0]["spent_usd"] == 0.01
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:
        again = c.post("/fal-ai/fast-sdxl", json={"prompt": "x"}, headers=as_caller("cutter"))
    assert again.status_code == 429, again.text
    assert again.json()["message"] == "budget exceeded"


# --- Redis down under FAL_PROXY_REDIS_FAILURE=open: a call admitted unchecked -------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_call_admitted_unchecked_never_gives_back_an_estimate_it_never_took(
    tmp_path: Path,
) -> None:
    """With Redis down under "open", a call is admitted without anything counted (the
    limiter's empty Lease). It used to be given a reservation anyway: its failure then gave
    back an estimate never taken, and its success settled cost − estimate, so every call
    made during an outage lowered the caller's spend once Redis took the owed deltas
    (in-process here, with the limiter answering as Redis down under "open" does)."""
    from aiohttp import web

    from proxy.forward.handler import Forwarder
    from proxy.limits.base import Lease
    from proxy.observe.metrics import Metrics
    from proxy.upstream.session import create_session
    from tests.unit.forward.test_handler import Client, scope, serving, settings

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.path.endswith("/bad"):
            return web.json_response({"detail": "invalid"}, status=422)
        return web.json_response({"ok": True}, headers={"x-fal-billable-units": "3"})

    prices = tmp_path / "prices.toml"
    prices.write_text('[prices]\n"*" = 0.01\n', encoding="utf-8")
    async with serving(handle) as gateway:
        config = settings(gateway, FAL_PROXY_QUOTAS="*=$1/day",
                          FAL_PROXY_PRICES_FILE=str(prices))  # fmt: skip
        from proxy.admission import Admission

        admission = Admission(config)
        limiter = admission.limiter
        await limiter.start()
        forward = Forwarder(config, admission, Metrics())
        forward.session = create_session(config)
        counted = limiter.admit
        down = False

        async def admit(caller: str, **kwargs: Any) -> Lease:
            return Lease() if down else await counted(caller, **kwargs)

        limiter.admit = admit  # type: ignore[method-assign]

        async def call(path: str) -> int | None:
            client = Client({"type": "http.request", "body": b"{}", "more_body": False})
            await forward(scope(path=path), client.receive, client.send)
            return client.status()

        async def spent() -> float:
            key = admission.limit_key(None, "127.0.0.1")
            report = (await admission.usage(key, None)).to_json()
            return float(report["budgets"][0]["spent_usd"])

        try:
            assert await call("/fal-ai/ok") == 200  # 3 units: $0.03 (estimate $0.01, settled)
            assert await spent() == pytest.approx(0.03)
            down = True
            assert await call("/fal-ai/ok") == 200  # unchecked; costs $0.03 all the same
            assert await call("/fal-ai/bad") == 422  # unchecked; cost nothing, took nothing
            assert await spent() == pytest.approx(0.06)
        finally:
            await forward.route.session.close() if forward.route.session else None
            await limiter.close()


# --- Reloaded files: a read is bounded -----------------------------------------------------


def test_a_reloaded_file_larger_than_the_bound_is_refused_unread(tmp_path: Path) -> None:
    """A watched file (tokens, JWKS, plans, prices, a key) is read whole on the event loop:
    a huge one (a log written to the wrong path, a runaway generator) used to be read
    and hashed whatever its size, stalling every call meanwhile. Past the bound it is
    refused, the last good version kept."""
    from proxy.app.config_reload import MAX_FILE_BYTES, WatchedFile

    installed: list[str] = []
    path = tmp_path / "tokens"
    text = "alice alice-token-0123456789\n"
    path.write_text(text + " " * (MAX_FILE_BYTES + 1 - len(text)), encoding="utf-8")
    watched = WatchedFile("TEST_FILE", str(path), lambda t: t.strip(), installed.append)
    assert watched.check(force=True) is False
    assert installed == []


def test_a_reloaded_path_that_is_no_regular_file_is_refused_unread(tmp_path: Path) -> None:
    """A symlink swapped to ``/dev/zero`` (or a FIFO) would never end a read: refused."""
    from proxy.app.config_reload import WatchedFile

    installed: list[str] = []
    link = tmp_path / "plans.toml"
    link.symlink_to("/dev/zero")
    watched = WatchedFile("TEST_FILE", str(link), lambda t: t, installed.append)
    assert watched.check(force=True) is False
    assert installed == []


def test_a_reloaded_path_that_is_a_fifo_is_refused_without_waiting(tmp_path: Path) -> None:
    import os

    from proxy.app.config_reload import WatchedFile

    fifo = tmp_path / "prices.toml"
    os.mkfifo(fifo)  # no writer ever: a blocking open would wait for one forever
    watched = WatchedFile("TEST_FILE", str(fifo), lambda t: t, lambda v: {})
    assert watched.check(force=True) is False
