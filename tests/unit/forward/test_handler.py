"""The forwarder driven as an ASGI callable, in process, with hand-written receive and send.

As Starlette's own tests do: for the paths awkward through a subprocess (a client gone at a
given moment, a body that never comes, a cancellation by the server, each refusal's shape).
The upstream is an in-process aiohttp server on loopback, or a closed port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from proxy.admission import Admission
from proxy.config.settings import Settings
from proxy.forward.handler import Forwarder
from proxy.observe.metrics import Metrics
from proxy.policy.python_port import PythonSdkListener
from proxy.upstream.session import create_session

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings(gateway: str, **env: str) -> Settings:
    return Settings.from_env({"FAL_KEY": "k-inprocess", "FAL_PROXY_GATEWAY_URL": gateway, **env})


def scope(
    method: str = "POST", path: str = "/fal-ai/fast-sdxl", headers: Any = ()
) -> dict[str, Any]:
    return {
        "type": "http", "http_version": "1.1", "method": method, "path": path,
        "raw_path": path.encode(), "query_string": b"", "client": ("127.0.0.1", 5000),
        "headers": [(b"host", b"127.0.0.1:8787"), *headers],
    }  # fmt: skip


class Client:
    """receive() hands out the scripted messages, then waits (as a live client does)."""

    def __init__(self, *messages: dict[str, Any]) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for message in messages:
            self.queue.put_nowait(message)
        self.sent: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        return await self.queue.get()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        self.changed.set()

    async def body_is(self, expected: bytes) -> None:
        """Wait (on the sends, not a timer) until the body sent so far is ``expected``."""
        while self.body() != expected:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 5)

    def status(self) -> int | None:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        return starts[0]["status"] if starts else None

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback aiohttp server standing in for the gateway; records the paths it got."""
    seen: list[str] = []
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        if request.path.endswith("/slow"):
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b"data: 1\n\n")
            await release.wait()
            return response
        return web.json_response({"ok": True, "len": len(await request.read())})

    async with serving(handle) as gateway:
        yield gateway, seen
        release.set()


@contextlib.asynccontextmanager
async def serving(handle: Any) -> AsyncIterator[str]:
    """An aiohttp server on loopback answering every path with ``handle``: its gateway URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        yield f"http://127.0.0.1:{port}/v1/a/g/fal"
    finally:
        await runner.cleanup()


async def forwarder(config: Settings, python: PythonSdkListener | None = None) -> Forwarder:
    admission = Admission(config)
    await admission.limiter.start()
    forward = Forwarder(config, admission, Metrics(), python=python)
    forward.session = create_session(config)
    return forward


async def test_a_small_post_is_forwarded_and_answered(upstream) -> None:
    gateway, seen = upstream
    forward = await forwarder(settings(gateway))
    client = Client({"type": "http.request", "body": b'{"prompt":"x"}', "more_body": False})
    await forward(scope(), client.receive, client.send)
    assert client.status() == 200 and json.loads(client.body()) == {"ok": True, "len": 14}
    assert seen == ["/v1/a/g/fal/fal-ai/fast-sdxl"]
    await forward.session.close()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "extra"),
    [
        ("TRACE", "/fal-ai/fast-sdxl", (), 405, b"allow"),
        ("POST", "/", (), 404, None),
        ("POST", "/api/fal/proxy", (), 400, None),
        ("POST", "/fal-ai/x", ((b"content-length", b"nope"),), 400, None),
        ("POST", "/fal-ai/x", ((b"origin", b"https://evil.example"),), 403, None),
    ],
)
async def test_refusals_are_json_with_their_headers_and_nothing_goes_up(
    upstream, method: str, path: str, headers: Any, status: int, extra: bytes | None
) -> None:
    gateway, seen = upstream
    forward = await forwarder(settings(gateway))
    client = Client({"type": "http.request", "body": b"", "more_body": False})
    await forward(scope(method, path, headers), client.receive, client.send)
    assert client.status() == status
    body = json.loads(client.body())
    assert body["message"] and "detail" in body
    names = {n for n, _ in client.sent[0]["headers"]}
    assert {b"content-type", b"content-length", b"x-proxy-request-id"} <= names
    assert extra is None or extra in names
    assert seen == []
    await forward.session.close()  # type: ignore[union-attr]


async def test_a_client_gone_before_its_body_sends_nothing_up(upstream) -> None:
    gateway, seen = upstream
    forward = await forwarder(settings(gateway))
    client = Client({"type": "http.disconnect"})
    await forward(scope(headers=((b"content-length", b"10"),)), client.receive, client.send)
    assert client.sent == [] and seen == []
    await forward.session.close()  # type: ignore[union-attr]


async def test_a_body_that_never_comes_is_a_408(upstream) -> None:
    gateway, seen = upstream
    forward = await forwarder(settings(gateway, FAL_PROXY_IDLE_TIMEOUT="0.2"))
    client = Client()  # declares a body, sends nothing
    await forward(scope(headers=((b"content-length", b"10"),)), client.receive, client.send)
    assert client.status() == 408 and seen == []
    await forward.session.close()  # type: ignore[union-attr]


async def test_a_stalled_streamed_upload_is_a_408_and_cut_upstream() -> None:
    # The upstream reads the body to its end: a cut connection ends the read with an error,
    # a body the proxy finished (or an upload left open) never does.
    read: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.read()
        except BaseException as exc:  # the connection cut mid-body (or the handler cancelled)
            if not read.done():
                read.set_result(exc)
            raise
        if not read.done():
            read.set_result(body)
        return web.json_response({"ok": True})

    async with serving(handle) as gateway:
        forward = await forwarder(settings(gateway, FAL_PROXY_IDLE_TIMEOUT="0.3"))
        # A first chunk, then nothing.
        client = Client({"type": "http.request", "body": b"part", "more_body": True})
        await forward(scope(), client.receive, client.send)
        assert client.status() == 408
        # Cut by the proxy itself, before its session (and every pooled connection) is closed.
        outcome = await asyncio.wait_for(read, 5)
        await forward.session.close()  # type: ignore[union-attr]
    assert isinstance(outcome, BaseException), f"the upstream took {outcome!r} as a whole body"


async def test_an_unreachable_gateway_is_a_502() -> None:
    with socket.socket() as held:  # bound, never listening: connections are refused
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        forward = await forwarder(settings(f"http://127.0.0.1:{port}/v1/a/g/fal"))
        client = Client({"type": "http.request", "body": b"{}", "more_body": False})
        await forward(scope(), client.receive, client.send)
    assert client.status() == 502
    assert json.loads(client.body())["message"] == "the gateway could not be reached"
    await forward.session.close()  # type: ignore[union-attr]


async def test_the_client_leaving_mid_stream_ends_the_exchange(upstream) -> None:
    gateway, _seen = upstream
    forward = await forwarder(settings(gateway))
    client = Client({"type": "http.request", "body": b"{}", "more_body": False})
    task = asyncio.ensure_future(forward(scope(path="/fal-ai/x/slow"), client.receive, client.send))
    await client.body_is(b"data: 1\n\n")  # the first event is through
    client.queue.put_nowait({"type": "http.disconnect"})
    await asyncio.wait_for(task, 5)  # returns, no exception: logged as 499
    await forward.session.close()  # type: ignore[union-attr]


async def test_a_server_cancel_mid_stream_ends_quietly(upstream) -> None:
    gateway, _seen = upstream
    forward = await forwarder(settings(gateway))
    client = Client({"type": "http.request", "body": b"{}", "more_body": False})
    task = asyncio.ensure_future(forward(scope(path="/fal-ai/x/slow"), client.receive, client.send))
    await client.body_is(b"data: 1\n\n")
    task.cancel()  # what uvicorn does when the drain deadline passes
    await asyncio.wait_for(task, 5)  # swallowed: logged as error=shutdown, no traceback
    assert not task.cancelled()
    await forward.session.close()  # type: ignore[union-attr]


async def test_a_credential_sent_twice_is_refused_when_callers_are_checked(
    upstream, tmp_path
) -> None:
    """Which of two credentials counts would be a guess (and a hop in front may have checked
    the other one): with caller auth on, refused before anything else is read of them."""
    gateway, seen = upstream
    tokens = tmp_path / "tokens"
    tokens.write_text("alice alice-token-0123456789\n")
    forward = await forwarder(
        settings(gateway, FAL_PROXY_AUTH="token", FAL_PROXY_CLIENT_TOKENS_FILE=str(tokens))
    )
    twice = ((b"x-proxy-authorization", b"Bearer wrong-token-0123456789"),
             (b"x-proxy-authorization", b"Bearer alice-token-0123456789"))  # fmt: skip
    client = Client({"type": "http.request", "body": b"{}", "more_body": False})
    await forward(scope(headers=twice), client.receive, client.send)
    assert client.status() == 400 and "more than once" in json.loads(client.body())["message"]
    once = Client({"type": "http.request", "body": b"{}", "more_body": False})
    await forward(scope(headers=twice[1:]), once.receive, once.send)
    assert once.status() == 200 and seen == ["/v1/a/g/fal/fal-ai/fast-sdxl"]
    await forward.session.close()  # type: ignore[union-attr]


async def test_a_calls_limit_key_is_worked_out_once(upstream, monkeypatch) -> None:
    # The request policy, the metadata and the slot each need it; for an IPv6 client it is
    # the address's /64, parsed: once per call, not three times.
    gateway, seen = upstream
    forward = await forwarder(settings(gateway))
    asked: list[str] = []
    real = forward.admission.limit_key

    def counted(caller: str | None, client: str) -> str:
        asked.append(client)
        return real(caller, client)

    monkeypatch.setattr(forward.admission, "limit_key", counted)
    client = Client({"type": "http.request", "body": b'{"prompt":"x"}', "more_body": False})
    v6 = dict(scope(), client=("2001:db8::7", 5000))
    await forward(v6, client.receive, client.send)
    assert client.status() == 200 and seen == ["/v1/a/g/fal/fal-ai/fast-sdxl"]
    assert asked == ["2001:db8::7"]
    await forward.session.close()  # type: ignore[union-attr]
