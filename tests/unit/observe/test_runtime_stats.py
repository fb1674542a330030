"""proxy.observe.runtime_stats: event-loop lag, upstream connections, worker restarts, /proc."""

from __future__ import annotations

import asyncio
import multiprocessing
import time

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, Histogram

from proxy.observe.runtime_stats import (
    LoopLag,
    RestartCount,
    UpstreamConnections,
    WorkerRestarts,
    connection_counts,
    process_collector,
)


def _lag() -> tuple[LoopLag, CollectorRegistry]:
    registry = CollectorRegistry()
    gauge = Gauge("lag_last", "", registry=registry)
    histogram = Histogram("lag", "", buckets=(0.01, 0.1, 1), registry=registry)
    return LoopLag(gauge, histogram, interval=0.02), registry


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    assert found is not None, (name, labels)
    return found


async def _until(check: object, what: str) -> None:
    deadline = time.monotonic() + 5
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def test_a_blocked_loop_is_recorded_as_one_lag_of_about_the_block() -> None:
    lag, registry = _lag()

    def count() -> float:
        return registry.get_sample_value("lag_count") or 0.0

    async def main() -> None:
        lag.start()
        lag.start()  # again: still one timer
        await _until(lambda: count() >= 1, "a first tick")
        before = count()
        time.sleep(0.3)  # noqa: ASYNC251 (the point: the loop blocked, the timer ~0.28 s late)
        await _until(lambda: count() > before, "the late tick")
        assert 0.2 < _value(registry, "lag_last") < 1.0
        # One late sample, not one per missed interval: the timer re-arms from when it ran.
        late = _value(registry, "lag_bucket", le="1.0") - _value(registry, "lag_bucket", le="0.1")
        assert late == 1
        lag.stop()
        stopped = count()
        await asyncio.sleep(0.1)  # five intervals: a timer left armed would have run
        assert count() == stopped

    asyncio.run(main())


def test_an_idle_loop_has_no_lag_to_speak_of() -> None:
    lag, registry = _lag()

    async def main() -> None:
        lag.start()
        await _until(lambda: (registry.get_sample_value("lag_count") or 0) >= 3, "three ticks")
        lag.stop()

    asyncio.run(main())
    assert registry.get_sample_value("lag_bucket", {"le": "0.1"}) == registry.get_sample_value(
        "lag_count"
    )


def test_upstream_connections_are_counted_in_use_and_idle() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def slow(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b"first")
            await release.wait()
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_get("/", slow)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        session = aiohttp.ClientSession()
        registry = CollectorRegistry()
        registry.register(UpstreamConnections(lambda: session))
        try:
            assert connection_counts(session) == (0, 0)
            response = await session.get(f"http://127.0.0.1:{port}/")
            await response.content.readexactly(5)
            assert connection_counts(session) == (1, 0)
            assert _value(registry, "fal_proxy_upstream_connections", state="in_use") == 1
            release.set()
            await response.read()
            response.release()
            assert connection_counts(session) == (0, 1)
            assert _value(registry, "fal_proxy_upstream_connections", state="idle") == 1
        finally:
            await session.close()
            await runner.cleanup()
        assert connection_counts(session) == (0, 0)  # closed

    asyncio.run(main())


def test_no_session_yet_is_no_connection() -> None:
    registry = CollectorRegistry()
    registry.register(UpstreamConnections(lambda: None))
    assert registry.get_sample_value("fal_proxy_upstream_connections", {"state": "in_use"}) == 0


def test_worker_restarts_read_the_supervisors_shared_count() -> None:
    count = RestartCount()
    registry = CollectorRegistry()
    registry.register(WorkerRestarts(count))
    assert registry.get_sample_value("fal_proxy_worker_restarts_total") == 0  # no supervisor
    shared = multiprocessing.get_context("spawn").RawValue("Q", 0)
    count.value = shared
    shared.value += 2
    assert registry.get_sample_value("fal_proxy_worker_restarts_total") == 2


def test_process_metrics_come_from_prometheus_client() -> None:
    registry = CollectorRegistry()
    process_collector(registry)
    assert (registry.get_sample_value("process_open_fds") or 0) > 0
    assert (registry.get_sample_value("process_resident_memory_bytes") or 0) > 0
    assert (registry.get_sample_value("process_start_time_seconds") or 0) > 0
