#!/usr/bin/env python3
"""The bare WebSocket relay: what relaying frames costs with nothing else, the proxy's yardstick.

A ``websockets`` asyncio server (the version the proxy uses) on uvloop (as the proxy runs)
that, for each client socket, opens one upstream socket with the ``websockets`` asyncio
client to ``--upstream`` + the client's path and query, then pumps frames both ways (one
task each way, ``async for`` then ``send``) until either side closes, passing the close
code on. Nothing else: no auth, no admission, no counting, no logging, no idle timer, no
pings, no compression, the same ``max_size`` as the proxy's default (16 MiB).

Prints ``{"event": "listening", "port": N}`` once it listens (``bench_common.start_child``
reads it). Usage: ``python bench/bare_ws_relay.py --upstream ws://127.0.0.1:PORT/prefix``.
Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from typing import Any

MAX_SIZE = 16 * 1024 * 1024  # the proxy's default FAL_PROXY_WS_MAX_BYTES


async def relay(upstream_base: str, client: Any) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async with connect(upstream_base + client.request.path, max_size=MAX_SIZE, compression=None,
                       ping_interval=None, proxy=None) as upstream:  # fmt: skip

        async def pump(source: Any, sink: Any) -> None:
            with contextlib.suppress(ConnectionClosed):
                async for message in source:
                    await sink.send(message)
            with contextlib.suppress(ConnectionClosed):
                await sink.close(source.close_code or 1000, source.close_reason or "")

        up = asyncio.ensure_future(pump(client, upstream))
        down = asyncio.ensure_future(pump(upstream, client))
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        await asyncio.wait([up, down], timeout=1)
        up.cancel()
        down.cancel()


def main() -> None:
    import uvloop
    from websockets.asyncio.server import serve

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="ws://127.0.0.1:PORT[/prefix]")
    args = parser.parse_args()
    base = args.upstream.rstrip("/")

    async def run() -> None:
        async with serve(lambda ws: relay(base, ws), "127.0.0.1", 0, max_size=MAX_SIZE,
                         compression=None, ping_interval=None) as server:  # fmt: skip
            port = server.sockets[0].getsockname()[1]
            print(json.dumps({"event": "listening", "role": "bare", "port": port}), flush=True)
            await asyncio.Future()

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # nothing to clean up: just go
    uvloop.run(run())


if __name__ == "__main__":
    main()
