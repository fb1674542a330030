#!/usr/bin/env python3
"""Benchmark the proxy's WebSocket bridge against a fast echo server, next to no proxy at all.

Starts an echo WebSocket server (this file with ``--serve-echo``: the ``websockets``
asyncio server on uvloop, any path, every frame sent back as it came) and the proxy
(``python -m proxy --port 0``, JSON logs on, ``FAL_PROXY_GATEWAY_URL`` pointing at the
echo server), pins the proxy to one CPU and the echo server and this script (the client)
to another, as ``bench/run.py`` does, then measures, for "direct" (the client straight at
the echo server, on the URL the proxy itself would open) and "proxy" (through the bridge):

* messages per second: one connection, a window of 64 binary 100-byte messages in flight,
  in rounds that alternate direct and proxy (median shown), and the CPU µs per message of
  the proxy (of the echo server for "direct"), from /proc/<pid>/task/*/schedstat;
* round-trip latency: one connection, strictly sequential 100-byte round trips, p50/p99;
* throughput: one connection, 1 MiB binary messages, 4 in flight, MB/s each way.

Usage: ``.venv/bin/python bench/ws_bench.py [--quick] [--rounds N] [--json PATH]``, or
``bench/run.py --ws [--quick] [--json PATH]``. Linux only (/proc). Only 127.0.0.1 is ever
contacted; the child processes stop on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SMALL = 100  # bytes per small message
WINDOW = 64  # small messages in flight in the msgs/s run
BIG = 1 << 20  # bytes per large message
BIG_WINDOW = 4
MAX_SIZE = 16 * 1024 * 1024  # the proxy's default FAL_PROXY_WS_MAX_BYTES
WS_PATH = "/fal-ai/echo/ws"  # what a client asks the proxy for


# -- the echo server (a separate process: this file with --serve-echo) ------------------


def serve_echo() -> None:
    import uvloop
    from websockets.asyncio.server import serve
    from websockets.exceptions import ConnectionClosed

    async def echo(ws: Any) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                await ws.send(message)

    async def main() -> None:
        async with serve(echo, "127.0.0.1", 0, max_size=MAX_SIZE, compression=None,
                         ping_interval=None) as server:  # fmt: skip
            port = server.sockets[0].getsockname()[1]
            print(json.dumps({"event": "listening", "role": "echo", "port": port}), flush=True)
            await asyncio.Future()

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # nothing to clean up: just go
    uvloop.run(main())


# -- client measurements (in this process, on uvloop) -----------------------------------


async def _connect(url: str) -> Any:
    from websockets.asyncio.client import connect

    # proxy=None: websockets ≥ 15 would otherwise honour *_proxy variables.
    return await connect(url, max_size=MAX_SIZE, compression=None, ping_interval=None, proxy=None,
                         open_timeout=10, close_timeout=1)  # fmt: skip


async def _close(ws: Any) -> None:
    """Close cleanly, and in any case drop the socket: an interrupted run must not leave it
    open, or the proxy's graceful shutdown would wait for it."""
    try:
        await ws.close()
    finally:
        ws.transport.abort()


async def pipelined(
    url: str, size: int, window: int, seconds: float, watch: dict[str, int]
) -> dict[str, Any]:
    """Keep ``window`` messages of ``size`` bytes in flight on one connection for ``seconds``."""
    from procfs import cpu_seconds_fine

    payload = os.urandom(size)
    ws = await _connect(url)
    try:
        for _ in range(window):  # warm-up: a few windows' worth, not counted
            await ws.send(payload)
        for _ in range(window * 4):
            if len(await ws.recv()) != size:
                raise RuntimeError("echo of the wrong size")
            await ws.send(payload)
        for _ in range(window):
            await ws.recv()

        cpu_before = {name: cpu_seconds_fine(pid) for name, pid in watch.items()}
        started = time.perf_counter()
        deadline = started + seconds
        for _ in range(window):
            await ws.send(payload)
        done, in_flight = 0, window
        while in_flight:
            message = await ws.recv()
            if len(message) != size:
                raise RuntimeError(f"echo of {len(message)} bytes, sent {size}")
            done += 1
            in_flight -= 1
            if time.perf_counter() < deadline:
                await ws.send(payload)
                in_flight += 1
        wall = time.perf_counter() - started
        cpu = {name: cpu_seconds_fine(pid) - cpu_before[name] for name, pid in watch.items()}
    finally:
        await _close(ws)
    result: dict[str, Any] = {"messages": done, "seconds": wall, "msgs_per_s": done / wall,
                              "mb_per_s": done * size / wall / 1e6}  # fmt: skip
    for name, used in cpu.items():
        result[f"{name}_cpu_us_per_msg"] = used * 1e6 / done
        result[f"{name}_cpu_util"] = used / wall
    return result


async def sequential(url: str, seconds: float) -> dict[str, Any]:
    """Strictly one 100-byte round trip at a time for ``seconds``; percentiles in µs."""
    payload = os.urandom(SMALL)
    ws = await _connect(url)
    try:
        for _ in range(200):  # warm-up
            await ws.send(payload)
            await ws.recv()
        samples: list[int] = []
        clock = time.perf_counter_ns
        deadline = clock() + int(seconds * 1e9)
        while True:
            t0 = clock()
            await ws.send(payload)
            message = await ws.recv()
            t1 = clock()
            if message != payload:
                raise RuntimeError("echo differs from what was sent")
            samples.append(t1 - t0)
            if t1 >= deadline:
                break
    finally:
        await _close(ws)
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(p / 100 * len(samples)))] / 1e3

    return {
        "round_trips": len(samples),
        "p50_us": pct(50),
        "p99_us": pct(99),
        "mean_us": statistics.fmean(samples) / 1e3,
    }


# -- run --------------------------------------------------------------------------------


def measure(
    args: argparse.Namespace, proxy_cpus: set[int], stack: contextlib.ExitStack
) -> dict[str, Any]:
    import uvloop
    from bench_common import GATEWAY_PREFIX, pin, start_child, step
    from procfs import status_kib

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "CF_"))}
    env["PYTHONUNBUFFERED"] = "1"
    echo = start_child(
        "echo server", [sys.executable, str(Path(__file__).resolve()), "--serve-echo"], env, stack
    )
    gateway_url = f"http://127.0.0.1:{echo.port}{GATEWAY_PREFIX}"
    proxy_env = dict(env, FAL_KEY="k", FAL_PROXY_GATEWAY_URL=gateway_url,
                     FAL_PROXY_LOG_FORMAT="json", FAL_PROXY_RATE_LIMIT_RPM="1000000000",
                     FAL_PROXY_MAX_CONCURRENT="100000",
                     FAL_PROXY_SUBMITS_PER_HOUR="1000000000")  # fmt: skip
    proxy = start_child("proxy", [sys.executable, "-m", "proxy", "--port", "0"], proxy_env, stack)
    pin(proxy.pid, proxy_cpus)
    # "direct" asks the echo server for the very URL the proxy opens upstream.
    modes = {
        "direct": (f"ws://127.0.0.1:{echo.port}{GATEWAY_PREFIX}{WS_PATH}", {"echo": echo.pid}),
        "proxy": (f"ws://127.0.0.1:{proxy.port}{WS_PATH}", {"proxy": proxy.pid, "echo": echo.pid}),
    }
    me = os.getpid()
    results: dict[str, Any] = {name: {"rounds": []} for name in modes}
    results["proxy"]["baseline_rss_mib"] = status_kib(proxy.pid, "VmRSS") / 1024
    stopped_by: list[int] = []

    async def interruptible(coro: Any) -> Any:
        # SIGTERM/SIGHUP cancel the measurement (a SystemExit raised inside a uvloop callback
        # would be swallowed as a transport error), then the ExitStack stops the children.
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
        for sig in previous:
            loop.add_signal_handler(sig, lambda s=sig: (stopped_by.append(s), task.cancel()))
        try:
            return await coro
        except asyncio.CancelledError:
            if stopped_by:
                raise SystemExit(128 + stopped_by[0]) from None
            raise
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)  # (resets to SIG_DFL)
                signal.signal(sig, handler)  # main()'s: SystemExit, so the clean-up runs

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for round_ in range(1, args.rounds + 1):
            for name, (url, watch) in modes.items():
                step(f"ws {name}: {SMALL} B messages, {WINDOW} in flight, {args.msgs_s} s, "
                     f"round {round_}/{args.rounds}")  # fmt: skip
                r = runner.run(
                    interruptible(
                        pipelined(url, SMALL, WINDOW, args.msgs_s, watch | {"client": me})
                    )
                )
                results[name]["rounds"].append(r)
        for name, (url, _) in modes.items():
            step(f"ws {name}: sequential {SMALL} B round trips, {args.latency_s} s")
            results[name]["latency"] = runner.run(interruptible(sequential(url, args.latency_s)))
        for name, (url, watch) in modes.items():
            step(f"ws {name}: 1 MiB messages, {BIG_WINDOW} in flight, {args.big_s} s")
            results[name]["big"] = runner.run(
                interruptible(pipelined(url, BIG, BIG_WINDOW, args.big_s, watch))
            )
    results["proxy"]["rss_after_mib"] = status_kib(proxy.pid, "VmRSS") / 1024
    results["proxy"]["peak_rss_mib"] = status_kib(proxy.pid, "VmHWM") / 1024
    for name in modes:
        rounds = results[name]["rounds"]
        results[name]["load"] = sorted(rounds, key=lambda r: r["msgs_per_s"])[len(rounds) // 2]
    return results


def report(results: dict[str, Any], meta: dict[str, Any]) -> str:
    d, p = results["direct"], results["proxy"]

    def ratio(a: float, b: float) -> str:
        return f"{b / a:.2f}×" if a else "—"

    rows = [
        (f"messages/s, 1 conn, {WINDOW} in flight, {SMALL} B", d["load"]["msgs_per_s"],
         p["load"]["msgs_per_s"], ".0f"),
        (f"round trip p50 µs, 1 conn, sequential {SMALL} B", d["latency"]["p50_us"],
         p["latency"]["p50_us"], ".0f"),
        (f"round trip p99 µs, 1 conn, sequential {SMALL} B", d["latency"]["p99_us"],
         p["latency"]["p99_us"], ".0f"),
        (f"MB/s each way, 1 MiB messages, {BIG_WINDOW} in flight", d["big"]["mb_per_s"],
         p["big"]["mb_per_s"], ".0f"),
        ("CPU µs per message (echoed; direct: echo server's, proxy: proxy's)",
         d["load"]["echo_cpu_us_per_msg"], p["load"]["proxy_cpu_us_per_msg"], ".1f"),
        ("CPU µs per 1 MiB message (same)", d["big"]["echo_cpu_us_per_msg"],
         p["big"]["proxy_cpu_us_per_msg"], ".0f"),
    ]  # fmt: skip
    lines = ["| WebSocket measure | direct | proxy | proxy / direct |", "|---|---:|---:|---:|"]
    for label, a, b, spec in rows:
        lines.append(f"| {label} | {a:{spec}} | {b:{spec}} | {ratio(a, b)} |")

    def pct(x: float) -> str:
        return f"{x * 100:.0f}%"

    def each(name: str) -> str:
        return ", ".join(f"{r['msgs_per_s']:.0f}" for r in results[name]["rounds"])

    pl, dl = p["load"], d["load"]
    added50 = p["latency"]["p50_us"] - d["latency"]["p50_us"]
    added99 = p["latency"]["p99_us"] - d["latency"]["p99_us"]
    shared = dl["echo_cpu_util"] + dl["client_cpu_util"]
    bound = (
        (
            f" Direct is bound by the shared CPU (echo server + client at {pct(shared)} together), "
            "so the ratio understates the proxy's own cost; the CPU row shows it."
        )
        if shared > 0.9
        else ""
    )
    lines += [
        "",
        f"- {meta['cpu']}, {meta['cpus']} CPUs; {meta['pinning']}. Python {meta['python']}, "
        f"websockets {meta['websockets']}, uvicorn {meta['uvicorn']}.",
        f"- A message is one {SMALL}-byte binary frame to the echo server and its echo back, so "
        f"the proxy relays 2 frames per message. Latency added by the proxy: "
        f"p50 {added50:+.0f} µs, "
        f"p99 {added99:+.0f} µs per round trip ({p['latency']['round_trips']} proxied / "
        f"{d['latency']['round_trips']} direct round trips).",
        f"- messages/s: {meta['rounds']} x {meta['msgs_seconds']} s per mode, alternating, median "
        f"shown (direct: {each('direct')}; proxy: {each('proxy')}). During the proxied run the "
        f"proxy used {pct(pl['proxy_cpu_util'])} of its CPU, "
        f"the echo server {pct(pl['echo_cpu_util'])} "
        f"and the client {pct(pl['client_cpu_util'])} of theirs (shared); direct: echo server "
        f"{pct(dl['echo_cpu_util'])}, client {pct(dl['client_cpu_util'])}. "
        f"A proxy near 100% is the "
        f"bottleneck; CPU µs from /proc/<pid>/task/*/schedstat.{bound}",
        f"- 1 MiB: {p['big']['messages']} proxied / {d['big']['messages']} direct messages in "
        f"{meta['big_seconds']} s; proxy at {pct(p['big']['proxy_cpu_util'])} of its CPU. "
        f"MB = 10^6 bytes. "
        f"Proxy RSS: {p['baseline_rss_mib']:.0f} MiB after start-up, {p['rss_after_mib']:.0f} MiB "
        f"after the runs, peak {p['peak_rss_mib']:.0f} MiB.",
    ]  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (~10 s)")
    parser.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help="messages/s runs per mode, median reported (default 3, 1 with --quick)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)  # the child
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def package_version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_echo:
        serve_echo()
        return 0
    # For bench_common and procfs (imported where needed, so the --serve-echo child stays lean).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import BenchError, cpu_model
    from websockets.exceptions import WebSocketException

    args.rounds = args.rounds or (1 if args.quick else 3)
    args.msgs_s = 1.0 if args.quick else 5.0
    args.latency_s = 1.0 if args.quick else 3.0
    args.big_s = 0.5 if args.quick else 3.0

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        proxy_cpus = {cpus[0]}
        os.sched_setaffinity(0, set(cpus[1:]))  # the echo server inherits this
        others = ",".join(map(str, cpus[1:]))
        pinning = f"proxy on CPU {cpus[0]}; echo server and client on CPU {others}"
    else:
        proxy_cpus = set(cpus)
        pinning = "NOT pinned: only one CPU available, everything shares it"
    meta = {
        "cpu": cpu_model(), "cpus": len(cpus), "pinning": pinning,
        "python": platform.python_version(),
        "websockets": package_version("websockets"), "uvicorn": package_version("uvicorn"),
        "rounds": args.rounds, "msgs_seconds": args.msgs_s, "latency_seconds": args.latency_s,
        "big_seconds": args.big_s, "quick": args.quick,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    try:
        with contextlib.ExitStack() as stack:  # stops the children
            results = measure(args, proxy_cpus, stack)
    except (BenchError, RuntimeError, OSError, WebSocketException) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    table = report(results, meta)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"meta": meta, "results": results, "table": table}, indent=2) + "\n"
        )
        print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
