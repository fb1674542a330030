#!/usr/bin/env python3
"""Instructions per small request: the proxy against the bare aiohttp forwarder, counted.

CPU time per request swings ±20–30 % between minutes on a shared VM, more than the cuts it
is meant to judge; the machine instructions a request executes do not. Each forwarder
(``python -m proxy`` configured as ``bench/run.py``'s main row: JSON log line, limits on but
never reached; and ``bench/baselines.py`` with aiohttp) runs under valgrind's callgrind in
front of ``bench/fast_gateway.py``; after ``--warmup`` requests its counters are zeroed,
``--requests`` POSTs of ``{"prompt":"cat"}`` go through it (8 at a time), and the
instructions it executed meanwhile, divided by the requests, is its figure. Rounds
alternate between the two; the ratio is the median's. The same run of the same code gives
the same figure within about 1 %.

An instruction count is not CPU time: a cache miss or a system call costs more than its
instructions (the kernel's side is not counted at all), so read it beside ``bench/run.py``'s
CPU rows, as the figure that does not move with the host. The guard for "the proxy's CPU
per request ≤ 1.3× the bare forwarder's".

Usage: ``.venv/bin/python bench/instructions.py [--rounds N] [--requests N]``. Needs
valgrind (``apt-get install -y valgrind``); Linux. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

# bench/ is sys.path[0]: bench/bench_common.py.
from bench_common import (
    GATEWAY_PREFIX,
    ROOT,
    BenchError,
    cpu_model,
    proxy_row_env,
    start_child,
    step,
)

TARGET = 1.30  # the proxy's instructions per request ≤ this × the bare forwarder's
CONCURRENCY = 8
BODY = b'{"prompt":"cat"}'
START_SECONDS = 300.0  # a Python start-up under callgrind takes tens of seconds


async def _post(url: str, count: int) -> None:
    left = count

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            headers = {"content-type": "application/json"}
            async with session.post(url, data=BODY, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise BenchError(f"{url}: status {response.status}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))


def callgrind_control(pid: int, *args: str) -> None:
    """Tell the callgrind running ``pid`` to ``--zero``, ``--dump=NAME``, ``--instr=on``..."""
    out = subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    if out.returncode != 0:
        raise BenchError(f"callgrind_control {' '.join(args)}: {out.stdout}{out.stderr}")


def dumped_events(out: Path, trigger: str) -> dict[str, int]:
    """The event totals (``Ir``, and with ``--cache-sim=yes`` the misses) of the dump that
    ``callgrind_control --dump=<trigger>`` wrote next to ``out`` (``--callgrind-out-file``)."""
    for dump in sorted(out.parent.glob(f"{out.name}*")):
        text = dump.read_text(errors="replace")
        if f"Trigger: dump {trigger}\n" not in text[:4096]:
            continue
        events = re.search(r"^events:\s+(.*)$", text, re.M)
        totals = re.search(r"^(?:summary|totals):\s+(.*)$", text, re.M)
        if events is not None and totals is not None:
            names, values = events.group(1).split(), map(int, totals.group(1).split())
            return dict(zip(names, values, strict=False))
    raise BenchError(f"no callgrind dump named {trigger!r} next to {out}")


def count(which: str, gateway_url: str, args: argparse.Namespace, tmp: Path) -> float:
    """Instructions per request of one forwarder, started afresh under callgrind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "CF_"))}
    env["PYTHONUNBUFFERED"] = "1"
    if which == "proxy":
        argv = [sys.executable, "-m", "proxy", "--port", "0"]
        env = proxy_row_env(env, gateway_url)
    else:
        argv = [sys.executable, str(ROOT / "bench" / "baselines.py"), "--port", "0"]
        env |= {"BENCH_GATEWAY_URL": gateway_url, "BENCH_CLIENT": "aiohttp"}
    out = tmp / f"{which}-{time.monotonic_ns()}.callgrind"
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    with contextlib.ExitStack() as stack:
        child = start_child(which, [*valgrind, *argv], env, stack, START_SECONDS)
        url = f"http://127.0.0.1:{child.port}/fal-ai/fast-sdxl"
        asyncio.run(_post(url, args.warmup))
        callgrind_control(child.pid, "--zero")
        asyncio.run(_post(url, args.requests))
        callgrind_control(child.pid, "--dump=measured")
    return dumped_events(out, "measured")["Ir"] / args.requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, alternating")
    parser.add_argument("--requests", type=int, default=1000, help="counted per run")
    parser.add_argument("--warmup", type=int, default=300, help="requests before counting")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench: valgrind not found; install it: apt-get install -y valgrind", file=sys.stderr)
        return 2
    per: dict[str, list[float]] = {"bare": [], "proxy": []}
    try:
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fal-instr-")))
            env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "CF_"))}
            gateway = start_child("fake gateway", [sys.executable, str(ROOT / "bench" /
                                  "fast_gateway.py"), "--port", "0"], env, stack)  # fmt: skip
            gateway_url = f"http://127.0.0.1:{gateway.port}{GATEWAY_PREFIX}"
            for r in range(args.rounds):
                for which in ("bare", "proxy"):
                    step(f"instructions: {which}, round {r + 1}/{args.rounds}, "
                         f"{args.requests} requests under callgrind")  # fmt: skip
                    per[which].append(count(which, gateway_url, args, tmp))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    bare, proxy = statistics.median(per["bare"]), statistics.median(per["proxy"])
    ratio = proxy / bare
    rounds = lambda xs: " / ".join(f"{x:,.0f}" for x in xs)  # noqa: E731
    print(f"\n## Instructions per small request (callgrind, {cpu_model()})\n")
    print("| forwarder | instructions per request (each round) | median | against bare "
          "| target | met |\n|---|---|---:|---:|---:|:---:|")  # fmt: skip
    print(f"| bare uvicorn + aiohttp | {rounds(per['bare'])} | {bare:,.0f} | 1.00× | | |")
    met = "yes" if ratio <= TARGET else "**no**"
    print(f"| fal-gateway-proxy | {rounds(per['proxy'])} | {proxy:,.0f} | {ratio:.2f}× "
          f"| ≤ {TARGET:.2f}× | {met} |")  # fmt: skip
    print(
        f"\n- {args.requests} POSTs {BODY.decode()} per run after {args.warmup} of warm-up, "
        f"{CONCURRENCY} at a time, at bench/fast_gateway.py; each run a fresh process under "
        "valgrind --tool=callgrind, counters zeroed after the warm-up; user-space "
        "instructions only (the kernel's side of each system call is not counted)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
