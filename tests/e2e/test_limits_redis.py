"""The Redis limiter against a real ``redis-server`` on loopback, as replicas would share it.

One server for the session (``redis_server``); every test uses its own ``key_prefix``, so
tests never see each other's counts. Tests that break Redis start their own server.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import structlog.testing
from hypothesis import HealthCheck, example, given
from hypothesis import settings as examples
from hypothesis import strategies as st

from proxy.errors import LimiterUnavailable, RateLimited
from proxy.limits import Lease, Limiter, LimitSettings, create_limiter, redis_batches
from proxy.limits.quotas import Quota
from proxy.limits.redis_backend import MAX_BATCH, REDIS_TIMEOUT, RedisLimiter
from proxy.limits.script import REPLAY_TTL
from tests.redis_support import START_TIMEOUT, RedisServer, free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings(url: str, prefix: str | None = None, **overrides: object) -> LimitSettings:
    fields: dict[str, object] = {
        "requests_per_minute": 0,
        "concurrent": 0,
        "submits_per_hour": 0,
        "redis_url": url,
        "key_prefix": prefix or f"test-{uuid.uuid4().hex}",
    }
    fields.update(overrides)
    return LimitSettings(**fields)  # type: ignore[arg-type]


# A frozen clock 15 s into the NEXT hour, so every window's answer is exact. Ahead of real
# time, never behind: quota keys expire at the end of their period in Redis's own time, and a
# clock in the current hour had them expire mid-run when a run crossed the hour (or midnight,
# for day quotas). Nothing else the script does compares with Redis's clock.
NOW = float((int(time.time()) // 3600 + 1) * 3600 + 15)


@asynccontextmanager
async def running(limit_settings: LimitSettings, *, frozen: bool = True) -> AsyncIterator[Limiter]:
    limiter = create_limiter(limit_settings)
    assert isinstance(limiter, RedisLimiter)
    if frozen:
        limiter.clock = lambda: NOW
    await limiter.start()
    try:
        yield limiter
    finally:
        await limiter.close()


async def refused(limiter: Limiter, caller: str = "web", *, submit: bool = False) -> RateLimited:
    with pytest.raises(RateLimited) as info:
        await limiter.admit(caller, submit=submit)
    return info.value


# --- each limit, in Redis -------------------------------------------------------------------


async def test_requests_per_minute(redis_server: RedisServer) -> None:
    async with running(settings(redis_server.url, requests_per_minute=3)) as limiter:
        assert await limiter.ready()
        for _ in range(3):
            await (await limiter.admit("web", submit=False)).release()
        err = await refused(limiter)
        assert err.status == 429 and "requests per minute" in err.detail and "3" in err.detail
        assert err.retry_after == 45  # as in memory: see tests/unit/test_limits.py
        await limiter.admit("mobile", submit=False)  # another caller has its own window


async def test_submits_per_hour_count_only_submits(redis_server: RedisServer) -> None:
    async with running(settings(redis_server.url, submits_per_hour=2)) as limiter:
        for _ in range(4):
            await limiter.admit("web", submit=False)
        await limiter.admit("web", submit=True)
        await limiter.admit("web", submit=True)
        err = await refused(limiter, submit=True)
        assert "generations per hour" in err.detail and err.retry_after == 3600 - 15
        await limiter.admit("web", submit=False)


async def test_concurrency_and_idempotent_release(redis_server: RedisServer) -> None:
    async with running(settings(redis_server.url, concurrent=2)) as limiter:
        first = await limiter.admit("web", submit=False)
        await limiter.admit("web", submit=False)
        err = await refused(limiter)
        assert "concurrent requests" in err.detail and "2" in err.detail and err.retry_after == 1
        await first.release()
        await first.release()  # idempotent: frees one slot, not two
        await limiter.admit("web", submit=False)  # the release rides on this call
        await refused(limiter)
        await limiter.admit("mobile", submit=False)


async def test_keys_never_hold_the_caller_id(redis_server: RedisServer) -> None:
    caller = "tok-SENTINEL:{a}/b \u2603"
    prefix = f"test-{uuid.uuid4().hex}"
    async with running(
        settings(redis_server.url, prefix, requests_per_minute=5, submits_per_hour=5, concurrent=5)
    ) as limiter:
        await limiter.admit(caller, submit=True)
        keys = [k for k in redis_server.keys() if k.startswith(prefix)]  # noqa: SIM118 - not a dict: runs KEYS *
        # This minute's and this hour's window, the leases, this month's usage and the
        # month's digest → id hash (the admin listing; one field per caller, the id in a
        # value, never in a key): O(1) per caller (no entry per hit), and every key expires;
        # and the batch's answers, kept for a replay for seconds.
        batches = [k for k in keys if k.startswith(f"{prefix}:batch:")]
        assert len(keys) - len(batches) == 5 and len(batches) == 1, keys
        assert 0 < redis_server.client().ttl(batches[0]) <= REPLAY_TTL
        assert all(redis_server.client().ttl(k) > 0 for k in keys)
        assert not any("SENTINEL" in k for k in keys)


async def test_a_unix_socket_url(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(  # --port 0: no TCP listener at all  # noqa: ASYNC220 - Popen returns at once
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        unix = settings(f"unix://{sock}?db=1", requests_per_minute=1, concurrent=1)
        async with running(unix) as limiter:
            deadline = time.monotonic() + START_TIMEOUT
            while not await limiter.ready():
                assert proc.poll() is None and time.monotonic() < deadline, "no redis-server"
                await asyncio.sleep(0.02)
            await limiter.admit("web", submit=False)
            assert "requests per minute" in (await refused(limiter)).detail
    finally:
        proc.terminate()
        proc.wait(10)


# --- replicas -------------------------------------------------------------------------------


async def test_two_replicas_share_every_limit(redis_server: RedisServer) -> None:
    shared = settings(redis_server.url, concurrent=2, requests_per_minute=4, submits_per_hour=1)
    async with running(shared) as a, running(shared) as b:
        on_a = await a.admit("web", submit=True)  # request 1, generation 1
        await b.admit("web", submit=False)  # request 2
        assert "concurrent" in (await refused(a)).detail  # both slots held, on either replica
        assert "concurrent" in (await refused(b)).detail  # (refusals spend nothing)
        await on_a.release()
        await a.flush()  # what A owes Redis, sent now rather than with its next call
        assert "generations per hour" in (await refused(b, submit=True)).detail
        await (await b.admit("web", submit=False)).release()  # request 3, in A's freed slot
        await b.flush()
        await (await a.admit("web", submit=False)).release()  # request 4
        assert "requests per minute" in (await refused(a)).detail
        assert "requests per minute" in (await refused(b)).detail


async def burst(a: Limiter, b: Limiter, caller: str, *, submit: bool) -> list[object]:
    """50 admits at once, alternating between two replicas; Leases and exceptions."""
    admits = [(a if i % 2 else b).admit(caller, submit=submit) for i in range(50)]
    return await asyncio.gather(*admits, return_exceptions=True)


async def test_concurrent_admits_never_exceed_the_limits(redis_server: RedisServer) -> None:
    shared = settings(redis_server.url, concurrent=5)
    async with running(shared) as a, running(shared) as b:
        results = await burst(a, b, "web", submit=False)
        leases = [r for r in results if isinstance(r, Lease)]
        assert len(leases) == 5
        assert all(isinstance(r, RateLimited) for r in results if not isinstance(r, Lease))
        await asyncio.gather(*[lease.release() for lease in leases])
        await b.flush()  # whichever replica's batch went first holds the 5: both give back
        assert isinstance(await a.admit("web", submit=False), Lease)  # no refused call kept one

    windowed = settings(redis_server.url, requests_per_minute=10, submits_per_hour=3)
    async with running(windowed) as a, running(windowed) as b:
        results = await burst(a, b, "web", submit=True)
        assert sum(isinstance(r, Lease) for r in results) == 3
        results = await burst(a, b, "mobile", submit=False)
        assert sum(isinstance(r, Lease) for r in results) == 10


# --- leases ---------------------------------------------------------------------------------


async def test_a_crashed_replicas_lease_expires_after_lease_ttl(redis_server: RedisServer) -> None:
    shared = settings(redis_server.url, concurrent=1, lease_ttl=1.0)
    started = time.monotonic()
    # Real clocks on both replicas: the lease's own expiry (its score) is what frees the slot,
    # not only the whole key's (a frozen clock never reached the lease's score).
    async with running(shared, frozen=False) as survivor:
        crashed = create_limiter(shared)
        await crashed.start()
        await crashed.admit("web", submit=False)
        await crashed.close()  # no release: as if the process died
        await refused(survivor)
        deadline = started + 10
        while True:
            try:
                await survivor.admit("web", submit=False)
                break
            except RateLimited:
                assert time.monotonic() < deadline, "the dead replica's lease never expired"
                await asyncio.sleep(0.05)
        assert time.monotonic() - started >= 1.0  # not before its ttl


async def test_renewal_keeps_a_held_lease_past_its_ttl(redis_server: RedisServer) -> None:
    shared = settings(redis_server.url, concurrent=1, lease_ttl=1.0)
    # Real clocks: renewal must push the lease's own expiry, which a frozen clock never reached.
    async with running(shared, frozen=False) as holder, running(shared, frozen=False) as other:
        lease = await holder.admit("web", submit=False)
        until = time.monotonic() + 3.5  # three and a half ttls, three or more renewals
        while time.monotonic() < until:
            await refused(other)
            await asyncio.sleep(0.1)
        await lease.release()
        await holder.flush()
        assert isinstance(await other.admit("web", submit=False), Lease)


async def test_one_round_trip_per_admitted_call(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows, quotas, the lease, usage and the last call's release: one command each."""
    # What is tested is that a release rides on the next call: the flush timer that sends it
    # alone when no call comes is pushed out of reach (a stalled process once let it fire).
    monkeypatch.setattr(redis_batches, "FLUSH_DELAY", 3600.0)
    quotas = (Quota("*", 100, "day"), Quota("fal-ai/*", 50, "month"))
    limits = settings(redis_server.url, requests_per_minute=100, submits_per_hour=100, concurrent=1)
    async with running(limits) as limiter:
        assert isinstance(limiter, RedisLimiter) and limiter._redis is not None
        client = limiter._redis
        sent: list[str] = []
        execute = client.execute_command

        async def counted(*args: object, **options: object) -> object:
            sent.append(str(args[0]))
            return await execute(*args, **options)

        def no_pipelines(*_args: object, **_kwargs: object) -> None:
            raise AssertionError("a pipeline on the request path")

        client.execute_command = counted  # type: ignore[method-assign]
        client.pipeline = no_pipelines  # type: ignore[method-assign,assignment]
        lease = await limiter.admit("web", submit=True, quotas=quotas, app="fal-ai/flux")
        sent.clear()  # the first call also loads the script (NOSCRIPT, SCRIPT LOAD)
        for _ in range(20):
            await lease.release()  # owed, not sent: it rides on the next call
            lease = await limiter.admit("web", submit=True, quotas=quotas, app="fal-ai/flux")
        assert sent == ["EVALSHA"] * 20
        leases = next(k for k in redis_server.keys() if k.startswith(f"{limits.key_prefix}:leases"))  # noqa: SIM118
        assert redis_server.client().zcard(leases) == 1  # the 20 releases all arrived
        del client.execute_command, client.pipeline


def counting_commands(limiter: Limiter) -> list[str]:
    """The name of every command the limiter sends from now on (its client patched)."""
    assert isinstance(limiter, RedisLimiter) and limiter._redis is not None
    client, sent = limiter._redis, list[str]()
    execute = client.execute_command

    async def counted(*args: object, **options: object) -> object:
        sent.append(str(args[0]))
        return await execute(*args, **options)

    client.execute_command = counted  # type: ignore[method-assign]
    return sent


async def test_the_admits_of_one_turn_share_one_script_call(redis_server: RedisServer) -> None:
    """Admits started in the same turn of the event loop go in one EVALSHA (at most
    MAX_BATCH each), with the same answers as one by one: 5 slots, the rest refused."""
    limits = settings(redis_server.url, requests_per_minute=150, concurrent=5)
    async with running(limits) as limiter:
        await (await limiter.admit("warm-up", submit=False)).release()  # loads the script
        sent = counting_commands(limiter)
        results = await asyncio.gather(
            *[limiter.admit("web", submit=False) for _ in range(MAX_BATCH + 36)],
            return_exceptions=True,
        )
        assert sent == ["EVALSHA", "EVALSHA"]  # 100 admits: a batch of 64, one of 36
        assert sum(isinstance(r, Lease) for r in results) == 5
        assert all(
            isinstance(r, RateLimited) and "concurrent" in r.detail
            for r in results
            if not isinstance(r, Lease)
        )
        # The refused ones spent nothing: 5 of 150 a minute are used, whatever the batch.
        await asyncio.gather(*[r.release() for r in results if isinstance(r, Lease)])
        await limiter.flush()
        for _ in range(145):
            await (await limiter.admit("web", submit=False)).release()
        assert "requests per minute" in (await refused(limiter)).detail


async def test_a_waiter_gone_before_its_answer_gives_its_slot_back(
    redis_server: RedisServer,
) -> None:
    """A request cancelled (its client left) while its admit is in Redis: the slot the
    script took for it is released, as for any lease; one cancelled before its batch
    left is never sent."""
    prefix = f"test-{uuid.uuid4().hex}"
    async with running(settings(redis_server.url, prefix, concurrent=1)) as limiter:
        assert isinstance(limiter, RedisLimiter)
        script, in_redis = limiter._script, asyncio.Event()

        async def slow_script(**kwargs: object) -> object:
            in_redis.set()
            return await script(**kwargs)

        limiter._script = slow_script
        admit = asyncio.create_task(limiter.admit("web", submit=False))
        await in_redis.wait()  # sent, not answered yet
        admit.cancel()
        await asyncio.gather(*limiter._sending)  # the answer came: a lease for nobody
        await limiter.flush()
        keys = [k for k in redis_server.keys() if k.startswith(f"{prefix}:leases")]  # noqa: SIM118
        assert sum(redis_server.client().zcard(k) for k in keys) == 0  # given back

        sent = counting_commands(limiter)
        admit = asyncio.create_task(limiter.admit("web", submit=False))
        await asyncio.sleep(0)  # queued for the end of the turn
        admit.cancel()
        await asyncio.sleep(0.05)
        assert sent == [] and admit.cancelled()
        assert isinstance(await limiter.admit("web", submit=False), Lease)  # the one slot


async def test_a_release_no_call_carries_is_sent_soon(redis_server: RedisServer) -> None:
    prefix = f"test-{uuid.uuid4().hex}"
    async with running(settings(redis_server.url, prefix, concurrent=1)) as limiter:
        lease = await limiter.admit("web", submit=False)
        await lease.release()
        leases = next(k for k in redis_server.keys() if k.startswith(f"{prefix}:leases"))  # noqa: SIM118
        deadline = time.monotonic() + 5  # FLUSH_DELAY is 20 ms: only the flush can free it
        while redis_server.client().zcard(leases):
            assert time.monotonic() < deadline, "the release was never sent"
            await asyncio.sleep(0.01)


# --- Redis failures -------------------------------------------------------------------------


async def test_unreachable_redis_fails_closed_by_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"redis://:hunter2-SENTINEL@127.0.0.1:{free_port()}/0"
    async with running(settings(url, requests_per_minute=10, concurrent=10)) as limiter:
        assert not await limiter.ready()
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable) as info:
            await limiter.admit("web", submit=False)
        assert time.monotonic() - started < 2 * REDIS_TIMEOUT + 1  # fails fast, no long retries
        err = info.value
        assert (err.status, err.reason) == (503, "limiter_unavailable") and err.retry_after >= 1
        assert "SENTINEL" not in err.message + err.detail
    assert "SENTINEL" not in capsys.readouterr().out


async def test_a_redis_that_never_answers_costs_one_timeout_per_request() -> None:
    with socket.socket() as silent:  # accepts connections (in the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        silent.setblocking(False)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        async with running(settings(url, concurrent=10)) as limiter:
            accepted(silent)  # start-up's ping
            started = time.monotonic()
            with pytest.raises(LimiterUnavailable):
                await limiter.admit("web", submit=False)
            # No retry on a timeout: one connection was tried, and a second timeout (which a
            # retry would cost, however fast the machine) was not waited for.
            assert time.monotonic() - started < 2 * REDIS_TIMEOUT
            assert accepted(silent) == 1


def accepted(listener: socket.socket) -> int:
    """Accept (and close) every connection waiting on a non-blocking ``listener``."""
    count = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            listener.accept()[0].close()
            count += 1
    return count


async def test_unreachable_redis_fails_open_when_asked() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    lenient = settings(
        url, requests_per_minute=1, concurrent=1, submits_per_hour=1, redis_failure="open"
    )
    async with running(lenient) as limiter:
        # Admitted unchecked, not refused: three over every limit of one, each said in the log.
        with structlog.testing.capture_logs() as logged:
            leases = [await limiter.admit("web", submit=True) for _ in range(3)]
        assert all(isinstance(lease, Lease) for lease in leases)
        unchecked = [e for e in logged if e["event"] == "limiter_unavailable"]
        assert len(unchecked) == 3 and all(e.get("admitted_unchecked") for e in unchecked)
        for lease in leases:
            await lease.release()


async def test_redis_going_away_and_coming_back(own_redis: RedisServer) -> None:
    closed = settings(own_redis.url, concurrent=2, requests_per_minute=100)
    opened = LimitSettings(**{**closed.__dict__, "redis_failure": "open"})
    async with running(closed) as limiter, running(opened) as lenient:
        held = await limiter.admit("web", submit=False)
        await lenient.admit("mobile", submit=False)
        own_redis.stop()
        assert not await limiter.ready()
        with pytest.raises(LimiterUnavailable):
            await limiter.admit("web", submit=False)
        await lenient.admit("mobile", submit=False)  # admitted unchecked
        await held.release()  # logs, never raises; the lease would expire with the data anyway
        own_redis.start()  # empty: --save ''
        assert await limiter.ready()
        await limiter.admit("web", submit=False)  # pooled connections to the old server recovered
        await limiter.admit("web", submit=False)
        await refused(limiter)


# --- the same answers as memory -------------------------------------------------------------

steps = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=40.0, allow_nan=False),  # seconds since the last
        st.sampled_from(["alice", "bob"]),
        st.booleans(),  # a generation?
        st.booleans(),  # hold the slot (else give it back at once)?
    ),
    min_size=1,
    max_size=25,
)


@examples(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rpm=st.integers(min_value=1, max_value=4),
    per_hour=st.integers(min_value=1, max_value=4),
    concurrent=st.integers(min_value=0, max_value=2),
    quota=st.integers(min_value=0, max_value=3),
    sequence=steps,
)
# Found by hypothesis: a lease held past lease_ttl on the fake clock (Redis expires it).
@example(
    rpm=4, per_hour=4, concurrent=1, quota=3,
    sequence=[(0.0, "alice", False, True), *[(40.0, "bob", False, False)] * 8,
              (40.0, "alice", False, False)],
)  # fmt: skip
def test_redis_gives_the_memory_limiters_answers(
    redis_server: RedisServer,
    rpm: int,
    per_hour: int,
    concurrent: int,
    quota: int,
    sequence: list[tuple[float, str, bool, bool]],
) -> None:
    """Windows, quotas and slots: the script's answers are the memory limiter's, call by call."""
    quotas = (Quota("*", quota, "day"),)
    # Leases in Redis expire after lease_ttl unless renewed (renewal runs on the real clock),
    # leases in memory never: the fake clock (at most 25 × 40 s) stays well inside the ttl.
    limits = settings(
        redis_server.url,
        requests_per_minute=rpm,
        submits_per_hour=per_hour,
        concurrent=concurrent,
        lease_ttl=7200.0,
    )

    async def outcomes(limiter: Limiter) -> list[object]:
        clock = [NOW]
        limiter.clock = lambda: clock[0]
        await limiter.start()
        held: list[Lease] = []
        seen: list[object] = []
        try:
            for step, caller, generation, hold in sequence:
                clock[0] += step
                try:
                    lease = await limiter.admit(caller, submit=generation, quotas=quotas)
                except RateLimited as refusal:
                    seen.append((type(refusal).__name__, refusal.detail, refusal.retry_after))
                    continue
                seen.append("admitted")
                if hold:
                    held.append(lease)
                else:
                    await lease.release()
                    if isinstance(limiter, RedisLimiter):
                        await limiter.flush()  # memory gives a slot back at once: so must this
        finally:
            await limiter.close()
        return seen

    async def both() -> None:
        memory = await outcomes(create_limiter(replace(limits, redis_url=None)))
        shared = await outcomes(create_limiter(limits))
        assert shared == memory

    asyncio.run(both())


async def test_more_calls_in_flight_than_connections_wait_for_one(
    redis_server: RedisServer,
) -> None:
    """300 calls at once on a pool of 64 connections: each waits its turn, none is refused
    (the default pool fails at once beyond its size: a 503 under load)."""
    limits = settings(redis_server.url, requests_per_minute=10_000, concurrent=1_000)
    async with running(limits) as limiter:
        results = await asyncio.gather(
            *[limiter.admit(f"caller-{n % 7}", submit=True) for n in range(300)],
            return_exceptions=True,
        )
        assert all(isinstance(r, Lease) for r in results), [
            r for r in results if not isinstance(r, Lease)
        ][:3]
