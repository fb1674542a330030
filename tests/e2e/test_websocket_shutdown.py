"""A proxy shutting down closes its bridged sockets with 1001 (going away), not 1012 or a cut."""

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
