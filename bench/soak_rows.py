"""The load rows of ``bench/soak.py`` (HTTP, SSE, WebSocket) and what every row shares: the
sizes, the row record, the context (emulator, proxies) and small helpers. Each row drives
one kind of load through a proxy and returns what was expected next to what was measured.
The fault rows are in ``soak_faults.py``. Only 127.0.0.1 is contacted."""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack
from soak_support import (
    HOST,
    Child,
    Response,
    cpu_seconds,
    fd_count,
    http_request,
    ms,
    pct,
    peak_rss_mib,
    read_to_eof,
    read_until,
    request_head,
    reset_peak_rss,
    rss_mib,
    wait_fds,
)
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

FD_SLACK = 4  # fds a proxy may hold above its baseline once a row is over
FD_WAIT = 20.0  # s: idle upstream keep-alive connections close when the emulator drops them (5 s)
RSS_LIMIT_MIB = {"load": 200.0, "sse": 300.0, "ws": 250.0}  # peak RSS a row may reach
FIRST_BYTE_TIMEOUT = 1.0  # the fault proxy's FAL_PROXY_FIRST_BYTE_TIMEOUT
IDLE_TIMEOUT = 1.0  # the fault proxy's FAL_PROXY_IDLE_TIMEOUT
HEADER_TIMEOUT = 2.0  # the fault proxy's FAL_PROXY_HEADER_TIMEOUT
DRAIN_SECONDS = 10.0  # the SIGTERM proxy's FAL_PROXY_DRAIN_SECONDS
LATE = 2.0  # s of slack allowed after a timeout on a busy 2-core machine
FIRST_EVENT = b'data: {"n": 1}'


@dataclass(frozen=True)
class Sizes:
    load_requests: int
    load_conns: int
    sse_streams: int
    ws_sessions: int
    ws_messages: int
    faults: int  # connections per fault row
    refused: int
    slow_headers: int
    drain_streams: int
    sse_cut: int | None = None  # SSE streams their clients close (None: half of them)


FULL = Sizes(10_000, 256, 1000, 300, 4, 50, 200, 100, 20)
QUICK = Sizes(2_000, 64, 200, 50, 4, 20, 50, 20, 10)


@dataclass
class Row:
    key: str
    title: str
    expected: str = ""
    measured: str = ""
    ok: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    after: str = ""  # the health checks run after the row
    seconds: float = 0.0


@dataclass
class Ctx:
    sizes: Sizes
    secret: str
    emulator: Child
    proxies: dict[str, Child]
    start_proxy: Any  # async (name, **env) -> Child
    header_timeout_known: bool
    fd_baseline: dict[str, int] = field(default_factory=dict)  # each proxy's fds once started, idle
    spare: list[Any] = field(default_factory=list)

    async def emu(self, method: str, path: str) -> Response:
        return await http_request(self.emulator.port, method, path, timeout=10)

    async def clear(self) -> None:
        """Forget the emulator's records, events and gates (every row starts clean)."""
        await self.emu("DELETE", "/_emulator/requests")

    async def release(self, gate: str) -> None:
        await self.emu("POST", f"/_emulator/gates/{gate}")

    async def events(self, prefix: str) -> int:
        found = (await self.emu("GET", "/_emulator/events")).json() or []
        return sum(1 for e in found if e.startswith(prefix))

    async def wait_events(self, prefix: str, count: int, timeout: float) -> tuple[int, float]:  # noqa: ASYNC109 - a poll budget: returns the partial count
        started = time.monotonic()
        while (seen := await self.events(prefix)) < count and time.monotonic() - started < timeout:  # noqa: ASYNC110 - polls the emulator over HTTP
            await asyncio.sleep(0.1)
        return seen, time.monotonic() - started


def delta(child: Child, before: Any, status: Any, error: Any = None) -> int:
    return child.snapshot().statuses[(status, error)] - before.statuses[(status, error)]


def key_in(responses: list[Response], secret: str) -> int:
    return sum(1 for r in responses if secret.encode() in r.body or secret in str(r.headers))


async def fd_state(ctx: Ctx, name: str) -> tuple[int, float, bool]:
    """Wait for proxy ``name``'s fds to come back to its idle baseline (+ slack)."""
    pid, base = ctx.proxies[name].pid, ctx.fd_baseline[name]
    fds, waited = await wait_fds(pid, base + FD_SLACK, FD_WAIT)
    return fds, waited, fds <= base + FD_SLACK


# -- 1. HTTP load -----------------------------------------------------------------------


async def row_load(ctx: Ctx) -> Row:
    s, proxy = ctx.sizes, ctx.proxies["load"]
    n, conns, pid = s.load_requests, s.load_conns, proxy.pid
    row = Row("load", f"HTTP load: {n} small POSTs (emulator/echo), {conns} connections")
    payload = {"prompt": "a cat", "soak": 1}
    body = json.dumps(payload).encode()
    url = f"http://{HOST}:{proxy.port}/emulator/echo"
    fds0, rss0 = fd_count(pid), rss_mib(pid)
    reset_peak_rss(pid)
    cpu0 = cpu_seconds(pid)
    latencies: list[float] = []
    bad: collections.Counter[str] = collections.Counter()
    ok = issued = 0
    connector = aiohttp.TCPConnector(limit=conns, limit_per_host=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:

        async def worker() -> None:
            nonlocal ok, issued
            while issued < n:
                issued += 1
                started = time.perf_counter()
                try:
                    async with session.post(
                        url, data=body, headers={"content-type": "application/json"}
                    ) as r:
                        data, status = await r.read(), r.status
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    bad[type(exc).__name__] += 1
                    continue
                latencies.append(time.perf_counter() - started)
                if status == 200 and json.loads(data) == {"input": payload}:
                    ok += 1
                else:
                    bad[f"status {status}"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conns)))
        wall = time.perf_counter() - started
        fds_loaded = fd_count(pid)
    cpu_us = (cpu_seconds(pid) - cpu0) * 1e6 / max(1, n)
    peak = peak_rss_mib(pid)
    fds1, waited, fds_ok = await fd_state(ctx, "load")
    limit = RSS_LIMIT_MIB["load"]
    row.expected = (
        f"{n}/{n} answered 200 with the echo, 0 errors; peak RSS < {limit:.0f} MiB; "
        f"fds back to ≤ {ctx.fd_baseline['load'] + FD_SLACK} "
        f"(idle {ctx.fd_baseline['load']} + {FD_SLACK})"
    )
    row.measured = (
        f"{ok}/{n} ok, {sum(bad.values())} errors{' ' + dict(bad).__repr__() if bad else ''}; "
        f"{n / wall:.0f} req/s; p50 {ms(pct(latencies, 50))} ms, p99 {ms(pct(latencies, 99))} ms; "
        f"proxy CPU {cpu_us:.0f} µs/req; RSS {rss0:.0f} → peak {peak:.0f} MiB; "
        f"fds {fds0} → {fds_loaded} loaded → {fds1} after {waited:.1f} s"
    )
    row.ok = ok == n and not bad and peak < limit and fds_ok
    row.details = {
        "requests": n,
        "connections": conns,
        "ok": ok,
        "errors": dict(bad),
        "wall_s": wall,
        "req_per_s": n / wall,
        "p50_ms": pct(latencies, 50) * 1e3,
        "p99_ms": pct(latencies, 99) * 1e3,
        "proxy_cpu_us_per_req": cpu_us,
        "rss_before_mib": rss0,
        "peak_rss_mib": peak,
        "fds_before": fds0,
        "fds_loaded": fds_loaded,
        "fds_after": fds1,
        "fds_settle_s": waited,
    }
    return row


# -- 2. SSE streams ---------------------------------------------------------------------


@dataclass
class Stream:
    kind: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    buffer: bytearray


async def open_stream(
    port: int, path: str, kind: str, gate: asyncio.Semaphore, failures: collections.Counter[str]
) -> Stream | None:
    """POST ``path`` and read up to the first SSE event; None (counted) on failure."""
    writer = None
    try:
        async with asyncio.timeout(60):
            async with gate:  # connect at most N at once; the streams then stay open together
                reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(request_head("POST", path, port, body=b"{}"))
            buffer = bytearray()
            if not await read_until(reader, buffer, FIRST_EVENT):
                failures["closed before the first event"] += 1
            elif not buffer.startswith(b"HTTP/1.1 200"):
                failures[buffer[:12].decode("latin-1")] += 1
            else:
                return Stream(kind, reader, writer, buffer)
    except (OSError, TimeoutError) as exc:
        failures[type(exc).__name__] += 1
    if writer is not None:
        writer.transport.abort()
    return None


def stream_complete(buffer: bytearray) -> bool:
    return (
        b"event: done" in buffer
        and b'data: {"n": 3}' in buffer
        and buffer.endswith(b"\r\n0\r\n\r\n")
    )


async def finish_stream(stream: Stream, timeout: float = 30) -> bool:  # noqa: ASYNC109 - per-stream budget, then abort
    try:
        async with asyncio.timeout(timeout):
            await read_to_eof(stream.reader, stream.buffer)
    except TimeoutError:
        pass
    stream.writer.transport.abort()
    return stream_complete(stream.buffer)


async def metric(port: int, name: str) -> float | None:
    text = (await http_request(port, "GET", "/metrics", timeout=10)).body.decode("latin-1")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def row_sse(ctx: Ctx) -> Row:
    proxy, n = ctx.proxies["load"], ctx.sizes.sse_streams
    pid, port = proxy.pid, proxy.port
    n_cut = n // 2 if ctx.sizes.sse_cut is None else ctx.sizes.sse_cut
    n_done = n - n_cut
    row = Row(
        "sse",
        f"SSE: {n} streams open at once "
        f"({n_done} finished by the upstream, {n_cut} closed by clients)",
    )
    fds0, rss0 = fd_count(pid), rss_mib(pid)
    reset_peak_rss(pid)
    before = proxy.snapshot()
    failures: collections.Counter[str] = collections.Counter()
    gate = asyncio.Semaphore(64)
    started = time.perf_counter()
    opened = await asyncio.gather(*(
        open_stream(port, "/emulator/sse?n=3" if i < n_done else "/emulator/stall",
                    "sse" if i < n_done else "stall", gate, failures)
        for i in range(n)))  # fmt: skip
    streams = [st for st in opened if st is not None]
    open_s = time.perf_counter() - started
    in_flight = await metric(port, "fal_proxy_in_flight_requests")
    rss_open, fds_open = rss_mib(pid), fd_count(pid)
    # Clients close half of the streams; the emulator finishes the other half.
    cut = [st for st in streams if st.kind == "stall"]
    for st in cut:
        st.writer.transport.abort()
    await ctx.release("sse-2")
    await ctx.release("sse-3")
    finished = await asyncio.gather(*(finish_stream(st) for st in streams if st.kind == "sse"))
    complete = sum(finished)
    gone, gone_s = await ctx.wait_events("disconnected:stall:", n_cut, 15)
    await proxy.settle()
    logged_done, logged_gone = delta(proxy, before, 200), delta(proxy, before, 499, "client_gone")
    peak = peak_rss_mib(pid)
    fds1, waited, fds_ok = await fd_state(ctx, "load")
    limit = RSS_LIMIT_MIB["sse"]
    row.expected = (
        f"all {n} open at once; {n_done} complete (last chunk, event done); {n_cut} cut: upstream "
        f"sees {n_cut} disconnects, proxy logs 499; peak RSS < {limit:.0f} MiB; fds back to ≤ "
        f"{ctx.fd_baseline['load'] + FD_SLACK}"
    )
    row.measured = (
        f"{len(streams)}/{n} open in {open_s:.1f} s{' ' + repr(dict(failures)) if failures else ''}"
        f" (proxy in-flight gauge {in_flight:.0f}); {complete}/{n_done} complete; upstream saw "
        f"{gone}/{n_cut} disconnects ({gone_s:.1f} s); "
        f"logged 200×{logged_done}, 499×{logged_gone}; "
        f"RSS {rss0:.0f} → {rss_open:.0f} all open, peak {peak:.0f} MiB; fds {fds0} → {fds_open} "
        f"all open → {fds1} after {waited:.1f} s"
    )
    row.ok = (
        len(streams) == n
        and complete == n_done
        and gone == n_cut
        and logged_gone == n_cut
        and logged_done == n_done
        and peak < limit
        and fds_ok
    )
    row.details = {
        "streams": n,
        "opened": len(streams),
        "open_failures": dict(failures),
        "open_s": open_s,
        "in_flight_gauge": in_flight,
        "complete": complete,
        "upstream_disconnects": gone,
        "logged_200": logged_done,
        "logged_499": logged_gone,
        "rss_before_mib": rss0,
        "rss_all_open_mib": rss_open,
        "peak_rss_mib": peak,
        "fds_before": fds0,
        "fds_all_open": fds_open,
        "fds_after": fds1,
        "fds_settle_s": waited,
    }
    return row


# -- 3. WebSockets ----------------------------------------------------------------------


async def row_ws(ctx: Ctx) -> Row:
    proxy, n, k = ctx.proxies["load"], ctx.sizes.ws_sessions, ctx.sizes.ws_messages
    pid = proxy.pid
    row = Row("ws", f"WebSocket: {n} bridged sessions at once, {k} messages each")
    url = f"ws://{HOST}:{proxy.port}/emulator/echo/realtime"
    fds0, rss0 = fd_count(pid), rss_mib(pid)
    reset_peak_rss(pid)
    before = proxy.snapshot()
    gate = asyncio.Semaphore(64)
    attempts, opened = [0], [0]
    all_tried, go = asyncio.Event(), asyncio.Event()
    rtts: list[float] = []
    outcome: collections.Counter[str] = collections.Counter()

    async def session(i: int) -> None:
        ws = None
        try:
            async with gate:
                ws = await ws_connect(
                    url,
                    proxy=None,
                    open_timeout=30,
                    close_timeout=10,
                    ping_interval=None,
                    max_size=1 << 20,
                )
            opened[0] += 1
        except Exception as exc:
            outcome[f"open failed: {type(exc).__name__}"] += 1
        finally:
            attempts[0] += 1
            if attempts[0] == n:
                all_tried.set()
        if ws is None:
            return
        try:
            await go.wait()
            for m in range(k):
                message = {"prompt": f"session {i} message {m}"}
                started = time.perf_counter()
                if m % 2:
                    await ws.send(msgpack.packb(message))
                    reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30))
                else:
                    await ws.send(json.dumps(message))
                    reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
                rtts.append(time.perf_counter() - started)
                if reply != {"input": message}:
                    outcome["wrong reply"] += 1
                    return
            await ws.close(1000, "soak done")
            outcome["clean close" if ws.close_code == 1000 else f"closed {ws.close_code}"] += 1
        except (ConnectionClosed, TimeoutError, OSError) as exc:
            outcome[f"failed: {type(exc).__name__}"] += 1
        finally:
            await ws.close()

    tasks = [asyncio.ensure_future(session(i)) for i in range(n)]
    started = time.perf_counter()
    await all_tried.wait()
    open_s = time.perf_counter() - started
    gauge = await metric(proxy.port, "fal_proxy_open_websockets")
    rss_open, fds_open = rss_mib(pid), fd_count(pid)
    go.set()
    await asyncio.gather(*tasks)
    closed_up, closed_s = await ctx.wait_events("ws-closed:1000:", n, 15)
    await proxy.settle()
    lines = proxy.snapshot().websockets - before.websockets
    peak = peak_rss_mib(pid)
    fds1, waited, fds_ok = await fd_state(ctx, "load")
    limit = RSS_LIMIT_MIB["ws"]
    clean = outcome["clean close"]
    others = {what: count for what, count in outcome.items() if what != "clean close"}
    row.expected = (
        f"{n}/{n} open at once, every echo right, closed 1000 both ways (upstream sees {n}× 1000); "
        f"{n} log lines; peak RSS < {limit:.0f} MiB; "
        f"fds back to ≤ {ctx.fd_baseline['load'] + FD_SLACK}"
    )
    row.measured = (
        f"{opened[0]}/{n} open in {open_s:.1f} s (open-sockets gauge {gauge:.0f}); {clean}/{n} "
        f"exchanged and closed 1000{' ' + repr(others) if others else ''}; "
        f"round trip p50 {ms(pct(rtts, 50))} ms, p99 {ms(pct(rtts, 99))} ms; upstream saw "
        f"{closed_up}× 1000 ({closed_s:.1f} s); {lines} log lines; RSS {rss0:.0f} → {rss_open:.0f} "
        f"all open, peak {peak:.0f} MiB; fds {fds0} → {fds_open} → {fds1} after {waited:.1f} s"
    )
    row.ok = clean == n and closed_up == n and lines == n and peak < limit and fds_ok
    row.details = {
        "sessions": n,
        "messages_each": k,
        "opened": opened[0],
        "outcomes": dict(outcome),
        "open_s": open_s,
        "open_gauge": gauge,
        "rtt_p50_ms": pct(rtts, 50) * 1e3,
        "rtt_p99_ms": pct(rtts, 99) * 1e3,
        "upstream_close_1000": closed_up,
        "log_lines": lines,
        "rss_before_mib": rss0,
        "rss_all_open_mib": rss_open,
        "peak_rss_mib": peak,
        "fds_before": fds0,
        "fds_all_open": fds_open,
        "fds_after": fds1,
        "fds_settle_s": waited,
    }
    return row


async def many(n: int, make: Any, concurrency: int | None = None) -> list[Any]:
    """``make(i)`` for i < n, at most ``concurrency`` at once (default: all)."""
    gate = asyncio.Semaphore(concurrency or n)

    async def one(i: int) -> Any:
        async with gate:
            return await make(i)

    return await asyncio.gather(*(one(i) for i in range(n)))


if __name__ == "__main__":
    sys.exit("run bench/soak.py")
