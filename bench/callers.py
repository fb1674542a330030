#!/usr/bin/env python3
"""How the proxy's per-caller machinery scales with the number of distinct callers.

Caller auth (``jwt``: HS256 with a distinct ``sub`` per caller; ``token``: a tokens file
of N lines), rate limits, the submit cap, the concurrency slot, quotas and budgets (with
prices) are all on, with limits so high that nothing is ever refused, in memory or in a
``redis-server`` this script starts on a free loopback port. For each row (N callers ×
auth × backend) a proxy of its own (``python -m proxy --port 0``, JSON logs) is started
against the fast fake gateway (``bench/fast_gateway.py``) and:

1. a few thousand requests from caller 0 warm the code paths and connections; RSS;
2. every one of the N callers sends one request (an aiohttp client, 64 at a time), capped
   at ``--warmup-cap`` seconds for the rows whose auth is too slow for that; RSS again, so
   the difference over the callers warmed is the proxy's memory per idle caller;
3. once every row of that auth and backend is up and warm (they stay up together; with
   Redis each has a database of its own), ``--rounds`` rounds: in each, ``wrk`` POSTs
   ``{"prompt":"cat"}`` to ``/fal-ai/fast-sdxl`` (a generation: every window and quota
   counts it) through each row's proxy in turn, the order rotated each round, for
   ``--seconds``, 64 connections, its Lua script taking the N credentials round-robin, one
   per request; the proxy's CPU (utime + stime of all its threads, /proc) over the
   requests completed, and the share of threads other than the main one. The rows set
   against each other (100,000 callers against 1) are measured moments apart, and their
   ratio is the median of the rounds' ratios: the host's speed drifts between minutes;
4. once the proxy is quiet, its CPU use over 5 idle seconds (should be 0).

The proxy is pinned to one CPU, everything else (fake gateway, redis-server, wrk, this
script) to another, as in ``bench/run.py``. A Markdown table of every row follows, then
the targets: CPU per request at 100,000 callers ≤ 1.15× that at 1 caller, redis ≤ 1.5×
memory, idle CPU 0, < 1 KiB per idle caller.

Usage: ``.venv/bin/python bench/callers.py [--callers 1,100000] [--auth jwt,token]
[--backend memory,redis] [--seconds S] [--rounds R] [--warmup-cap S] [--quick]
[--json PATH]``
(or ``make bench-callers BENCH_ARGS=...``). Needs ``wrk`` and ``redis-server`` (for the
redis rows); Linux only (/proc). Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import redis

# bench/ is sys.path[0]: these are bench/bench_common.py and bench/procfs.py.
from bench_common import (
    GATEWAY_PREFIX,
    ROOT,
    BenchError,
    Child,
    cpu_model,
    pin,
    script_calls,
    start_child,
    start_redis,
    step,
)
from procfs import CLK_TCK, cpu_seconds, cpu_seconds_fine, status_kib

CALLER_COUNTS = (1, 1_000, 10_000, 100_000)
AUTHS = ("jwt", "token")
BACKENDS = ("memory", "redis")
CONNECTIONS, THREADS = 64, 2
APP_PATH = "/fal-ai/fast-sdxl"  # fal.run-shaped: a generation, counted by every window
BODY = b'{"prompt":"cat"}'
AUTH_HEADER = "x-proxy-authorization"  # the default FAL_PROXY_AUTH_HEADER
JWT_SECRET = "bench-callers-hs256-secret-0123456789abcdef"  # ≥ 32 characters
JWT_LIFETIME = 30 * 86400
PREWARM_REQUESTS, PREWARM_CAP = 2000, 10.0  # caller 0 only, before the RSS baseline
GIVE_UP_AFTER = 20.0  # s: a warm-up on course to take longer than its cap stops here
HIGH = "1000000000"
# Every limit, quota and budget on, none ever reached by this load. A budget makes each call
# look up its price and reserve its estimate (FAL_PROXY_PRICES_FILE, written in main()).
LIMITS_ENV = {
    "FAL_PROXY_RATE_LIMIT_RPM": HIGH,
    "FAL_PROXY_SUBMITS_PER_HOUR": HIGH,
    "FAL_PROXY_MAX_CONCURRENT": "1000",
    # Quotas and budgets (older proxies ignore quotas; ones before budgets refuse "$").
    "FAL_PROXY_QUOTAS": f"fal-ai/*={HIGH}/day,*={HIGH}/month,"
    "fal-ai/*=$1000000/day,*=$1000000/month",
}
PRICES = '[prices]\n"fal-ai/fast-sdxl" = 0.0025\n"fal-ai/flux/*" = 0.025\n"*" = 0.01\n'

# Targets (issue 12).
TARGET_SCALE = 1.15  # ≤ CPU/request at the most callers ÷ at 1 caller
TARGET_REDIS = 1.5  # ≤ CPU/request with redis ÷ with memory
TARGET_IDLE_PCT = 0.5  # ≤ % of a CPU while idle after the load ("0"; /proc counts 10 ms ticks)
TARGET_RSS_PER_CALLER = 1024  # < bytes per idle caller

# wrk: one credential per request, round-robin. Thread k (0-based, of T) takes credentials
# k, k+T, k+2T, ... so together the threads go through the list in order. Arguments after
# the URL: the credentials file (one header value a line), T, the header name, the body.
WRK_SCRIPT = r"""
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

local creds, n, pos, step, header, body = {}, 0, 0, 1, nil, nil
local headers = {}

function init(args)
  for line in io.lines(args[1]) do
    n = n + 1
    creds[n] = line
  end
  step, header, body = tonumber(args[2]), args[3], args[4]
  pos = id
  headers["Content-Type"] = "application/json"
end

function request()
  headers[header] = creds[pos % n + 1]
  pos = pos + step
  return wrk.format("POST", nil, headers, body)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nBENCH_JSON {"requests":%d,"duration_us":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"p50_us":%.1f,"p99_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


# -- /proc ------------------------------------------------------------------------------


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """utime + stime of one thread (/proc/<pid>/task/<tid>/stat), in seconds."""
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    return status_kib(pid, "VmRSS") * 1024


def settle(pid: int, limit: float = 30.0) -> float:
    """Wait until the proxy is quiet (< 10% of a CPU over 0.25 s); the seconds it took.

    Requests wrk or the warm-up client left in flight are still being answered for a while
    (up to a second or so when each costs milliseconds).
    """
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = cpu_seconds_fine(pid)
        time.sleep(0.25)
        if cpu_seconds_fine(pid) - before < 0.025:
            break
    return time.monotonic() - started


# -- callers ----------------------------------------------------------------------------


@dataclass
class Credentials:
    """Caller ids and credentials, made once for the most callers asked for; rows slice them."""

    tmp: Path
    most: int
    made: dict[str, list[str]] = field(default_factory=dict)  # auth → tokens

    def tokens(self, auth: str, n: int) -> list[str]:
        if auth not in self.made:
            step(f"{auth}: making {self.most:,} credentials")
            if auth == "jwt":
                exp = int(time.time()) + JWT_LIFETIME
                self.made[auth] = [
                    jwt.encode({"sub": f"caller-{i}", "exp": exp}, JWT_SECRET, algorithm="HS256")
                    for i in range(self.most)
                ]
            else:
                self.made[auth] = [secrets.token_urlsafe(24) for _ in range(self.most)]
        return self.made[auth][:n]

    def files(self, auth: str, n: int) -> tuple[Path, dict[str, str]]:
        """The wrk credentials file (header values) and the proxy's auth settings."""
        tokens = self.tokens(auth, n)
        wrk_file = self.tmp / f"wrk-{auth}-{n}.txt"
        wrk_file.write_text("".join(f"Bearer {t}\n" for t in tokens))
        if auth == "jwt":
            return wrk_file, {"FAL_PROXY_AUTH": "jwt", "FAL_PROXY_JWT_SECRET": JWT_SECRET}
        tokens_file = self.tmp / f"tokens-{n}.txt"
        tokens_file.write_text("".join(f"caller-{i} {t}\n" for i, t in enumerate(tokens)))
        return wrk_file, {
            "FAL_PROXY_AUTH": "token",
            "FAL_PROXY_CLIENT_TOKENS_FILE": str(tokens_file),
        }


# -- load -------------------------------------------------------------------------------


async def _drive(url: str, tokens: Sequence[str], connections: int, cap: float) -> dict[str, Any]:
    statuses: dict[int, int] = {}
    errors: list[str] = []
    todo = iter(tokens)
    started = time.monotonic()
    capped = False

    judged = False

    def hopeless() -> bool:
        """Past the cap, or, judged once after GIVE_UP_AFTER, on course to need more."""
        nonlocal judged
        elapsed = time.monotonic() - started
        if elapsed > cap:
            return True
        if judged or elapsed < GIVE_UP_AFTER:
            return False
        judged = True
        return elapsed * len(tokens) > cap * (sum(statuses.values()) + len(errors))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal capped
        for token in todo:
            if capped or hopeless():
                capped = True
                return
            headers = {"content-type": "application/json", AUTH_HEADER: f"Bearer {token}"}
            try:
                async with session.post(url, data=BODY, headers=headers) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
            except (TimeoutError, aiohttp.ClientError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(min(connections, len(tokens)))))
    done = sum(statuses.values())
    return {
        "requests": done,
        "seconds": time.monotonic() - started,
        "non_2xx": sum(n for status, n in statuses.items() if not 200 <= status < 300),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": len(errors),
        "error_sample": errors[:3],
        "capped": capped,
    }


def drive(url: str, tokens: Sequence[str], connections: int, cap: float) -> dict[str, Any]:
    """Send one request per token, ``connections`` at a time, until done or ``cap`` seconds."""
    return asyncio.run(_drive(url, tokens, connections, cap))


def run_wrk(url: str, script: Path, creds: Path, connections: int, seconds: int) -> dict[str, Any]:
    threads = min(THREADS, connections)
    cmd = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
        "-s", str(script), url, "--", str(creds), str(threads), AUTH_HEADER, BODY.decode(),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    match = re.search(r"^BENCH_JSON (.*)$", out.stdout, re.M)
    if out.returncode != 0 or match is None:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stdout}{out.stderr}")
    result = json.loads(match.group(1))
    if result["requests"] == 0:
        raise BenchError(f"wrk at {url}: no request completed: {out.stdout}")
    return result


class WarningTail(collections.deque[bytes]):
    """A proxy's output tail (what ``Child`` keeps) that also counts its warning and error
    events (request lines aside) by event and error, e.g. why a request got a 503."""

    def __init__(self) -> None:
        super().__init__(maxlen=64)
        self.pending = b""
        self.counts: collections.Counter[str] = collections.Counter()

    def append(self, chunk: bytes) -> None:
        super().append(chunk)
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        for line in lines:
            if b'"request"' in line or not (b"warning" in line or b"error" in line):
                continue
            with contextlib.suppress(ValueError, AttributeError):
                record = json.loads(line)
                if record.get("level") in ("warning", "error", "critical"):
                    error = record.get("error")
                    self.counts[f"{record.get('event')}" + (f": {error}" if error else "")] += 1


# -- one row ----------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    proxy_cpus: set[int]
    env: dict[str, str]
    gateway_url: str
    script: Path
    creds: Credentials
    redis: redis.Redis | None = None
    redis_url: str = ""


@dataclass
class Live:
    """One row's proxy, started and warmed, kept running while its group's rounds go on."""

    name: str
    proxy: Child
    url: str
    wrk_file: Path
    warnings: WarningTail
    row: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)


def run_group(ctx: Context, auth: str, backend: str) -> list[dict[str, Any]]:
    """Every caller count's row for one auth and backend: each row's proxy started and warmed
    in turn and kept running, then ``--rounds`` rounds of ``wrk``, one per proxy a round,
    the order rotated each round, so that the CPU of 100,000 callers is set against that of
    1 caller measured moments apart: on a shared VM the host's speed drifts from one minute
    to the next, and rows measured one after the other set that drift against the callers."""
    if backend == "redis":
        assert ctx.redis is not None
        ctx.redis.flushall()  # every group starts from nothing; each row has a database
    with contextlib.ExitStack() as stack:
        live = [
            start_row(ctx, stack, n, auth, backend, db) for db, n in enumerate(ctx.args.callers)
        ]
        for r in range(ctx.args.rounds):
            turn = live[r % len(live) :] + live[: r % len(live)]
            for row in turn:
                step(f"{row.name}: round {r + 1}/{ctx.args.rounds}, wrk, "
                     f"{ctx.args.connections} connections, {ctx.args.seconds} s")  # fmt: skip
                row.rounds.append(measure(ctx, row))
        for row in live:
            settled = settle(row.proxy.pid)
            step(f"{row.name}: idle, {ctx.args.idle} s (after {settled:.1f} s to settle)")
            idle0 = cpu_seconds(row.proxy.pid)
            time.sleep(ctx.args.idle)
            row.row.update(settle_seconds=settled,
                           idle_cpu_pct=100 * (cpu_seconds(row.proxy.pid) - idle0) / ctx.args.idle,
                           rss_mib=rss_bytes(row.proxy.pid) / (1 << 20))  # fmt: skip
    return [finish(row) for row in live]


def base_env(tmp: Path) -> dict[str, str]:
    """This process's environment for the children, less any FAL_/CF_ setting, with the
    prices file (written to ``tmp``) that the budgets in :data:`LIMITS_ENV` look up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "CF_"))}
    env["PYTHONUNBUFFERED"] = "1"
    prices = tmp / "prices.toml"
    prices.write_text(PRICES)
    env["FAL_PROXY_PRICES_FILE"] = str(prices)  # older proxies ignore it
    return env


def row_env(env: dict[str, str], gateway_url: str, auth_env: dict[str, str]) -> dict[str, str]:
    """A row's proxy: in front of ``gateway_url``, JSON logs, every limit of
    :data:`LIMITS_ENV`, caller auth as ``auth_env`` says."""
    return dict(env, FAL_KEY="k", FAL_PROXY_GATEWAY_URL=gateway_url, FAL_PROXY_LOG_FORMAT="json",
                **LIMITS_ENV, **auth_env)  # fmt: skip


def start_row(ctx: Context, stack: contextlib.ExitStack, n: int, auth: str, backend: str,
              db: int) -> Live:  # fmt: skip
    """Start one row's proxy and warm it: caller 0, then every caller once (RSS around it)."""
    args = ctx.args
    name = f"{n:,} callers, {auth}, {backend}"
    wrk_file, auth_env = ctx.creds.files(auth, n)
    tokens = ctx.creds.tokens(auth, n)
    proxy_env = row_env(ctx.env, ctx.gateway_url, auth_env)
    redis_used = lambda: int(ctx.redis.info("memory")["used_memory"]) if ctx.redis else 0  # noqa: E731
    if backend == "redis":
        proxy_env["FAL_PROXY_REDIS_URL"] = f"{ctx.redis_url}/{db}"
    proxy = start_child(f"proxy ({name})", [sys.executable, "-m", "proxy", "--port", "0"],
                        proxy_env, stack)  # fmt: skip
    pin(proxy.pid, ctx.proxy_cpus)  # every thread; threads started later inherit it
    proxy.tail = warnings = WarningTail()  # the drain thread appends to child.tail
    pid = proxy.pid
    url = f"http://127.0.0.1:{proxy.port}{APP_PATH}"
    try:
        step(f"{name}: warm-up, caller 0, {PREWARM_REQUESTS} requests")
        pre = drive(url, tokens[:1] * PREWARM_REQUESTS, args.connections, PREWARM_CAP)
        settle(pid)
        rss_before, redis_before = rss_bytes(pid), redis_used()
        step(f"{name}: warm-up, one request from each of the {n:,} callers "
             f"(at most {args.warmup_cap:.0f} s)")  # fmt: skip
        warm = drive(url, tokens, args.connections, args.warmup_cap)
        settle(pid)
        rss_warm, redis_warm = rss_bytes(pid), redis_used()
    except BenchError:
        proxy.say_if_exited()
        raise
    warmed = min(n, max(1, warm["requests"]))  # the first callers, caller 0 included
    step(f"{name}: {warm['requests']:,} requests in {warm['seconds']:.1f} s"
         f"{' (capped)' if warm['capped'] else ''}")  # fmt: skip
    row: dict[str, Any] = {
        "callers": n, "auth": auth, "backend": backend,
        "warmed": warmed, "warmup_capped": warm["capped"], "warmup_seconds": warm["seconds"],
        "prewarm": pre, "warmup": warm,
        "rss_per_caller": (rss_warm - rss_before) / max(1, warmed - 1) if n > 1 else None,
        "redis_bytes_per_caller": (redis_warm - redis_before) / max(1, warmed - 1)
        if backend == "redis" and n > 1 else None,
    }  # fmt: skip
    return Live(name, proxy, url, wrk_file, warnings, row)


def measure(ctx: Context, row: Live) -> dict[str, Any]:
    """One round of ``wrk`` on one row's proxy: its CPU over the requests completed."""
    pid = row.proxy.pid
    try:
        # Only this row's proxy is under load: Redis's script calls meanwhile are its batches.
        redis_client = ctx.redis if row.row["backend"] == "redis" else None
        calls0 = script_calls(redis_client) if redis_client is not None else 0
        total0, main0 = cpu_seconds(pid), thread_cpu_seconds(pid, pid)
        started = time.monotonic()
        load = run_wrk(row.url, ctx.script, row.wrk_file, ctx.args.connections, ctx.args.seconds)
        wall = time.monotonic() - started
        total1, main1 = cpu_seconds(pid), thread_cpu_seconds(pid, pid)
        calls = script_calls(redis_client) - calls0 if redis_client is not None else 0
    except BenchError:
        row.proxy.say_if_exited()
        raise
    requests = load["requests"]
    return {
        "load": load,
        "req_per_s": requests / (load["duration_us"] / 1e6),
        "cpu_us_per_req": (total1 - total0) * 1e6 / requests,
        # Both in 10 ms ticks, read a moment apart: the difference can come out a tick below 0.
        "other_threads_cpu_us_per_req": max(0.0, (total1 - total0) - (main1 - main0))
        * 1e6
        / requests,
        "cpu_util": (total1 - total0) / wall,
        "admits_per_call": requests / calls if calls else None,
    }


def finish(live: Live) -> dict[str, Any]:
    """The row: each figure the median of its rounds, every round kept, errors summed."""
    row, rounds = live.row, live.rounds
    for key in ("req_per_s", "cpu_us_per_req", "other_threads_cpu_us_per_req", "cpu_util"):
        row[key] = statistics.median(r[key] for r in rounds)
    batches = [r["admits_per_call"] for r in rounds if r["admits_per_call"]]
    row["admits_per_call"] = statistics.median(batches) if batches else None
    row["cpu_rounds"] = [r["cpu_us_per_req"] for r in rounds]
    row["load"] = [r["load"] for r in rounds]
    row["proxy_warnings"] = dict(live.warnings.counts)
    row["non_2xx"] = (sum(r["load"]["errors"]["status"] for r in rounds)
                      + row["warmup"]["non_2xx"] + row["prewarm"]["non_2xx"])  # fmt: skip
    row["socket_errors"] = (
        sum(v for r in rounds for k, v in r["load"]["errors"].items() if k != "status")
        + row["warmup"]["errors"] + row["prewarm"]["errors"]
    )  # fmt: skip
    return row


# -- report -----------------------------------------------------------------------------


def _num(x: float | None, spec: str = ",.0f") -> str:
    return "—" if x is None else format(x, spec)


def rows_table(rows: list[dict[str, Any]]) -> str:
    head = ("| callers | auth | backend | CPU µs/req | of which other threads | req/s | non-2xx "
            "| RSS MiB after | RSS B/caller | idle CPU % |\n"
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    lines = [head]
    for r in rows:
        callers = f"{r['callers']:,}"
        if r["warmup_capped"]:
            callers += f" ({r['warmed']:,} warmed)"
        lines.append(
            f"| {callers} | {r['auth']} | {r['backend']} | {r['cpu_us_per_req']:,.0f} "
            f"| {r['other_threads_cpu_us_per_req']:,.0f} | {r['req_per_s']:,.0f} "
            f"| {r['non_2xx'] + r['socket_errors']:,} | {r['rss_mib']:.1f} "
            f"| {_num(r['rss_per_caller'])} | {r['idle_cpu_pct']:.1f} |"
        )
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, bool | None]]:
    """(target, which rows, measured, ok) for every target the rows can be judged on."""
    out: list[tuple[str, str, str, bool | None]] = []
    by = {(r["callers"], r["auth"], r["backend"]): r for r in rows}
    counts = sorted({r["callers"] for r in rows})
    low, high = counts[0], counts[-1]
    for auth in AUTHS:
        for backend in BACKENDS:
            a, b = by.get((low, auth, backend)), by.get((high, auth, backend))
            if a is None or b is None or low == high:
                continue
            # Round by round (the two proxies measured moments apart), then the median.
            each = [y / x for x, y in zip(a["cpu_rounds"], b["cpu_rounds"], strict=True)]
            ratio = statistics.median(each)
            rounds = ", ".join(f"{x:.2f}" for x in each)
            out.append((
                f"CPU/request, {high:,} ÷ {low:,} caller(s) ≤ {TARGET_SCALE}×",
                f"{auth}, {backend}",
                f"{ratio:.2f}× (median of the rounds' {rounds}; "
                f"{b['cpu_us_per_req']:,.0f} ÷ {a['cpu_us_per_req']:,.0f} µs)",
                ratio <= TARGET_SCALE,
            ))  # fmt: skip
    for auth in AUTHS:
        ratios = {
            n: by[(n, auth, "redis")]["cpu_us_per_req"] / by[(n, auth, "memory")]["cpu_us_per_req"]
            for n in counts
            if (n, auth, "redis") in by and (n, auth, "memory") in by
        }
        if ratios:
            worst = max(ratios.values())
            each = ", ".join(f"{n:,}: {x:.2f}×" for n, x in ratios.items())
            out.append((f"CPU/request, redis ÷ memory ≤ {TARGET_REDIS}×", f"{auth}",
                        f"worst {worst:.2f}× ({each})", worst <= TARGET_REDIS))  # fmt: skip
    worst_idle = max(rows, key=lambda r: r["idle_cpu_pct"])
    out.append((
        f"idle CPU after the load 0 (≤ {TARGET_IDLE_PCT}%)",
        "every row",
        f"worst {worst_idle['idle_cpu_pct']:.1f}% ({worst_idle['callers']:,}, "
        f"{worst_idle['auth']}, {worst_idle['backend']})",
        worst_idle["idle_cpu_pct"] <= TARGET_IDLE_PCT,
    ))  # fmt: skip
    for auth in AUTHS:
        for backend in BACKENDS:
            r = by.get((high, auth, backend))
            if r is None or r["rss_per_caller"] is None:
                continue
            capped = f", {r['warmed']:,} warmed" if r["warmup_capped"] else ""
            out.append((
                f"RSS per idle caller < {TARGET_RSS_PER_CALLER} B",
                f"{auth}, {backend}, {high:,}{capped}",
                f"{r['rss_per_caller']:,.0f} B",
                r["rss_per_caller"] < TARGET_RSS_PER_CALLER,
            ))  # fmt: skip
    bad = [r for r in rows if r["non_2xx"] or r["socket_errors"]]
    out.append(("no request refused or failed (limits well under)", "every row",
                f"{len(bad)} row(s) with non-2xx or socket errors", not bad))  # fmt: skip
    return out


def targets_table(judged: list[tuple[str, str, str, bool | None]]) -> str:
    lines = ["| target | rows | measured | |", "|---|---|---|---|"]
    for what, which, measured, ok in judged:
        lines.append(f"| {what} | {which} | {measured} | {'pass' if ok else 'FAIL'} |")
    return "\n".join(lines)


def report(rows: list[dict[str, Any]], meta: dict[str, Any], args: argparse.Namespace) -> str:
    judged = targets(rows)
    capped = [r for r in rows if r["warmup_capped"]]
    redis_rows = [r for r in rows if r["redis_bytes_per_caller"] is not None]
    notes = [
        f"{meta['cpu']}, {meta['cpus']} CPUs; {meta['pinning']}. Python {meta['python']}; "
        f"{meta['wrk']}. Code: {meta['code']}.",
        f"Each row: a proxy of its own; {PREWARM_REQUESTS:,} requests from caller 0, then one "
        f"from every caller ({args.connections} at a time, at most {args.warmup_cap:.0f} s). "
        f"The rows of one auth and backend stay up together (Redis: a database each) for "
        f"{args.rounds} rounds of wrk -t{min(THREADS, args.connections)} -c{args.connections} "
        f"-d{args.seconds}s POST {APP_PATH} with the callers' credentials round-robin, each "
        f"row once a round, the order rotated; CPU and req/s: the rounds' median; then "
        f"{args.idle} s idle each. "
        f"Limits: {', '.join(f'{k}={v}' for k, v in LIMITS_ENV.items())}.",
        "CPU µs/req: utime + stime of every proxy thread during a wrk run ÷ requests "
        "completed; 'other threads': all but the main (event-loop) thread. RSS B/caller: "
        "(RSS after every caller's request − RSS after caller 0's) ÷ (callers warmed − 1). "
        "Idle CPU: /proc ticks (10 ms) over the idle seconds, once the proxy is quiet. "
        "non-2xx counts wrk's status errors, the warm-ups' non-2xx and all socket errors.",
    ]
    if capped:
        notes.append(
            "Warm-up capped (too slow to reach every caller): "
            + "; ".join(
                f"{r['callers']:,} {r['auth']} {r['backend']}: {r['warmed']:,} warmed in "
                f"{r['warmup_seconds']:.0f} s" for r in capped
            )
            + ". wrk still cycles through all the callers."
        )  # fmt: skip
    for r in rows:
        if r["non_2xx"] or r["socket_errors"]:
            why = "; ".join(f"{k} ×{v:,}" for k, v in r["proxy_warnings"].items()) or "none logged"
            notes.append(
                f"{r['callers']:,} {r['auth']} {r['backend']}: {r['non_2xx']:,} non-2xx, "
                f"{r['socket_errors']:,} socket errors; the proxy's warnings: {why}."
            )
    if batched := [r for r in rows if r.get("admits_per_call")]:
        notes.append(
            "Admits per Redis script call under wrk (the rounds' median; a call carries the "
            "admits of one turn of the event loop, and its cost is shared by them): "
            + "; ".join(
                f"{r['callers']:,} {r['auth']}: {r['admits_per_call']:.1f}" for r in batched
            )
            + "."
        )  # fmt: skip
    if redis_rows:
        notes.append(
            "Redis used_memory per warmed caller: "
            + "; ".join(
                f"{r['callers']:,} {r['auth']}: {r['redis_bytes_per_caller']:,.0f} B"
                for r in redis_rows
            )
            + "."
        )
    text = (
        f"## Per-caller scaling ({meta['time']})\n\n{rows_table(rows)}\n\n"
        + "\n".join(f"- {n}" for n in notes)
        + f"\n\n### Targets\n\n{targets_table(judged)}\n"
    )
    print("\n" + text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        table = [{"target": t, "rows": w, "measured": m, "ok": ok} for t, w, m, ok in judged]
        doc = {"meta": meta, "rows": rows, "targets": table}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"JSON written to {args.json}")
    return text


# -- main -------------------------------------------------------------------------------


def _choices(allowed: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
        return items

    return parse


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x.strip().replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of numbers") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("at least one count, each ≥ 1")
    return sorted(set(counts))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=_counts, metavar="N,...",
                        help="caller counts (default 1,1000,10000,100000; "
                             "1,1000 with --quick)")  # fmt: skip
    parser.add_argument("--auth", type=_choices(AUTHS), default=list(AUTHS), metavar="jwt,token")
    parser.add_argument("--backend", type=_choices(BACKENDS), default=list(BACKENDS),
                        metavar="memory,redis")  # fmt: skip
    parser.add_argument("--seconds", type=int, metavar="S",
                        help="seconds of each round's wrk run on each row "
                             "(default 6, 3 with --quick)")  # fmt: skip
    parser.add_argument("--rounds", type=int, metavar="R",
                        help="rounds of wrk, every row of an auth and backend in turn "
                             "(default 3, 2 with --quick)")  # fmt: skip
    parser.add_argument("--warmup-cap", type=float, metavar="S",
                        help="at most this long for the one-request-per-caller warm-up "
                             "(default 300, 20 with --quick; stopped after 20 s if on "
                             "course to take longer by then)")  # fmt: skip
    parser.add_argument("--idle", type=int, metavar="S",
                        help="idle seconds measured after each row "
                             "(default 5, 2 with --quick)")  # fmt: skip
    parser.add_argument("--connections", type=int, default=CONNECTIONS, metavar="C",
                        help=f"wrk and warm-up connections (default {CONNECTIONS})")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the tables here")
    args = parser.parse_args(argv)
    args.callers = args.callers or ([1, 1_000] if args.quick else list(CALLER_COUNTS))
    args.seconds = args.seconds or (3 if args.quick else 6)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.warmup_cap = args.warmup_cap or (20.0 if args.quick else 300.0)
    args.idle = args.idle or (2 if args.quick else 5)
    if min(args.seconds, args.rounds, args.idle, args.connections) < 1 or args.warmup_cap <= 0:
        parser.error("--seconds, --rounds, --idle, --connections and --warmup-cap must be positive")
    return args


def code_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            return f"{ROOT} at {out.stdout.strip()}"
    return str(ROOT)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk not found; install it: apt-get install -y wrk", file=sys.stderr)
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        proxy_cpus = {cpus[0]}
        os.sched_setaffinity(0, set(cpus[1:]))  # this script and every child it starts
        others = ",".join(map(str, cpus[1:]))
        pinning = (
            f"proxy on CPU {cpus[0]}; fake gateway, redis-server, wrk, clients on CPU {others}"
        )
    else:
        proxy_cpus = set(cpus)
        pinning = "NOT pinned: only one CPU available, everything shares it"
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    meta = {
        "cpu": cpu_model(),
        "cpus": len(cpus),
        "pinning": pinning,
        "python": platform.python_version(),
        "wrk": (wrk_version.stdout + wrk_version.stderr).strip().splitlines()[0],
        "code": code_version(),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "idle_seconds": args.idle,
        "warmup_cap": args.warmup_cap,
        "connections": args.connections,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    try:
        with contextlib.ExitStack() as stack:  # stops the children, removes the temp files
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fal-callers-")))
            script = tmp / "callers.lua"
            script.write_text(WRK_SCRIPT)
            env = base_env(tmp)
            gateway_argv = [sys.executable, str(ROOT / "bench" / "fast_gateway.py"), "--port", "0"]
            gateway = start_child("fake gateway", gateway_argv, env, stack)
            ctx = Context(args, proxy_cpus, env, f"http://127.0.0.1:{gateway.port}{GATEWAY_PREFIX}",
                          script, Credentials(tmp, max(args.callers)))  # fmt: skip
            if "redis" in args.backend:
                ctx.redis = start_redis(tmp / "redis.log", stack)
                stack.callback(ctx.redis.close)
                ctx.redis_url = f"redis://127.0.0.1:{ctx.redis.get_connection_kwargs()['port']}"
            for backend in args.backend:
                for auth in args.auth:
                    rows.extend(run_group(ctx, auth, backend))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        failed = True
        if not rows:
            return 1
        step("reporting the rows finished so far")
    else:
        failed = False
    meta["run_seconds"] = round(time.monotonic() - started)
    rows.sort(key=lambda r: (AUTHS.index(r["auth"]), BACKENDS.index(r["backend"]), r["callers"]))
    text = report(rows, meta, args)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    step(f"done in {meta['run_seconds']} s")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
