"""The WebSocket bridge (``proxy/bridge_ws.py``), end to end.

A real ``websockets`` client talks to the real proxy (``python -m proxy`` under uvicorn),
which bridges to the product's emulator (``proxy/emulator/realtime.py``) in its own
process. ``emulator/echo/realtime`` echoes ``{"input": ...}``; ``emulator/ws/realtime``
is the emulator's scripted socket (close with a code, drop the TCP connection, flood
frames; see its docstring). Waits are polls with a deadline, never a fixed sleep; the
one timed window is the slow-reader test's "read nothing for a second".
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import FAL_KEY, PREFIX, FakeGateway, RunningProxy

MiB = 1024 * 1024
DEADLINE = 10.0
TOKEN = "tok-web-0123456789abcdef"
ECHO = "emulator/echo/realtime"
SCRIPTED = "emulator/ws/realtime"

# --- helpers ----------------------------------------------------------------------------------


def ws_url(proxy: RunningProxy, path: str = ECHO, query: str = "") -> str:
    return proxy.url.replace("http://", "ws://", 1) + f"/{path}" + (f"?{query}" if query else "")


def open_ws(url: str, **kwargs: Any) -> Any:
    kwargs.setdefault("max_size", 32 * MiB)
    return connect(url, proxy=None, open_timeout=DEADLINE, close_timeout=5, **kwargs)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


async def recv(ws: ClientConnection) -> Any:
    return await asyncio.wait_for(ws.recv(), DEADLINE)


async def refused_status(url: str, **kwargs: Any) -> int:
    """The HTTP status the proxy refused the upgrade with (fails if it accepted)."""
    try:
        async with open_ws(url, **kwargs):
            pass
    except InvalidStatus as exc:
        return exc.response.status_code
    pytest.fail("the upgrade was accepted")


async def closed(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Wait for the proxy to close the socket; return the (code, reason) it sent."""
    with pytest.raises(ConnectionClosed):
        while True:
            await recv(ws)
    return (ws.close_code, ws.close_reason)


def poll(check: Any, what: str, timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def upstream_record(gw: FakeGateway) -> dict[str, Any]:
    records = gw.requests("websocket")
    assert len(records) == 1, records
    return records[0]


def websocket_lines(proxy: RunningProxy) -> list[dict[str, Any]]:
    return [r for r in proxy.logs() if r.get("event") == "websocket"]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def assert_no_key(*things: Any) -> None:
    for thing in things:
        text = thing.decode("latin-1") if isinstance(thing, bytes) else str(thing)
        assert FAL_KEY not in text


# --- frames -----------------------------------------------------------------------------------


def test_msgpack_and_json_echo_keep_their_frame_types(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    async def go() -> list[Any]:
        seen: list[Any] = []
        async with open_ws(ws_url(proxy)) as ws:
            seen += [ws.response.headers.raw_items(), ws.response.body]
            await ws.send(msgpack.packb({"prompt": "cat", "n": 1}))
            binary = await recv(ws)
            await ws.send(json.dumps({"prompt": "dog"}))
            text = await recv(ws)
            seen += [binary, text]
            assert isinstance(binary, bytes) and msgpack.unpackb(binary) == {
                "input": {"prompt": "cat", "n": 1}
            }
            assert isinstance(text, str) and json.loads(text) == {"input": {"prompt": "dog"}}
        seen.append((ws.close_code, ws.close_reason))
        return seen

    seen = run(go())
    assert_no_key(*seen)  # nothing the client saw carries the key
    record = upstream_record(fake_gateway)
    assert record["path"] == f"{PREFIX}/{ECHO}"
    assert record["header_map"]["authorization"] == f"Key {FAL_KEY}"


def test_a_4_mib_frame_round_trips(proxy: RunningProxy) -> None:
    payload = bytes(range(256)) * (4 * MiB // 256)

    async def go() -> None:
        async with open_ws(ws_url(proxy)) as ws:
            await ws.send(msgpack.packb({"blob": payload}))
            reply = msgpack.unpackb(await recv(ws))
            assert reply == {"input": {"blob": payload}}
        async with open_ws(ws_url(proxy, SCRIPTED)) as ws:
            await ws.send(payload)
            assert await recv(ws) == payload

    run(go())


def test_200_concurrent_sockets_each_echo(start_proxy: Any) -> None:
    proxy = start_proxy(FAL_PROXY_MAX_CONCURRENT="400", FAL_PROXY_RATE_LIMIT_RPM="0")

    async def one(i: int) -> Any:
        async with open_ws(ws_url(proxy)) as ws:
            await ws.send(msgpack.packb({"i": i}))
            return msgpack.unpackb(await recv(ws))

    async def go() -> list[Any]:
        return await asyncio.gather(*(one(i) for i in range(200)))

    assert run(go()) == [{"input": {"i": i}} for i in range(200)]


# --- closes -----------------------------------------------------------------------------------


def test_client_close_code_and_reason_reach_the_upstream(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    async def go() -> None:
        async with open_ws(ws_url(proxy)) as ws:
            await ws.send(json.dumps({"x": 1}))
            await recv(ws)
            await ws.close(4001, "bye")

    run(go())
    poll(lambda: "ws-closed:4001:bye" in fake_gateway.events(), "the emulator to see 4001 bye")


def test_upstream_close_code_and_reason_reach_the_client(proxy: RunningProxy) -> None:
    async def go() -> tuple[Any, Any]:
        async with open_ws(ws_url(proxy, SCRIPTED)) as ws:
            await ws.send(json.dumps({"close": 4003, "reason": "nope"}))
            return await closed(ws)

    assert run(go()) == (4003, "nope")


def test_upstream_crash_closes_the_client_with_1011(proxy: RunningProxy) -> None:
    async def go() -> tuple[Any, Any]:
        async with open_ws(ws_url(proxy, SCRIPTED)) as ws:
            await ws.send("not a command")
            assert await recv(ws) == "not a command"
            await ws.send(json.dumps({"drop": True}))
            return await closed(ws)

    code, reason = run(go())
    assert code == 1011
    assert_no_key(reason)


def test_upstream_refusing_the_handshake_is_relayed_as_its_status(
    start_proxy: Any, fake_gateway: FakeGateway
) -> None:
    proxy = start_proxy(FAL_KEY="fal-wrong-key:0000")
    status = run(refused_status(ws_url(proxy)))
    assert status == 403  # the emulator closes before accepting: uvicorn answers 403
    assert upstream_record(fake_gateway)["header_map"]["authorization"] == "Key fal-wrong-key:0000"
    line = poll(lambda: websocket_lines(proxy), "the websocket log line")[0]
    assert line["error"] == "upstream_refused"


# --- slow reader ------------------------------------------------------------------------------


def test_a_slow_reader_keeps_the_proxy_memory_bounded(start_proxy: Any) -> None:
    proxy = start_proxy()
    pid = proxy.process.proc.pid
    count = 200

    async def go() -> tuple[int, int]:
        async with open_ws(ws_url(proxy, SCRIPTED), max_size=2 * MiB) as ws:
            # Warm up: a 1 MiB frame each way, so first-use allocations are not counted.
            await ws.send(b"w" * MiB)
            assert await recv(ws) == b"w" * MiB
            base = peak = rss_bytes(pid)
            await ws.send(json.dumps({"flood": count, "size": MiB}))
            window = time.monotonic() + 1.0
            while time.monotonic() < window:  # read nothing for a second, watching the RSS
                peak = max(peak, rss_bytes(pid))
                await asyncio.sleep(0.02)
            for i in range(count):
                frame = await recv(ws)
                assert frame == bytes([i % 256]) * MiB, i
                if i % 20 == 0:
                    peak = max(peak, rss_bytes(pid))
            assert json.loads(await recv(ws)) == {"flooded": count}
            return base, peak

    base, peak = run(go())
    assert peak - base < 64 * MiB, f"the proxy grew by {(peak - base) / MiB:.1f} MiB"


# --- credentials ------------------------------------------------------------------------------


def test_credential_subprotocols_are_stripped(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    async def go() -> Any:
        async with open_ws(ws_url(proxy), subprotocols=["fal-api-key.CLIENTKEY", "v1"]) as ws:
            await ws.send(json.dumps(1))
            assert json.loads(await recv(ws)) == {"input": 1}
            return ws.subprotocol

    assert run(go()) == "v1"
    headers = upstream_record(fake_gateway)["header_map"]
    assert headers["sec-websocket-protocol"] == "v1"
    assert headers["authorization"] == f"Key {FAL_KEY}"
    assert "CLIENTKEY" not in json.dumps(upstream_record(fake_gateway)["headers"])


def test_a_client_fal_jwt_token_is_not_forwarded(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    async def go() -> None:
        async with open_ws(ws_url(proxy, query="fal_jwt_token=client-jwt&keep=1")) as ws:
            await ws.send(json.dumps(2))
            assert json.loads(await recv(ws)) == {"input": 2}

    run(go())
    record = upstream_record(fake_gateway)
    assert "fal_jwt_token" not in record["query"] and "client-jwt" not in record["query"]
    assert record["query"] == "keep=1"
    assert record["header_map"]["authorization"] == f"Key {FAL_KEY}"


# --- access rules -----------------------------------------------------------------------------


def test_an_origin_not_allowed_is_refused_before_anything_goes_upstream(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    status = run(refused_status(ws_url(proxy), origin="https://evil.example"))
    assert status == 403
    assert fake_gateway.requests("websocket") == []


def test_an_app_not_allowed_is_refused(start_proxy: Any, fake_gateway: FakeGateway) -> None:
    proxy = start_proxy(FAL_PROXY_ALLOWED_APPS="fal-ai/flux/dev")
    assert run(refused_status(ws_url(proxy))) == 403
    assert fake_gateway.requests("websocket") == []


def test_token_callers_on_upgrades(
    start_proxy: Any, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"web-app {TOKEN}\n")
    proxy = start_proxy(FAL_PROXY_AUTH="token", FAL_PROXY_CLIENT_TOKENS_FILE=str(tokens))

    async def echo(**kwargs: Any) -> Any:
        async with open_ws(ws_url(proxy), **kwargs) as ws:
            await ws.send(json.dumps("hi"))
            assert json.loads(await recv(ws)) == {"input": "hi"}
            return ws.subprotocol

    assert run(refused_status(ws_url(proxy))) == 401
    assert (
        run(
            refused_status(
                ws_url(proxy), subprotocols=["proxy-authorization.tok-nope-0123456789abcdef"]
            )
        )
        == 401
    )
    assert fake_gateway.requests("websocket") == []

    run(echo(additional_headers={"x-proxy-authorization": f"Bearer {TOKEN}"}))
    assert "x-proxy-authorization" not in upstream_record(fake_gateway)["header_map"]
    fake_gateway.clear()

    assert run(echo(subprotocols=[f"proxy-authorization.{TOKEN}", "v1"])) == "v1"
    record = upstream_record(fake_gateway)
    assert record["header_map"]["sec-websocket-protocol"] == "v1"
    assert TOKEN not in json.dumps([record["headers"], record["query"]])
    lines = poll(
        lambda: len(websocket_lines(proxy)) >= 4 and websocket_lines(proxy), "four websocket lines"
    )
    assert [line.get("caller") for line in lines[2:4]] == ["web-app", "web-app"]
    assert all(TOKEN not in json.dumps(line) for line in proxy.logs())


def test_concurrency_limit_refuses_a_second_socket(
    start_proxy: Any, fake_gateway: FakeGateway
) -> None:
    proxy = start_proxy(FAL_PROXY_MAX_CONCURRENT="1")

    async def go() -> None:
        async with open_ws(ws_url(proxy)) as ws:
            await ws.send(json.dumps(1))
            await recv(ws)
            assert await refused_status(ws_url(proxy)) == 429

        # the slot is released when the session ends
        async def free() -> None:
            async with open_ws(ws_url(proxy)) as again:
                await again.send(json.dumps(2))
                assert json.loads(await recv(again)) == {"input": 2}

        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                await free()
                return
            except InvalidStatus as exc:
                if exc.response.status_code != 429 or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)

    run(go())


# --- size limit -------------------------------------------------------------------------------


def test_ws_max_bytes_applies_to_client_frames(start_proxy: Any, fake_gateway: FakeGateway) -> None:
    proxy = start_proxy(FAL_PROXY_WS_MAX_BYTES=str(64 * 1024))

    async def go() -> tuple[Any, Any]:
        async with open_ws(ws_url(proxy, SCRIPTED)) as ws:
            await ws.send(b"x" * (64 * 1024))  # at the limit: fine
            assert await recv(ws) == b"x" * (64 * 1024)
            await ws.send(b"x" * (64 * 1024 + 1))
            return await closed(ws)

    assert run(go())[0] == 1009
    poll(
        lambda: any(e.startswith("ws-closed:") for e in fake_gateway.events()),
        "the upstream to be closed",
    )


def test_ws_max_bytes_applies_to_upstream_frames(
    start_proxy: Any, fake_gateway: FakeGateway
) -> None:
    proxy = start_proxy(FAL_PROXY_WS_MAX_BYTES=str(64 * 1024))

    async def go() -> tuple[Any, Any]:
        async with open_ws(ws_url(proxy, SCRIPTED)) as ws:
            await ws.send(json.dumps({"flood": 1, "size": 64 * 1024}))  # at the limit: fine
            assert await recv(ws) == bytes([0]) * (64 * 1024)
            assert json.loads(await recv(ws)) == {"flooded": 1}
            await ws.send(json.dumps({"flood": 1, "size": 64 * 1024 + 1}))
            return await closed(ws)

    code, _ = run(go())
    # The proxy refused the upstream's message: the upstream is told 1009, and so is the client.
    poll(
        lambda: any(e.startswith("ws-closed:1009:") for e in fake_gateway.events()), "1009 upstream"
    )
    assert code == 1009


# --- logs -------------------------------------------------------------------------------------


def test_one_canonical_log_line_per_session(start_proxy: Any) -> None:
    proxy = start_proxy()

    async def go() -> None:
        async with open_ws(ws_url(proxy, SCRIPTED)) as ws:
            await ws.send(b"abc")
            await recv(ws)
            await ws.send("hello")
            await recv(ws)
            await ws.close(4001, "bye")
        async with open_ws(ws_url(proxy, SCRIPTED)) as ws:
            await ws.send(json.dumps({"close": 4003, "reason": "nope"}))
            await closed(ws)

    run(go())
    lines = poll(
        lambda: len(websocket_lines(proxy)) >= 2 and websocket_lines(proxy), "two websocket lines"
    )
    first, second = lines
    assert first["target_path"] == f"/{SCRIPTED}"
    assert (first["frames_in"], first["frames_out"], first["bytes_in"], first["bytes_out"]) == (
        2,
        2,
        8,
        8,
    )
    assert (first["client_close"], first["upstream_close"]) == (4001, 4001)
    assert "error" not in first
    assert (second["frames_in"], second["frames_out"]) == (1, 0)
    assert second["upstream_close"] == 4003 and second["client_close"] in (
        None,
        4003,
    )  # 4003: the echo
    assert len(websocket_lines(proxy)) == 2


def test_a_closed_session_ends_promptly(start_proxy: Any) -> None:
    proxy = start_proxy(FAL_PROXY_MAX_CONCURRENT="1")

    async def session(close_first: bool) -> None:
        async with open_ws(ws_url(proxy, SCRIPTED)) as ws:
            if close_first:
                await ws.close(1000)
            else:
                await ws.send(json.dumps({"close": 4003, "reason": "nope"}))
                await closed(ws)

    for n, close_first in enumerate((True, False), 1):
        run(session(close_first))  # the second is admitted: the first gave its slot back
        lines = poll(
            lambda n=n: len(websocket_lines(proxy)) >= n and websocket_lines(proxy), "the end"
        )
        # The session ends with its close, waiting on no timer: a bridge that waited for its
        # idle timer (300 s by default) ended 5 s late, when its wait for the upstream's close
        # gave up. Timed by the proxy itself (its line's duration, from the handshake), so the
        # log pipe's pace is no part of it; a session here takes tens of milliseconds, and
        # 4 s leaves a machine ten times slower room while the 5 s wait still fails.
        assert lines[n - 1]["duration_ms"] < 4000, lines[n - 1]


def test_the_key_never_reaches_the_proxy_logs(proxy: RunningProxy) -> None:
    # A session of its own on the shared proxy, so the test holds alone and in any order:
    # echoes, then the upstream drops the connection (1011, the error path). Seven frames
    # in: no other session of this module sends that many, so its line is told apart.
    frames = 7

    async def go() -> tuple[Any, Any]:
        async with open_ws(ws_url(proxy, SCRIPTED)) as ws:
            for i in range(frames - 1):
                await ws.send(f"frame {i}")
                assert await recv(ws) == f"frame {i}"
            await ws.send(json.dumps({"drop": True}))
            return await closed(ws)

    assert run(go())[0] == 1011
    poll(
        lambda: [
            line
            for line in websocket_lines(proxy)
            if line["target_path"] == f"/{SCRIPTED}" and line["frames_in"] == frames
        ],
        "this session's websocket line",
    )
    # The whole log: this session's line and every line logged before it (run in file
    # order, every session above on the shared proxy).
    assert all(FAL_KEY not in json.dumps(line) for line in proxy.logs())
