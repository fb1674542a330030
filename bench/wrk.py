"""The small-request load of ``bench/run.py`` and ``bench/scaling.py``: ``wrk`` with a Lua
script that POSTs a fal.run-shaped body and prints a machine-readable summary, and each
watched process's CPU per request around one run (from /proc, ``bench/procfs.py``).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from bench_common import BenchError
from procfs import cpu_seconds

LOAD_CONNECTIONS, LOAD_THREADS = 64, 2

# wrk script: the small fal.run-shaped POST, and a machine-readable summary at the end
# (wrk's `done` gets the merged latency histogram of every thread, in µs).
WRK_SCRIPT = r"""
wrk.method = "POST"
wrk.body = '{"prompt":"cat"}'
wrk.headers["content-type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nBENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"p50_us":%.1f,"p99_us":%.1f,"mean_us":%.1f,"max_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""


def wrk_script(target_url: str | None = None) -> str:
    """WRK_SCRIPT, sending ``x-fal-target-url: target_url`` when given (the fal SDK's proxy
    protocol, for a forwarder that speaks only that: fal's own, in Express)."""
    if target_url is None:
        return WRK_SCRIPT
    extra = f'wrk.headers["x-fal-target-url"] = "{target_url}"\n'
    return WRK_SCRIPT.replace('wrk.method = "POST"\n', 'wrk.method = "POST"\n' + extra, 1)


def run_wrk(
    url: str, script: Path, *, connections: int, threads: int, seconds: int
) -> dict[str, Any]:
    cmd = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
        "--latency", "-s", str(script), url,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    match = re.search(r"^BENCH_JSON (.*)$", out.stdout, re.M)
    if out.returncode != 0 or match is None:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stdout}{out.stderr}")
    result = json.loads(match.group(1))
    errors = sum(result["errors"].values())
    if result["requests"] == 0 or errors:
        raise BenchError(f"wrk at {url}: {result['requests']} requests, errors {result['errors']}")
    return result


def small_load(url: str, script: Path, pids: dict[str, int], *, connections: int, threads: int,
               seconds: int) -> dict[str, Any]:  # fmt: skip
    """One wrk run; adds each watched process's CPU µs per request and CPU utilisation."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.monotonic()
    result = run_wrk(url, script, connections=connections, threads=threads, seconds=seconds)
    wall = time.monotonic() - started
    for name, pid in pids.items():
        used = cpu_seconds(pid) - before[name]
        result[f"{name}_cpu_us_per_req"] = used * 1e6 / result["requests"]
        result[f"{name}_cpu_util"] = used / wall
    result["req_per_s"] = result["requests"] / (result["duration_us"] / 1e6)
    return result
