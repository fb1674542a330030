"""The Redis limiter's batches (the admits of one event-loop turn in one script call),
against a real ``redis-server``: the same answers as one by one, and no slot kept for
nobody when a waiter leaves, Redis is slow, a connection breaks or the limiter closes.

Several tests put a TCP hop between the limiter and Redis that holds replies back or
drops one, as a slow network or a failover would.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Coroutine
from typing import Any

import pytest
import redis as sync_redis
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st

from proxy.errors import LimiterUnavailable, QuotaExceeded, RateLimited
from proxy.limits import Lease, Limiter, LimitSettings, caller_key, create_limiter
from proxy.limits import redis_backend as limits_redis
from proxy.limits.quotas import Quota
from proxy.limits.redis_backend import RedisLimiter
from tests.redis_support import RedisServer, memory_and_redis_agree

NOW = float((int(time.time()) // 3600 + 1) * 3600 + 15)  # as in test_limits_redis


def limits_for(url: str, **overrides: object) -> LimitSettings:
    fields: dict[str, object] = {
        "requests_per_minute": 0, "submits_per_hour": 0, "concurrent": 1, "redis_url": url,
        "key_prefix": f"test-{uuid.uuid4().hex}",
    }  # fmt: skip
    fields.update(overrides)
    return LimitSettings(**fields)  # type: ignore[arg-type]


async def started(limits: LimitSettings) -> RedisLimiter:
    limiter = create_limiter(limits)
    assert isinstance(limiter, RedisLimiter)
    await limiter.start()
    await (await limiter.admit("warm-up", submit=False)).release()  # the script loaded
    return limiter


def evalsha_calls(server: RedisServer) -> int:
    stats = sync_redis.Redis(port=server.port).info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


# --- the same answers -------------------------------------------------------------------------

call = st.tuples(
    st.sampled_from(["alice", "bob"]),
    # a request; a generation (submit); a generation inside an open session (no slot)
    st.sampled_from(["request", "submit", "message"]),
    st.sampled_from([None, "fal-ai/flux", "fal-ai/sdxl", "x/y"]),  # app
    st.booleans(),  # the first quota applies
    st.booleans(),  # the second quota applies
    st.booleans(),  # hold the slot after the turn
)
turns = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=40.0, allow_nan=False),
              st.lists(call, min_size=0, max_size=12)),
    min_size=1, max_size=6,
)  # fmt: skip


def outcome(result: object) -> object:
    """A call's answer, with what it reports used of each of its quotas once admitted (the
    script's ``{0, used * nq}``: a wrong count there differs from memory's)."""
    if isinstance(result, Lease):
        return ("admitted", result.used)
    if isinstance(result, tuple):
        return ("counted", result)  # count_generation
    assert isinstance(result, (RateLimited, QuotaExceeded)), repr(result)
    return (type(result).__name__, result.detail, result.retry_after)


def ask(
    limiter: Limiter, quotas: tuple[Quota, Quota], who: str, kind: str, app: str | None,
    first: bool, second: bool,
) -> Coroutine[Any, Any, Lease | tuple[int, ...]]:  # fmt: skip
    """One call of a turn: a request, a generation (submit) or a generation in a session."""
    applying = tuple(q for q, on in zip(quotas, (first, second), strict=True) if on)
    if kind == "message":
        return limiter.count_generation(who, app=app, quotas=applying)
    return limiter.admit(who, submit=kind == "submit", app=app, quotas=applying)


@examples(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rpm=st.integers(min_value=0, max_value=5),
    per_hour=st.integers(min_value=0, max_value=5),
    concurrent=st.integers(min_value=0, max_value=3),
    q1=st.integers(min_value=0, max_value=3),
    q2=st.integers(min_value=0, max_value=3),
    plan=turns,
)
def test_one_turns_batch_gives_the_memory_limiters_answers(
    redis_server: RedisServer, rpm: int, per_hour: int, concurrent: int, q1: int, q2: int,
    plan: list[tuple[float, list[tuple[str, str, str | None, bool, bool, bool]]]],
) -> None:  # fmt: skip
    """Each turn's admits start together (one batch in Redis); memory admits the same calls
    one by one in the same order. The same answers (with what each admitted call reports
    used of its quotas), and the same usage afterwards; a generation counted inside a
    session (``count_generation``) takes no slot and is no request of the minute, in both."""
    quotas = (Quota("*", q1, "day"), Quota("fal-ai/*", q2, "month"))
    limits = limits_for(
        redis_server.url, requests_per_minute=rpm, submits_per_hour=per_hour,
        concurrent=concurrent, lease_ttl=7200.0,
    )  # fmt: skip

    async def run(limiter: Limiter, together: bool) -> list[object]:
        clock = [NOW]
        limiter.clock = lambda: clock[0]
        await limiter.start()
        seen: list[object] = []
        for step, calls in plan:
            clock[0] += step
            admits = [ask(limiter, quotas, *call[:-1]) for call in calls]
            results: list[object] = []
            if together:
                results = await asyncio.gather(*admits, return_exceptions=True)
            else:
                for admit in admits:
                    try:
                        results.append(await admit)
                    except (RateLimited, QuotaExceeded) as exc:
                        results.append(exc)
            seen.append([outcome(r) for r in results])
            for result, (*_, hold) in zip(results, calls, strict=True):
                if isinstance(result, Lease) and not hold:
                    await result.release()
            if isinstance(limiter, RedisLimiter):
                await limiter.flush()  # memory gives a slot back at once: so must this
        for who in ("alice", "bob"):
            report = await limiter.usage(who, "default", quotas)
            seen.append(("usage", who, [u.used for u in report.quotas], report.apps))
        return seen

    memory_and_redis_agree(limits, run)


# --- no slot kept for nobody ------------------------------------------------------------------


def test_a_waiter_cancelled_in_the_turn_its_answer_came_gives_its_slot_back(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer is set, then, before the waiter runs again, it is cancelled (its client
    left): Redis gave it a slot that nobody holds, so it is given back."""
    task: list[asyncio.Task[Lease]] = []

    class CancelledOnAnswer(limits_redis._Call):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            # Runs before the waiter's own wake-up, in the turn the answer is set.
            self.answer.add_done_callback(lambda _: task[0].cancel())

    async def main() -> None:
        limiter = await started(limits_for(redis_server.url))
        monkeypatch.setattr(limits_redis, "_Call", CancelledOnAnswer)
        task.append(asyncio.create_task(limiter.admit("web", submit=False)))
        with pytest.raises(asyncio.CancelledError):
            await task[0]
        monkeypatch.undo()
        await limiter.flush()
        try:
            assert isinstance(await limiter.admit("web", submit=False), Lease)  # the one slot
        finally:
            await limiter.close()

    asyncio.run(main())


async def slow_hop(redis_port: int, delay: list[float]) -> asyncio.Server:
    """A TCP hop to Redis holding each reply back ``delay[0]`` seconds."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, late: bool) -> None:
        try:
            while data := await reader.read(65536):
                if late and delay[0]:
                    await asyncio.sleep(delay[0])
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", redis_port)
        await asyncio.gather(pipe(client_r, server_w, False), pipe(server_r, client_w, True))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def hop_url(hop: asyncio.Server) -> str:
    return f"redis://127.0.0.1:{hop.sockets[0].getsockname()[1]}/0"


async def gated_hop(redis_port: int) -> tuple[asyncio.Server, dict[str, Any]]:
    """A TCP hop to Redis that, once ``state["armed"]`` is set, holds back the next request
    that reaches it (whatever the connection) until ``state["gate"]`` is set; every other
    request goes through at once."""
    state: dict[str, Any] = {"armed": False, "gate": asyncio.Event()}

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        try:
            while data := await reader.read(65536):
                if up and state["armed"]:
                    state["armed"] = False
                    await state["gate"].wait()
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", redis_port)
        await asyncio.gather(pipe(client_r, server_w, True), pipe(server_r, client_w, False))

    return await asyncio.start_server(handle, "127.0.0.1", 0), state


def test_a_slot_released_here_is_free_for_this_replicas_next_call(
    redis_server: RedisServer,
) -> None:
    """The batch giving a slot back is still on its way to Redis (held in the hop) when
    the same caller's next call is admitted on this replica: batches travel on several
    connections, so that admit must wait for it, not overtake it and be refused for the
    caller's own released slot (two replicas' tests saw [200, 200, 429] for sequential
    calls at concurrency 1)."""

    async def main() -> None:
        hop, state = await gated_hop(redis_server.port)
        limiter = await started(limits_for(hop_url(hop)))  # concurrency 1
        try:
            lease = await limiter.admit("web", submit=False)
            await lease.release()  # owed: a flush batch, or the next admit, carries it
            state["armed"] = True
            flushing = asyncio.ensure_future(limiter.flush())  # held in the hop
            admitting = asyncio.ensure_future(limiter.admit("web", submit=False))
            # Without the ordering the admit reaches Redis at once, ahead of the release, and
            # is answered (refused) while the release is held; with it, it waits for it.
            await asyncio.wait([admitting], timeout=1.0)
            state["gate"].set()
            await flushing
            assert isinstance(await admitting, Lease)  # the caller's one slot, free again
        finally:
            state["gate"].set()
            await limiter.close()
            hop.close()

    asyncio.run(main())


@pytest.mark.parametrize("failure", ["closed", "open"])
def test_a_batch_answered_after_the_timeout_keeps_no_slot(
    redis_server: RedisServer, failure: str
) -> None:
    """Redis ran the batch (10 callers, 1 slot each), but the reply came after
    REDIS_TIMEOUT: the callers were told 503 (closed) or admitted unchecked (open), and
    the slots the script took for them are given back."""
    delay = [0.0]

    async def main() -> None:
        hop = await slow_hop(redis_server.port, delay)
        limiter = await started(limits_for(hop_url(hop), redis_failure=failure))
        callers = [f"caller-{n}" for n in range(10)]
        delay[0] = limits_redis.REDIS_TIMEOUT + 0.5
        during = await asyncio.gather(
            *[limiter.admit(c, submit=False) for c in callers], return_exceptions=True
        )
        delay[0] = 0.0
        expected = LimiterUnavailable if failure == "closed" else Lease
        assert all(isinstance(r, expected) for r in during), during
        await limiter.flush()
        after = await asyncio.gather(
            *[limiter.admit(c, submit=False) for c in callers], return_exceptions=True
        )
        await limiter.close()
        hop.close()
        assert all(isinstance(r, Lease) for r in after), after

    asyncio.run(main())


def test_a_batch_whose_reply_was_lost_with_its_connection_counts_once(
    redis_server: RedisServer,
) -> None:
    """Redis ran the batch, then the connection broke before the reply: redis-py sends the
    same EVALSHA again on a fresh connection. The second run gives the first run's answers
    (admitted, each with its slot and its quota's count, kept through cjson) and counts
    nothing again."""
    drop = [False]

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", redis_server.port)

        async def up() -> None:
            while data := await client_r.read(65536):
                server_w.write(data)
            server_w.close()

        async def down() -> None:
            while data := await server_r.read(65536):
                if drop[0]:
                    drop[0] = False
                    client_w.transport.abort()  # the reply is lost with the connection
                    server_w.close()
                    return
                client_w.write(data)
            client_w.close()

        await asyncio.gather(up(), down(), return_exceptions=True)

    async def main() -> None:
        hop = await asyncio.start_server(handle, "127.0.0.1", 0)
        limits = limits_for(hop_url(hop), requests_per_minute=2)
        limiter = await started(limits)
        before = evalsha_calls(redis_server)
        drop[0] = True
        callers = [f"caller-{n}" for n in range(10)]
        quotas = (Quota("*", 5, "day"), Quota("*", 10**13, "month", money=True))
        results = await asyncio.gather(
            *[limiter.admit(c, submit=True, quotas=quotas, estimate=10**13 - 1) for c in callers],
            return_exceptions=True,
        )
        assert evalsha_calls(redis_server) - before == 2  # sent twice, as redis-py does
        assert all(isinstance(r, Lease) for r in results), results
        assert all(r.used == (1, 10**13 - 1) for r in results), results  # type: ignore[union-attr]
        for lease in results:
            await lease.release()  # type: ignore[union-attr]
        await limiter.flush()
        # Each caller has spent 1 of 2 a minute (not 2: the replay counted nothing).
        again = await asyncio.gather(
            *[limiter.admit(c, submit=True, quotas=quotas[:1]) for c in callers],
            return_exceptions=True,
        )
        await limiter.close()
        hop.close()
        assert all(isinstance(r, Lease) and r.used == (2,) for r in again), again

    asyncio.run(main())


def test_close_waits_for_the_batches_in_redis(redis_server: RedisServer) -> None:
    """close() (shutdown) while admits are in Redis: their waiters get their answers, the
    slot of one that left is given back, and nothing is sent twice."""
    delay = [0.0]

    async def main() -> None:
        hop = await slow_hop(redis_server.port, delay)
        limiter = await started(limits_for(hop_url(hop)))
        before = evalsha_calls(redis_server)
        delay[0] = 0.5
        admits = [asyncio.create_task(limiter.admit(f"c{n}", submit=False)) for n in range(5)]
        await asyncio.sleep(0.1)  # in Redis
        admits[0].cancel()  # its client left
        await limiter.close()
        delay[0] = 0.0
        results = await asyncio.wait_for(asyncio.gather(*admits, return_exceptions=True), 5)
        assert isinstance(results[0], asyncio.CancelledError)
        assert all(isinstance(r, Lease) for r in results[1:]), results
        # The batch, then the release close() flushed: never the batch twice.
        assert evalsha_calls(redis_server) - before == 2
        check = await started(limits_for(redis_server.url, key_prefix=limiter.settings.key_prefix))
        try:
            assert isinstance(await check.admit("c0", submit=False), Lease)  # given back
        finally:
            await check.close()
            hop.close()

    asyncio.run(main())


def test_a_limiter_started_twice_or_used_after_close_opens_nothing_more(
    redis_server: RedisServer,
) -> None:
    """A second start() keeps the one pool and renewal task; a release after close() is
    dropped (its lease expires) instead of reconnecting the closed client."""

    async def main() -> None:
        limiter = await started(limits_for(redis_server.url))
        await limiter.start()
        lease = await limiter.admit("late", submit=False)
        before = evalsha_calls(redis_server)
        await limiter.close()
        assert asyncio.all_tasks() == {asyncio.current_task()}  # no renewal task left behind
        await lease.release()
        await limiter.flush()
        assert evalsha_calls(redis_server) == before  # nothing sent after close

    asyncio.run(main())


# --- one bad key fails only its own call ---------------------------------------------------


def test_a_key_of_another_type_fails_only_its_callers_admit(redis_server: RedisServer) -> None:
    """One caller's leases key holds a string (a faulty Redis, a key_prefix shared with
    something else): that caller's admit is unavailable (503); the others of the same batch
    are admitted, and keep nothing when they give their slots back."""
    limits = limits_for(redis_server.url)
    sync_redis.Redis(port=redis_server.port).set(
        f"{limits.key_prefix}:leases:{caller_key('broken')}", "x"
    )

    async def main() -> None:
        limiter = await started(limits)
        results = await asyncio.gather(
            limiter.admit("alice", submit=False), limiter.admit("broken", submit=False),
            limiter.admit("bob", submit=False), return_exceptions=True,
        )  # fmt: skip
        assert isinstance(results[0], Lease) and isinstance(results[2], Lease), results
        assert isinstance(results[1], LimiterUnavailable)
        await asyncio.gather(results[0].release(), results[2].release())
        await limiter.flush()
        again = await asyncio.gather(
            limiter.admit("alice", submit=False), limiter.admit("bob", submit=False),
            return_exceptions=True,
        )  # fmt: skip
        await limiter.close()
        assert all(isinstance(r, Lease) for r in again), again

    asyncio.run(main())


def test_an_owed_operation_redis_refuses_does_not_hold_up_every_call(
    redis_server: RedisServer,
) -> None:
    """Units owed for a usage key Redis refuses (another type): dropped, not carried by
    every later batch, which would then fail for every caller."""
    limits = limits_for(redis_server.url, concurrent=0)

    async def main() -> None:
        limiter = await started(limits)
        usage_key, _ = limiter._usage_key(caller_key("mallory"), time.time())
        sync_redis.Redis(port=redis_server.port).set(usage_key, "x")
        await limiter.add_units("mallory", "fal-ai/flux", 1.5)
        outcomes = []
        for _ in range(3):
            await limiter.admit("alice", submit=False)  # raises LimiterUnavailable if held up
            outcomes.append("admitted")
        await limiter.close()
        assert outcomes == ["admitted"] * 3

    asyncio.run(main())


def test_a_fal_requests_units_count_once_across_replicas(redis_server: RedisServer) -> None:
    """A queue result fetched through two replicas (and again through one) adds its units
    once; units of another request, or with no request id, add as often as they come."""
    limits = limits_for(redis_server.url, concurrent=0)

    async def main() -> None:
        first, second = await started(limits), await started(limits)
        try:
            assert await first.add_units("alice", "fal-ai/flux", 2.0, "req-1")
            assert await second.add_units("alice", "fal-ai/flux", 2.0, "req-1")  # not seen here
            assert not await first.add_units("alice", "fal-ai/flux", 2.0, "req-1")
            await second.add_units("alice", "fal-ai/flux", 0.5, "req-2")
            await first.add_units("alice", "fal-ai/flux", 0.25)
            await second.add_units("alice", "fal-ai/flux", 0.25)
            await first.flush()
            await second.flush()
            report = await first.usage("alice", "default", ())
            assert report.apps == {"fal-ai/flux": (0, 3.0, 0)}
        finally:
            await first.close()
            await second.close()

    asyncio.run(main())
