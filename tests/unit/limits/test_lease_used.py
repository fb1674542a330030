"""What an admitted call reports used of its quotas and budgets (``Lease.used``, and
``count_generation``'s answer): the counts after the call, aligned with the quotas passed,
empty (the shared constant, nothing built) when none counted it.

The Redis limiter's answers are checked against these, call by call, in
``tests/e2e/test_limits_redis_batches.py`` and ``tests/e2e/test_budget_arithmetic.py``.
"""

from __future__ import annotations

import pytest

from proxy.errors import BudgetExceeded, QuotaExceeded
from proxy.limits import Lease
from proxy.limits.base import NO_USE
from proxy.limits.quotas import Quota
from tests.unit.limits.support import running

pytestmark = pytest.mark.anyio


DAY = Quota("*", 3, "day")
FLUX = Quota("fal-ai/flux/*", 10, "month")
BUDGET = Quota("*", 100_000, "day", money=True)  # $0.10


def test_a_lease_stays_tiny() -> None:
    lease = Lease()
    assert Lease.__slots__ == ("_release", "used") and not hasattr(lease, "__dict__")
    assert lease.used is NO_USE == ()


@pytest.mark.parametrize("concurrent", [0, 2])
async def test_each_quota_reports_its_count_after_the_call(concurrent: int) -> None:
    async with running(concurrent=concurrent) as limiter:
        quotas = (DAY, FLUX)
        leases = []
        for expected in ((1, 1), (2, 2)):
            lease = await limiter.admit("web", submit=True, quotas=quotas, app="fal-ai/flux")
            assert lease.used == expected
            leases.append(lease)
        for lease in leases:
            await lease.release()
        # In the order passed, whatever it is; a quota another call did not count starts at 0.
        other = await limiter.admit("web", submit=True, quotas=(Quota("x/*", 5, "day"), DAY))
        assert other.used == (1, 3)
        with pytest.raises(QuotaExceeded):
            await limiter.admit("web", submit=True, quotas=quotas)
        assert (await limiter.usage("web", "default", quotas)).quotas[0].used == 3  # unchanged


async def test_a_budget_reports_its_spend_with_the_estimates_held() -> None:
    async with running() as limiter:
        first = await limiter.admit("web", submit=True, quotas=(DAY, BUDGET), estimate=30_000)
        assert first.used == (1, 30_000)
        second = await limiter.admit("web", submit=True, quotas=(DAY, BUDGET), estimate=50_000)
        assert second.used == (2, 80_000)
        # An estimate of 0 counts nothing in the budget: it reports what is held.
        third = await limiter.admit("web", submit=True, quotas=(DAY, BUDGET), estimate=0)
        assert third.used == (3, 80_000)
        with pytest.raises(BudgetExceeded):
            await limiter.admit("web", submit=True, quotas=(BUDGET,), estimate=30_000)


async def test_no_quota_reports_nothing_and_builds_nothing() -> None:
    async with running(concurrent=1) as limiter:
        request = await limiter.admit("web", submit=False, quotas=(DAY,))  # not a generation
        assert request.used is NO_USE
        await request.release()
        submit = await limiter.admit("web", submit=True)
        assert submit.used is NO_USE
        await submit.release()
        assert await limiter.count_generation("web") is NO_USE


async def test_a_generation_inside_a_session_reports_as_an_admit_does() -> None:
    async with running(concurrent=1) as limiter:
        session = await limiter.admit("web", submit=True, quotas=(DAY, BUDGET), estimate=10)
        assert session.used == (1, 10)
        assert await limiter.count_generation("web", quotas=(DAY, BUDGET), estimate=10) == (2, 20)
        assert await limiter.count_generation("web", quotas=(DAY,)) == (3,)
        with pytest.raises(QuotaExceeded):
            await limiter.count_generation("web", quotas=(DAY,))
        await session.release()
