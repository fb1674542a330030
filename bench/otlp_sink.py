"""An OTLP/HTTP sink for the benchmark's "tracing on" rows: accepts every export and drops it.

``POST <any path>`` (the proxy's exporter posts to ``/v1/traces``): the body is read and
counted, the answer is an empty ``ExportTraceServiceResponse`` (200, zero bytes of protobuf:
every field at its default). ``GET /_stats``: ``{"exports": N, "bytes": M}`` since the start,
so the run can say the spans really went out.

Run as ``python bench/otlp_sink.py --port 0``; it prints one JSON line
``{"event": "listening", "port": N}`` on stdout and serves on 127.0.0.1 until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from aiohttp import web

stats = {"exports": 0, "bytes": 0}


async def export(request: web.Request) -> web.Response:
    body = await request.read()
    stats["exports"] += 1
    stats["bytes"] += len(body)
    return web.Response(body=b"", content_type="application/x-protobuf")


async def stats_page(_request: web.Request) -> web.Response:
    return web.json_response(stats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port))
    return 0


async def serve(port: int) -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/_stats", stats_page)
    app.router.add_post("/{path:.*}", export)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(json.dumps({"event": "listening", "port": bound}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
