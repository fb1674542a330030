"""What ``bench/run.py`` and ``bench/ws_bench.py`` share: where the repository is, the
fake gateway's path prefix, the error a failed measurement raises, CPU pinning, the child
processes (started, awaited until they listen, drained, stopped) and progress lines.

The /proc readers are in ``bench/procfs.py``. Imported as ``bench_common`` (bench/ is
sys.path[0] when a bench script runs), by both scripts; it imports neither, so the two
scripts' imports form no cycle.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_PREFIX = "/v1/acct/gw/fal"  # the fake gateway's "/v1/<account>/<gateway>/fal"


def proxy_row_env(env: dict[str, str], gateway_url: str) -> dict[str, str]:
    """``env`` plus the configuration of ``bench/run.py``'s main "proxy" row, in front of the
    gateway at ``gateway_url``: the JSON log line, and limits on (their cost is part of every
    request) but high enough never to refuse the load generator, which is one caller sending
    thousands of requests a second."""
    return dict(
        env,
        FAL_KEY="k",
        FAL_PROXY_GATEWAY_URL=gateway_url,
        FAL_PROXY_LOG_FORMAT="json",
        FAL_PROXY_RATE_LIMIT_RPM="1000000000",
        FAL_PROXY_MAX_CONCURRENT="100000",
        FAL_PROXY_SUBMITS_PER_HOUR="1000000000",
    )


class BenchError(RuntimeError):
    """A measurement could not be made or came out invalid."""


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` (affinity is per thread) to ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


# -- child processes --------------------------------------------------------------------


@dataclass
class Child:
    """A long-running child (fake gateway, echo server, proxy) whose output a thread drains."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int = 0
    tail: collections.deque[bytes] = field(default_factory=lambda: collections.deque(maxlen=64))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output_tail(self) -> str:
        return b"".join(self.tail).decode("utf-8", "replace")[-4000:]

    def say_if_exited(self) -> None:
        """If the child has exited, say so with its last output (why a measurement failed)."""
        if self.proc.poll() is not None:
            step(f"{self.name} exited ({self.proc.returncode}):\n{self.output_tail()}")

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a child, kill it if it ignores that for 10 s, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_child(
    name: str, argv: list[str], env: dict[str, str], stack: contextlib.ExitStack,
    start_seconds: float = 30.0,
) -> Child:  # fmt: skip
    """Start ``argv``, wait for its ``"event": "listening"`` JSON line, then drain its output.

    stdout and stderr share one pipe, read by a thread that keeps only a short tail (for
    error messages): the proxy writes a log line per request, and a full pipe would
    stall it. The child gets its own session, so a Ctrl-C here reaches only this
    script, whose clean-up then stops the child.
    """
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    child = Child(name, proc)
    stack.callback(child.stop)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    with contextlib.suppress(OSError):  # a bigger pipe absorbs log bursts; best effort
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    listening = threading.Event()

    def drain() -> None:
        pending = b""
        while chunk := os.read(fd, 1 << 16):
            child.tail.append(chunk)
            if listening.is_set():
                continue
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                with contextlib.suppress(ValueError, AttributeError):
                    record = json.loads(line)
                    if record.get("event") == "listening":
                        child.port = int(record["port"])
                        listening.set()

    threading.Thread(target=drain, name=f"drain-{name}", daemon=True).start()
    deadline = time.monotonic() + start_seconds
    while not listening.wait(0.1):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"{name} did not start (exit {proc.poll()}):\n{child.output_tail()}")
    return child


# -- reporting --------------------------------------------------------------------------


def step(label: str) -> None:
    print(f"bench: {label}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# -- redis-server -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_calls(client: redis.Redis) -> int:
    """Script calls a Redis server has run (``INFO commandstats``): the Redis limiter's
    batches, each carrying the admits of one turn of a proxy's event loop."""
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


def start_redis(log: Path, stack: contextlib.ExitStack) -> redis.Redis:
    """A redis-server of our own on a free loopback port (no persistence); a client to it.

    redis-server cannot bind port 0: a free port is picked first, and if another process
    takes it meanwhile the server exits and another is tried. Its PING is believed only
    from our own server (its ``process_id``).
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server not found: apt-get install -y redis-server")
    for _attempt in range(5):
        port = free_port()
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        stack.callback(stop_process, proc)
        client = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(redis.ConnectionError):
                if int(client.info("server")["process_id"]) == proc.pid:
                    return client
            time.sleep(0.02)
        stop_process(proc)
    raise BenchError(f"redis-server did not start:\n{log.read_text()[-2000:]}")
