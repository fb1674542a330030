#!/usr/bin/env python3
"""Benchmark the proxy's WebSocket bridge against a bare relay and against no relay at all.

Starts an echo WebSocket server (this file with ``--serve-echo``: the ``websockets``
asyncio server on uvloop, any path, every frame sent back as it came), the proxy
(``python -m proxy --port 0``, JSON logs on, ``FAL_PROXY_GATEWAY_URL`` pointing at the
echo server) and the bare relay (``bench/bare_ws_relay.py``: the ``websockets`` library
bridging two sockets, nothing else, on uvloop). The proxy and the bare relay are pinned to
one CPU, the echo server and this script (the client) to another, as ``bench/run.py``
does. Three modes, in rounds that alternate them (the order rotating each round):
"direct" (the client straight at the echo server, on the URL the proxy itself would open),
"bare" (through the bare relay) and "proxy" (through the bridge). In each round, each mode:

* small messages: one connection, a window of 64 msgpack frames (~170 bytes, shaped like
  fal's realtime input) in flight: messages/s and the CPU µs per message of the relay
  (of the echo server for "direct"), from /proc/<pid>/task/*/schedstat; every echo is
  compared with what was sent, byte for byte;
* small round trips: strictly sequential, p50/p99 µs (the latency a relay adds: its
  figure minus direct's, in the same round);
* 1 MiB binary frames: 4 in flight (messages/s, MB/s, CPU per message), then sequential
  (p50/p99).

Medians over the rounds are shown, with the spread; the proxy/bare ratios are taken per
round (side by side), then their median, against the target (≤ 1.3×).

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

WINDOW = 64  # small messages in flight in the msgs/s run
BIG = 1 << 20  # bytes per large message
BIG_WINDOW = 4
MAX_SIZE = 16 * 1024 * 1024  # the proxy's default FAL_PROXY_WS_MAX_BYTES
WS_PATH = "/fal-ai/echo/ws"  # what a client asks the proxy for
TARGET = 1.3  # proxy / bare relay, CPU per message and added p99
MODES = ("direct", "bare", "before", "proxy")  # "before": --compare DIR only


def small_frame() -> bytes:
    """A msgpack frame shaped like fal's realtime input (what its JS client sends)."""
    import msgpack

    return bytes(msgpack.packb({
        "request_id": "3f2c9e4a-1b7d-4c55-9a0e-6d2b8f1e7a90",
        "prompt": "a photo of a cat wearing a tiny hat, studio lighting",
        "image_size": "square_hd", "num_inference_steps": 4, "seed": 42, "sync_mode": True,
    }))  # fmt: skip


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


def _check(message: Any, payload: bytes) -> None:
    if message != payload:  # bytes == bytes: also false for a text frame
        kind = "text" if isinstance(message, str) else f"{len(message)} bytes"
        raise RuntimeError(f"echo differs from what was sent ({kind}, sent {len(payload)} bytes)")


async def pipelined(
    url: str, payload: bytes, window: int, seconds: float, watch: dict[str, int]
) -> dict[str, Any]:
    """Keep ``window`` copies of ``payload`` in flight on one connection for ``seconds``."""
    from procfs import cpu_seconds_fine

    ws = await _connect(url)
    try:
        for _ in range(window):  # warm-up: a few windows' worth, not counted
            await ws.send(payload)
        for _ in range(window * 4):
            _check(await ws.recv(), payload)
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
            _check(await ws.recv(), payload)
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
                              "mb_per_s": done * len(payload) / wall / 1e6}  # fmt: skip
    for name, used in cpu.items():
        result[f"{name}_cpu_us_per_msg"] = used * 1e6 / done
        result[f"{name}_cpu_util"] = used / wall
    return result


async def sequential(url: str, payload: bytes, seconds: float) -> dict[str, Any]:
    """Strictly one round trip at a time for ``seconds``; percentiles in µs."""
    ws = await _connect(url)
    try:
        for _ in range(20 if len(payload) > 4096 else 200):  # warm-up
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
            _check(message, payload)
            samples.append(t1 - t0)
            if t1 >= deadline:
                break
    finally:
        await _close(ws)
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(p / 100 * len(samples)))] / 1e3

    return {"round_trips": len(samples), "p50_us": pct(50), "p99_us": pct(99),
            "mean_us": statistics.fmean(samples) / 1e3}  # fmt: skip


# -- run --------------------------------------------------------------------------------


def measure(
    args: argparse.Namespace, relay_cpus: set[int], stack: contextlib.ExitStack
) -> dict[str, Any]:
    import uvloop
    from bench_common import GATEWAY_PREFIX, pin, proxy_row_env, start_child, step
    from procfs import status_kib

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "CF_"))}
    env["PYTHONUNBUFFERED"] = "1"
    here = Path(__file__).resolve()
    echo = start_child("echo server", [sys.executable, str(here), "--serve-echo"], env, stack)
    gateway_url = f"http://127.0.0.1:{echo.port}{GATEWAY_PREFIX}"
    proxy_env = proxy_row_env(env, gateway_url)
    proxy = start_child("proxy", [sys.executable, "-m", "proxy", "--port", "0"], proxy_env, stack)
    pin(proxy.pid, relay_cpus)
    bare = start_child("bare relay", [sys.executable, str(here.parent / "bare_ws_relay.py"),
                       "--upstream", f"ws://127.0.0.1:{echo.port}{GATEWAY_PREFIX}"], env,
                       stack)  # fmt: skip
    pin(bare.pid, relay_cpus)
    before = None
    if "before" in args.modes:  # the same proxy settings, its package from --compare DIR
        tree = str(args.compare.resolve())
        code = (f"import sys, runpy; sys.path.insert(0, {tree!r}); sys.argv[0] = 'proxy'; "
                "runpy.run_module('proxy', run_name='__main__')")  # fmt: skip
        before = start_child("proxy (before)", [sys.executable, "-c", code, "--port", "0"],
                             proxy_env, stack)  # fmt: skip
        pin(before.pid, relay_cpus)
    # "direct" asks the echo server for the very URL the proxy opens upstream.
    modes = {
        "direct": (f"ws://127.0.0.1:{echo.port}{GATEWAY_PREFIX}{WS_PATH}", "echo"),
        "bare": (f"ws://127.0.0.1:{bare.port}{WS_PATH}", "relay"),
        "proxy": (f"ws://127.0.0.1:{proxy.port}{WS_PATH}", "relay"),
    }
    pids = {"direct": echo.pid, "bare": bare.pid, "proxy": proxy.pid}
    if before is not None:
        modes["before"] = (f"ws://127.0.0.1:{before.port}{WS_PATH}", "relay")
        pids["before"] = before.pid
    modes = {name: modes[name] for name in args.modes}
    me = os.getpid()
    results: dict[str, Any] = {name: {"rounds": []} for name in modes}
    if "proxy" in modes:
        results["proxy"]["baseline_rss_mib"] = status_kib(proxy.pid, "VmRSS") / 1024
    small = small_frame()
    big = os.urandom(BIG)
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

    names = list(modes)

    def run(coro: Any) -> dict[str, Any]:
        result: dict[str, Any] = runner.run(interruptible(coro))
        return result

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                url, role = modes[name]
                watch = {role: pids[name], "echo": echo.pid, "client": me}
                step(f"ws {name}: round {round_ + 1}/{args.rounds}")
                results[name]["rounds"].append({
                    "small": run(pipelined(url, small, WINDOW, args.msgs_s, watch)),
                    "small_latency": run(sequential(url, small, args.latency_s)),
                    "big": run(pipelined(url, big, BIG_WINDOW, args.big_s, watch)),
                    "big_latency": run(sequential(url, big, args.big_latency_s)),
                })  # fmt: skip
    if "proxy" in modes:
        results["proxy"]["rss_after_mib"] = status_kib(proxy.pid, "VmRSS") / 1024
        results["proxy"]["peak_rss_mib"] = status_kib(proxy.pid, "VmHWM") / 1024
    results["small_bytes"] = len(small)
    return results


# -- report -----------------------------------------------------------------------------

# (label, part of a round, key, number format)
MEASURES = [
    ("small: messages/s, 64 in flight", "small", "msgs_per_s", ".0f"),
    ("small: CPU µs per message", "small", "cpu", ".1f"),
    ("small: round trip p50 µs", "small_latency", "p50_us", ".0f"),
    ("small: round trip p99 µs", "small_latency", "p99_us", ".0f"),
    ("1 MiB: messages/s, 4 in flight", "big", "msgs_per_s", ".0f"),
    ("1 MiB: CPU µs per message", "big", "cpu", ".0f"),
    ("1 MiB: round trip p50 µs", "big_latency", "p50_us", ".0f"),
    ("1 MiB: round trip p99 µs", "big_latency", "p99_us", ".0f"),
]


def value(mode: str, round_: dict[str, Any], part: str, key: str) -> float:
    if key == "cpu":  # the relay's own CPU; direct: the echo server's
        key = "echo_cpu_us_per_msg" if mode == "direct" else "relay_cpu_us_per_msg"
    return float(round_[part][key])


def added(results: dict[str, Any], mode: str, part: str, key: str) -> list[float]:
    """Per round: ``mode``'s latency minus direct's in the same round."""
    pairs = zip(results[mode]["rounds"], results["direct"]["rounds"], strict=True)
    return [r[part][key] - d[part][key] for r, d in pairs]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Medians, spreads and the per-round proxy/bare ratios, for the table and the JSON."""
    modes = [m for m in MODES if m in results]
    out: dict[str, Any] = {}
    for label, part, key, _ in MEASURES:
        row: dict[str, Any] = {}
        for mode in modes:
            values = [value(mode, r, part, key) for r in results[mode]["rounds"]]
            row[mode] = {"median": statistics.median(values), "min": min(values),
                         "max": max(values)}  # fmt: skip
        for relay, prefix in (("proxy", ""), ("before", "before_")):
            if "bare" in modes and relay in modes:
                ratios = [value(relay, p, part, key) / value("bare", b, part, key)
                          for p, b in zip(results[relay]["rounds"], results["bare"]["rounds"],
                                          strict=True)]  # fmt: skip
                row[f"{prefix}ratio"] = spread(ratios)
        if "direct" in modes and part.endswith("latency"):
            for mode in modes[1:]:
                row[f"{mode}_added"] = spread(added(results, mode, part, key))
            for relay, prefix in (("proxy", ""), ("before", "before_")):
                if "bare" in modes and relay in modes:
                    pa, ba = added(results, relay, part, key), added(results, "bare", part, key)
                    row[f"{prefix}added_ratio"] = spread(
                        [p / b if b > 0 else float("inf") for p, b in zip(pa, ba, strict=True)]
                    )
        out[label] = row
    return out


def report(results: dict[str, Any], meta: dict[str, Any]) -> str:
    summary = summarize(results)
    results["summary"] = summary
    modes = [m for m in MODES if m in results]
    both = "bare" in modes and "proxy" in modes

    def cell(stat: dict[str, float], spec: str) -> str:
        if meta["rounds"] == 1:
            return f"{stat['median']:{spec}}"
        return f"{stat['median']:{spec}} ({stat['min']:{spec}}–{stat['max']:{spec}})"

    compared = both and "before" in modes
    head = ["WebSocket relay", *modes]
    if compared:
        head += ["before / bare"]
    if both:
        head += ["proxy / bare", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    verdicts: list[tuple[str, float, bool]] = []
    for label, part, key, spec in MEASURES:
        row = summary[label]
        cells = [label, *(cell(row[m], spec) for m in modes)]
        if compared:
            cells.append(cell(row["before_ratio"], ".2f"))
        if both:
            r = row["ratio"]["median"]
            judged = key == "cpu"
            ok = r <= TARGET
            cells += [f"{cell(row['ratio'], '.2f')}", f"≤ {TARGET}×" if judged else "",
                      ("yes" if ok else "**no**") if judged else ""]  # fmt: skip
            if judged:
                verdicts.append((label, r, ok))
        lines.append("| " + " | ".join(cells) + " |")
        if part.endswith("latency") and "direct" in modes:
            which = key[:3]
            cells = [
                f"{label.split(':')[0]}: added {which} µs (relay − direct)",
                "",
                *(cell(row[f"{m}_added"], "+.0f") for m in modes if m != "direct"),
            ]
            if compared:
                cells.append(cell(row["before_added_ratio"], ".2f"))
            if both:
                r = row["added_ratio"]["median"]
                judged = which == "p99"
                ok = r <= TARGET
                cells += [cell(row["added_ratio"], ".2f"), f"≤ {TARGET}×" if judged else "",
                          ("yes" if ok else "**no**") if judged else ""]  # fmt: skip
                if judged:
                    verdicts.append((cells[0], r, ok))
            lines.append("| " + " | ".join(cells) + " |")

    def pct(x: float) -> str:
        return f"{x * 100:.0f}%"

    def each(mode: str, part: str) -> str:
        return ", ".join(f"{r[part]['msgs_per_s']:.0f}" for r in results[mode]["rounds"])

    lines += [
        "",
        f"- {meta['cpu']}, {meta['cpus']} CPUs; {meta['pinning']}. Python {meta['python']}, "
        f"websockets {meta['websockets']}, uvicorn {meta['uvicorn']}, uvloop {meta['uvloop']}.",
        f"- {meta['rounds']} rounds, modes alternating (order rotated each round); each cell "
        "the median over rounds (min–max); ratios are per round, proxy against bare in the "
        "same round, then their median. A message is one frame to the echo server and its "
        "echo back: a relay relays 2 frames per message. CPU: the relay process's "
        "utime+stime (/proc/<pid>/task/*/schedstat) over the messages; direct: the echo "
        "server's. Latency added: relay minus direct in the same round.",
        f"- small = a {results['small_bytes']}-byte msgpack frame shaped like fal's realtime "
        f"input ({meta['msgs_seconds']} s with {WINDOW} in flight, then {meta['latency_seconds']} "
        f"s sequential); 1 MiB = random bytes ({meta['big_seconds']} s with {BIG_WINDOW} in "
        f"flight, {meta['big_latency_seconds']} s sequential). Every echo was compared with "
        "what was sent, byte for byte (and is a binary frame).",
    ]  # fmt: skip
    for mode in modes:
        line = f"- {mode}: small messages/s per round {each(mode, 'small')}"
        if mode != "direct":
            utils = [r["small"]["relay_cpu_util"] for r in results[mode]["rounds"]]
            line += f"; relay CPU busy {', '.join(pct(u) for u in utils)} during them"
        lines.append(line + f"; 1 MiB messages/s {each(mode, 'big')}.")
    if "direct" in modes:
        d = results["direct"]["rounds"]
        shared = statistics.median(
            [r["small"]["echo_cpu_util"] + r["small"]["client_cpu_util"] for r in d]
        )
        lines.append(
            f"- Direct's echo server and client share one CPU ({pct(shared)} busy together "
            "during the small-message runs), so direct's messages/s is bound by it; relays "
            "near 100% busy are bound by their own CPU."
        )
    if "proxy" in modes:
        p = results["proxy"]
        lines.append(
            f"- Proxy RSS: {p['baseline_rss_mib']:.0f} MiB after start-up, "
            f"{p['rss_after_mib']:.0f} MiB after the runs, peak {p['peak_rss_mib']:.0f} MiB."
        )
    for label, r, ok in verdicts:
        lines.append(
            f"- Target {label.strip()}: proxy ≤ {TARGET}× bare: {r:.2f}×, "
            + ("met." if ok else f"**not met**, by {(r / TARGET - 1) * 100:.0f}% over the target.")
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (~15 s)")
    parser.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help="rounds of every mode, medians reported (default 5, 1 with --quick)",
    )
    parser.add_argument("--modes", default=",".join(MODES),
                        help="which of direct,bare,proxy to run (default all)")  # fmt: skip
    parser.add_argument("--compare", type=Path, metavar="DIR",
                        help="also run, as mode 'before', the proxy package in DIR (from e.g. "
                             "git archive REV proxy | tar -x -C DIR)")  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)  # the child
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    wanted = args.modes.split(",") + (["before"] if args.compare else [])
    args.modes = [m for m in MODES if m in wanted and (m != "before" or args.compare)]
    if not args.modes:
        parser.error(f"--modes: any of {','.join(MODES)}")
    return args


def package_version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None, cpus: list[int] | None = None) -> int:
    """``cpus``: the CPUs to lay the processes out on (default: this process's affinity)."""
    args = parse_args(argv)
    if args.serve_echo:
        serve_echo()
        return 0
    # For bench_common and procfs (imported where needed, so the --serve-echo child stays lean).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import BenchError, cpu_model
    from websockets.exceptions import WebSocketException

    args.rounds = args.rounds or (1 if args.quick else 5)
    args.msgs_s = 1.0 if args.quick else 3.0
    args.latency_s = 1.0 if args.quick else 2.0
    args.big_s = 0.5 if args.quick else 2.0
    args.big_latency_s = 0.5 if args.quick else 2.0

    cpus = sorted(cpus or os.sched_getaffinity(0))
    if len(cpus) >= 2:
        relay_cpus = {cpus[0]}
        os.sched_setaffinity(0, set(cpus[1:]))  # the echo server inherits this
        others = ",".join(map(str, cpus[1:]))
        pinning = f"proxy and bare relay on CPU {cpus[0]}; echo server and client on CPU {others}"
    else:
        relay_cpus = set(cpus)
        pinning = "NOT pinned: only one CPU available, everything shares it"
    meta = {
        "cpu": cpu_model(), "cpus": len(cpus), "pinning": pinning,
        "python": platform.python_version(),
        "websockets": package_version("websockets"), "uvicorn": package_version("uvicorn"),
        "uvloop": package_version("uvloop"),
        "rounds": args.rounds, "msgs_seconds": args.msgs_s, "latency_seconds": args.latency_s,
        "big_seconds": args.big_s, "big_latency_seconds": args.big_latency_s,
        "quick": args.quick, "modes": args.modes,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    try:
        with contextlib.ExitStack() as stack:  # stops the children
            results = measure(args, relay_cpus, stack)
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
