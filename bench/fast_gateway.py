"""A fast fake AI Gateway for the benchmark: it must never be the bottleneck.

A raw asyncio ``BufferedProtocol`` HTTP/1.1 server (uvloop when available, ``httptools``
for parsing), keep-alive and pipelining, no framework. Routing is by the last path segment,
so the same paths work straight at the gateway (``/v1/acct/gw/fal/bytes``) and through the proxy
(``/fal-ai/bytes`` upstream becomes ``/v1/acct/gw/fal/fal-ai/bytes``):

* ``GET  …/bytes?size=N``  a streamed N-byte body (content-length set), written in 1 MiB
  slices of one shared zero buffer under transport flow control: memory stays flat.
* ``POST …/sink``          the request body (content-length or chunked) is counted and
  discarded; the answer is ``{"received": <bytes>}``.
* ``GET  …/_stats``        ``{"connections": N, "requests": M}`` since the start (TLS
  handshakes are the connections, with ``--tls-dir``).
* anything else            a fixed small JSON answer, like a fal.run result.

With ``--tls-dir DIR`` it speaks TLS: a test CA and a certificate for 127.0.0.1 and
localhost, made with ``trustme``; the CA goes to ``DIR/ca.pem`` (for the proxy's
``FAL_PROXY_TEST_GATEWAY_CA_FILE``).

Run as ``python bench/fast_gateway.py --port 0``; it prints one JSON line
``{"event": "listening", "port": N}`` on stdout and serves until SIGTERM/SIGINT.
It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
from collections import deque
from pathlib import Path

import httptools

CHUNK = memoryview(bytes(1 << 20))  # one shared 1 MiB zero buffer for every download
MAX_DOWNLOAD = 1 << 40
READ_BUFFER = memoryview(bytearray(1 << 20))  # shared by every connection, see below
STATS = {"connections": 0, "requests": 0}

SMALL_BODY = (
    b'{"images":[{"url":"https://v3.fal.media/files/x/cat.png","width":1024,"height":1024}],'
    b'"seed":42}'
)
# Headers shaped like a gateway answer: fal's request id and the gateway's log id.
_SMALL_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: application/json\r\n"
    b"content-length: %d\r\n"
    b"x-fal-request-id: 3f1c2a9e-5b7d-4e0a-9c61-8d2f4b7a1e05\r\n"
    b"cf-aig-log-id: 01JBENCHFAKEGATEWAYLOGID000\r\n"
    b"cf-aig-cache-status: MISS\r\n"
)
SMALL_RESPONSE = _SMALL_HEAD % len(SMALL_BODY) + b"\r\n" + SMALL_BODY
SMALL_RESPONSE_CLOSE = _SMALL_HEAD % len(SMALL_BODY) + b"connection: close\r\n\r\n" + SMALL_BODY


def _head(status: bytes, length: int, content_type: bytes, close: bool) -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(length).encode()
        + (b"\r\nconnection: close" if close else b"")
        + b"\r\n\r\n"
    )


def _json_response(status: bytes, obj: object, close: bool) -> bytes:
    body = json.dumps(obj).encode()
    return _head(status, len(body), b"application/json", close) + body


class GatewayProtocol(asyncio.BufferedProtocol):
    """One connection. Responses go out in request order; a download holds the queue.

    A BufferedProtocol: the loop reads straight into a 1 MiB buffer, with no bytes object
    per read, which doubles the sink's upload speed on loopback. All connections share
    that one buffer: the loop fills it and calls ``buffer_updated`` back to back, and the
    parser copies whatever it keeps, so nothing in it outlives the call.
    """

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body_bytes = 0
        # Queued responses: (bytes to write now, bytes to stream after, close after).
        self.queue: deque[tuple[bytes, int, bool]] = deque()
        self.stream_left = 0
        self.close_after_stream = False
        self.write_paused = False

    # -- asyncio.BufferedProtocol ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        STATS["connections"] += 1
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is not a subclass)
        transport.set_write_buffer_limits(high=4 << 20, low=1 << 20)

    def get_buffer(self, sizehint: int) -> memoryview:
        return READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.parser.feed_data(READ_BUFFER[:nbytes])
        except httptools.HttpParserError:
            self._enqueue(
                _json_response(b"400 Bad Request", {"error": "bad request"}, True), 0, True
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.queue.clear()
        self.stream_left = 0

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._pump()

    # -- httptools callbacks ----------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # curl sends "Expect: 100-continue" for big uploads; answer at once, never stall it.
        if name.lower() == b"expect" and value.lower() == b"100-continue" and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)  # counted and dropped

    def on_message_complete(self) -> None:
        close = not self.parser.should_keep_alive()
        url = httptools.parse_url(self.url)
        path = url.path.rstrip(b"/")
        last = path[path.rfind(b"/") + 1 :]
        method = self.parser.get_method()
        STATS["requests"] += 1
        if last == b"_stats":
            self._enqueue(_json_response(b"200 OK", STATS, close), 0, close)
        elif last == b"bytes" and method == b"GET":
            size = _size_param(url.query)
            if size is None:
                error = _json_response(b"400 Bad Request", {"error": "size=N needed"}, close)
                self._enqueue(error, 0, close)
            else:
                self._enqueue(
                    _head(b"200 OK", size, b"application/octet-stream", close), size, close
                )
        elif last == b"sink":
            self._enqueue(_json_response(b"200 OK", {"received": self.body_bytes}, close), 0, close)
        else:
            self._enqueue(SMALL_RESPONSE_CLOSE if close else SMALL_RESPONSE, 0, close)

    # -- writing ----------------------------------------------------------------------
    def _enqueue(self, head: bytes, stream: int, close: bool) -> None:
        self.queue.append((head, stream, close))
        if self.stream_left == 0:
            self._pump()

    def _pump(self) -> None:
        """Write queued responses until done or the transport's buffer is full."""
        transport = self.transport
        while transport is not None and not self.write_paused:
            if self.stream_left:
                n = min(self.stream_left, len(CHUNK))
                transport.write(CHUNK[:n])
                self.stream_left -= n
                if self.stream_left == 0 and self.close_after_stream:
                    transport.close()
                    return
                continue
            if not self.queue:
                return
            head, stream, close = self.queue.popleft()
            transport.write(head)
            if stream:
                self.stream_left, self.close_after_stream = stream, close
            elif close:
                transport.close()
                return


def _size_param(query: bytes | None) -> int | None:
    for part in (query or b"").split(b"&"):
        if part.startswith(b"size="):
            try:
                size = int(part[5:])
            except ValueError:
                return None
            return size if 0 <= size <= MAX_DOWNLOAD else None
    return None


async def serve(port: int, tls: ssl.SSLContext | None = None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(GatewayProtocol, "127.0.0.1", port, backlog=4096, ssl=tls)
    bound = server.sockets[0].getsockname()[1]
    print(json.dumps({"event": "listening", "port": bound}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1, 0 = any free port")
    parser.add_argument("--tls-dir", type=Path, help="speak TLS; write the test CA to DIR/ca.pem")
    args = parser.parse_args(argv)
    tls = None
    if args.tls_dir is not None:
        import trustme

        ca = trustme.CA()
        args.tls_dir.mkdir(parents=True, exist_ok=True)
        ca.cert_pem.write_to_path(str(args.tls_dir / "ca.pem"))
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(tls)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, tls))
    else:
        uvloop.run(serve(args.port, tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
