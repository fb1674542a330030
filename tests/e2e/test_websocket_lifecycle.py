"""Bridged sockets over time: idle ones closed with 1001, and 1001 when the proxy shuts down."""

from __future__ import annotations

import asyncio
import json
import signal

from websockets.asyncio.client import connect

from tests.conftest import FakeGateway


def test_shutdown_closes_bridged_sockets_with_1001(start_proxy, fake_gateway: FakeGateway) -> None:
    proxy = start_proxy()
    url = proxy.url.replace("http://", "ws://") + "/emulator/echo/realtime"

    async def session() -> tuple[int | None, str]:
        async with connect(url, proxy=None, open_timeout=10) as ws:
            await ws.send(json.dumps({"a": 1}))
            assert json.loads(await ws.recv()) == {"input": {"a": 1}}
            proxy.process.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except Exception:
                pass
            return ws.close_code, ws.close_reason or ""

    code, reason = asyncio.run(session())
    assert (code, reason) == (1001, "proxy shutting down")
    assert proxy.process.proc.wait(10) == 0


IDLE = 2.0  # long enough for the echo below on a machine ten times slower than usual


def test_idle_sessions_are_closed_with_1001(start_proxy, fake_gateway: FakeGateway) -> None:
    proxy = start_proxy(FAL_PROXY_IDLE_TIMEOUT=str(IDLE))
    url = proxy.url.replace("http://", "ws://") + "/emulator/echo/realtime"

    async def session() -> tuple[int | None, str]:
        async with connect(url, proxy=None, open_timeout=30) as ws:
            await ws.send(json.dumps({"a": 1}))
            assert json.loads(await ws.recv()) == {"input": {"a": 1}}  # activity; then none
            try:
                # The close comes IDLE seconds after the echo: 30 s leaves a slow machine
                # room, and is far below the default idle timeout (300 s) that would apply
                # were the setting not honoured.
                await asyncio.wait_for(ws.recv(), 30)
            except Exception:
                pass
            return ws.close_code, ws.close_reason or ""

    assert asyncio.run(session()) == (1001, "idle timeout")
    line = proxy.process.wait_for_json(lambda r: r.get("event") == "websocket", timeout=10)
    assert line["error"] == "idle_timeout"
    # Closed by the idle timer, not before it: the session lasted at least the idle period
    # (the proxy's own measure, so a slow machine only makes it longer).
    assert line["duration_ms"] >= IDLE * 1000, line
