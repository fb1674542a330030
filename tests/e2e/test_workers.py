"""Several workers (``--workers N``): one port, a drain of every worker on SIGTERM, and a
worker that dies (OOM, crash) replaced by uvicorn's supervisor while traffic goes on.

Which worker holds a connection is read from ``/proc`` (the server side of the TCP
connection, found by the client's port, is a socket in exactly one worker's fd table), so
the tests put a stream on each worker on purpose instead of hoping the kernel spreads them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FAL_KEY, ROOT, FakeGateway, Process, child_env
from tests.redis_support import stop_process

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc (Linux)")

START = 30.0  # seconds for a worker (a fresh interpreter) to come up, on a slow machine


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# --- processes, as /proc sees them --------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = text.rsplit(")", 1)[1].split()[:2]  # the name, in brackets, may hold spaces
    return state, int(ppid)


def exited(pid: int) -> bool:
    """Every thread of ``pid`` has exited (its files, the listening socket among them, are
    closed). The main thread turns zombie first, while the others may still hold the
    process's files for a moment: a connection queued on its socket then is reset."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in threads:
        try:
            state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            return False
    return True


def children(pid: int) -> set[int]:
    """The live (not zombie) processes whose parent is ``pid``."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == pid and stat[0] != "Z":
                found.add(int(entry))
    return found


def running(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def writes(pid: int) -> int:
    """How many write system calls the process has made so far (``syscw`` in its io file)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError(f"no syscw in /proc/{pid}/io")


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _server_side_inode(server_port: int, client_port: int) -> int | None:
    """The inode of the accepted socket of the loopback connection ``client_port`` → server."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            if int(local.rsplit(":", 1)[1], 16) == server_port and (
                int(remote.rsplit(":", 1)[1], 16) == client_port
            ):
                return inode
    return None


def _listening_inodes(port: int) -> set[int]:
    """The inodes of every socket listening on ``port`` (TCP state 0A)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    found.add(int(fields[9]))
    return found


# --- the proxy under test -----------------------------------------------------------------


@dataclass
class Workers:
    """A ``--workers`` proxy: the supervisor process and the workers it reported."""

    process: Process
    url: str
    port: int

    @property
    def supervisor(self) -> int:
        return self.process.proc.pid

    def listening_pids(self) -> list[int]:
        """Every worker that logged its listening line, in order."""
        return [
            line["pid"] for line in self.process.json_lines() if line.get("event") == "listening"
        ]

    def wait_for_listening(self, count: int) -> list[int]:
        """Wait until ``count`` workers have logged their listening line; all of them."""

        def enough() -> list[int] | None:
            assert self.process.proc.poll() is None, "\n".join(self.process.lines)
            pids = self.listening_pids()
            return pids if len(pids) >= count else None

        return wait_until(enough, START, f"{count} listening lines")

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.process.json_lines() if line.get("event") == event]

    def worker_holding(self, response: httpx.Response) -> int:
        """The worker serving ``response``'s connection."""
        client_port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
        inode = wait_until(
            lambda: _server_side_inode(self.port, client_port), 5, "the server-side socket"
        )
        workers = children(self.supervisor)
        holders = wait_until(
            lambda: [pid for pid in workers if inode in _socket_inodes(pid)], 5, "its worker"
        )
        assert len(holders) == 1, holders
        return int(holders[0])


def start_workers(gateway: FakeGateway, count: int = 2, **env: str) -> Workers:
    process = Process(
        [sys.executable, "-m", "proxy", "--port", "0", "--workers", str(count)],
        child_env(
            FAL_KEY=FAL_KEY,
            FAL_PROXY_GATEWAY_URL=gateway.gateway_url,
            FAL_PROXY_LOG_FORMAT="json",
            **env,
        ),
    )
    first = process.wait_for_json(lambda r: r.get("event") == "listening", timeout=START)
    workers = Workers(process, first["url"], first["port"])
    workers.wait_for_listening(count)
    return workers


@contextlib.contextmanager
def running_workers(gateway: FakeGateway, count: int = 2, **env: str) -> Iterator[Workers]:
    """Start a ``--workers`` proxy; afterwards leave no process behind, even on failure."""
    workers = start_workers(gateway, count, **env)
    seen = children(workers.supervisor)
    try:
        yield workers
    finally:
        seen |= children(workers.supervisor)
        stop_process(workers.process.proc)  # SIGTERM, SIGKILL after 10 s
        # Only left if the supervisor was killed before its workers (a stopped worker never
        # ends on SIGTERM): killed before the supervisor's stdout is closed, since they hold
        # it open and closing it waits for its reader, which waits for them.
        for pid in seen:
            with contextlib.suppress(ProcessLookupError):
                if running(pid):
                    os.kill(pid, signal.SIGKILL)
        workers.process.stop()


def stop_and_check_nothing_is_left(workers: Workers) -> None:
    """SIGTERM the supervisor: it exits 0, and every process it started is gone."""
    descendants = children(workers.supervisor)  # the workers and multiprocessing's tracker
    assert set(workers.listening_pids()) & descendants
    workers.process.proc.send_signal(signal.SIGTERM)
    assert workers.process.proc.wait(30) == 0
    wait_until(lambda: not [pid for pid in descendants if running(pid)], 10, "every worker to exit")


@dataclass
class Stream:
    response: httpx.Response
    lines: Iterator[str]
    worker: int


def open_stream(stack: contextlib.ExitStack, workers: Workers) -> Stream:
    """A gated SSE stream (``emulator/sse``): event 1 arrives, 2 and 3 wait for their gates."""
    client = stack.enter_context(
        httpx.Client(base_url=workers.url, trust_env=False, timeout=httpx.Timeout(20, read=15))
    )
    response = stack.enter_context(client.stream("POST", "/emulator/sse?n=3", json={}))
    assert response.status_code == 200
    lines = response.iter_lines()
    assert next(lines) == 'data: {"n": 1}'
    return Stream(response, lines, workers.worker_holding(response))


def streams_on(stack: contextlib.ExitStack, workers: Workers, pids: set[int]) -> list[Stream]:
    """Open streams until each of ``pids`` serves at least one.

    Each worker listens on its own socket (SO_REUSEPORT) and the kernel picks one by the
    connection's addresses: a new connection lands on any of two workers with even odds.
    (No worker may be paused to steer it: a paused worker's socket still gets its share.)
    """
    streams: list[Stream] = []
    for _ in range(24):
        if pids <= {s.worker for s in streams}:
            return streams
        streams.append(open_stream(stack, workers))
    raise AssertionError(f"no stream landed on {pids - {s.worker for s in streams}}")


def release_and_finish(gateway: FakeGateway, stream: Stream) -> None:
    gateway.release("sse-2")
    gateway.release("sse-3")
    rest = [line for line in stream.lines if line]
    assert rest == ['data: {"n": 2}', "event: done", 'data: {"n": 3}']


# --- the tests ----------------------------------------------------------------------------


def test_workers_share_one_port_and_all_drain_on_sigterm(fake_gateway: FakeGateway) -> None:
    process = Process(
        [sys.executable, "-m", "proxy", "--port", "0", "--workers", "2"],
        child_env(
            FAL_KEY=FAL_KEY,
            FAL_PROXY_GATEWAY_URL=fake_gateway.gateway_url,
            FAL_PROXY_LOG_FORMAT="json",
        ),
    )
    try:
        first = process.wait_for_json(lambda r: r.get("event") == "listening")
        process.wait_for_json(
            lambda r: r.get("event") == "listening" and r.get("pid") != first["pid"]
        )
        with httpx.Client(base_url=first["url"], trust_env=False, timeout=10) as c:
            for _ in range(6):
                with httpx.Client(base_url=first["url"], trust_env=False, timeout=10) as fresh:
                    assert fresh.post("/emulator/echo", json={}).status_code == 200
            assert c.get("/healthz").status_code == 200
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(20) == 0
    finally:
        process.stop()


def test_a_burst_of_connections_is_spread_over_the_workers(fake_gateway: FakeGateway) -> None:
    # On one socket shared by all, the first worker awake took a whole burst of connections
    # (uvloop accepts until the queue is empty): 64 at once all went to one of two workers.
    with running_workers(fake_gateway) as workers:
        pids = set(workers.listening_pids())
        # Each worker listens on a socket of its own (SO_REUSEPORT), the supervisor on none.
        listening = _listening_inodes(workers.port)
        assert len(listening) == len(pids), listening
        for pid in pids:
            assert len(listening & _socket_inodes(pid)) == 1
        assert not listening & _socket_inodes(workers.supervisor)
        one_cpu = {min(os.sched_getaffinity(0))}
        for pid in pids:  # the burst waits in the kernel until the workers take it, in turns
            for task in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(task), one_cpu)
            os.kill(pid, signal.SIGSTOP)
        try:
            burst = [socket.create_connection(("127.0.0.1", workers.port), 5) for _ in range(32)]
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        try:
            for sock in burst:  # every connection queued before any is answered
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            held: dict[int, int] = dict.fromkeys(pids, 0)
            for sock in burst:
                assert sock.recv(64).startswith(b"HTTP/1.1 200"), "no answer"
                port = sock.getsockname()[1]
                inode = wait_until(lambda port=port: _server_side_inode(workers.port, port), 5,
                                   "the server-side socket")  # fmt: skip
                holder = wait_until(
                    lambda inode=inode: [p for p in pids if inode in _socket_inodes(p)], 5,
                    "its worker",
                )  # fmt: skip
                held[holder[0]] += 1
            # Even odds per connection: fewer than 4 of 32 on a worker happens ~1 in 10^5.
            assert min(held.values()) >= 4, held
        finally:
            for sock in burst:
                sock.close()


def test_sigterm_lets_a_stream_on_every_worker_finish_then_exits_0(
    fake_gateway: FakeGateway,
) -> None:
    with running_workers(fake_gateway, FAL_PROXY_DRAIN_SECONDS="20") as workers:
        pids = set(workers.listening_pids())
        descendants = children(workers.supervisor)
        with contextlib.ExitStack() as stack:
            streams = streams_on(stack, workers, pids)
            workers.process.proc.send_signal(signal.SIGTERM)  # every worker mid-stream

            def refused() -> bool:  # the port closes: no worker, nor the supervisor, holds it
                try:
                    httpx.get(workers.url + "/healthz", trust_env=False, timeout=1)
                except httpx.ConnectError:
                    return True
                except httpx.TransportError:
                    pass
                return False

            wait_until(refused, 10, "new connections to be refused while draining")
            assert all(running(pid) for pid in pids)  # still draining
            for stream in streams:  # not cut by the shutdown
                release_and_finish(fake_gateway, stream)
        assert workers.process.proc.wait(20) == 0
        wait_until(lambda: not [p for p in descendants if running(p)], 10, "the workers to exit")
        assert len(workers.logged("Shutting down")) == len(pids)
        assert "Traceback" not in "\n".join(workers.process.lines)


class Traffic:
    """Threads posting to ``emulator/echo``, a new connection each time (so the kernel
    hands it to any worker); every request's start, end and status or error is kept."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        self.results: list[tuple[float, float, int | BaseException]] = []  # monotonic times
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=self.url, trust_env=False, timeout=10, limits=limits) as c:
            while not self.stop.is_set():
                start = time.monotonic()
                outcome: int | BaseException
                try:
                    outcome = c.post("/emulator/echo", json={}).status_code
                except httpx.TransportError as exc:
                    outcome = exc
                self.results.append((start, time.monotonic(), outcome))

    def successes(self, after: float = 0.0, before: float = float("inf")) -> int:
        done = list(self.results)
        return sum(1 for start, end, o in done if o == 200 and after < start and end < before)

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(20)


def test_a_killed_worker_is_replaced_while_traffic_is_served(fake_gateway: FakeGateway) -> None:
    with (
        running_workers(  # no 429s: every POST is a submit, and the survivor takes them all
            fake_gateway,
            FAL_PROXY_RATE_LIMIT_RPM="0",
            FAL_PROXY_SUBMITS_PER_HOUR="0",
            FAL_PROXY_MAX_CONCURRENT="0",
        ) as workers,  # fmt: skip
        contextlib.ExitStack() as stack,
    ):
        original = set(workers.listening_pids())
        assert original <= children(workers.supervisor)
        streams = streams_on(stack, workers, original)  # one in flight on each worker
        victim = streams[0].worker
        with Traffic(workers.url) as traffic:
            wait_until(lambda: traffic.successes() >= 20, 10, "traffic to flow")
            os.kill(victim, signal.SIGKILL)  # as the OOM killer does
            wait_until(lambda: exited(victim), 5, "the worker to die")
            dead = time.monotonic()
            for stream in streams:
                if stream.worker == victim:  # its connections are cut
                    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                        for _ in stream.lines:
                            pass

            [replacement] = [
                pid for pid in workers.wait_for_listening(len(original) + 1) if pid not in original
            ]
            replaced = time.monotonic()
            assert replacement in children(workers.supervisor)
            wait_until(
                lambda: traffic.successes(after=replaced) >= 20, 10, "traffic after the replacement"
            )
        # Served on (by the other worker) between the death and the replacement.
        assert traffic.successes(after=dead, before=replaced) > 0
        failed = [(start, o) for start, _, o in traffic.results if o != 200]
        # Only requests already in flight on the killed worker may fail, and only as a lost
        # connection: none started once it was gone, and no answer was an error status.
        assert all(isinstance(o, httpx.TransportError) for _, o in failed), failed
        assert all(start < dead for start, _ in failed), failed
        for stream in streams:
            if stream.worker != victim:  # the other worker's stream was never disturbed
                release_and_finish(fake_gateway, stream)

        # The replacement serves: with the other worker paused, a stream lands on it.
        streams_on(stack, workers, {replacement})
        [died] = workers.logged("worker_died")
        assert (died["pid"], died["signal"], died["hung"]) == (victim, "SIGKILL", False)
        assert [line["pid"] for line in workers.logged("worker_started")][-1] == replacement
        stop_and_check_nothing_is_left(workers)


def test_a_hung_worker_is_killed_and_replaced(fake_gateway: FakeGateway) -> None:
    with running_workers(fake_gateway) as workers:
        original = workers.listening_pids()
        # Until the supervisor has a first health-check answer from a worker, the worker is
        # still starting and has WORKER_START_SECONDS (60 s), not the 5 s health-check timeout;
        # a worker that comes up faster than the supervisor's first check (on an idle machine)
        # would be stopped before that. An idle worker writes nothing but those answers (its
        # listening line came before): wait for one, which the supervisor then reads.
        written = writes(original[0])
        wait_until(lambda: writes(original[0]) > written, 10, "a health-check answer")
        os.kill(original[0], signal.SIGSTOP)  # alive, but answers nothing any more
        [replacement] = [p for p in workers.wait_for_listening(3) if p not in original]
        [died] = workers.logged("worker_died")
        assert (died["pid"], died["signal"], died["hung"]) == (original[0], "SIGKILL", True)
        assert not running(original[0]) and replacement in children(workers.supervisor)
        with httpx.Client(base_url=workers.url, trust_env=False, timeout=10) as c:
            assert c.post("/emulator/echo", json={}).status_code == 200
        stop_and_check_nothing_is_left(workers)


def test_a_slow_starting_worker_is_not_taken_for_hung(
    fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    # Each worker (a fresh interpreter) takes 7 s before it can answer a health check, longer
    # than the 5 s a started worker has to answer one.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys, time\nif '--multiprocessing-fork' in sys.argv:\n    time.sleep(7)\n"
    )
    pythonpath = os.pathsep.join([str(tmp_path), str(ROOT)])
    with running_workers(fake_gateway, PYTHONPATH=pythonpath) as workers:
        assert len(workers.logged("worker_started")) == 2
        assert workers.logged("worker_died") == []
        stop_and_check_nothing_is_left(workers)


def test_a_worker_that_cannot_start_stops_the_supervisor_instead_of_looping(
    fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    # Every interpreter of the run (supervisor and workers) imports this first.
    (tmp_path / "sitecustomize.py").write_text(
        "import proxy.app.assemble\n"
        "def create_app(settings, **options):\n"
        "    raise RuntimeError('broken on purpose')\n"
        "proxy.app.assemble.create_app = create_app\n"
    )
    process = Process(
        [sys.executable, "-m", "proxy", "--port", "0", "--workers", "2"],
        child_env(
            FAL_KEY=FAL_KEY,
            FAL_PROXY_GATEWAY_URL=fake_gateway.gateway_url,
            FAL_PROXY_LOG_FORMAT="json",
            PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
        ),
    )
    try:
        assert process.proc.wait(START) == 1
    finally:
        process.stop()
    events = [line.get("event") for line in process.json_lines()]
    assert "worker_start_failed" in events and "worker_failed_to_start" in events
    assert events.count("worker_started") == 2  # no replacement started
    assert "listening" not in events


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        env=child_env(FAL_PROXY_LOG_FORMAT="json", **env),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_bad_configuration_with_workers_exits_2_with_one_line_before_any_worker() -> None:
    gateway = {"FAL_KEY": "k", "FAL_PROXY_GATEWAY_URL": "http://127.0.0.1:9/v1/a/g/fal"}
    out = run_cli("--workers", "2", FAL_PROXY_METRICS_PORT="9100", **gateway)
    assert (out.returncode, out.stdout) == (2, "")
    [line] = out.stderr.splitlines()
    assert line.startswith("fal-gateway-proxy: error: ") and "FAL_PROXY_METRICS_PORT" in line

    with socket.socket() as taken:  # the port cannot be had
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = run_cli("--port", str(taken.getsockname()[1]), "--workers", "2", **gateway)
    assert out.returncode == 2
    [line] = out.stderr.splitlines()
    assert line.startswith("fal-gateway-proxy: error: cannot listen on 127.0.0.1:")
    assert "worker_started" not in out.stdout and "listening" not in out.stdout
