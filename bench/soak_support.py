"""Helpers for ``bench/soak.py``: child processes whose output is scanned line by line,
figures from /proc, and a small raw HTTP/1.1 client on asyncio streams.

Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_common import stop_process
from procfs import cpu_seconds, fd_count, peak_rss_mib, reset_peak_rss, rss_mib, status_kib  # noqa: F401

try:
    import orjson

    _loads: Any = orjson.loads
except ImportError:  # pragma: no cover - orjson is a dependency of the proxy
    _loads = json.loads

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # the only address this script talks to
CLK_TCK = os.sysconf("SC_CLK_TCK")


class SoakError(RuntimeError):
    """Setting up a run failed (a child did not start, ...)."""


# -- /proc: bench/procfs.py -------------------------------------------------------------


async def wait_fds(pid: int, limit: int, timeout: float) -> tuple[int, float]:  # noqa: ASYNC109 - a poll budget: returns the fds then
    """Wait until ``pid`` holds at most ``limit`` fds; (fds then, seconds waited)."""
    started = time.monotonic()
    while True:
        fds = fd_count(pid)
        waited = time.monotonic() - started
        if fds <= limit or waited >= timeout:
            return fds, waited
        await asyncio.sleep(0.1)


# -- child processes --------------------------------------------------------------------

CHILDREN: list[subprocess.Popen[bytes]] = []  # every child ever started, for the clean-up


def stop_all_children(grace: float = 5.0) -> None:
    """Terminate every child this script started (by pid), then kill what is left."""
    for proc in CHILDREN:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in CHILDREN:
        if proc.poll() is None:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2)


def child_env(**extra: str) -> dict[str, str]:
    """A clean environment: nothing from the caller's shell that could change behaviour."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Snapshot:
    lines: int
    fives: int
    tracebacks: int
    leaks: int
    statuses: collections.Counter[tuple[Any, Any]]
    websockets: int


@dataclass
class Child:
    """A child process (proxy or emulator) whose merged stdout/stderr is read by a thread.

    Every line is scanned as it arrives: for ``secret`` (a leaked key), for tracebacks
    (``Traceback`` or a JSON ``exception`` field), and for the canonical ``request`` lines
    (counted by (status, error)); any other JSON line is kept (bounded) for waits.
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    secret: bytes
    proc: subprocess.Popen[bytes] = field(init=False)
    port: int = 0
    lines: int = 0
    fives: int = 0  # lines saying status 500
    tracebacks: int = 0
    leaks: int = 0
    websockets: int = 0  # canonical "websocket" lines
    # other lines at warning level and above, by (level, event): what the proxy complained about
    complaints: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    statuses: collections.Counter[tuple[Any, Any]] = field(default_factory=collections.Counter)
    records: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=4000)
    )
    samples: list[str] = field(default_factory=list)  # the first few bad lines, key redacted
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Child:
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,  # a Ctrl-C reaches only this script
        )  # fmt: skip
        CHILDREN.append(self.proc)
        assert self.proc.stdout is not None
        with contextlib.suppress(OSError):  # a bigger pipe absorbs log bursts; best effort
            fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        threading.Thread(target=self._drain, name=f"drain-{self.name}", daemon=True).start()
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _sample(self, kind: str, line: bytes) -> None:
        if len(self.samples) < 10:
            text = line.replace(self.secret, b"<FAL_KEY>").decode("utf-8", "replace")
            self.samples.append(f"{kind}: {text[:600]}")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.lock:
                self._scan(line)

    def _scan(self, line: bytes) -> None:
        self.lines += 1
        if self.secret in line:
            self.leaks += 1
            self._sample("key", line)
        if b"Traceback" in line or b'"exception"' in line:
            self.tracebacks += 1
            self._sample("traceback", line)
        try:
            record = _loads(line)
        except ValueError:
            return
        if not isinstance(record, dict):
            return
        if record.get("status") == 500:
            self.fives += 1
            self._sample("500", line)
        event = record.get("event")
        if event == "request":
            self.statuses[(record.get("status"), record.get("error"))] += 1
            return
        if event == "websocket":
            self.websockets += 1
        elif record.get("level") in ("warning", "error", "critical"):
            self.complaints[(record["level"], str(event).split("\n", 1)[0][:100])] += 1
        if event == "listening" and not self.port:
            self.port = int(record["port"])
        self.records.append(record)

    def snapshot(self) -> Snapshot:
        with self.lock:
            return Snapshot(
                self.lines,
                self.fives,
                self.tracebacks,
                self.leaks,
                collections.Counter(self.statuses),
                self.websockets,
            )

    def find(self, predicate: Any) -> dict[str, Any] | None:
        with self.lock:
            records = list(self.records)
        return next((r for r in records if predicate(r)), None)

    async def wait_listening(self, timeout: float = 40.0) -> None:  # noqa: ASYNC109 - a start-up deadline with its own error
        deadline = time.monotonic() + timeout
        while not self.port:
            if not self.alive or time.monotonic() > deadline:
                raise SoakError(
                    f"{self.name} did not start (exit {self.proc.poll()}): {self.samples}"
                )
            await asyncio.sleep(0.05)

    async def wait_log(self, predicate: Any, timeout: float) -> dict[str, Any] | None:  # noqa: ASYNC109 - a poll budget: None if not logged
        deadline = time.monotonic() + timeout
        while (found := self.find(predicate)) is None and time.monotonic() < deadline:  # noqa: ASYNC110 - log lines arrive without an event
            await asyncio.sleep(0.05)
        return found

    async def settle(self, quiet: float = 0.3, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a poll budget, never raises
        """Wait until the child's output has been quiet for ``quiet`` s (its log lines are in)."""
        deadline = time.monotonic() + timeout
        seen = -1
        while time.monotonic() < deadline:
            if self.lines == seen:
                return
            seen = self.lines
            await asyncio.sleep(quiet)

    def stop(self) -> None:
        stop_process(self.proc)


# -- a raw HTTP/1.1 client --------------------------------------------------------------


@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    clean: bool = False  # the body ended as framed (content-length, last chunk, or EOF)
    error: str | None = None  # a connection error, or "timeout"
    seconds: float = 0.0

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def request_head(
    method: str,
    path: str,
    port: int,
    *,
    body: bytes | None = None,
    chunked: bool = False,
    content_type: str = "application/json",
    close: bool = True,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}"]
    if body is not None or chunked:
        lines.append(f"Content-Type: {content_type}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif body is not None:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def read_head(reader: asyncio.StreamReader, response: Response) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    response.status = int(status_line.split(" ", 2)[1])
    for line in header_lines:
        if ":" in line:
            name, _, value = line.partition(":")
            response.headers[name.strip().lower()] = value.strip()


async def read_body(reader: asyncio.StreamReader, response: Response) -> None:
    """Read the body as framed; ``clean`` is False when the connection ended mid-body."""
    body = bytearray()
    try:
        if "chunked" in response.headers.get("transfer-encoding", "").lower():
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        elif "content-length" in response.headers:
            body += await reader.readexactly(int(response.headers["content-length"]))
        else:
            body += await reader.read()  # close-delimited
        response.clean = True
    except asyncio.IncompleteReadError as exc:
        body += exc.partial
    except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
        response.error = type(exc).__name__
    response.body = bytes(body)


async def http_request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109 - never raises: a timeout is recorded in the Response
) -> Response:
    """One request on a fresh connection (``Connection: close``); never raises."""
    response = Response()
    started = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(request_head(method, path, port, body=body))
            await read_head(reader, response)
            if method != "HEAD" and response.status not in (204, 304):
                await read_body(reader, response)
            else:
                response.clean = True
    except TimeoutError:
        response.error = "timeout"
    except (
        OSError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
        ValueError,
        IndexError,
    ) as exc:
        response.error = type(exc).__name__
    finally:
        if writer is not None:
            writer.close()
    response.seconds = time.perf_counter() - started
    return response


async def read_until(reader: asyncio.StreamReader, buffer: bytearray, token: bytes) -> bool:
    """Read into ``buffer`` until ``token`` is in it (True) or the peer closes (False)."""
    while token not in buffer:
        data = await reader.read(65536)
        if not data:
            return False
        buffer += data
    return True


async def read_to_eof(reader: asyncio.StreamReader, buffer: bytearray) -> bool:
    """Read into ``buffer`` until EOF; False on a reset."""
    try:
        while data := await reader.read(65536):
            buffer += data
    except ConnectionError:
        return False
    return True


# -- figures ----------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"
