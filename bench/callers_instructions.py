#!/usr/bin/env python3
"""Per-caller cost counted, not timed: instructions and cache misses per request at 1 caller
and at 100,000, under valgrind's callgrind.

``bench/callers.py`` times the proxy's CPU per request at 100,000 callers against 1 caller;
on a shared VM single rounds of that ratio spread from 0.99× to 1.32× with the same code, so
a 15 % target cannot be judged from them alone. What more callers can cost a request is
more work (a cache that misses, a bigger structure to walk) or slower memory (the callers'
state no longer in the CPU's caches). Callgrind counts the first exactly, and simulates the
second: its cache model (the host's sizes) counts the last-level misses a request makes.

Each row (callers × auth × backend, configured as ``bench/callers.py`` configures them: every
limit, quota and budget on, none reached) is a fresh ``python -m proxy`` under
``valgrind --tool=callgrind --cache-sim=yes``, instrumentation off while it is warmed (caller
0, then every caller once); then on, ``--requests`` POSTs taking the callers round-robin are
counted. Redis runs outside valgrind: its side is not counted.

Usage: ``.venv/bin/python bench/callers_instructions.py [--callers 1,100000]
[--auth jwt,token] [--backend memory,redis] [--requests N]`` (``make bench`` runs it; the
four pairs take about 35 minutes, the 100,000-caller warm-ups most of it). Needs valgrind
and, for the redis rows, redis-server; Linux. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# bench/ is sys.path[0]: bench/bench_common.py, bench/callers.py, bench/instructions.py.
from bench_common import (
    GATEWAY_PREFIX,
    ROOT,
    BenchError,
    cpu_model,
    script_calls,
    start_child,
    start_redis,
    step,
)
from callers import (
    APP_PATH,
    AUTHS,
    BACKENDS,
    TARGET_SCALE,
    Credentials,
    _choices,
    _counts,
    base_env,
    drive,
    row_env,
)
from instructions import START_SECONDS, callgrind_control, dumped_events

CONNECTIONS = 16
# The last-level cache simulated, fixed rather than the host's (valgrind reads a server's
# whole L3, 256 MiB direct-mapped on the bench machine, where one core sees its complex's):
# 32 MiB, 16-way, 64-byte lines, an EPYC core complex's L3. On a shared host the proxy's
# share of it is smaller, so these misses are a floor.
LAST_LEVEL = "33554432,16,64"
WARM_CAP = 1800.0  # s: warming 100,000 callers under valgrind takes 4 (token) to 10 minutes


def count_row(n: int, auth: str, backend: str, ctx: dict[str, Any], args: argparse.Namespace
              ) -> dict[str, Any]:  # fmt: skip
    """One row: a fresh proxy under callgrind, warmed, then ``args.requests`` counted."""
    tmp: Path = ctx["tmp"]
    creds: Credentials = ctx["creds"]
    _wrk_file, auth_env = creds.files(auth, n)
    tokens = creds.tokens(auth, n)
    env = row_env(ctx["env"], ctx["gateway_url"], auth_env)
    if backend == "redis":
        ctx["redis"].flushall()
        env["FAL_PROXY_REDIS_URL"] = ctx["redis_url"]
    out = tmp / f"proxy-{n}-{auth}-{backend}.callgrind"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--cache-sim=yes",
                f"--LL={LAST_LEVEL}", f"--callgrind-out-file={out}"]  # fmt: skip
    name = f"{n:,} callers, {auth}, {backend}"
    with contextlib.ExitStack() as stack:
        child = start_child(f"proxy ({name})", [*valgrind, sys.executable, "-m", "proxy",
                            "--port", "0"], env, stack, START_SECONDS)  # fmt: skip
        url = f"http://127.0.0.1:{child.port}{APP_PATH}"
        step(f"{name}: warming caller 0, then each of the {n:,} callers once (not counted)")
        warm = [drive(url, tokens[:1] * 300, CONNECTIONS, WARM_CAP),
                drive(url, tokens, CONNECTIONS, args.warmup_cap)]  # fmt: skip
        if any(w["non_2xx"] or w["errors"] for w in warm):
            raise BenchError(f"{name}: the warm-up was refused or failed: {warm}")
        warmed = warm[1]["requests"]
        # The callers in the order wrk would take them, past the ones just used for warming
        # the instrumented code: every counted request is a caller not seen for a while.
        order = [tokens[i % warmed] for i in range(300, 300 + 300 + args.requests)]
        callgrind_control(child.pid, "--instr=on")
        drive(url, order[:300], CONNECTIONS, WARM_CAP)
        callgrind_control(child.pid, "--zero")
        step(f"{name}: {args.requests:,} requests counted")
        calls = script_calls(ctx["redis"]) if backend == "redis" else 0
        done = drive(url, order[300:], CONNECTIONS, WARM_CAP)
        callgrind_control(child.pid, "--dump=measured")
        calls = script_calls(ctx["redis"]) - calls if backend == "redis" else 0
        if done["requests"] != args.requests or done["non_2xx"] or done["errors"]:
            raise BenchError(f"{name}: counted requests failed: {done}")
    events = dumped_events(out, "measured")
    per = {k: v / args.requests for k, v in events.items()}
    caches = re.findall(r"^desc: (I1|D1|LL) cache:\s*(.*)$", _dump_head(out), re.M)
    return {
        "callers": n, "auth": auth, "backend": backend, "warmed": warmed,
        "instructions": per["Ir"],
        "ll_misses": per.get("DLmr", 0.0) + per.get("DLmw", 0.0) + per.get("ILmr", 0.0),
        "d1_misses": per.get("D1mr", 0.0) + per.get("D1mw", 0.0),
        "caches": dict(caches),
        # The admits of one loop turn share a script call: how many did is timing (how
        # fast Redis answers against the proxy under valgrind), and moves the count.
        "admits_per_call": args.requests / calls if calls else None,
    }  # fmt: skip


def _dump_head(out: Path) -> str:
    """The start of callgrind's first dump next to ``out``: its cache model's sizes."""
    for dump in sorted(out.parent.glob(f"{out.name}*")):
        with dump.open(errors="replace") as f:
            return f.read(4096)
    return ""


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"## Per-caller cost counted (callgrind, {cpu_model()})",
        "",
        "| auth | backend | callers | instructions per request | last-level cache misses "
        "per request | L1 data misses per request | admits per Redis call "
        "| instructions ÷ 1 caller | target | met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for row in rows:
        one = next((r for r in rows if r["callers"] == 1 and r["auth"] == row["auth"]
                    and r["backend"] == row["backend"]), None)  # fmt: skip
        callers = f"{row['callers']:,}"
        if row["warmed"] != row["callers"]:
            callers += f" ({row['warmed']:,} warmed)"
        ratio = target = met = ""
        batch = f"{row['admits_per_call']:.1f}" if row.get("admits_per_call") else ""
        if one is not None and row["callers"] > 1:
            r = row["instructions"] / one["instructions"]
            ratio, target = f"{r:.3f}×", f"≤ {TARGET_SCALE:.2f}×"
            met = "yes" if r <= TARGET_SCALE else "**no**"
        lines.append(
            f"| {row['auth']} | {row['backend']} | {callers} | {row['instructions']:,.0f} "
            f"| {row['ll_misses']:,.1f} | {row['d1_misses']:,.0f} | {batch} | {ratio} | {target} "
            f"| {met} |"
        )
    caches = rows[0]["caches"] if rows else {}
    lines += [
        "",
        f"- {args.requests:,} POSTs counted per row, the callers round-robin, {CONNECTIONS} at "
        "a time, after every caller's first request (not counted); each row a fresh process "
        "under valgrind --tool=callgrind --cache-sim=yes; user-space only (the kernel's side "
        "of a system call, and Redis, are not counted).",
        f"- The simulated caches: {', '.join(f'{k} {v}' for k, v in caches.items()) or '?'}. "
        "A miss is counted, not timed: at ~100 ns each on this kind of host, 100 more misses "
        "per request would be about 10 µs.",
        "- With Redis, the admits of one turn of the proxy's event loop share one script call, "
        "and the fewer share it, the more instructions each costs: how many do is timing "
        "(Redis runs at full speed, the proxy under valgrind), so the Redis rows are less "
        "exact than the memory rows; the admits per call say how far.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=_counts, default=[1, 100_000],
                        help="comma-separated caller counts (default 1,100000)")  # fmt: skip
    parser.add_argument("--auth", type=_choices(AUTHS), default=list(AUTHS),
                        help="comma-separated: jwt, token (default both)")  # fmt: skip
    parser.add_argument("--backend", type=_choices(BACKENDS), default=list(BACKENDS),
                        help="comma-separated: memory, redis (default both)")  # fmt: skip
    parser.add_argument("--requests", type=int, default=2000, help="counted per row")
    parser.add_argument("--warmup-cap", type=float, default=WARM_CAP,
                        help="seconds at most for every caller's first request")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench: valgrind not found; install it: apt-get install -y valgrind", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    try:
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fal-callers-cg-")))
            env = base_env(tmp)
            gateway = start_child("fake gateway", [sys.executable, str(ROOT / "bench" /
                                  "fast_gateway.py"), "--port", "0"], env, stack)  # fmt: skip
            ctx: dict[str, Any] = {
                "tmp": tmp, "env": env, "creds": Credentials(tmp, max(args.callers)),
                "gateway_url": f"http://127.0.0.1:{gateway.port}{GATEWAY_PREFIX}",
            }  # fmt: skip
            if "redis" in args.backend:
                ctx["redis"] = client = start_redis(tmp / "redis.log", stack)
                stack.callback(client.close)
                ctx["redis_url"] = f"redis://127.0.0.1:{client.get_connection_kwargs()['port']}/0"
            for backend in args.backend:
                for auth in args.auth:
                    for n in sorted(args.callers):
                        rows.append(count_row(n, auth, backend, ctx, args))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        if rows:
            print(report(rows, args))
        return 1
    print(report(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
