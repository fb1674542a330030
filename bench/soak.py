#!/usr/bin/env python3
"""Soak and fault runs: the proxy under many connections and awkward peers, on loopback.

Starts the offline emulator (``python -m proxy emulator``, as fal + the gateway) and
proxies (``python -m proxy --port 0``, JSON logs, a sentinel fal key), then runs these
rows, each bounded in count and time, and prints a Markdown table of expected vs
measured, pass/fail:

* load: 10,000 small POSTs (``emulator/echo``) over 256 connections: ok/errors, req/s,
  p50/p99, the proxy's CPU per request, peak RSS, open fds before/after;
* sse: 1,000 SSE streams open at once, half finished by the upstream and half closed by
  their clients; RSS and fds with all open, fds back to the baseline afterwards;
* ws: 300 WebSockets bridged at once, a few messages each, closed 1000 both ways;
* refused: the gateway's port refuses connections (502, fast);
* silent: the gateway never answers (``emulator/hang``, first-byte timeout 1 s: 504);
* die: the gateway resets mid-body (``emulator/die``): the client sees a cut, not an end;
* leave: clients leave mid-stream and before the headers: the upstream sees every one;
* uploads: slow uploads complete, stalled ones get 408 (idle timeout 1 s);
* headers: slow header senders (1 byte/s) with ``FAL_PROXY_HEADER_TIMEOUT=2``;
* slots: after those faults, every concurrency slot is free (128 × 504, then one 429);
* sigterm: SIGTERM with streams and sockets in flight (``FAL_PROXY_DRAIN_SECONDS=10``);
* expiry: SIGTERM with streams that outlive the drain: cut, exit 0.

After every row each proxy still running must answer ``GET /healthz`` 200 with its
in-flight and open-WebSocket gauges back to 0, and no proxy
may have answered or logged a 500, logged a traceback, or logged the fal key (its whole
output is scanned for the sentinel).

Usage: ``.venv/bin/python bench/soak.py [--quick] [--json PATH] [--only ROW,...]
[--timeout S] [--sse N] [--ws N]`` (or ``make soak SOAK_ARGS=...``); ``--sse``/``--ws`` set
the sse and ws rows' counts (``bench/run.py`` uses them for its concurrency rows). Exit
status 1 when a row fails, 2 when the run could not be set up, 124 on the hard timeout.
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import resource
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import uvloop
from soak_faults import (
    FAULT_SLOTS,
    free_closed_port,
    row_die,
    row_drain_expiry,
    row_leave,
    row_refused,
    row_sigterm,
    row_silent,
    row_slots,
    row_slow_headers,
    row_uploads,
)
from soak_rows import (
    FIRST_BYTE_TIMEOUT,
    FULL,
    HEADER_TIMEOUT,
    IDLE_TIMEOUT,
    QUICK,
    Ctx,
    Row,
    metric,
    row_load,
    row_sse,
    row_ws,
)
from soak_support import (
    HOST,
    ROOT,
    Child,
    SoakError,
    child_env,
    fd_count,
    http_request,
    stop_all_children,
)

ROWS = [  # key, function, time budget in seconds (three quarters of it with --quick)
    ("load", row_load, 240),
    ("sse", row_sse, 150),
    ("ws", row_ws, 120),
    ("refused", row_refused, 60),
    ("silent", row_silent, 60),
    ("die", row_die, 60),
    ("leave", row_leave, 60),
    ("uploads", row_uploads, 60),
    ("headers", row_slow_headers, 60),
    ("slots", row_slots, 60),
    ("sigterm", row_sigterm, 90),
    ("expiry", row_drain_expiry, 60),
]
DONE: list[Row] = []  # rows finished so far (printed even on the hard timeout)
CHILDREN: dict[str, Child] = {}  # the proxies, by name, for the report


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (the children inherit it): 1,000 streams
    need ~1,000 fds here, ~2,000 in the proxy and ~1,000 in the emulator."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def header_timeout_known() -> bool:
    """Whether this proxy's settings table (``--help``) lists FAL_PROXY_HEADER_TIMEOUT."""
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    return "FAL_PROXY_HEADER_TIMEOUT" in out.stdout


PROXY_ENV = {  # every proxy: no per-caller limits (all load comes from one address)
    "FAL_PROXY_LOG_FORMAT": "json",
    "FAL_PROXY_RATE_LIMIT_RPM": "0",
    "FAL_PROXY_MAX_CONCURRENT": "0",
    "FAL_PROXY_SUBMITS_PER_HOUR": "0",
    "FAL_PROXY_ALLOWED_APPS": "emulator/*,fal-ai/fast-sdxl",  # what the rows call
    "FAL_PROXY_HOST": HOST,
}


async def run(args: argparse.Namespace) -> list[Row]:
    sizes = QUICK if args.quick else FULL
    if args.sse is not None:  # bench/run.py's concurrency rows: every stream runs to its end
        sizes = dataclasses.replace(sizes, sse_streams=args.sse, sse_cut=0)
    if args.ws is not None:
        sizes = dataclasses.replace(sizes, ws_sessions=args.ws)
    secret = f"fal-SOAK-SENTINEL-{secrets.token_hex(8)}:{secrets.token_hex(8)}"
    python = sys.executable
    emulator = Child(
        "emulator",
        [
            python,
            "-m",
            "proxy",
            "emulator",
            "--host",
            HOST,
            "--port",
            "0",
            "--key",
            secret,
            "--time-scale",
            "0.05",
        ],
        child_env(FAL_PROXY_LOG_FORMAT="json"),
        secret.encode(),
    ).start()
    await emulator.wait_listening()
    gateway = f"http://{HOST}:{emulator.port}/v1/soak/soak/fal"
    closed = free_closed_port()
    proxies = CHILDREN

    def launch(name: str, **env: str) -> Child:
        full = {**PROXY_ENV, "FAL_KEY": secret, "FAL_PROXY_GATEWAY_URL": gateway, **env}
        proxies[name] = Child(
            name, [python, "-m", "proxy", "--port", "0"], child_env(**full), secret.encode()
        ).start()
        return proxies[name]

    async def start_proxy(name: str, **env: str) -> Child:
        child = launch(name, **env)
        await child.wait_listening()
        return child

    launch("load")
    launch(
        "fault",
        FAL_PROXY_FIRST_BYTE_TIMEOUT=f"{FIRST_BYTE_TIMEOUT:g}",
        FAL_PROXY_IDLE_TIMEOUT=f"{IDLE_TIMEOUT:g}",
        FAL_PROXY_HEADER_TIMEOUT=f"{HEADER_TIMEOUT:g}",
        FAL_PROXY_MAX_CONCURRENT=str(FAULT_SLOTS),
    )
    launch(
        "refused", FAL_PROXY_GATEWAY_URL=f"http://{HOST}:{closed.getsockname()[1]}/v1/soak/soak/fal"
    )
    known = await asyncio.to_thread(header_timeout_known)
    for child in list(proxies.values()):
        await child.wait_listening()
    ctx = Ctx(sizes, secret, emulator, proxies, start_proxy, known, spare=[closed])
    await asyncio.sleep(0.5)  # start-up settles (e.g. its own probes' sockets close)
    ctx.fd_baseline = {name: fd_count(child.pid) for name, child in proxies.items()}
    for key, function, budget in ROWS:
        if args.only and key not in args.only:
            continue
        await ctx.clear()
        before = {name: child.snapshot() for name, child in proxies.items()}
        started = time.monotonic()
        budget = budget * (0.75 if args.quick else 1)
        try:
            row = await asyncio.wait_for(function(ctx), budget)
        except TimeoutError:
            row = Row(key, key, f"done within {budget:g} s", "TIMED OUT", False)
        except Exception as exc:
            traceback.print_exc()
            row = Row(key, key, "runs", f"error: {type(exc).__name__}: {exc}", False)
        row.seconds = time.monotonic() - started
        await check_health(proxies, before, row)
        DONE.append(row)
        print(
            f"soak: {row.key:8} {'pass' if row.ok else 'FAIL'} in {row.seconds:5.1f} s: "
            f"{row.measured}",
            file=sys.stderr,
            flush=True,
        )
    return DONE


async def check_health(proxies: dict[str, Child], before: dict[str, Any], row: Row) -> None:
    """After a row: every running proxy answers /healthz 200; none answered or logged a 500,
    logged a traceback, or logged the key (counted over the row, from each proxy's output)."""
    for child in proxies.values():
        if child.alive:
            await child.settle()
    health: dict[str, Any] = {}
    for name, child in proxies.items():
        if child.alive:
            r = await http_request(child.port, "GET", "/healthz", timeout=10)
            health[name] = r.status or r.error
            # Nothing is in flight once a row is over: a gauge left up is a leaked request.
            for gauge in ("fal_proxy_in_flight_requests", "fal_proxy_open_websockets"):
                value = await metric(child.port, gauge)
                if value:
                    health[name] = f"{gauge} {value:g}"
        else:
            health[name] = f"exited {child.proc.returncode}"
    fives = tracebacks = leaks = 0
    samples: list[str] = []
    for name, child in proxies.items():
        now, then = child.snapshot(), before.get(name)
        fives += now.fives - (then.fives if then else 0)
        tracebacks += now.tracebacks - (then.tracebacks if then else 0)
        leaks += now.leaks - (then.leaks if then else 0)
        if fives or tracebacks or leaks:
            samples += [f"{name} proxy, {s}" for s in child.samples]
    unhealthy = {n: h for n, h in health.items() if h != 200 and not str(h).startswith("exited 0")}
    row.after = (
        f"healthz {unhealthy if unhealthy else '200'} · 500s {fives} · "
        f"tracebacks {tracebacks} · key {leaks}"
    )
    row.details["after"] = {
        "healthz": health,
        "fives": fives,
        "tracebacks": tracebacks,
        "key_leaks": leaks,
        "samples": samples[:10],
    }
    if unhealthy or fives or tracebacks or leaks:
        row.ok = False


def table(rows: list[Row]) -> str:
    out = [
        "| # | row | expected | measured | after the row | result |",
        "|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(rows, 1):
        cells = [
            str(i),
            row.title,
            row.expected,
            row.measured,
            row.after,
            "pass" if row.ok else "**FAIL**",
        ]
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(out)


def report(rows: list[Row], args: argparse.Namespace, meta: dict[str, Any]) -> None:
    print()
    print(
        f"## Soak ({'quick' if args.quick else 'full'}), {meta['started']}, {meta['wall_s']:.0f} s"
    )
    print()
    print(table(rows))
    print()
    print(
        f"{sum(r.ok for r in rows)}/{len(rows)} rows pass. Host: {meta['cpus']} CPUs, load average "
        f"{meta['loadavg']}; Python {meta['python']}; RLIMIT_NOFILE {meta['nofile']}. "
        f"Only {HOST} was contacted."
    )
    complaints = {name: child.complaints for name, child in CHILDREN.items() if child.complaints}
    if complaints:
        print(
            "\nProxy log lines at warning level or above, besides request lines "
            "(count, level, event):"
        )
        for name, counter in complaints.items():
            for (level, event), count in counter.most_common(8):
                print(f"- {name}: {count}× {level}: {event}")
    for row in rows:
        for sample in row.details.get("after", {}).get("samples", [])[:3]:
            print(f"- row {row.key}: {sample[:300]}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta["complaints"] = {
            name: [[level, event, count] for (level, event), count in counter.items()]
            for name, counter in complaints.items()
        }
        payload = {
            "meta": meta,
            "rows": [
                {
                    "key": r.key,
                    "title": r.title,
                    "expected": r.expected,
                    "measured": r.measured,
                    "after": r.after,
                    "ok": r.ok,
                    "seconds": r.seconds,
                    "details": r.details,
                }
                for r in rows
            ],
        }
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"\nJSON: {path}")


def watchdog(seconds: float) -> threading.Timer:
    """The hard stop: print what is done, kill every child, exit 124, whatever the loop is doing."""

    def fire() -> None:
        print(f"\nsoak: hard timeout after {seconds:g} s: stopping", file=sys.stderr, flush=True)
        stop_all_children(grace=2)
        if DONE:
            print(table(DONE), flush=True)
        os._exit(124)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller counts: a smoke run of about a minute"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--only",
        type=lambda s: set(s.split(",")),
        default=None,
        help="comma-separated rows: " + ",".join(k for k, _, _ in ROWS),
    )
    parser.add_argument(
        "--sse",
        type=int,
        metavar="N",
        help="the sse row's streams, all finished by the upstream (none cut)",
    )
    parser.add_argument("--ws", type=int, metavar="N", help="the ws row's sessions")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="hard limit for the whole run, seconds (default 600; 180 with --quick)",
    )
    args = parser.parse_args()
    if args.only and not args.only <= {k for k, _, _ in ROWS}:
        parser.error(f"unknown rows: {', '.join(sorted(args.only - {k for k, _, _ in ROWS}))}")
    soft, _ = raise_nofile()
    timer = watchdog(args.timeout or (180 if args.quick else 600))
    for sig in (signal.SIGTERM, signal.SIGHUP):  # as Ctrl-C: the clean-up below runs
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    started = time.time()
    try:
        rows = uvloop.run(run(args))
    except SoakError as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return 2
    finally:
        stop_all_children()
        timer.cancel()
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "wall_s": time.time() - started,
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "nofile": soft,
    }
    report(rows, args, meta)
    return 0 if rows and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        sys.exit(130)
