"""Bare forwarders for the upstream-client comparison (``bench/run.py --clients``).

A pure-ASGI app that forwards every request to ``BENCH_GATEWAY_URL`` + its path with
either ``httpx.AsyncClient`` or ``aiohttp.ClientSession`` (``BENCH_CLIENT=httpx|aiohttp``),
streaming both bodies. Nothing else: no logging, no target resolution, no header policy
beyond dropping ``host`` and the hop-by-hop headers, no timeouts of its own. What it
costs is uvicorn plus the client, which is the part of the proxy's cost that the choice
of client decides. It runs under uvicorn as the proxy does (uvloop, httptools, no
logging, the proxy's GC tuning) and prints ``{"event": "listening", "port": N}``.

Run as ``BENCH_GATEWAY_URL=http://127.0.0.1:P/v1/acct/gw/fal BENCH_CLIENT=httpx
python bench/baselines.py [--port 0]``; it listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import uvicorn
from yarl import URL

GATEWAY = os.environ.get("BENCH_GATEWAY_URL", "").rstrip("/")
CLIENT = os.environ.get("BENCH_CLIENT", "aiohttp")
DROP = frozenset(
    b"host connection keep-alive proxy-connection proxy-authenticate proxy-authorization "
    b"te trailer transfer-encoding upgrade".split()
)


async def request_body(receive: Any) -> bytes | AsyncIterator[bytes]:
    """The whole body if it came in one message (a small POST), else a stream of it."""
    first = await receive()
    if not first.get("more_body"):
        return first.get("body", b"")

    async def stream() -> AsyncIterator[bytes]:
        message = first
        while True:
            yield message.get("body", b"")
            if not message.get("more_body"):
                return
            message = await receive()

    return stream()


def start(status: int, headers: Any) -> dict[str, Any]:
    kept = [(k, v) for k, v in headers if k.lower() not in DROP]
    return {"type": "http.response.start", "status": status, "headers": kept}


async def via_httpx(
    client: httpx.AsyncClient, method: str, url: str, headers: list, body: Any, send: Any
) -> None:
    request = client.build_request(method, url, headers=headers, content=body)
    response = await client.send(request, stream=True)
    try:
        await send(start(response.status_code, response.headers.raw))
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await response.aclose()


async def via_aiohttp(
    session: aiohttp.ClientSession, method: str, url: str, headers: list, body: Any, send: Any
) -> None:
    str_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
    async with session.request(
        method, URL(url, encoded=True), headers=str_headers, data=body, allow_redirects=False
    ) as response:
        await send(start(response.status, response.raw_headers))
        async for chunk in response.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


async def via_pyreqwest(
    client: Any, method: str, url: str, headers: list, body: Any, send: Any
) -> None:
    builder = client.request(method, url).headers(
        [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
    )
    builder = builder.body_bytes(body) if isinstance(body, bytes) else builder.body_stream(body)
    async with builder.build_streamed() as response:
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
        await send(start(response.status, raw))
        reader = response.body_reader
        while (chunk := await reader.read_chunk()) is not None:
            await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def make_client() -> Any:
    if CLIENT == "pyreqwest":  # hyper under a Rust runtime; as the others: no decompression,
        from datetime import timedelta  # no redirects, no cookies, no environment proxies

        from pyreqwest.client import ClientBuilder

        builder = (
            ClientBuilder().gzip(False).brotli(False).zstd(False).deflate(False)
            .follow_redirects(False).default_cookie_store(False).no_proxy()
            .pool_idle_timeout(timedelta(seconds=60)).http1_only()
        )  # fmt: skip
        return builder.build()
    if CLIENT == "httpx":
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=200)
        return httpx.AsyncClient(trust_env=False, limits=limits, timeout=None)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False, trust_env=False,
    )  # fmt: skip


client: Any = None  # set by the lifespan

# The proxy's own collector thresholds (proxy.serve.server.GC_THRESHOLDS), so that the
# comparison is of the forwarding work, not of two collector settings; BENCH_GC="a,b,c"
# overrides them (to see what the setting costs).
GC_THRESHOLDS = tuple(int(n) for n in os.environ.get("BENCH_GC", "5000,4,400").split(","))


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global client
    if scope["type"] == "lifespan":
        await receive()  # lifespan.startup
        client = make_client()
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await (client.aclose() if CLIENT == "httpx" else client.close())
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = [(k, v) for k, v in scope["headers"] if k not in DROP]
    url = GATEWAY + (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    if scope["query_string"]:
        url += "?" + scope["query_string"].decode("latin-1")
    body = await request_body(receive)
    forward = {"httpx": via_httpx, "pyreqwest": via_pyreqwest}.get(CLIENT, via_aiohttp)
    await forward(client, scope["method"], url, headers, body, send)


class Server(uvicorn.Server):
    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        gc.collect()  # as proxy.serve.server.tune_gc
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        port = self.servers[0].sockets[0].getsockname()[1]
        print(json.dumps({"event": "listening", "port": port, "client": CLIENT}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    port = parser.parse_args().port
    if not GATEWAY or CLIENT not in ("httpx", "aiohttp", "pyreqwest"):
        parser.error("set BENCH_GATEWAY_URL, and BENCH_CLIENT to httpx, aiohttp or pyreqwest")
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", lifespan="on",
        log_config=None, access_log=False, server_header=False, date_header=False,
        proxy_headers=False,
    )  # fmt: skip
    Server(config).run()


if __name__ == "__main__":
    main()
