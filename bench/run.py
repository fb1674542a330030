#!/usr/bin/env python3
"""Benchmark the proxy against a fast fake gateway, side by side with no proxy at all.

Starts ``bench/fast_gateway.py`` and the proxy (``python -m proxy --port 0``, JSON logs
on, as in production), pins the proxy to one CPU and everything else (fake gateway,
``wrk``, ``curl``, this script) to another, then measures, for "direct" (load straight
at the fake gateway) and "proxy" (through the proxy):

* CPU µs per small POST at 64 connections (the proxy's own CPU for "proxy", the fake
  gateway's for "direct"), from /proc/<pid>/stat around a ``wrk`` run; and req/s. In
  rounds alternating direct and proxy, median shown, with a CPU "yardstick" loop timed
  around each round to flag a host that is slower than idle (noisy neighbours);
* p50/p99 latency at 1 connection;
* a 64 MiB download and a 32 MiB upload with ``curl``: best MB/s of 3 and peak RSS
  (VmHWM, reset through /proc/<pid>/clear_refs before each transfer);
* the proxy's RSS right after start-up.

With ``--clients``, two bare forwarders from ``bench/baselines.py`` (aiohttp and httpx as
the upstream client, pinned as the proxy is) join the small-request rounds, and a second
table compares direct, proxy and both against the aiohttp one.

Usage: ``.venv/bin/python bench/run.py [--quick] [--duration S] [--rounds N] [--json PATH]
[--profile PATH] [--clients]`` (or ``make bench BENCH_ARGS=...``). ``--ws`` runs the
WebSocket bridge benchmark (``bench/ws_bench.py``) alone; a full run (not ``--only-proxy``)
ends with its table (the proxy against the bare WebSocket relay).
Needs ``wrk`` (``apt-get install -y wrk``) and ``curl``; Linux only (/proc). Only
127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import scaling
import streams

# bench/ is sys.path[0]: these are bench/bench_common.py and bench/procfs.py.
from bench_common import (
    GATEWAY_PREFIX,
    ROOT,
    BenchError,
    Child,
    cpu_model,
    pin,
    proxy_row_env,
    start_child,
    step,
)
from procfs import cpu_seconds_fine, reset_peak_rss, status_kib
from wrk import LOAD_CONNECTIONS, LOAD_THREADS, run_wrk, small_load, wrk_script

MIB = 1 << 20
DOWNLOAD_BYTES = 64 * MIB
UPLOAD_BYTES = 32 * MIB
TRANSFER_REPEATS = 3
# Bare forwarders of bench/baselines.py (BENCH_CLIENT=aiohttp|pyreqwest|httpx).
BASELINES = ("baseline-aiohttp", "baseline-pyreqwest", "baseline-httpx")

# Targets the proxy's figures are judged against.
TARGET_CPU_US = 350.0  # ≤ proxy CPU per small request
TARGET_MBPS = 500.0  # ≥ each way, 64 MiB down / 32 MiB up
TARGET_RSS_MIB = 100.0  # < peak RSS
TARGET_OVER_BARE = 1.3  # ≤ proxy CPU per small request ÷ the bare uvicorn + aiohttp forwarder's
TARGET_UNDER_EXPRESS = 3.0  # ≥ fal's Express proxy's CPU per small request ÷ the proxy's


# -- the host's speed (/proc readers: bench/procfs.py; pinning: bench/bench_common.py) ---


def yardstick_ms(cpus: set[int]) -> float:
    """Time a fixed pure-Python loop on ``cpus`` (best of 3): the host's speed right now.

    Shared VMs have slow spells (noisy neighbours) during which every figure, the
    proxy's CPU per request included, gets worse; a slower yardstick flags them.
    """
    time.sleep(0.5)  # let the proxy finish the requests in flight when wrk stopped
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)  # this thread only, for the moment of the loop
    try:
        best = float("inf")
        for _ in range(3):
            started, x = time.perf_counter(), 0
            for i in range(300_000):
                x += i
            best = min(best, time.perf_counter() - started)
        return best * 1e3
    finally:
        os.sched_setaffinity(0, saved)


# -- load generators --------------------------------------------------------------------


CURL = ["curl", "--silent", "--show-error", "--noproxy", "*", "--max-time", "120"]


def transfer(
    kind: str, url: str, pid: int, upload_file: Path, repeats: int = TRANSFER_REPEATS
) -> dict[str, Any]:
    """Best MB/s (10^6 bytes/s) of ``repeats`` curl transfers; the worst peak RSS of ``pid``."""
    speeds, peaks, utils = [], [], []
    for _ in range(repeats):
        reset_peak_rss(pid)
        cpu_before = cpu_seconds_fine(pid)
        if kind == "download":
            cmd = [
                *CURL,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download} %{time_total}",
                url,
            ]
        else:
            # -T streams the file (curl 7.88's --data-binary @file stalls ~40 ms at random on
            # loopback); "Expect:" off: no 100-continue round trip in either mode.
            cmd = [
                *CURL, "-X", "POST", "-T", str(upload_file), "-H", "Expect:",
                "-H", "content-type: application/octet-stream",
                "-w", "\n%{http_code} %{size_upload} %{time_total}", url,
            ]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        body, _, metrics = out.stdout.rpartition("\n") if kind == "upload" else ("", "", out.stdout)
        try:
            code, size, seconds = metrics.split()
        except ValueError:
            raise BenchError(f"curl {kind} at {url} failed: {out.stdout}{out.stderr}") from None
        expected = DOWNLOAD_BYTES if kind == "download" else UPLOAD_BYTES
        if code != "200" or int(size) != expected:
            raise BenchError(
                f"curl {kind} at {url}: status {code}, {size} bytes: {out.stderr}{body}"
            )
        if kind == "upload" and json.loads(body).get("received") != expected:
            raise BenchError(f"upload at {url}: the gateway received {body}, not {expected} bytes")
        speeds.append(expected / float(seconds) / 1e6)
        peaks.append(status_kib(pid, "VmHWM") / 1024)
        utils.append((cpu_seconds_fine(pid) - cpu_before) / float(seconds))
    best = speeds.index(max(speeds))
    return {"mb_per_s": speeds[best], "all_mb_per_s": speeds, "peak_rss_mib": max(peaks),
            "cpu_util": utils[best]}  # fmt: skip


# -- py-spy profile ---------------------------------------------------------------------


def profile(proxy: Child, url: str, script: Path, seconds: int, out_path: Path) -> dict[str, Any]:
    """Sample the proxy with py-spy under the 64-connection load; summarise the hot frames.

    Runs after the measurements (sampling slows the proxy down). The collapsed stacks
    (``--format raw``, readable by speedscope or flamegraph.pl) go to ``out_path``.
    Native frames (C extensions, libc, the kernel-call wrappers) are sampled too when
    py-spy can unwind them here; else it falls back to Python frames only.
    """
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise BenchError("py-spy not found: pip install py-spy (the 'bench' extra)")
    err = ""
    for native in (["--native"], []):
        cmd = [
            spy, "record", "--pid", str(proxy.pid), "--duration", str(seconds), "--rate", "250",
            "--format", "raw", "--nolineno", *native, "--output", str(out_path),
        ]  # fmt: skip
        spy_proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            time.sleep(1)  # let py-spy attach
            run_wrk(
                url, script, connections=LOAD_CONNECTIONS, threads=LOAD_THREADS, seconds=seconds
            )
            _, err = spy_proc.communicate(timeout=seconds + 60)
        finally:
            if spy_proc.poll() is None:
                spy_proc.kill()
                spy_proc.wait()
        if spy_proc.returncode == 0 and out_path.exists():
            return {"native": bool(native), **summarise_stacks(out_path.read_text())}
    raise BenchError(f"py-spy failed: {err}")


_PYTHON_FRAME = re.compile(r"\.py\)$|\(<frozen [^)]*>\)$|\(<string>\)$")


def _short_frame(frame: str) -> str:
    frame = re.sub(r"\(.*?(?:site|dist)-packages/", "(", frame)
    frame = re.sub(r"\(/[^)]*/lib/python3[.\d]*/", "(", frame)  # the standard library
    return frame.replace(f"({ROOT}/", "(")


def summarise_stacks(collapsed: str, top: int = 15) -> dict[str, Any]:
    """The hottest frames in py-spy's collapsed stacks, as % of the samples.

    * ``self``: where the CPU was when sampled: the leaf frame; a native leaf is shown
      with the innermost Python frame that led to it (``write (libc) ← send (uvicorn)``).
    * ``total``: Python frames by time spent in them or below; the event-loop scaffolding
      that is on (nearly) every stack is left out.
    """
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        samples += n
        frames = [_short_frame(f) for f in stack.split(";")]
        python = [f for f in frames if _PYTHON_FRAME.search(f)]
        leaf = frames[-1]
        if not _PYTHON_FRAME.search(leaf) and python:
            leaf = f"{leaf} ← {python[-1]}"
        own[leaf] += n
        for frame in set(python):
            total[frame] += n
    pct = lambda n: round(100 * n / samples, 1) if samples else 0.0  # noqa: E731
    return {
        "samples": samples,
        "self": [(f, pct(n)) for f, n in own.most_common(top)],
        "total": [(f, pct(n)) for f, n in total.most_common() if n < 0.97 * samples][:top],
    }


# -- report -----------------------------------------------------------------------------


@dataclass
class Row:
    metric: str
    against: str  # what the proxy's figure is compared with ("" for none)
    base: float | None
    proxy: float | None
    fmt: str
    target: str = ""
    ok: bool | None = None  # the proxy figure against the target
    ratio: bool = True  # a proxy/baseline ratio means something for this metric


SMALL = "CPU µs per small request, 64 conn"
BASELINE_LABELS = {
    "baseline-aiohttp": "bare uvicorn + aiohttp",
    "baseline-pyreqwest": "bare uvicorn + pyreqwest",
    "baseline-httpx": "bare uvicorn + httpx",
}


def rows_from(r: dict[str, Any]) -> list[Row]:
    d, p = r["direct"], r["proxy"]
    cpu = p["load"]["proxy_cpu_us_per_req"]
    rows = [
        Row(SMALL, "direct (fake gateway's CPU)", d["load"]["gateway_cpu_us_per_req"], cpu,
            "{:.0f}", f"≤ {TARGET_CPU_US:.0f}", cpu <= TARGET_CPU_US),
    ]  # fmt: skip
    if EXPRESS in r:
        express = r[EXPRESS]["load"]["proxy_cpu_us_per_req"]
        rows.append(Row(SMALL, "fal's server-proxy in Express (the peer)", express, cpu,
                        "{:.0f}", f"≤ {1 / TARGET_UNDER_EXPRESS:.2f}× (≥ 3× cheaper)",
                        cpu * TARGET_UNDER_EXPRESS <= express))  # fmt: skip
    for name in BASELINES:
        if name not in r:
            continue
        bare = r[name]["load"]["proxy_cpu_us_per_req"]
        if name == "baseline-aiohttp":  # the floor: the stack the proxy is built on, alone
            target = f"≤ {TARGET_OVER_BARE:.2f}×"
            rows.append(Row(SMALL, BASELINE_LABELS[name], bare, cpu, "{:.0f}", target,
                            cpu <= TARGET_OVER_BARE * bare))  # fmt: skip
        else:
            rows.append(Row(SMALL, BASELINE_LABELS[name], bare, cpu, "{:.0f}"))
    tls = r[TLS_MODE]["load"]
    handshakes = sum(x.get("handshakes", 0) for x in r[TLS_MODE]["load_rounds"])
    requests = sum(x["requests"] for x in r[TLS_MODE]["load_rounds"])
    per_thousand = 1000 * handshakes / max(requests, 1)
    rows += [
        Row(f"{SMALL}, TLS to the gateway", "the same, plain HTTP", cpu,
            tls["proxy_cpu_us_per_req"], "{:.0f}"),
        Row("TLS handshakes per 1,000 requests (in the rounds)", "", None, per_thousand, "{:.2f}",
            "< 1", per_thousand < 1, False),
        Row(f"{SMALL}, tracing on (every call's spans to a local OTLP/HTTP sink)",
            "the same, tracing off", cpu, r[TRACING_MODE]["load"]["proxy_cpu_us_per_req"],
            "{:.0f}"),
        Row("req/s, 64 conn", "direct", d["load"]["req_per_s"], p["load"]["req_per_s"], "{:.0f}"),
    ]  # fmt: skip
    if "workers" in r:
        w = r["workers"]
        rows.append(Row("req/s, 64 conn, limits in Redis: 2 workers", "1 worker",
                        w[1]["req_per_s"], w[2]["req_per_s"], "{:.0f}", "≥ 1.80×",
                        w["ratio"] >= 1.8))  # fmt: skip
        # Why the ratio is what it is: the most 2 CPUs could serve at the CPU per request
        # that every process of the run spent (workers, redis-server, gateway, wrk).
        rows += [
            Row("req/s, 64 conn, limits in Redis: 2 workers", "2 CPUs' ceiling at the run's "
                "CPU per request (workers + Redis + gateway + wrk)",
                w[2]["cpu_bound_req_per_s"], w[2]["req_per_s"], "{:.0f}"),
            Row("CPU µs per small request, limits in Redis: 2 workers (sum)", "1 worker",
                w[1]["proxy_cpu_us_per_req"], w[2]["proxy_cpu_us_per_req"], "{:.0f}"),
        ]  # fmt: skip
    rows += [
        Row("p50 latency ms, 1 conn", "direct", d["latency"]["p50_us"] / 1e3,
            p["latency"]["p50_us"] / 1e3, "{:.3f}"),
        Row("p99 latency ms, 1 conn", "direct", d["latency"]["p99_us"] / 1e3,
            p["latency"]["p99_us"] / 1e3, "{:.3f}"),
        Row("64 MiB download MB/s (best of 3)", "direct",
            d["download"]["mb_per_s"], p["download"]["mb_per_s"],
            "{:.0f}", f"≥ {TARGET_MBPS:.0f}", p["download"]["mb_per_s"] >= TARGET_MBPS),
        Row("64 MiB download peak RSS MiB", "direct",
            d["download"]["peak_rss_mib"], p["download"]["peak_rss_mib"],
            "{:.1f}", f"< {TARGET_RSS_MIB:.0f}",
            p["download"]["peak_rss_mib"] < TARGET_RSS_MIB, False),
        Row("32 MiB upload MB/s (best of 3)", "direct", d["upload"]["mb_per_s"],
            p["upload"]["mb_per_s"], "{:.0f}", f"≥ {TARGET_MBPS:.0f}",
            p["upload"]["mb_per_s"] >= TARGET_MBPS),
        Row("32 MiB upload peak RSS MiB", "direct", d["upload"]["peak_rss_mib"],
            p["upload"]["peak_rss_mib"], "{:.1f}", f"< {TARGET_RSS_MIB:.0f}",
            p["upload"]["peak_rss_mib"] < TARGET_RSS_MIB, False),
        Row("RSS after start-up MiB", "direct", d["baseline_rss_mib"], p["baseline_rss_mib"],
            "{:.1f}", f"< {TARGET_RSS_MIB:.0f}", p["baseline_rss_mib"] < TARGET_RSS_MIB, False),
    ]  # fmt: skip
    if "streams" in r:
        rows += streams_table_rows(r["streams"])
    return rows


def streams_table_rows(st: dict[str, Any]) -> list[Row]:
    """Streams per process (bench/streams.py): RSS per open stream and socket, and the delay
    of an event through the proxy against direct, with their targets."""
    rows = []
    unit_one = {"sse": "an event", "ws": "a frame"}
    for key, what, unit, kib in (("sse", "SSE stream", "events", streams.TARGET_SSE_KIB),
                                 ("ws", "WebSocket", "frames", streams.TARGET_WS_KIB)):  # fmt: skip
        if key not in st:
            continue
        c = st[key]
        p, d = c["proxy"], c["direct"]
        every = (
            p["opened"] == c["count"]
            and p["delivered"] == p["sent"] == c["count"] * st["events_each"]
        )
        each = c.get("kib_each", float("nan"))
        rows += [
            Row(f"RSS KiB per open {what} ({p['opened']:,}/{c['count']:,} open at once; "
                f"{p['delivered']:,}/{p['sent']:,} {unit} delivered)", "", None, each, "{:.1f}",
                f"≤ {kib:.0f}, all", every and each <= kib, False),
            Row(f"p99 delay ms of {unit_one[key]}, {c['count']:,} {what}s open "
                f"(added: {c['added_p99_ms']:+.2f} ms)", "direct", d["p99_ms"], p["p99_ms"],
                "{:.2f}", f"+≤ {streams.TARGET_ADDED_P99_MS:.0f}",
                c["added_p99_ms"] <= streams.TARGET_ADDED_P99_MS),
        ]  # fmt: skip
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| metric | against | theirs | proxy | proxy/theirs | target (proxy) | ok |",
        "|---|---|---:|---:|---:|---:|:---:|",
    ]
    for row in rows:
        show = lambda v, row=row: "—" if v is None else row.fmt.format(v)  # noqa: E731
        ratio = f"{row.proxy / row.base:.2f}×" if row.ratio and row.base and row.proxy else "—"
        ok = "" if row.ok is None else ("pass" if row.ok else "**FAIL**")
        cells = [row.metric, row.against or "—", show(row.base), show(row.proxy), ratio,
                 row.target, ok]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def express_version(package: str) -> str | None:
    path = EXPRESS_SERVER.parent / "node_modules" / package / "package.json"
    with contextlib.suppress(OSError, ValueError):
        return str(json.loads(path.read_text())["version"])
    return None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def tool_version(cmd: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).splitlines()[0].strip()
    return "unknown"


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="short smoke run (~15 s): one short round"
    )
    parser.add_argument("--duration", type=int, metavar="S",
                        help="seconds of each 64-connection run (default 10, 3 with --quick); "
                             "the 1-connection latency runs take half")  # fmt: skip
    parser.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help="64-connection runs per mode, median reported (default 3, 1 with --quick)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--profile", type=Path, metavar="PATH",
                        help="afterwards, py-spy the proxy under load: collapsed stacks to PATH, "
                             "top frames printed")  # fmt: skip
    parser.add_argument("--only-proxy", action="store_true",
                        help="only direct, the proxy and the TLS-upstream proxy: no bare "
                             "forwarders, no Express, no workers or concurrency rows (for "
                             "iterating on the hot path)")  # fmt: skip
    parser.add_argument("--streams", "--sse", type=int, default=8000, metavar="N",
                        help="SSE streams open at once through one proxy process (default "
                             "8000; 0: none)")  # fmt: skip
    parser.add_argument("--sockets", "--websockets", type=int, default=4000, metavar="N",
                        help="WebSockets open at once through one proxy process (default 4000; "
                             "0: none)")  # fmt: skip
    parser.add_argument("--only-streams", action="store_true",
                        help="only the streams-per-process rows (bench/streams.py; about 80 s "
                             "at the defaults; needs neither wrk nor curl)")  # fmt: skip
    parser.add_argument("--ws", action="store_true",
                        help="benchmark the WebSocket bridge instead (bench/ws_bench.py; "
                             "takes --quick, --rounds and --json)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.duration is not None and args.duration < 1:
        parser.error("--duration must be at least 1")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def measure(
    args: argparse.Namespace, proxy_cpus: set[int], stack: contextlib.ExitStack
) -> dict[str, Any]:
    """Start the fake gateway and the proxy, run every measurement, return the results."""
    load_s, latency_s, warmup_s = args.load_s, args.latency_s, args.warmup_s
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fal-proxy-bench-")))
    script = tmp / "post.lua"
    script.write_text(wrk_script())
    upload_file = tmp / "upload.bin"
    with open(upload_file, "wb") as f:
        block = os.urandom(MIB)
        for _ in range(UPLOAD_BYTES // MIB):
            f.write(block)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "CF_"))}
    env["PYTHONUNBUFFERED"] = "1"
    gateway_argv = [sys.executable, str(ROOT / "bench" / "fast_gateway.py"), "--port", "0"]
    gateway = start_child("fake gateway", gateway_argv, env, stack)
    gateway_url = f"http://127.0.0.1:{gateway.port}{GATEWAY_PREFIX}"
    proxy_env = proxy_row_env(env, gateway_url)
    proxy = start_child("proxy", [sys.executable, "-m", "proxy", "--port", "0"], proxy_env, stack)
    pin(proxy.pid, proxy_cpus)  # every thread, now that it is up
    proxy_url = f"http://127.0.0.1:{proxy.port}"
    # Production talks HTTPS to the gateway: the same proxy in front of a TLS fake gateway
    # (a trustme CA, trusted through the test-only FAL_PROXY_TEST_GATEWAY_CA_FILE).
    tls_dir = tmp / "tls"
    tls_gateway = start_child("fake gateway (TLS)", [*gateway_argv, "--tls-dir", str(tls_dir)],
                              env, stack)  # fmt: skip
    tls_proxy_env = dict(
        proxy_env,
        FAL_PROXY_GATEWAY_URL=f"https://127.0.0.1:{tls_gateway.port}{GATEWAY_PREFIX}",
        FAL_PROXY_TEST_GATEWAY_CA_FILE=str(tls_dir / "ca.pem"),
    )
    tls_proxy = start_child(
        "proxy (TLS upstream)", [sys.executable, "-m", "proxy", "--port", "0"], tls_proxy_env, stack
    )
    pin(tls_proxy.pid, proxy_cpus)
    # Tracing on (OTEL_*): the same proxy exporting every call's spans over OTLP/HTTP to a
    # sink that drops them (bench/otlp_sink.py, not on the proxy's CPU); the SDK's export
    # thread is the proxy's and pinned with it, so its CPU counts.
    sink = start_child("OTLP sink", [sys.executable, str(ROOT / "bench" / "otlp_sink.py"),
                                     "--port", "0"], env, stack)  # fmt: skip
    tracing_env = dict(proxy_env, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{sink.port}")
    tracing_proxy = start_child(
        "proxy (tracing on)", [sys.executable, "-m", "proxy", "--port", "0"], tracing_env, stack
    )
    pin(tracing_proxy.pid, proxy_cpus)

    # Both modes ask for the same upstream paths: "direct" names the gateway's own URL for
    # what the proxy turns /fal-ai/x into. Each mode's cost is that of one process.
    modes = {"direct": (gateway_url, gateway), "proxy": (proxy_url, proxy)}
    load_modes = dict(modes)  # those in the small-request rounds
    load_modes[TLS_MODE] = (f"http://127.0.0.1:{tls_proxy.port}", tls_proxy)
    load_modes[TRACING_MODE] = (f"http://127.0.0.1:{tracing_proxy.port}", tracing_proxy)
    scripts = dict.fromkeys(load_modes, script)
    for name in () if args.only_proxy else BASELINES:
        client_env = dict(env, BENCH_GATEWAY_URL=gateway_url, BENCH_CLIENT=name.split("-")[1])
        argv = [sys.executable, str(ROOT / "bench" / "baselines.py"), "--port", "0"]
        child = start_child(name, argv, client_env, stack)
        pin(child.pid, proxy_cpus)  # loaded one at a time, so each has the CPU to itself
        load_modes[name], scripts[name] = (f"http://127.0.0.1:{child.port}", child), script
    if not args.only_proxy:
        # fal's own proxy speaks only the SDK's protocol: its route, the target in a header.
        express_script = tmp / "express.lua"
        express_script.write_text(wrk_script("https://fal.run/fal-ai/x"))
        express_env = dict(env, BENCH_GATEWAY_URL=gateway_url, FAL_KEY="k")
        child = start_child(EXPRESS, ["node", str(EXPRESS_SERVER), "--port", "0"], express_env,
                            stack)  # fmt: skip
        pin(child.pid, proxy_cpus)
        load_modes[EXPRESS] = (f"http://127.0.0.1:{child.port}/api/fal/proxy", child)
        scripts[EXPRESS] = express_script
    gateways = {name: gateway.pid for name in load_modes} | {TLS_MODE: tls_gateway.pid}
    time.sleep(0.5)

    results: dict[str, Any] = {
        name: {"baseline_rss_mib": status_kib(child.pid, "VmRSS") / 1024}
        for name, (_, child) in load_modes.items()
    }
    try:
        # Small requests, in rounds that alternate direct and proxy (and the baselines) so that
        # a slow spell of the host (common on shared VMs) hits all; the median round is reported.
        url = {name: base + ("" if name == EXPRESS else "/fal-ai/x")
               for name, (base, _) in load_modes.items()}  # fmt: skip
        for name in load_modes:
            step(f"{name}: warm-up, {warmup_s} s")  # connections, the upstream pool, caches
            run_wrk(url[name], scripts[name], connections=LOAD_CONNECTIONS, threads=LOAD_THREADS,
                    seconds=warmup_s)  # fmt: skip
        for round_ in range(1, args.rounds + 1):
            for name, (_, child) in load_modes.items():
                step(f"{name}: small POSTs, {LOAD_CONNECTIONS} connections, {load_s} s, "
                     f"round {round_}/{args.rounds}")  # fmt: skip
                # The forwarder under test (proxy or baseline) is "proxy" in the result keys.
                watched = {"gateway": gateways[name]} | (
                    {} if name == "direct" else {"proxy": child.pid}
                )
                before = yardstick_ms(proxy_cpus)
                # Upstream pools idled (keep-alive expiry) while the other modes ran: 1 s
                # of the same load first, so that the round measures the steady state.
                run_wrk(url[name], scripts[name], connections=LOAD_CONNECTIONS,
                        threads=LOAD_THREADS, seconds=1)  # fmt: skip
                stats = tls_stats(tls_gateway.port, tls_dir / "ca.pem") if name == TLS_MODE else {}
                result = small_load(url[name], scripts[name], watched,
                                    connections=LOAD_CONNECTIONS, threads=LOAD_THREADS,
                                    seconds=load_s)  # fmt: skip
                if stats:  # TLS handshakes during the round (its own _stats call excluded)
                    after = tls_stats(tls_gateway.port, tls_dir / "ca.pem")
                    result["handshakes"] = after["connections"] - stats["connections"] - 1
                result["yardstick_ms"] = (before + yardstick_ms(proxy_cpus)) / 2
                results[name].setdefault("load_rounds", []).append(result)
        for name in load_modes:
            key = "gateway_cpu_us_per_req" if name == "direct" else "proxy_cpu_us_per_req"
            ranked = sorted(results[name]["load_rounds"], key=lambda r, key=key: r[key])
            results[name]["load"] = ranked[(len(ranked) - 1) // 2]
        for name, (base, _) in modes.items():
            step(f"{name}: latency, 1 connection, {latency_s} s")
            results[name]["latency"] = run_wrk(
                base + "/fal-ai/x", script, connections=1, threads=1, seconds=latency_s
            )
        for name, (base, child) in modes.items():
            step(f"{name}: {DOWNLOAD_BYTES // MIB} MiB download, {UPLOAD_BYTES // MIB} MiB upload, "
                 f"x{TRANSFER_REPEATS}")  # fmt: skip
            download_url = f"{base}/fal-ai/bytes?size={DOWNLOAD_BYTES}"
            results[name]["download"] = transfer("download", download_url, child.pid, upload_file)
            results[name]["upload"] = transfer(
                "upload", f"{base}/fal-ai/sink", child.pid, upload_file
            )
        results["proxy"]["rss_after_mib"] = status_kib(proxy.pid, "VmRSS") / 1024
        results[TRACING_MODE]["sink"] = sink_stats(sink.port)
        if not args.only_proxy:
            results["workers"] = scaling.workers_rows(
                proxy_env, gateway.pid, script, sorted(os.sched_getaffinity(0) | proxy_cpus),
                load_s, args.rounds, stack,
            )  # fmt: skip
            results["streams"] = streams.stream_rows(args.streams, args.sockets, stack)
    except BenchError:
        for _, child in load_modes.values():
            child.say_if_exited()
        raise
    if args.profile:
        step(f"profile: py-spy on the proxy under {LOAD_CONNECTIONS}-connection load, {load_s} s")
        try:
            results["profile"] = profile(
                proxy, proxy_url + "/fal-ai/x", script, load_s, args.profile
            )
        except BenchError as exc:  # the measurements stand without it
            step(f"profile skipped: {exc}")
    return results


TLS_MODE = "proxy-tls"
TRACING_MODE = "proxy-tracing"  # OTEL_EXPORTER_OTLP_ENDPOINT set: spans to bench/otlp_sink.py


def sink_stats(port: int) -> dict[str, int]:
    """What the OTLP sink received: exports (batches) and bytes."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=5) as answer:
        stats: dict[str, int] = json.loads(answer.read())
    return stats


EXPRESS = "fal-express"  # fal's @fal-ai/server-proxy in Express (bench/express_proxy)
EXPRESS_SERVER = ROOT / "bench" / "express_proxy" / "server.cjs"


def tls_stats(port: int, ca_file: Path) -> dict[str, int]:
    """The TLS fake gateway's connections (= TLS handshakes) and requests, this one excluded."""
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(ca_file))
    url = f"https://127.0.0.1:{port}{GATEWAY_PREFIX}/_stats"
    with urllib.request.urlopen(url, context=context, timeout=10) as answer:
        stats = json.loads(answer.read())
    return {"connections": stats["connections"] - 1, "requests": stats["requests"] - 1}


def report(results: dict[str, Any], meta: dict[str, Any], args: argparse.Namespace) -> None:
    rows = rows_from(results)
    direct, proxy = results["direct"], results["proxy"]
    pl, dl = proxy["load"], direct["load"]
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    speeds = lambda t: "/".join(f"{s:.0f}" for s in t["all_mb_per_s"])  # noqa: E731

    def rounds(mode: str, key: str, spec: str = ".0f") -> str:
        return "/".join(f"{r[key]:{spec}}" for r in results[mode]["load_rounds"])

    sticks = [r["yardstick_ms"] for r in results["proxy"]["load_rounds"]]
    idle = meta["yardstick_idle_ms"]
    noisy = (f" vs {idle:.1f} ms before the runs: the host was slower than idle, by up to "
             f"{100 * (max(sticks) / idle - 1):.0f}% (noisy neighbours?), and so are the figures"
             if max(sticks) > 1.1 * idle
             else f" ({idle:.1f} ms before the runs: steady)")  # fmt: skip
    print(f"\n## fal-gateway-proxy benchmark ({meta['time']})\n")
    print(markdown_table(rows))
    print(
        f"\n- {meta['cpu']}, {meta['cpus']} CPUs; {meta['pinning']}. "
        f"Python {meta['python']}; {meta['wrk']}.\n"
        f"- 64-connection runs: wrk -t{LOAD_THREADS} -c{LOAD_CONNECTIONS}, "
        f'POST {{"prompt":"cat"}}, '
        f"{meta['rounds']} x {meta['load_seconds']} s per mode, median shown; proxy CPU µs/request "
        f"in each round: {rounds('proxy', 'proxy_cpu_us_per_req')}, "
        f"req/s: {rounds('proxy', 'req_per_s')}; "
        f"direct (gateway) µs/request: {rounds('direct', 'gateway_cpu_us_per_req')}. "
        f"Yardstick loop on the proxy's CPU around each proxy round: "
        f"{rounds('proxy', 'yardstick_ms', '.1f')} ms{noisy}. "
        f"Latency runs: {meta['latency_seconds']} s, -t1 -c1. "
        f"MB = 10^6 bytes. The direct column's CPU and RSS figures are the fake gateway's.\n"
        f"- proxy run: the proxy used {pct(pl['proxy_cpu_util'])} of a CPU (≈100% = saturated, so "
        f"req/s is the proxy's limit); the fake gateway used {pl['gateway_cpu_us_per_req']:.0f} "
        f"µs/request ({pct(pl['gateway_cpu_util'])} of its CPU). Direct run: fake gateway at "
        f"{pct(dl['gateway_cpu_util'])} of its CPU (which it shares with wrk).\n"
        f"- transfers, CPU use during the best run: proxy down "
        f"{pct(proxy['download']['cpu_util'])}, "
        f"up {pct(proxy['upload']['cpu_util'])}; fake gateway (direct) down "
        f"{pct(direct['download']['cpu_util'])}, up {pct(direct['upload']['cpu_util'])}. All runs, "
        f"MB/s: direct down {speeds(direct['download'])}, up {speeds(direct['upload'])}; "
        f"proxy down {speeds(proxy['download'])}, up {speeds(proxy['upload'])}.\n"
        f"- proxy RSS after all runs: {proxy['rss_after_mib']:.1f} MiB."
    )
    sink = results[TRACING_MODE]["sink"]
    others = [name for name in (TLS_MODE, TRACING_MODE, *BASELINES, EXPRESS) if name in results]
    each = "; ".join(f"{name}: {rounds(name, 'proxy_cpu_us_per_req')} µs, "
                     f"{rounds(name, 'req_per_s')} req/s" for name in others)  # fmt: skip
    versions = ", ".join(f"{k} {v or 'NOT installed'}" for k, v in meta["versions"].items())
    print(
        f"- The other forwarders, in the same interleaved rounds, each alone on the proxy's CPU "
        f"(median shown; each round: {each}). {TLS_MODE}: this proxy in front of the same fake "
        "gateway speaking TLS 1.3 (a trustme CA trusted through FAL_PROXY_TEST_GATEWAY_CA_FILE); "
        "handshakes: the TLS gateway's accepted connections during the rounds, over their "
        f"requests. {TRACING_MODE}: this proxy with OTEL_EXPORTER_OTLP_ENDPOINT set, every call "
        "sampled, its 4 spans batched (the SDK's defaults) to bench/otlp_sink.py, which drops "
        f"them ({sink['exports']:,} exports, {sink['bytes'] / 1e6:.1f} MB received). "
        "Bare forwarders: bench/baselines.py, uvicorn + the client, streaming both "
        "ways, no logging, no header policy, no checks. fal's server-proxy: its Express "
        "handler as its README sets it up (bench/express_proxy/server.cjs), the target in "
        "x-fal-target-url, fetch() pointed at the fake gateway. Before each round, 1 s of "
        f"the same load (pools warm again). Versions: {versions}."
    )
    if "workers" in results:
        w = results["workers"]
        each = lambda n: "/".join(f"{x['req_per_s']:.0f}" for x in w["rounds"][n])  # noqa: E731
        print(
            f"- Workers ({w['layout']}): limits in a redis-server of the run's own, 1 s of load "
            f"then {meta['load_seconds']} s measured, rounds alternating, median shown. req/s "
            f"each round: 1 worker {each(1)}, 2 workers {each(2)}; 2 ÷ 1 = {w['ratio']:.2f}×. "
            f"Per request (median round): proxy CPU {w[1]['proxy_cpu_us_per_req']:.0f} µs at 1 "
            f"worker, {w[2]['proxy_cpu_us_per_req']:.0f} µs at 2; redis-server "
            f"{w[2]['redis_cpu_us_per_req']:.0f} µs, fake gateway "
            f"{w[2]['gateway_cpu_us_per_req']:.0f} µs, wrk {w[2]['wrk_cpu_us_per_req']:.0f} µs "
            "at 2 workers; the workers' CPU use: "
            + ", ".join(pct(u) for u in w[2]["worker_cpu_util"])
            + f". With that load on the same 2 CPUs, 2 workers can reach at most "
            f"{w[2]['cpu_bound_req_per_s'] / w[1]['req_per_s']:.2f}× one worker's req/s "
            "(the ceiling row over the 1-worker row)."
        )
    if "streams" in results:
        print(streams.stream_notes(results["streams"]))
    missed = [row.metric + f" ({row.against})" for row in rows if row.ok is False]
    print(f"\nTargets missed: {'; '.join(missed)}" if missed else "\nAll targets met.")
    if "streams" in results:
        streams.print_report(results["streams"], notes=False)
    if "profile" in results:
        prof = results["profile"]
        kind = "Python and native frames" if prof["native"] else "Python frames only"
        print(f"\n### py-spy: the proxy under {LOAD_CONNECTIONS}-connection load "
              f"({prof['samples']} samples, {kind}; stacks in {args.profile})")  # fmt: skip
        titles = {"self": "self time (where the CPU was)", "total": "total time (Python frames)"}
        for key, title in titles.items():
            print(f"\n| # | {title} | % |\n|---:|---|---:|")
            for i, (frame, share) in enumerate(prof[key], 1):
                print(f"| {i} | `{frame}` | {share} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        table = [
            {
                "metric": r.metric,
                "against": r.against,
                "theirs": r.base,
                "proxy": r.proxy,
                "target": r.target,
                "ok": r.ok,
            }
            for r in rows
        ]
        doc = {"meta": meta, "results": results, "table": table}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nJSON written to {args.json}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ws:  # the WebSocket bridge: bench/ws_bench.py, which needs neither wrk nor curl
        import ws_bench

        return ws_bench.main([*(["--quick"] if args.quick else []),
                              *(["--rounds", str(args.rounds)] if args.rounds else []),
                              *(["--json", str(args.json)] if args.json else [])])  # fmt: skip
    if args.only_streams:
        return streams.main(["--streams", str(args.streams), "--sockets", str(args.sockets),
                             *(["--json", str(args.json)] if args.json else [])])  # fmt: skip
    args.load_s = args.duration or (3 if args.quick else 10)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.latency_s = max(1, args.load_s // 2)
    args.warmup_s = 1 if args.quick else 2
    if not args.only_proxy and not (EXPRESS_SERVER.parent / "node_modules").is_dir():
        print("bench: fal's proxy is not installed: npm ci --prefix bench/express_proxy "
              "(make bench does it), or --only-proxy", file=sys.stderr)  # fmt: skip
        return 2
    for tool in ("wrk", "curl", *(() if args.only_proxy else ("node", "redis-server"))):
        if shutil.which(tool) is None:
            print(
                f"bench: {tool} not found; install it: apt-get install -y {tool}", file=sys.stderr
            )
            return 2

    # CPU layout: the proxy alone on one CPU, everything else (this script included, and
    # so every process it starts, until the proxy is moved) on the other(s).
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        proxy_cpus = {cpus[0]}
        os.sched_setaffinity(0, set(cpus[1:]))
        others = ",".join(map(str, cpus[1:]))
        pinning = f"proxy on CPU {cpus[0]}; fake gateway, wrk, curl on CPU {others}"
    else:
        proxy_cpus = set(cpus)
        pinning = "NOT pinned: only one CPU available, everything shares it"
    meta = {
        "cpu": cpu_model(),
        "cpus": len(cpus),
        "pinning": pinning,
        "python": platform.python_version(),
        "wrk": tool_version(["wrk", "--version"]),
        "load_seconds": args.load_s,
        "rounds": args.rounds,
        "latency_seconds": args.latency_s,
        "quick": args.quick,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "yardstick_idle_ms": yardstick_ms(proxy_cpus),  # before anything runs
    }
    # sniffio: without it httpcore retries its import several times a request
    names = ("uvicorn", "aiohttp", "pyreqwest", "httpx", "httpcore", "sniffio")
    meta["versions"] = {name: package_version(name) for name in names} | {
        "node": tool_version(["node", "--version"]),
        "@fal-ai/server-proxy": express_version("@fal-ai/server-proxy"),
        "express": express_version("express"),
    }

    # SIGTERM/SIGHUP become SystemExit, so the clean-up runs as it does on Ctrl-C.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    try:
        with contextlib.ExitStack() as stack:  # stops the children, removes the temp files
            results = measure(args, proxy_cpus, stack)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    report(results, meta, args)
    if args.only_proxy:
        return 0
    # The WebSocket relay against the bare relay, in the same run (bench/ws_bench.py, laid out
    # on all the CPUs again: proxy and bare relay on the first, echo and client on the rest).
    import ws_bench

    print("\n## WebSocket relay (bench/ws_bench.py)\n", flush=True)
    ws_json = args.json.with_name(args.json.stem + "-ws.json") if args.json else None
    return ws_bench.main([*(["--quick"] if args.quick else []),
                          *(["--json", str(ws_json)] if ws_json else [])],
                         cpus=sorted(proxy_cpus | os.sched_getaffinity(0)))  # fmt: skip


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
