"""``bench/run.py``'s scaling rows: req/s at 1 and 2 workers.

* **Workers.** The same small POSTs (``wrk``, 64 connections) at ``python -m proxy
  --workers 1`` and ``--workers 2``, both with the limits in a ``redis-server`` of our own
  (``FAL_PROXY_REDIS_URL``: what several workers need to share one caller's limits), in
  rounds that alternate, median shown. Layout on the 2-core machine: each worker pinned to
  a CPU of its own (1 worker: CPU 0; 2 workers: CPU 0 and CPU 1); the fake gateway,
  redis-server and ``wrk`` free to run on either. So with one worker, they have the other
  CPU to themselves; with two, they take their share from the workers': the ratio is what
  a second core really buys on this machine, load generator included.

The streams-per-process rows (N SSE streams, M WebSockets through one proxy process) are in
``bench/streams.py``.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import BenchError, Child, pin, start_child, start_redis, step
from procfs import cpu_seconds
from wrk import LOAD_CONNECTIONS, LOAD_THREADS, run_wrk

WORKER_COUNTS = (1, 2)


def workers_of(pid: int) -> list[int]:
    """The supervisor's worker processes (multiprocessing's "spawn" children; not its
    resource tracker), from /proc."""
    found = []
    for child in descendants(pid):
        with contextlib.suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                found.append(child)
    return found


def descendants(pid: int) -> list[int]:
    """Every process under ``pid``, from /proc."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for tid in os.listdir(f"/proc/{parent}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{parent}/task/{tid}/children") as f:
                kids = [int(k) for k in f.read().split()]
                found += kids
                todo += kids
    return found


def wait_workers(child: Child, n: int, url: str, script: Path) -> list[int]:
    """The supervisor's ``n`` workers, once each has answered (a short wrk run reaches all)."""
    deadline = time.monotonic() + 60
    workers = [child.pid]  # --workers 1 is the plain single process, no supervisor
    while n > 1 and time.monotonic() < deadline:
        workers = workers_of(child.pid)
        if len(workers) >= n:
            break
        time.sleep(0.1)
    else:
        if n > 1:
            raise BenchError(f"{child.name}: {n} workers did not start:\n{child.output_tail()}")
    # A worker listens a moment after it starts: until every one has served, keep trying.
    while time.monotonic() < deadline:
        before = {pid: cpu_seconds(pid) for pid in workers}
        run_wrk(url, script, connections=LOAD_CONNECTIONS, threads=LOAD_THREADS, seconds=1)
        if all(cpu_seconds(pid) - before[pid] > 0.05 for pid in workers):
            return workers
    raise BenchError(f"{child.name}: not every worker served:\n{child.output_tail()}")


def workers_rows(
    proxy_env: dict[str, str], gateway_pid: int, script: Path, cpus: list[int], load_s: int,
    rounds: int, stack: contextlib.ExitStack,
) -> dict[str, Any]:  # fmt: skip
    """req/s and CPU per request at 1 and 2 workers, limits in Redis; see the module doc."""
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fal-proxy-workers-")))
    everywhere = set(cpus)
    os.sched_setaffinity(0, everywhere)  # redis-server, wrk and this script: on any CPU
    redis_client = start_redis(tmp / "redis.log", stack)
    redis_port = redis_client.connection_pool.connection_kwargs["port"]
    redis_pid = int(redis_client.info("server")["process_id"])
    env = dict(proxy_env, FAL_PROXY_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
    pin(gateway_pid, everywhere)
    proxies: dict[int, tuple[str, list[int]]] = {}
    for n in WORKER_COUNTS:
        argv = [sys.executable, "-m", "proxy", "--port", "0", "--workers", str(n)]
        child = start_child(f"proxy, {n} worker(s), Redis limits", argv, env, stack)
        url = f"http://127.0.0.1:{child.port}/fal-ai/x"
        step(f"{n} worker(s): waiting for every worker to serve")
        workers = wait_workers(child, n, url, script)
        for worker, cpu in zip(workers, cpus, strict=False):
            pin(worker, {cpu})
        proxies[n] = (url, workers)
    results: dict[str, Any] = {
        "layout": f"1 worker on CPU {cpus[0]}; 2 workers on CPU {cpus[0]} and CPU {cpus[1]}; "
        "fake gateway, redis-server and wrk on any CPU",
        "rounds": {n: [] for n in WORKER_COUNTS},
    }
    for round_ in range(1, rounds + 1):
        for n, (url, workers) in proxies.items():
            step(f"{n} worker(s), Redis limits: small POSTs, {LOAD_CONNECTIONS} connections, "
                 f"{load_s} s, round {round_}/{rounds}")  # fmt: skip
            watched = {f"w{i}": pid for i, pid in enumerate(workers)}
            watched |= {"redis": redis_pid, "gateway": gateway_pid}
            before = {name: cpu_seconds(pid) for name, pid in watched.items()}
            before["wrk"] = children_cpu_seconds()
            started = time.monotonic()
            run_wrk(url, script, connections=LOAD_CONNECTIONS, threads=LOAD_THREADS, seconds=1)
            result = run_wrk(url, script, connections=LOAD_CONNECTIONS, threads=LOAD_THREADS,
                             seconds=load_s)  # fmt: skip
            wall = time.monotonic() - started
            used = {name: cpu_seconds(pid) - before[name] for name, pid in watched.items()}
            used["wrk"] = children_cpu_seconds() - before["wrk"]
            result["req_per_s"] = result["requests"] / (result["duration_us"] / 1e6)
            proxy_cpu = sum(v for k, v in used.items() if k.startswith("w"))
            # CPU over both wrk runs (the 1 s settle included), per request of the long one:
            # the settle run is short, so this overstates each figure by the same few %.
            total = result["requests"] * (1 + 1 / load_s)
            result["proxy_cpu_us_per_req"] = proxy_cpu * 1e6 / total
            result["proxy_cpu_util"] = proxy_cpu / wall
            result["redis_cpu_us_per_req"] = used["redis"] * 1e6 / total
            result["gateway_cpu_us_per_req"] = used["gateway"] * 1e6 / total
            result["wrk_cpu_us_per_req"] = used["wrk"] * 1e6 / total
            # What the machine's CPUs could serve at most if only this CPU were spent.
            result["cpu_bound_req_per_s"] = len(everywhere) * total / sum(used.values())
            result["worker_cpu_util"] = [used[f"w{i}"] / wall for i in range(len(workers))]
            results["rounds"][n].append(result)
    for n in WORKER_COUNTS:
        ranked = sorted(results["rounds"][n], key=lambda r: r["req_per_s"])
        results[n] = ranked[(len(ranked) - 1) // 2]
    results["ratio"] = results[2]["req_per_s"] / results[1]["req_per_s"]
    return results


def children_cpu_seconds() -> float:
    """User + system CPU of this process's children that have ended (every wrk run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
