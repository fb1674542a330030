#!/usr/bin/env python3
"""``bench/run.py``'s streams-per-process rows: N SSE streams, then M WebSockets, open at once
through one proxy process, every event stamped by the fake upstream and read by the clients.

Three kinds of process, all from this file, on loopback only:

* **the fake upstream** (``--serve-upstream``): raw asyncio on uvloop, one port, standing in
  for the gateway. A GET answers an SSE stream (chunked ``text/event-stream``, one ``: open``
  comment at once, then nothing); a WebSocket upgrade is accepted (no subprotocol, no
  extension). ``GET /_start?events=K&interval=S`` then sends K events to every stream (or
  frames to every socket) open at that moment, at a steady rate: stream ``s`` of ``N`` gets
  its ``i``-th event at ``t0 + (i + s/N)·S``, so the upstream sends N/S events a second, spread
  evenly (a 1 ms tick), never in bursts. Each event carries ``time.monotonic_ns()`` taken
  right before its write (CLOCK_MONOTONIC is one clock for every process of the host). After
  the K-th: ``event: done`` and the stream's end, or a close 1000. ``GET /_stats``: open
  streams and sockets, events sent.
* **clients** (``--client``): raw asyncio protocols on uvloop (an HTTP/1.1 chunked SSE
  reader; a WebSocket client that answers pings and closes), each process holding its share
  of the connections. Each event's delay is ``monotonic_ns()`` when it is read minus its
  stamp.
* **this process**: raises RLIMIT_NOFILE (soft to hard) for itself and its children,
  starts a fresh proxy per row (``python -m proxy --port 0``, per-caller limits raised),
  runs each row twice, **direct** (clients → upstream) and **proxy** (clients → proxy →
  upstream), and reports streams opened/asked, events delivered/sent, the proxy's RSS per
  open stream ((RSS while all are open − RSS before) ÷ N, after a 100-stream warm-up), its
  fds, its CPU, and the delay: p50/p99 through the proxy minus the same percentile direct,
  the added delay.

Layout on 2 CPUs: the proxy alone on the first, the upstream and the clients on the others
(as bench/run.py pins its forwarders). The direct run shows what the clients and the
upstream cost on their own: its delay is the floor the proxy's is measured against.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench_common import (
    GATEWAY_PREFIX,
    ROOT,
    BenchError,
    Child,
    pin,
    proxy_row_env,
    start_child,
    step,
)
from procfs import cpu_seconds_fine, fd_count, rss_mib

SSE_PATH = "/fal-ai/x/requests/00000000-0000-4000-8000-000000000000/status/stream"
WS_PATH = "/fal-ai/x/realtime"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
EVENTS = 10  # per stream or socket
INTERVAL = 1.0  # s between two events of one stream
WARMUP = 100  # streams or sockets opened, fed and closed before "RSS before"
CONNECT_GATE = 64  # connections being opened at once, per client process
TARGET_SSE_KIB = 32.0
TARGET_WS_KIB = 64.0
TARGET_ADDED_P99_MS = 5.0


# -- the fake upstream ------------------------------------------------------------------


class Upstream:
    """What the upstream process holds: open streams and sockets, the events sent."""

    def __init__(self) -> None:
        self.sse: dict[int, asyncio.Transport] = {}
        self.ws: dict[int, asyncio.Transport] = {}
        self.sent = 0
        self.next_id = 0
        self.running = False
        self.task: asyncio.Future[None] | None = None

    async def feed(self, events: int, interval: float) -> None:
        """K events to every stream and socket open now, N/interval a second, evenly spread."""
        targets = [("sse", t) for t in self.sse.values()] + [("ws", t) for t in self.ws.values()]
        n = len(targets)
        self.running = True
        t0 = time.monotonic()
        done = 0
        total = n * events
        mono = time.monotonic_ns
        try:
            while done < total:
                due = min(total, int((time.monotonic() - t0) * n / interval) + 1)
                while done < due:
                    kind, transport = targets[done % n]
                    i = done // n
                    done += 1
                    if transport.is_closing():
                        continue
                    stamp = mono()
                    if kind == "sse":
                        payload = b"data: %d %d\n\n" % (stamp, i)
                        transport.write(b"%x\r\n%s\r\n" % (len(payload), payload))
                    else:
                        payload = b"%d %d" % (stamp, i)
                        transport.write(bytes((0x81, len(payload))) + payload)
                    self.sent += 1
                await asyncio.sleep(0.001)
            await asyncio.sleep(interval / 2)
            for kind, transport in targets:
                if transport.is_closing():
                    continue
                if kind == "sse":
                    end = b"event: done\ndata: end\n\n"
                    transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(end), end))
                    transport.close()
                else:  # close 1000; the TCP close once the peer answers (or after 10 s)
                    transport.write(b"\x88\x02\x03\xe8")
                    asyncio.get_running_loop().call_later(10, transport.close)
        finally:
            self.running = False


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, state: Upstream) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.kind = ""  # "" (reading the head), "sse", "ws"
        self.id = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.next_id += 1
        self.id = self.state.next_id

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.sse.pop(self.id, None)
        self.state.ws.pop(self.id, None)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        if self.kind == "ws":
            self._frames()
            return
        if self.kind or b"\r\n\r\n" not in self.buffer:
            return  # an SSE request's keep-alive bytes (none expected) or a partial head
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        target = lines[0].split(" ")[1]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        path, _, query = target.partition("?")
        if path.endswith("/_start"):
            args = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
            body = json.dumps({"streams": len(self.state.sse), "sockets": len(self.state.ws)})
            if not self.state.running:
                self.state.task = asyncio.ensure_future(
                    self.state.feed(int(args.get("events", EVENTS)),
                                    float(args.get("interval", INTERVAL)))
                )  # fmt: skip
            self._answer(body.encode())
        elif path.endswith("/_stats"):
            stats = {"streams": len(self.state.sse), "sockets": len(self.state.ws),
                     "sent": self.state.sent, "running": self.state.running}  # fmt: skip
            self._answer(json.dumps(stats).encode())
        elif headers.get("upgrade", "").lower() == "websocket":
            accept = base64.b64encode(
                hashlib.sha1(headers["sec-websocket-key"].encode() + WS_GUID).digest()
            )
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            self.kind = "ws"
            self.state.ws[self.id] = self.transport
            self._frames()
        else:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
                b"connection: close\r\n\r\n8\r\n: open\n\n\r\n"
            )
            self.kind = "sse"
            self.state.sse[self.id] = self.transport

    def _answer(self, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()

    def _frames(self) -> None:
        """Masked frames from the peer: pings answered, a close answered and the TCP closed."""
        assert self.transport is not None
        for opcode, payload in parse_frames(self.buffer, masked=True):
            if opcode == 0x9:
                self.transport.write(bytes((0x8A, len(payload))) + payload)
            elif opcode == 0x8:
                self.state.ws.pop(self.id, None)
                self.transport.close()
                return


def parse_frames(buffer: bytearray, masked: bool) -> list[tuple[int, bytes]]:
    """Whole frames at the start of ``buffer`` (removed from it): (opcode, payload)."""
    frames = []
    while len(buffer) >= 2:
        length = buffer[1] & 0x7F
        at = 2
        if length == 126:
            if len(buffer) < 4:
                break
            length, at = int.from_bytes(buffer[2:4], "big"), 4
        elif length == 127:
            if len(buffer) < 10:
                break
            length, at = int.from_bytes(buffer[2:10], "big"), 10
        mask = b""
        if buffer[1] & 0x80:
            mask, at = bytes(buffer[at : at + 4]), at + 4
        if len(buffer) < at + length:
            break
        payload = bytes(buffer[at : at + length])
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        frames.append((buffer[0] & 0x0F, payload))
        del buffer[: at + length]
    return frames


async def serve_upstream() -> None:
    state = Upstream()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: UpstreamProtocol(state), "127.0.0.1", 0,
                                      backlog=4096)  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"event": "listening", "role": "stream upstream", "port": port}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


# -- clients ----------------------------------------------------------------------------


class Tally:
    """One client process's connections: how they went, and every event's delay (µs)."""

    def __init__(self) -> None:
        self.delays: list[int] = []
        self.at: list[int] = []  # when each was read (monotonic ms), for the delay by second
        self.events = 0
        self.done = 0  # streams ended with "event: done" / sockets closed 1000
        self.ended = 0  # connections over, however
        self.failed: dict[str, int] = {}
        self.all_over = asyncio.Event()
        self.expected = 0

    def fail(self, why: str) -> None:
        self.failed[why] = self.failed.get(why, 0) + 1

    def over(self) -> None:
        self.ended += 1
        if self.ended >= self.expected:
            self.all_over.set()


class SseClient(asyncio.Protocol):
    """GET an SSE stream; decode the chunked body; stamp every ``data: <ns> <i>`` event."""

    def __init__(self, tally: Tally, request: bytes, opened: asyncio.Future[bool]) -> None:
        self.tally, self.request, self.opened = tally, request, opened
        self.buffer = bytearray()
        self.text = bytearray()
        self.head_done = False
        self.chunk_left = -1  # bytes of chunk data still due (+2 for its CRLF); -1: a size line
        self.finished = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_result(False)
            self.tally.fail("closed before the first byte")
        elif not self.finished:
            self.tally.fail("cut before event: done")
        self.tally.over()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        self.buffer += data
        if not self.head_done:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            ok = self.buffer.startswith(b"HTTP/1.1 200")
            if not ok:
                self.tally.fail(self.buffer[:12].decode("latin-1"))
                assert self.transport is not None
                self.transport.abort()
                return
            del self.buffer[: end + 4]
            self.head_done = True
            self.opened.set_result(True)
        buf = self.buffer
        while buf:
            if self.chunk_left < 0:
                line_end = buf.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(bytes(buf[:line_end]).split(b";")[0], 16)
                del buf[: line_end + 2]
                if size == 0:
                    self.finished = b"event: done" in self.text or self.finished
                    break
                self.chunk_left = size + 2
            take = min(self.chunk_left, len(buf))
            self.text += buf[:take]
            del buf[:take]
            self.chunk_left -= take
            if self.chunk_left == 0:
                del self.text[-2:]  # the chunk's CRLF
                self.chunk_left = -1
        while (cut := self.text.find(b"\n\n")) >= 0:
            event = bytes(self.text[:cut])
            del self.text[: cut + 2]
            if event.startswith(b"data: ") and event[6:7].isdigit():
                stamp = int(event[6:].split(b" ", 1)[0])
                self.tally.delays.append((now - stamp) // 1000)
                self.tally.at.append(now // 1_000_000)
                self.tally.events += 1
            elif event.startswith(b"event: done"):
                self.finished = True
                self.tally.done += 1


class WsClient(asyncio.Protocol):
    """A WebSocket client: the handshake, stamped text frames, pings answered, the close."""

    def __init__(self, tally: Tally, request: bytes, opened: asyncio.Future[bool]) -> None:
        self.tally, self.request, self.opened = tally, request, opened
        self.buffer = bytearray()
        self.head_done = False
        self.closed_1000 = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_result(False)
            self.tally.fail("closed before the handshake's answer")
        elif not self.closed_1000:
            self.tally.fail("cut before close 1000")
        self.tally.over()

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert self.transport is not None
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        self.buffer += data
        assert self.transport is not None
        if not self.head_done:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buffer.startswith(b"HTTP/1.1 101"):
                self.tally.fail(self.buffer[:12].decode("latin-1"))
                self.transport.abort()
                return
            del self.buffer[: end + 4]
            self.head_done = True
            self.opened.set_result(True)
        for opcode, payload in parse_frames(self.buffer, masked=False):
            if opcode == 0x1:
                self.tally.delays.append((now - int(payload.split(b" ", 1)[0])) // 1000)
                self.tally.at.append(now // 1_000_000)
                self.tally.events += 1
            elif opcode == 0x9:
                self._send(0xA, payload)
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if code == 1000:
                    self.closed_1000 = True
                    self.tally.done += 1
                else:
                    self.tally.fail(f"closed {code}")
                self._send(0x8, payload[:2])
                asyncio.get_running_loop().call_later(5, self.transport.close)


async def run_client(kind: str, port: int, path: str, count: int) -> None:
    """Open ``count`` connections, say how many opened (a JSON line), wait for ``go S`` on
    stdin, read every event until each ends or S seconds pass, print the tally."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    tally.expected = count
    if kind == "sse":
        request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                   "Accept: text/event-stream\r\n\r\n").encode()  # fmt: skip
    gate = asyncio.Semaphore(CONNECT_GATE)
    transports: list[asyncio.BaseTransport] = []

    async def one() -> bool:
        opened: asyncio.Future[bool] = loop.create_future()
        try:
            async with gate:
                if kind == "sse":
                    factory: Any = lambda: SseClient(tally, request, opened)  # noqa: E731
                else:
                    key = base64.b64encode(os.urandom(16)).decode()
                    ws_request = (
                        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                        "Sec-WebSocket-Version: 13\r\n\r\n"
                    ).encode()
                    factory = lambda: WsClient(tally, ws_request, opened)  # noqa: E731
                transport, _ = await loop.create_connection(factory, "127.0.0.1", port)
                transports.append(transport)
                async with asyncio.timeout(60):
                    return await opened
        except (OSError, TimeoutError) as exc:
            tally.fail(f"open: {type(exc).__name__}: {getattr(exc, 'strerror', '') or ''}")
            tally.over()
            return False

    results = await asyncio.gather(*(one() for _ in range(count)))
    print(json.dumps({"opened": sum(results), "failed": tally.failed}), flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    budget = float(line.split()[1]) if line.startswith("go") else 0.0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(budget):
            await tally.all_over.wait()
    for transport in transports:
        transport.abort()
    print(json.dumps({"events": tally.events, "done": tally.done, "failed": tally.failed,
                      "delays_us": tally.delays, "at_ms": tally.at}), flush=True)  # fmt: skip


# -- the rows ---------------------------------------------------------------------------


def raise_nofile(needed: int) -> dict[str, Any]:
    """Soft RLIMIT_NOFILE to the hard one (the children inherit it); whether it is enough."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return {"soft_before": soft, "soft": now, "hard": hard, "needed": needed,
            "enough": now >= needed}  # fmt: skip


def _get(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        result: dict[str, Any] = json.loads(answer.read())
        return result


def pct(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    ranked = sorted(values)
    return float(ranked[min(len(ranked) - 1, int(q / 100 * len(ranked)))])


def by_second(at: list[int], delays: list[int]) -> list[float]:
    """The p99 delay (ms) of the events read in each second of the feed."""
    if not at:
        return []
    first = min(at)
    seconds: dict[int, list[int]] = {}
    for when, delay in zip(at, delays, strict=True):
        seconds.setdefault((when - first) // 1000, []).append(delay)
    return [round(pct(seconds[s], 99) / 1e3, 2) for s in sorted(seconds)]


def one_pass(
    kind: str, port: int, path: str, n: int, upstream: Child, clients: int, events: int,
    interval: float, cpus: set[int], watch: int | None,
) -> dict[str, Any]:  # fmt: skip
    """N connections at ``port`` (direct or the proxy), fed ``events`` each; the figures."""
    per = [n // clients + (1 if i < n % clients else 0) for i in range(clients)]
    procs = []
    argv = [sys.executable, str(Path(__file__).resolve()), "--client", kind, "--port", str(port),
            "--path", path]  # fmt: skip
    try:
        started = time.monotonic()
        for count in per:
            if count:
                proc = subprocess.Popen([*argv, "--count", str(count)], cwd=ROOT,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        start_new_session=True)  # fmt: skip
                pin(proc.pid, cpus)
                procs.append(proc)
        opened, failed = 0, {}
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise BenchError(f"{kind} client exited ({proc.wait()}) before opening")
            report = json.loads(line)
            opened += report["opened"]
            for why, count in report["failed"].items():
                failed[why] = failed.get(why, 0) + count
        open_s = time.monotonic() - started
        stats = _get(upstream.port, "/_stats")
        at_upstream = stats["streams" if kind == "sse" else "sockets"]
        figures: dict[str, Any] = {"asked": n, "opened": opened, "open_failed": failed,
                                   "open_s": open_s, "at_upstream": at_upstream}  # fmt: skip
        if watch is not None:
            figures |= {"rss_open_mib": rss_mib(watch), "fds_open": fd_count(watch)}
            cpu0 = cpu_seconds_fine(watch)
        sent0 = stats["sent"]
        _get(upstream.port, f"/_start?events={events}&interval={interval}")
        feed_s = events * interval
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"go {feed_s + 30}\n")
            proc.stdin.flush()
        t0 = time.monotonic()
        peak = figures.get("rss_open_mib", 0.0)
        while time.monotonic() - t0 < feed_s:  # RSS while every stream is open and fed
            time.sleep(0.25)
            if watch is not None:
                peak = max(peak, rss_mib(watch))
        if watch is not None:
            figures["cpu_s"] = cpu_seconds_fine(watch) - cpu0
            figures["rss_fed_mib"] = peak
            figures["fds_fed"] = fd_count(watch)
        delays: list[int] = []
        at: list[int] = []
        got = done = 0
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise BenchError(f"{kind} client exited ({proc.wait()}) before its tally")
            report = json.loads(line)
            delays += report["delays_us"]
            at += report["at_ms"]
            got += report["events"]
            done += report["done"]
            for why, count in report["failed"].items():
                failed[why] = failed.get(why, 0) + count
        figures["feed_s"] = time.monotonic() - t0
        figures |= {
            "sent": _get(upstream.port, "/_stats")["sent"] - sent0,
            "delivered": got,
            "ended_cleanly": done,
            "failed": failed,
            "p50_ms": pct(delays, 50) / 1e3,
            "p99_ms": pct(delays, 99) / 1e3,
            "max_ms": (max(delays) / 1e3) if delays else float("nan"),
            "p99_by_second_ms": by_second(at, delays),
        }
        return figures
    finally:
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()


def wait_quiet(port: int, seconds: float = 20) -> None:
    """Until the upstream holds no stream or socket (the last pass's are gone)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stats = _get(port, "/_stats")
        if not stats["streams"] and not stats["sockets"] and not stats["running"]:
            return
        time.sleep(0.2)


def stream_rows(
    streams: int, sockets: int, stack: contextlib.ExitStack, *, events: int = EVENTS,
    interval: float = INTERVAL, clients: int = 2,
) -> dict[str, Any]:  # fmt: skip
    """The SSE and WebSocket rows: see the module doc."""
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpus = {cpus[0]}
    other_cpus = set(cpus[1:]) or proxy_cpus
    nofile = raise_nofile(2 * max(streams, sockets) + 200)
    if not nofile["enough"]:
        step(f"streams: RLIMIT_NOFILE hard limit {nofile['hard']} is below the "
             f"{nofile['needed']} descriptors the proxy needs: raise it (ulimit -Hn, the "
             "container's nofile); some connections will fail")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "CF_"))}
    env["PYTHONUNBUFFERED"] = "1"
    upstream = start_child("stream upstream", [sys.executable, str(Path(__file__).resolve()),
                                               "--serve-upstream"], env, stack)  # fmt: skip
    pin(upstream.pid, other_cpus)
    gateway_url = f"http://127.0.0.1:{upstream.port}{GATEWAY_PREFIX}"
    # One caller opens every stream: no cap on its streams in flight, nor on its submits.
    proxy_env = proxy_row_env(env, gateway_url) | {
        "FAL_PROXY_MAX_CONCURRENT": "0",
        "FAL_PROXY_SUBMITS_PER_HOUR": "0",
    }
    results: dict[str, Any] = {"nofile": nofile, "events_each": events, "interval_s": interval,
                               "clients": clients}  # fmt: skip
    for kind, n, path in (("sse", streams, SSE_PATH), ("ws", sockets, WS_PATH)):
        if n <= 0:
            continue
        label = "SSE streams" if kind == "sse" else "WebSockets"
        row: dict[str, Any] = {"count": n}
        step(f"streams: {n:,} {label} direct (clients → fake upstream), {events} events each, "
             f"one per {interval:g} s")  # fmt: skip
        wait_quiet(upstream.port)
        row["direct"] = one_pass(kind, upstream.port, GATEWAY_PREFIX + path, n, upstream,
                                 clients, events, interval, other_cpus, None)  # fmt: skip
        proxy_argv = json.loads(os.environ.get("STREAMS_PROXY_ARGV", "null")) or [
            sys.executable,
            "-m",
            "proxy",
            "--port",
            "0",
        ]  # (experiments: another command)
        proxy = start_child(f"proxy ({label})", proxy_argv, proxy_env, stack)
        pin(proxy.pid, proxy_cpus)
        wait_quiet(upstream.port)
        step(f"streams: {min(WARMUP, n)} {label} through the proxy (warm-up)")
        one_pass(kind, proxy.port, path, min(WARMUP, n), upstream, 1, 2, 0.2, other_cpus,
                 None)  # fmt: skip
        wait_quiet(upstream.port)
        time.sleep(1)
        row["rss_before_mib"] = rss_mib(proxy.pid)
        row["fds_before"] = fd_count(proxy.pid)
        step(f"streams: {n:,} {label} through the proxy, {events} events each")
        row["proxy"] = p = one_pass(kind, proxy.port, path, n, upstream, clients, events,
                                    interval, other_cpus, proxy.pid)  # fmt: skip
        wait_quiet(upstream.port)
        time.sleep(1)
        row["rss_after_mib"] = rss_mib(proxy.pid)
        row["fds_after"] = fd_count(proxy.pid)
        row["open_files_line"] = next(
            (line for line in proxy.output_tail().splitlines() if "open_files_limit" in line), ""
        )
        proxy.stop()
        if p["opened"]:
            row["kib_each"] = (p["rss_fed_mib"] - row["rss_before_mib"]) * 1024 / p["opened"]
            row["kib_each_open"] = (p["rss_open_mib"] - row["rss_before_mib"]) * 1024 / p["opened"]
        row["added_p50_ms"] = p["p50_ms"] - row["direct"]["p50_ms"]
        row["added_p99_ms"] = p["p99_ms"] - row["direct"]["p99_ms"]
        row["cpu_util"] = p["cpu_s"] / (events * interval)
        row["cpu_us_per_event"] = p["cpu_s"] * 1e6 / max(1, p["delivered"])
        results[kind] = row
    return results


def rows_markdown(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(what, measured, target, met) for each row."""
    out = []
    for kind, what, target_kib in (("sse", "SSE streams", TARGET_SSE_KIB),
                                   ("ws", "WebSockets", TARGET_WS_KIB)):  # fmt: skip
        if kind not in r:
            continue
        row = r[kind]
        p, d = row["proxy"], row["direct"]
        n = row["count"]
        all_in = p["opened"] == n and p["delivered"] == p["sent"] == n * r["events_each"]
        kib = row.get("kib_each", float("nan"))
        measured = (
            f"{p['opened']:,}/{n:,} open; {p['delivered']:,}/{p['sent']:,} events delivered; "
            f"{kib:.1f} KiB RSS each; {p['fds_open']:,} fds; added delay p50 "
            f"{row['added_p50_ms']:+.2f} ms, p99 {row['added_p99_ms']:+.2f} ms (proxy "
            f"{p['p50_ms']:.2f}/{p['p99_ms']:.2f}, direct {d['p50_ms']:.2f}/{d['p99_ms']:.2f}); "
            f"proxy CPU {100 * row['cpu_util']:.0f}%, {row['cpu_us_per_event']:.0f} µs/event"
        )
        target = (f"all open and delivered; ≤ {target_kib:.0f} KiB each; "
                  f"added p99 ≤ {TARGET_ADDED_P99_MS:.0f} ms")  # fmt: skip
        met = all_in and kib <= target_kib and row["added_p99_ms"] <= TARGET_ADDED_P99_MS
        out.append((f"{n:,} {what} through one proxy process", measured, target, met))
    return out


def print_report(r: dict[str, Any], notes: bool = True) -> None:
    print("\n### Streams per process\n\n| rows | measured | target | ok |\n|---|---|---|:---:|")
    for what, measured, target, met in rows_markdown(r):
        print(f"| {what} | {measured} | {target} | {'pass' if met else '**FAIL**'} |")
    if notes:
        print("\n" + stream_notes(r))


def stream_notes(r: dict[str, Any]) -> str:
    nf = r["nofile"]
    parts = [
        f"- Streams per process (bench/streams.py): a raw-asyncio fake upstream stamps each "
        f"event with CLOCK_MONOTONIC; {r['events_each']} events per stream or socket, one per "
        f"{r['interval_s']:g} s each, sent evenly spread once all are open; clients in "
        f"{r['clients']} processes (raw asyncio, uvloop) with the upstream on the CPU(s) the "
        f"proxy does not use; added delay = through the proxy − direct (same clients, same "
        f"upstream, same count). RLIMIT_NOFILE: soft {nf['soft_before']} → {nf['soft']}, hard "
        f"{nf['hard']}" + ("" if nf["enough"] else
                           f" — BELOW the {nf['needed']} descriptors the proxy needs") + "."
    ]  # fmt: skip
    for kind in ("sse", "ws"):
        if kind not in r:
            continue
        row = r[kind]
        p, d = row["proxy"], row["direct"]
        fails = {k: v for k, v in p["failed"].items()}
        parts.append(
            f"- {kind}: proxy RSS {row['rss_before_mib']:.1f} MiB before → "
            f"{p['rss_open_mib']:.1f} all open ({row.get('kib_each_open', float('nan')):.1f} "
            f"KiB each), {p['rss_fed_mib']:.1f} peak while fed → {row['rss_after_mib']:.1f} "
            f"after all closed; fds {row['fds_before']} → {p['fds_open']} → {row['fds_after']}; "
            f"opened in {p['open_s']:.1f} s (direct {d['open_s']:.1f} s); direct "
            f"{d['opened']:,} open, {d['delivered']:,}/{d['sent']:,} delivered; proxy "
            f"{p['ended_cleanly']:,} ended cleanly, max delay {p['max_ms']:.1f} ms (direct "
            f"{d['max_ms']:.1f}); proxy p99 by second of the feed "
            + "/".join(f"{x:.1f}" for x in p["p99_by_second_ms"])
            + " ms"
            + (f"; failures {fails}" if fails else "")
            + "."
        )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=8000, help="SSE streams (default 8000)")
    parser.add_argument("--sockets", type=int, default=4000, help="WebSockets (default 4000)")
    parser.add_argument("--events", type=int, default=EVENTS, help="events per stream")
    parser.add_argument("--interval", type=float, default=INTERVAL,
                        help="seconds between two events of one stream")  # fmt: skip
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=("sse", "ws"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream or args.client:
        import uvloop

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if args.serve_upstream:
            uvloop.run(serve_upstream())
        else:
            uvloop.run(run_client(args.client, args.port, args.path, args.count))
        return 0
    with contextlib.ExitStack() as stack:
        try:
            results = stream_rows(args.streams, args.sockets, stack, events=args.events,
                                  interval=args.interval, clients=args.clients)  # fmt: skip
        except BenchError as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            return 1
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
