"""The in-memory limiter: each limit refuses at the right count, with the right Retry-After.

The limiter's clock is frozen at ``NOW`` (15 s into a minute and into an hour), so every
window's answer is exact; tests move it by hand.
"""

from __future__ import annotations

import asyncio

import pytest

from proxy.errors import QuotaExceeded, RateLimited
from proxy.limits import (
    Lease,
    Limiter,
    LimitSettings,
    MemoryLimiter,
    caller_key,
    create_limiter,
)
from proxy.limits.base import seconds_until
from proxy.limits.quotas import Quota
from tests.unit.limits.support import running

pytestmark = pytest.mark.anyio

UNLIMITED = LimitSettings(requests_per_minute=0, concurrent=0, submits_per_hour=0)


async def admit_and_release(limiter: Limiter, caller: str = "web", *, submit: bool = False) -> None:
    await (await limiter.admit(caller, submit=submit)).release()


# --- pure helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reset", "now", "seconds"),
    [
        (100.0, 100.0, 1),  # already reset: still at least 1
        (99.0, 100.0, 1),  # in the past
        (100.2, 100.0, 1),
        (101.0, 100.0, 1),
        (101.01, 100.0, 2),  # rounded up: retrying early would be refused again
        (159.5, 100.0, 60),
        (3700.0, 100.0, 3600),
    ],
)
def test_seconds_until(reset: float, now: float, seconds: int) -> None:
    assert seconds_until(reset, now) == seconds


def test_caller_keys_are_fixed_length_hex_and_distinct() -> None:
    callers = ["web", "Web", "web/600/1/minute", "a:b", "", "☃", "\ud800", "x" * 10_000, "w\x00"]
    keys = [caller_key(c) for c in callers]
    assert len(set(keys)) == len(callers)
    assert all(len(k) == 32 and all(ch in "0123456789abcdef" for ch in k) for k in keys)
    assert caller_key("web") == caller_key("web")


def test_create_limiter_without_redis_is_in_memory() -> None:
    assert isinstance(create_limiter(LimitSettings()), MemoryLimiter)
    with pytest.raises(ValueError, match="redis_failure"):
        create_limiter(LimitSettings(redis_failure="sometimes"))
    with pytest.raises(ValueError, match="0 \\(unlimited\\) or more"):
        create_limiter(LimitSettings(concurrent=-1))
    with pytest.raises(ValueError, match="lease_ttl"):
        create_limiter(LimitSettings(lease_ttl=0))


# --- each limit -----------------------------------------------------------------------------


async def test_requests_per_minute_refuse_the_fourth_of_three() -> None:
    async with running(requests_per_minute=3) as limiter:
        for _ in range(3):
            await admit_and_release(limiter)
        with pytest.raises(RateLimited) as info:
            await limiter.admit("web", submit=False)
        err = info.value
        assert (err.status, err.reason) == (429, "rate_limited")
        assert "requests per minute" in err.detail and "3" in err.detail
        # 45 s to the next minute, where 3 hits weigh 3 * (60 - t)/60: under 3 at once.
        assert err.retry_after == 45
        with pytest.raises(RateLimited):  # still refused, and refusals are not counted as hits
            await limiter.admit("web", submit=True)
        assert await limiter.ready()


async def test_submits_per_hour_refuse_the_third_of_two_and_only_count_submits() -> None:
    async with running(submits_per_hour=2) as limiter:
        for _ in range(5):
            await admit_and_release(limiter, submit=False)  # status polls, results, runs...
        await admit_and_release(limiter, submit=True)
        await admit_and_release(limiter, submit=True)
        with pytest.raises(RateLimited) as info:
            await limiter.admit("web", submit=True)
        assert "generations per hour" in info.value.detail and "2" in info.value.detail
        assert info.value.retry_after == 3600 - 15
        await admit_and_release(limiter, submit=False)  # non-submits still pass


async def test_a_generation_inside_a_session_counts_in_the_hour_and_quotas_only() -> None:
    """count_generation (a socket's request message): the hourly window, the quotas and usage
    count it; it is no request of the minute and takes no slot, so a session holding the
    caller's only slot can still count its messages, and other calls are not starved."""
    quota = Quota("fal-ai/fast-lcm-diffusion", 3, "day")
    async with running(requests_per_minute=2, concurrent=1, submits_per_hour=4) as limiter:
        session = await limiter.admit("web", submit=True, quotas=(quota,), app="fal-ai/fast-lcm")
        await limiter.count_generation("web", quotas=(quota,), app="fal-ai/fast-lcm")
        await limiter.count_generation("web", quotas=(quota,), app="fal-ai/fast-lcm")
        with pytest.raises(QuotaExceeded) as used_up:
            await limiter.count_generation("web", quotas=(quota,), app="fal-ai/fast-lcm")
        assert used_up.value.quota["limit"] == 3
        await limiter.count_generation("web", app="other")  # no quota of its app: the hour only
        with pytest.raises(RateLimited) as hour:
            await limiter.count_generation("web", app="other")
        assert "generations per hour" in hour.value.detail
        await session.release()
        await admit_and_release(limiter)  # the minute saw one request, not six
        report = await limiter.usage("web", "default", (quota,))
        assert report.quotas[0].used == 3
        assert report.apps == {"fal-ai/fast-lcm": (3, 0.0, 0), "other": (1, 0.0, 0)}


async def test_concurrency_refuses_beyond_the_slots_and_release_frees_one() -> None:
    async with running(concurrent=2) as limiter:
        first = await limiter.admit("web", submit=False)
        await limiter.admit("web", submit=True)
        with pytest.raises(RateLimited) as info:
            await limiter.admit("web", submit=False)
        assert "concurrent requests" in info.value.detail and "2" in info.value.detail
        assert info.value.retry_after == 1
        await first.release()
        third = await limiter.admit("web", submit=False)
        with pytest.raises(RateLimited):
            await limiter.admit("web", submit=False)
        await third.release()


async def test_release_is_idempotent() -> None:
    async with running(concurrent=1) as limiter:
        lease = await limiter.admit("web", submit=False)
        await lease.release()
        await lease.release()  # must not free a second slot
        await lease.release()
        held = await limiter.admit("web", submit=False)
        with pytest.raises(RateLimited):
            await limiter.admit("web", submit=False)
        await held.release()


@pytest.mark.parametrize(
    ("limits", "submit"),
    [
        ({"requests_per_minute": 1}, False),
        ({"submits_per_hour": 1}, True),
        ({"concurrent": 1}, False),
    ],
)
async def test_callers_are_independent(limits: dict[str, int], submit: bool) -> None:
    async with running(**limits) as limiter:
        await limiter.admit("alice", submit=submit)  # held, not released
        with pytest.raises(RateLimited):
            await limiter.admit("alice", submit=submit)
        await limiter.admit("bob", submit=submit)
        await limiter.admit("alice/1/1/minute", submit=submit)  # no key confusion either
        with pytest.raises(RateLimited):
            await limiter.admit("bob", submit=submit)


async def test_concurrent_admits_never_exceed_the_limits() -> None:
    async with running(concurrent=5) as limiter:
        results = await asyncio.gather(
            *[limiter.admit("web", submit=False) for _ in range(50)], return_exceptions=True
        )
        assert sum(isinstance(r, Lease) for r in results) == 5
        assert all(isinstance(r, (Lease, RateLimited)) for r in results)
    async with running(requests_per_minute=10) as limiter:
        results = await asyncio.gather(
            *[limiter.admit("web", submit=False) for _ in range(50)], return_exceptions=True
        )
        assert sum(isinstance(r, Lease) for r in results) == 10


async def test_zero_means_unlimited() -> None:
    limiter = create_limiter(UNLIMITED)
    await limiter.start()
    try:
        # None released until the end, submits and not.
        leases = [await limiter.admit("web", submit=i % 2 == 0) for i in range(2000)]
        assert len(leases) == 2000 and all(isinstance(lease, Lease) for lease in leases)
        for lease in leases:
            await lease.release()
    finally:
        await limiter.close()


async def test_a_refused_call_spends_nothing() -> None:
    # Every limit is checked before any is counted: a call refused for concurrency does not
    # use up a request of the minute.
    async with running(requests_per_minute=2, concurrent=1) as limiter:
        held = await limiter.admit("web", submit=False)  # hit 1
        for _ in range(5):  # refused for concurrency: not hits
            with pytest.raises(RateLimited) as info:
                await limiter.admit("web", submit=False)
            assert "concurrent" in info.value.detail
        await held.release()
        await admit_and_release(limiter)  # hit 2
        with pytest.raises(RateLimited) as info:
            await limiter.admit("web", submit=False)
        assert "requests per minute" in info.value.detail


async def test_refusals_never_show_the_caller() -> None:
    caller = "Bearer tok-SENTINEL-7f3a\u2603\x00{x}"
    async with running(requests_per_minute=1, concurrent=1) as limiter:
        await limiter.admit(caller, submit=False)
        with pytest.raises(RateLimited) as info:
            await limiter.admit(caller, submit=False)
        err = info.value
        assert "SENTINEL" not in err.message + err.detail + str(err) + err.body().decode()
