"""proxy.observe.metrics: the operators' metrics and their bounded labels."""

from __future__ import annotations

from proxy.observe.metrics import Metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_every_series_an_alert_reads_exists_before_anything_happens() -> None:
    metrics = Metrics()
    assert sample(metrics, "fal_proxy_breaker_state") == 0
    assert sample(metrics, "fal_proxy_breaker_last_change_timestamp_seconds") == 0
    for state in ("closed", "half_open", "open"):
        assert sample(metrics, "fal_proxy_breaker_transitions_total", state=state) == 0
    for route in ("stream", "queue"):
        assert sample(metrics, "fal_proxy_open_streams", route=route) == 0
    assert sample(metrics, "fal_proxy_redis_errors_total") == 0
    assert sample(metrics, "fal_proxy_redis_script_seconds_count") == 0
    assert sample(metrics, "fal_proxy_worker_restarts_total") == 0
    assert sample(metrics, "fal_proxy_workers") == 1
    assert sample(metrics, "fal_proxy_upstream_connections", state="idle") == 0
    assert sample(metrics, "fal_proxy_event_loop_lag_seconds_count") == 0
    assert (sample(metrics, "process_open_fds") or 0) > 0
    body, _ = metrics.render()
    assert b"fal_proxy_event_loop_lag_last_seconds" in body


def test_the_breaker_state_its_time_and_its_transitions() -> None:
    metrics = Metrics()
    metrics.observe_breaker("open", 1000.0)
    assert sample(metrics, "fal_proxy_breaker_state") == 1
    metrics.observe_breaker("half_open", 1030.0)
    assert sample(metrics, "fal_proxy_breaker_state") == 0.5
    metrics.observe_breaker("closed", 1031.0)
    assert sample(metrics, "fal_proxy_breaker_state") == 0
    assert sample(metrics, "fal_proxy_breaker_last_change_timestamp_seconds") == 1031
    assert sample(metrics, "fal_proxy_breaker_transitions_total", state="open") == 1
    assert sample(metrics, "fal_proxy_breaker_transitions_total", state="closed") == 1


def test_streams_count_up_and_down_by_route_and_other_routes_are_not_streams() -> None:
    metrics = Metrics()
    first, second = metrics.stream_opened("stream"), metrics.stream_opened("queue")
    assert metrics.stream_opened("run") is None  # not a streaming route: no label made
    assert sample(metrics, "fal_proxy_open_streams", route="stream") == 1
    assert sample(metrics, "fal_proxy_open_streams", route="run") is None
    first.dec()
    second.dec()
    assert sample(metrics, "fal_proxy_open_streams", route="stream") == 0


def test_upstream_round_trips_and_redis_calls() -> None:
    metrics = Metrics()
    metrics.observe_upstream("run", 0.2)
    metrics.observe_upstream("run", 0.3)
    assert sample(metrics, "fal_proxy_upstream_duration_seconds_count", route="run") == 2
    assert sample(metrics, "fal_proxy_upstream_duration_seconds_sum", route="run") == 0.5
    metrics.observe_redis(0.001, False)
    metrics.observe_redis(2.0, True)
    assert sample(metrics, "fal_proxy_redis_script_seconds_count") == 2
    assert sample(metrics, "fal_proxy_redis_errors_total") == 1


def test_two_apps_never_share_counters() -> None:
    one, two = Metrics(), Metrics()
    one.observe_redis(0.001, True)
    assert sample(two, "fal_proxy_redis_errors_total") == 0


class _Call:
    def __init__(self) -> None:
        import asyncio

        self.keys = ["leases", "k"]
        self.args = ["x", "lease-1"]
        self.answer: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    def lease(self) -> tuple[str, str]:
        return "leases", "lease-1"


def test_each_redis_batch_is_one_observation_answered_or_failed() -> None:
    import asyncio

    from redis.exceptions import ConnectionError as RedisConnectionError

    from proxy.limits.base import LimitSettings
    from proxy.limits.redis_batches import Batches
    from proxy.limits.script import SEPARATOR

    metrics = Metrics()
    outcomes: list[object] = []

    async def script(keys: list[str], args: list[object]) -> list[object]:
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return [outcome] * int(str(args[0]).split(SEPARATOR)[0])  # head: the admits

    async def main() -> None:
        batches = Batches(LimitSettings(concurrent=0, redis_url="redis://x"), lambda: script)
        batches.on_call = metrics.observe_redis
        outcomes.append(["admitted"])
        # Three admits in one turn: one batch, one observation.
        await asyncio.gather(*(batches.answer(_Call()) for _ in range(3)))
        assert sample(metrics, "fal_proxy_redis_script_seconds_count") == 1
        outcomes.append(RedisConnectionError("refused"))
        answer = await batches.answer(_Call())
        assert isinstance(answer, RedisConnectionError)  # the store's error, for the limiter
        assert sample(metrics, "fal_proxy_redis_script_seconds_count") == 2
        assert sample(metrics, "fal_proxy_redis_errors_total") == 1

    asyncio.run(main())
