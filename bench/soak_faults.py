"""The fault rows of ``bench/soak.py``: a refusing, silent or dying gateway, clients that
leave, upload slowly or send their headers a byte a second, concurrency slots after all
that, and SIGTERM with work in flight. Only 127.0.0.1 is contacted."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import time
from typing import Any

from soak_rows import (
    DRAIN_SECONDS,
    FD_SLACK,
    FIRST_BYTE_TIMEOUT,
    HEADER_TIMEOUT,
    IDLE_TIMEOUT,
    LATE,
    Ctx,
    Row,
    Stream,
    delta,
    fd_state,
    finish_stream,
    key_in,
    many,
    metric,
    open_stream,
)
from soak_support import (
    HOST,
    Response,
    chunk,
    fd_count,
    http_request,
    ms,
    pct,
    read_body,
    read_head,
    request_head,
)
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed


async def open_streams(
    port: int, path: str, kind: str, k: int, failures: collections.Counter[str]
) -> list[Stream]:
    """``k`` streams opened at once (64 connecting at a time); the failures are counted."""
    gate = asyncio.Semaphore(64)
    opened = await asyncio.gather(
        *(open_stream(port, path, kind, gate, failures) for _ in range(k))
    )
    return [stream for stream in opened if stream is not None]


async def row_refused(ctx: Ctx) -> Row:
    proxy, n = ctx.proxies["refused"], ctx.sizes.refused
    row = Row("refused", f"gateway refuses connections (closed port): {n} requests, 20 at a time")
    got = await many(
        n,
        lambda i: http_request(
            proxy.port, "POST", "/fal-ai/fast-sdxl", body=b'{"prompt":"x"}', timeout=15
        ),
        20,
    )
    codes = collections.Counter(r.status or r.error for r in got)
    message = "the gateway could not be reached"
    right = sum(1 for r in got if r.status == 502 and (r.json() or {}).get("message") == message)
    times = [r.seconds for r in got]
    leaked = key_in(got, ctx.secret)
    row.expected = (
        "all 502 'the gateway could not be reached', each in < 0.5 s; no key in any answer"
    )
    row.measured = (
        f"{right}/{n} right 502 {dict(codes)}; p50 {ms(pct(times, 50))} ms, "
        f"p99 {ms(pct(times, 99))} ms, "
        f"max {ms(max(times))} ms; key in {leaked} answers"
    )
    row.ok = right == n and max(times) < 0.5 and not leaked
    row.details = {
        "requests": n,
        "codes": {str(k): v for k, v in codes.items()},
        "right": right,
        "p50_ms": pct(times, 50) * 1e3,
        "p99_ms": pct(times, 99) * 1e3,
        "max_ms": max(times) * 1e3,
    }
    return row


async def row_silent(ctx: Ctx) -> Row:
    proxy, n = ctx.proxies["fault"], ctx.sizes.faults
    row = Row(
        "silent",
        f"gateway silent (emulator/hang), first-byte timeout {FIRST_BYTE_TIMEOUT:g} s: {n} at once",
    )
    got = await many(
        n, lambda i: http_request(proxy.port, "POST", "/emulator/hang", body=b"{}", timeout=15)
    )
    codes = collections.Counter(r.status or r.error for r in got)
    times = [r.seconds for r in got]
    on_time = sum(
        1
        for r in got
        if r.status == 504 and FIRST_BYTE_TIMEOUT - 0.05 <= r.seconds <= FIRST_BYTE_TIMEOUT + LATE
    )
    gone, _gone_s = await ctx.wait_events("disconnected:hang:", n, 10)
    leaked = key_in(got, ctx.secret)
    row.expected = (
        f"all 504 after {FIRST_BYTE_TIMEOUT:g}–{FIRST_BYTE_TIMEOUT + LATE:g} s; "
        f"the upstream sees all {n} requests closed; no key in any answer"
    )
    row.measured = (
        f"{on_time}/{n} 504 in time {dict(codes)}; after min {min(times):.2f} "
        f"/ p50 {pct(times, 50):.2f} / max {max(times):.2f} s; "
        f"upstream saw {gone}/{n} closed; key in {leaked} answers"
    )
    row.ok = on_time == n and gone == n and not leaked
    row.details = {
        "requests": n,
        "codes": {str(k): v for k, v in codes.items()},
        "on_time": on_time,
        "min_s": min(times),
        "p50_s": pct(times, 50),
        "max_s": max(times),
        "upstream_closed": gone,
    }
    return row


async def row_die(ctx: Ctx) -> Row:
    proxy, n = ctx.proxies["fault"], ctx.sizes.faults
    row = Row("die", f"gateway resets mid-body (emulator/die: 10 of 1000 bytes): {n} at once")
    before = proxy.snapshot()
    got = await many(n, lambda i: http_request(proxy.port, "GET", "/emulator/die", timeout=15))
    cut = sum(1 for r in got if r.status == 200 and not r.clean and r.body == b"x" * 10)
    clean = sum(1 for r in got if r.clean)
    await proxy.settle()
    logged = delta(proxy, before, 200, "upstream_unavailable")
    times = [r.seconds for r in got]
    row.expected = (
        f"all {n}: 200, 10 bytes, then the connection cut (never a clean end); "
        "logged upstream_unavailable"
    )
    row.measured = (
        f"{cut}/{n} cut after 10 bytes, {clean} ended cleanly; max {ms(max(times))} ms; "
        f"logged 200/upstream_unavailable ×{logged}"
    )
    row.ok = cut == n and clean == 0 and logged == n
    row.details = {
        "requests": n,
        "cut": cut,
        "clean": clean,
        "logged": logged,
        "max_ms": max(times) * 1e3,
    }
    return row


async def row_leave(ctx: Ctx) -> Row:
    proxy, n = ctx.proxies["fault"], ctx.sizes.faults
    row = Row(
        "leave",
        f"clients leave: {n} mid-stream (emulator/stall), {n} before the headers (emulator/hang)",
    )
    before = proxy.snapshot()
    failures: collections.Counter[str] = collections.Counter()
    gate = asyncio.Semaphore(64)

    async def leave_hang(i: int) -> None:
        try:
            _reader, writer = await asyncio.open_connection(HOST, proxy.port)
            writer.write(request_head("POST", "/emulator/hang", proxy.port, body=b"{}"))
            await asyncio.sleep(0.3)  # well inside the first-byte timeout
            writer.transport.abort()
        except OSError as exc:
            failures[type(exc).__name__] += 1

    streams = await asyncio.gather(
        *(open_stream(proxy.port, "/emulator/stall", "stall", gate, failures) for _ in range(n))
    )
    left = time.monotonic()
    for st in streams:
        if st is not None:
            st.writer.transport.abort()
    await asyncio.gather(*(leave_hang(i) for i in range(n)))
    stall, _stall_s = await ctx.wait_events("disconnected:stall:", n, 10)
    hang, _ = await ctx.wait_events("disconnected:hang:", n, 10)
    all_s = time.monotonic() - left
    await proxy.settle()
    logged = delta(proxy, before, 499, "client_gone")
    row.expected = (
        f"the upstream sees all {2 * n} requests closed within 5 s; "
        f"proxy logs {2 * n}× 499 client_gone"
    )
    row.measured = (
        f"upstream saw {stall}/{n} mid-stream and {hang}/{n} waiting requests closed "
        f"(all within {all_s:.1f} s){' ' + repr(dict(failures)) if failures else ''}; "
        f"logged 499 ×{logged}"
    )
    row.ok = stall == n and hang == n and all_s <= 5 + 0.5 and logged == 2 * n and not failures
    row.details = {
        "mid_stream": n,
        "before_headers": n,
        "upstream_closed_stream": stall,
        "upstream_closed_waiting": hang,
        "all_closed_s": all_s,
        "logged_499": logged,
    }
    return row


async def row_uploads(ctx: Ctx) -> Row:
    proxy, n = ctx.proxies["fault"], ctx.sizes.faults
    port = proxy.port
    row = Row(
        "uploads",
        f"uploads at idle timeout {IDLE_TIMEOUT:g} s: {n} slow (512 B / 0.3 s), {n} stalled",
    )
    parts = 8

    async def upload(i: int, stall: bool) -> tuple[Response, float, str]:
        response = Response()
        data = os.urandom(512 * parts)
        writer = None
        last_sent = time.perf_counter()
        try:
            async with asyncio.timeout(parts * 0.3 + IDLE_TIMEOUT + 10):
                reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(
                    request_head(
                        "POST",
                        "/emulator/sink",
                        port,
                        chunked=True,
                        content_type="application/octet-stream",
                    )
                )
                for p in range(1 if stall else parts):
                    writer.write(chunk(data[p * 512 : (p + 1) * 512]))
                    await writer.drain()
                    last_sent = time.perf_counter()
                    if not stall:
                        await asyncio.sleep(0.3)
                if not stall:
                    writer.write(b"0\r\n\r\n")
                    last_sent = time.perf_counter()
                await read_head(reader, response)
                await read_body(reader, response)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            response.error = type(exc).__name__
        finally:
            if writer is not None:
                writer.transport.abort()
        return response, time.perf_counter() - last_sent, hashlib.sha256(data).hexdigest()

    slow = asyncio.gather(*(upload(i, False) for i in range(n)))
    stalled = asyncio.gather(*(upload(i, True) for i in range(n)))
    slow_got, stalled_got = await asyncio.gather(slow, stalled)
    slow_ok = sum(
        1
        for r, _, digest in slow_got
        if r.status == 200 and (r.json() or {}) == {"len": 512 * parts, "sha256": digest}
    )
    waits = [t for r, t, _ in stalled_got]
    stalled_ok = sum(
        1
        for r, t, _ in stalled_got
        if r.status == 408
        and (r.json() or {}).get("message") == "request body stalled"
        and IDLE_TIMEOUT - 0.05 <= t <= IDLE_TIMEOUT + LATE
    )
    records = (await ctx.emu("GET", "/_emulator/requests")).json() or []
    sinks = sum(
        1 for r in records if r.get("kind") == "gateway" and r["path"].endswith("/emulator/sink")
    )
    slow_codes = collections.Counter(r.status or r.error for r, _, _ in slow_got)
    stalled_codes = collections.Counter(r.status or r.error for r, _, _ in stalled_got)
    row.expected = (
        f"slow: {n}/{n} 200, the gateway gets every byte (sha256); stalled: {n}/{n} 408 "
        f"{IDLE_TIMEOUT:g}–{IDLE_TIMEOUT + LATE:g} s after the last byte, "
        "never a complete body upstream"
    )
    row.measured = (
        f"slow: {slow_ok}/{n} right {dict(slow_codes)}; stalled: {stalled_ok}/{n} 408 in time "
        f"{dict(stalled_codes)}, after p50 {pct(waits, 50):.2f} / max {max(waits):.2f} s; "
        f"complete bodies upstream {sinks} (= the slow ones)"
    )
    row.ok = slow_ok == n and stalled_ok == n and sinks == n
    row.details = {
        "slow": n,
        "slow_ok": slow_ok,
        "stalled": n,
        "stalled_ok": stalled_ok,
        "stalled_p50_s": pct(waits, 50),
        "stalled_max_s": max(waits),
        "complete_upstream": sinks,
    }
    return row


SLOW_HEAD = (
    b"POST /emulator/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"X-Slow: " + b"s" * 200 + b"\r\n\r\n"
)


async def row_slow_headers(ctx: Ctx) -> Row:
    proxy, n = ctx.proxies["fault"], ctx.sizes.slow_headers
    window = HEADER_TIMEOUT + 6
    row = Row(
        "headers",
        f"slow header senders: {n} connections, 1 header byte/s, FAL_PROXY_HEADER_TIMEOUT="
        f"{HEADER_TIMEOUT:g}",
    )
    fds0 = fd_count(proxy.pid)

    async def slowloris(i: int) -> tuple[float | None, str]:
        """(seconds until the proxy closed the connection, or None; what it answered)."""
        reader, writer = await asyncio.open_connection(HOST, proxy.port)
        started = time.monotonic()
        answer = bytearray()
        closed: float | None = None

        async def watch() -> None:
            nonlocal closed
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    answer.extend(data)
            closed = time.monotonic() - started

        watcher = asyncio.ensure_future(watch())
        try:
            for byte in SLOW_HEAD:
                if watcher.done() or time.monotonic() - started > window:
                    break
                try:
                    writer.write(bytes([byte]))
                    await writer.drain()
                except ConnectionError:
                    closed = closed or time.monotonic() - started
                    break
                await asyncio.wait({watcher}, timeout=1.0)
            if closed is None and not watcher.done():
                await asyncio.wait(
                    {watcher}, timeout=max(0.0, window - (time.monotonic() - started))
                )
        finally:
            watcher.cancel()
            writer.transport.abort()
        first = bytes(answer).split(b"\r\n", 1)[0].decode("latin-1") if answer else "nothing"
        return closed, first

    tasks = asyncio.gather(*(slowloris(i) for i in range(n)))
    await asyncio.sleep(1.0)
    fds_during = fd_count(proxy.pid)
    probe = await http_request(
        proxy.port, "POST", "/emulator/echo", body=b'{"probe":1}', timeout=10
    )
    got = await tasks
    closed = [t for t, _ in got if t is not None]
    answers = collections.Counter(a for _, a in got)
    in_time = sum(1 for t in closed if HEADER_TIMEOUT - 0.25 <= t <= HEADER_TIMEOUT + LATE)
    fds1, _waited, fds_ok = await fd_state(ctx, "fault")
    note = (
        ""
        if ctx.header_timeout_known
        else " (FAL_PROXY_HEADER_TIMEOUT is not in this proxy's settings table)"
    )
    row.expected = (
        f"all {n} closed by the proxy {HEADER_TIMEOUT:g}–{HEADER_TIMEOUT + LATE:g} s "
        "after connecting; other requests still served meanwhile; "
        f"fds back to ≤ {ctx.fd_baseline['fault'] + FD_SLACK}"
    )
    times = (
        f"after min {min(closed):.2f} / p50 {pct(closed, 50):.2f} / max {max(closed):.2f} s"
        if closed
        else f"none closed within {window:g} s"
    )
    row.measured = (
        f"{len(closed)}/{n} closed ({in_time} in time), {times}; answered: {dict(answers)}; "
        f"{n - len(closed)} still open at {window:g} s{note}; probe meanwhile "
        f"{probe.status or probe.error} in {ms(probe.seconds)} ms; "
        f"fds {fds0} → {fds_during} → {fds1}"
    )
    row.ok = in_time == n and probe.status == 200 and fds_ok
    row.details = {
        "connections": n,
        "closed": len(closed),
        "closed_in_time": in_time,
        "closed_min_s": min(closed) if closed else None,
        "closed_max_s": max(closed) if closed else None,
        "answers": dict(answers),
        "window_s": window,
        "setting_known": ctx.header_timeout_known,
        "probe_status": probe.status,
        "probe_ms": probe.seconds * 1e3,
        "fds_before": fds0,
        "fds_during": fds_during,
        "fds_after": fds1,
    }
    return row


FAULT_SLOTS = 128  # the fault proxy's FAL_PROXY_MAX_CONCURRENT (every fault row stays below it)


async def row_slots(ctx: Ctx) -> Row:
    """After the faults, every concurrency slot of the fault proxy is free again: a leaked
    one (a request cut, timed out or refused that kept its slot) would turn one of these
    hanging requests into a 429 too early."""
    proxy, n = ctx.proxies["fault"], FAULT_SLOTS
    row = Row(
        "slots",
        f"concurrency slots free after the faults: {n + 1} hanging requests at once, "
        f"FAL_PROXY_MAX_CONCURRENT={n}",
    )
    got = await many(
        n + 1, lambda i: http_request(proxy.port, "POST", "/emulator/hang", body=b"{}", timeout=15)
    )
    codes = collections.Counter(r.status or r.error for r in got)
    gauge = await metric(proxy.port, "fal_proxy_in_flight_requests")
    row.expected = f"{n}× 504 (each held a slot until its first-byte timeout) and exactly 1× 429"
    row.measured = f"{dict(codes)}; in-flight gauge afterwards {gauge:.0f}"
    row.ok = codes == collections.Counter({504: n, 429: 1})
    row.details = {
        "slots": n,
        "codes": {str(k): v for k, v in codes.items()},
        "in_flight_after": gauge,
    }
    return row


# -- 10. SIGTERM ------------------------------------------------------------------------


async def row_sigterm(ctx: Ctx) -> Row:
    k, n_ws = ctx.sizes.drain_streams, 5
    row = Row(
        "sigterm",
        f"SIGTERM with {k} SSE streams and {n_ws} WebSockets in flight, "
        f"FAL_PROXY_DRAIN_SECONDS={DRAIN_SECONDS:g}",
    )
    proxy = await ctx.start_proxy("sigterm", FAL_PROXY_DRAIN_SECONDS=f"{DRAIN_SECONDS:g}")
    failures: collections.Counter[str] = collections.Counter()
    streams = await open_streams(proxy.port, "/emulator/sse?n=3", "sse", k, failures)
    sockets = []
    for i in range(n_ws):
        ws = await ws_connect(
            f"ws://{HOST}:{proxy.port}/emulator/echo/realtime",
            proxy=None,
            open_timeout=10,
            ping_interval=None,
        )
        await ws.send(json.dumps({"n": i}))
        await asyncio.wait_for(ws.recv(), 10)
        sockets.append(ws)
    sent = time.monotonic()
    os.kill(proxy.pid, signal.SIGTERM)
    shutting = await proxy.wait_log(lambda r: "Shutting down" in str(r.get("event")), 10)
    try:
        _, writer = await asyncio.open_connection(HOST, proxy.port)
        writer.transport.abort()
        refused = False
    except OSError:
        refused = True

    async def ws_close_code(ws: Any) -> int | None:
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            while True:
                await asyncio.wait_for(ws.recv(), 5)
        return ws.close_code

    codes = collections.Counter(await asyncio.gather(*(ws_close_code(ws) for ws in sockets)))
    await asyncio.sleep(
        max(0.0, 1.0 - (time.monotonic() - sent))
    )  # the streams outlive the signal a while
    await ctx.release("sse-2")
    await ctx.release("sse-3")
    complete = sum(await asyncio.gather(*(finish_stream(st, DRAIN_SECONDS + 5) for st in streams)))
    try:
        code = await asyncio.to_thread(proxy.proc.wait, DRAIN_SECONDS + 10)
    except Exception:
        code = None
    exit_s = time.monotonic() - sent
    row.expected = (
        f"{k}/{k} streams finish after the signal, WebSockets closed 1001, "
        f"new connections refused, exit 0 within {DRAIN_SECONDS:g} s"
    )
    row.measured = (
        f"{complete}/{k} finished{' ' + repr(dict(failures)) if failures else ''}; "
        f"WebSocket close codes {dict(codes)}; "
        f"'Shutting down' logged: {shutting is not None}; new connection "
        f"{'refused' if refused else 'ACCEPTED'}; exit code {code} after {exit_s:.1f} s"
    )
    row.ok = (
        complete == k
        and codes == collections.Counter({1001: n_ws})
        and refused
        and code == 0
        and exit_s <= DRAIN_SECONDS + 1
    )
    row.details = {
        "streams": k,
        "complete": complete,
        "ws_close_codes": {str(c): v for c, v in codes.items()},
        "new_connection_refused": refused,
        "exit_code": code,
        "exit_s": exit_s,
    }
    return row


EXPIRY_DRAIN = 2.0


async def row_drain_expiry(ctx: Ctx) -> Row:
    """Streams that outlive the drain: cut when it expires, and the proxy still exits 0."""
    k = 5
    row = Row(
        "expiry",
        f"SIGTERM with {k} streams that never end, FAL_PROXY_DRAIN_SECONDS={EXPIRY_DRAIN:g}",
    )
    proxy = await ctx.start_proxy("expiry", FAL_PROXY_DRAIN_SECONDS=f"{EXPIRY_DRAIN:g}")
    failures: collections.Counter[str] = collections.Counter()
    streams = await open_streams(proxy.port, "/emulator/stall", "stall", k, failures)
    sent = time.monotonic()
    os.kill(proxy.pid, signal.SIGTERM)
    try:
        code = await asyncio.to_thread(proxy.proc.wait, EXPIRY_DRAIN + 10)
    except Exception:
        code = None
    exit_s = time.monotonic() - sent
    await asyncio.gather(*(finish_stream(st, 5) for st in streams))
    cut = sum(1 for st in streams if not st.buffer.endswith(b"0\r\n\r\n"))
    gone, _ = await ctx.wait_events("disconnected:stall:", k, 5)
    await asyncio.sleep(0.3)  # the last lines of the exited proxy are read
    logged = {
        f"{status}/{error}": count for (status, error), count in proxy.snapshot().statuses.items()
    }
    row.expected = (
        f"{k}/{k} streams cut at the deadline (no last chunk), the upstream sees {k} closes, "
        f"exit 0 {EXPIRY_DRAIN:g}–{EXPIRY_DRAIN + 1:g} s after the signal"
    )
    row.measured = (
        f"{cut}/{len(streams)} cut{' ' + repr(dict(failures)) if failures else ''}; upstream saw "
        f"{gone}/{k} closed; exit code {code} after {exit_s:.1f} s; logged as {logged}"
    )
    row.ok = (
        len(streams) == k
        and cut == k
        and gone == k
        and code == 0
        and EXPIRY_DRAIN - 0.1 <= exit_s <= EXPIRY_DRAIN + 1
    )
    row.details = {
        "streams": k,
        "cut": cut,
        "upstream_closed": gone,
        "exit_code": code,
        "exit_s": exit_s,
        "logged": logged,
    }
    return row


def free_closed_port() -> socket.socket:
    """A loopback port that refuses connections: bound (so nobody else takes it), not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    return sock


if __name__ == "__main__":
    sys.exit("run bench/soak.py")
