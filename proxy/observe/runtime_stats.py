"""What the process and its event loop are doing, for ``/metrics``, at no cost per request.

* :class:`LoopLag`: how late the event loop runs a timer (a loop kept busy by a slow
  callback, a blocking call, the garbage collector or a starved CPU makes every request wait
  that long).
* :class:`UpstreamConnections`: the upstream session's connections, in use and idle, counted
  when ``/metrics`` is scraped.
* :class:`WorkerRestarts`: how many workers the ``--workers`` supervisor has replaced,
  read when ``/metrics`` is scraped from a counter the supervisor shares with its workers.
* :func:`process_collector`: prometheus_client's own ``process_*`` metrics (open files, RSS,
  CPU, start time), read from ``/proc`` when ``/metrics`` is scraped.

None of them runs a thread, and none adds work to a request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LAG_INTERVAL = 0.5  # s between two of LoopLag's timers
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class LoopLag:
    """Event-loop lag: a timer on the loop, re-armed by itself every ``interval`` seconds,
    records how late it ran (``gauge``: the last lag; ``histogram``: every one).

    Why a self-re-arming timer, not a thread nor a measure at scrape time: a thread would need
    the GIL the loop holds (and would measure the GIL as much as the loop); a measure at
    scrape time sees one instant every scrape interval and misses a loop stalled between two
    scrapes, while the histogram here has every sample of the interval (two a second), so a
    p99 over 5 minutes sees a stall of a fraction of a second. The cost: two callbacks a
    second on an idle loop (a few µs each), nothing per request. A stall of ``s`` seconds
    is recorded once as a lag of about ``s`` (the timer re-arms from the time it actually
    ran), not as many lags.

    uvloop's timers have millisecond resolution: a lag of a millisecond or so is the floor.
    """

    def __init__(self, gauge: Gauge, histogram: Histogram, interval: float = LAG_INTERVAL) -> None:
        self.gauge, self.histogram, self.interval = gauge, histogram, interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Arm the first timer on the running loop (again: nothing more)."""
        if self._handle is not None:
            return
        self._loop = loop = asyncio.get_running_loop()
        self._due = loop.time() + self.interval
        self._handle = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        lag = now - self._due if now > self._due else 0.0
        self.gauge.set(lag)
        self.histogram.observe(lag)
        self._due = now + self.interval
        self._handle = loop.call_at(self._due, self._tick)


class UpstreamConnections(Collector):
    """``fal_proxy_upstream_connections{state="in_use"|"idle"}``: the upstream session's
    connections, counted at scrape time from its aiohttp connector (``session()`` gives the
    session, None before the app's lifespan ran). Counted from the connector's ``_acquired``
    set and ``_conns`` pool (aiohttp has no public count; a test pins both)."""

    def __init__(self, session: Callable[[], Any]) -> None:
        self.session = session

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "fal_proxy_upstream_connections",
            "Upstream (gateway and direct) connections: in use by a request, or idle in the pool",
            labels=["state"],
        )
        in_use, idle = connection_counts(self.session())
        family.add_metric(["in_use"], in_use)
        family.add_metric(["idle"], idle)
        yield family


def connection_counts(session: Any) -> tuple[int, int]:
    """(in use, idle) connections of an aiohttp session; (0, 0) without one."""
    connector = getattr(session, "connector", None) if session is not None else None
    if connector is None or getattr(session, "closed", True):
        return 0, 0
    acquired = getattr(connector, "_acquired", ())
    pooled = getattr(connector, "_conns", {})
    return len(acquired), sum(len(conns) for conns in pooled.values())


class RestartCount:
    """The number of workers the ``--workers`` supervisor replaced: one integer in shared
    memory (a ``multiprocessing`` RawValue), written by the supervisor, read by every worker
    at scrape time. Set in a worker by :func:`use_restart_count` before its app is built;
    a single process (no supervisor) reports 0."""

    value: Any = None  # the shared RawValue('Q'), in a worker under the supervisor

    def get(self) -> int:
        shared = self.value
        return int(shared.value) if shared is not None else 0


RESTARTS = RestartCount()


def use_restart_count(shared: Any) -> None:
    """(In a worker.) Report the supervisor's shared restart counter."""
    RESTARTS.value = shared


class WorkerRestarts(Collector):
    """``fal_proxy_worker_restarts_total``: workers the supervisor replaced since it started.

    Why a counter shared by the supervisor rather than only each process's start time: with
    ``--workers N`` the scrapes of one port reach any of the workers, each with its own start
    time, so ``changes(process_start_time_seconds[…])`` would count a worker switch as a
    restart; every worker reports the same shared count. A single process (the recommended
    way when scraping: one worker per pod) has no supervisor: its restarts are the
    container's, seen as ``changes(process_start_time_seconds[…])`` (``fal_proxy_workers``
    says which case a target is)."""

    def __init__(self, count: RestartCount = RESTARTS) -> None:
        self.count = count

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            "fal_proxy_worker_restarts",
            "Workers the --workers supervisor replaced (died or hung) since it started",
            value=self.count.get(),
        )


def process_collector(registry: CollectorRegistry) -> None:
    """prometheus_client's process metrics in ``registry`` (``process_open_fds``,
    ``process_max_fds``, ``process_resident_memory_bytes``, ``process_start_time_seconds``,
    ``process_cpu_seconds_total``…; read from /proc at scrape time, on Linux)."""
    ProcessCollector(registry=registry)
