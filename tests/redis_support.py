"""A real ``redis-server`` on a free loopback port, for the limiter and proxy tests."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import redis

from proxy.limits import Limiter, LimitSettings, create_limiter

START_TIMEOUT = 10.0


def stop_process(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """Terminate a child, kill it if it ignores that for 10 s, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    """A loopback port nothing listens on (redis-server cannot bind port 0 itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start the server; with ``port`` 0, on a free port of its own.

        redis-server cannot bind port 0, so a free port is picked first, and another process
        may take it in between: then the server exits, and another port is tried. A PING is
        only believed from this process's own server (its ``process_id``), never from
        whatever else might already listen there.
        """
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed: apt-get install redis-server "
                "(.ci/run installs it when missing)"
            )
        choose = self.port == 0
        for _attempt in range(5):
            if choose:
                self.port = free_port()
            if self._start_on(binary):
                return self
            if not choose:
                break
        pytest.fail(f"redis-server did not start:\n{self.log.read_text()}")

    def _start_on(self, binary: str) -> bool:
        """True once our server answers PING on ``self.port``; False if it exited."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                try:
                    if int(client.info("server")["process_id"]) == self.proc.pid:
                        return True
                except redis.ConnectionError:
                    pass
                if self.proc.poll() is not None:  # e.g. the port was taken meanwhile
                    return False
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"redis-server did not answer PING:\n{self.log.read_text()}")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def client(self) -> redis.Redis:
        """A synchronous client (strings, not bytes) for the test to look into the server."""
        return redis.Redis(port=self.port, decode_responses=True)

    def keys(self) -> list[str]:
        with redis.Redis(port=self.port, decode_responses=True) as client:
            return sorted(client.keys("*"))


def memory_and_redis_agree(
    limits: LimitSettings, run: Callable[[Limiter, bool], Awaitable[list[object]]]
) -> None:
    """``run(limiter, together)`` on the memory limiter (one call at a time) and on the Redis
    one of ``limits`` (each turn's calls together: one batch) gives the same answers. ``run``
    starts the limiter; this closes it."""

    async def one(limiter: Limiter, together: bool) -> list[object]:
        try:
            return await run(limiter, together)
        finally:
            await limiter.close()

    async def both() -> None:
        memory = await one(create_limiter(replace(limits, redis_url=None)), False)
        shared = await one(create_limiter(limits), True)
        assert shared == memory

    asyncio.run(both())
