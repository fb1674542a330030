"""Budgets' money arithmetic, against a real ``redis-server`` and the memory limiter.

Random turns of admits (each with an estimate in micro-dollars), then settlements of some
admitted calls (their cost arrives: ``cost - estimate``) and releases of others (they
failed: the estimate comes back). The Redis limiter, whose turns go in one batch, gives the
memory limiter's answers call by call (each admitted call's reported use of the quota and
the budget included); and in both the budget's counter is exactly the
integer sum the model says (admitted estimates, plus each settlement's difference, minus
each release): no float drift, nothing counted twice, nothing lost.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st

from proxy.errors import BudgetExceeded, QuotaExceeded
from proxy.limits import Lease, Limiter, LimitSettings
from proxy.limits.quotas import Quota
from proxy.limits.redis_backend import RedisLimiter
from proxy.limits.spend import Reservation
from tests.redis_support import RedisServer, memory_and_redis_agree

NOW = float((int(time.time()) // 86400) * 86400 + 3600)  # an hour into a UTC day
APP = "fal-ai/flux"

# One call: who, its estimate (µ$), and what happens to it once admitted: its cost
# arrives (settled, with this cost in µ$), or it fails (released), or it stays in flight.
call = st.tuples(
    st.sampled_from(["alice", "bob"]),
    st.integers(min_value=0, max_value=40_000),
    st.one_of(st.integers(min_value=0, max_value=90_000), st.sampled_from(["fail", "flight"])),
)
turns = st.lists(st.lists(call, min_size=1, max_size=8), min_size=1, max_size=5)


@examples(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(limit=st.integers(min_value=0, max_value=200_000), count_limit=st.integers(0, 12),
       plan=turns)  # fmt: skip
def test_reserve_settle_release_match_memory_and_the_integer_model(
    redis_server: RedisServer, limit: int, count_limit: int,
    plan: list[list[tuple[str, int, int | str]]],
) -> None:  # fmt: skip
    budget = Quota("*", limit, "day", money=True)
    quotas = (Quota("*", count_limit, "day"), budget)
    limits = LimitSettings(
        requests_per_minute=0, submits_per_hour=0, concurrent=0, redis_url=redis_server.url,
        key_prefix=f"test-{uuid.uuid4().hex}",
    )  # fmt: skip

    async def run(limiter: Limiter, together: bool) -> list[object]:
        limiter.clock = lambda: NOW
        await limiter.start()
        seen: list[object] = []
        model = {"alice": 0, "bob": 0}
        for n, calls in enumerate(plan):
            admits = [
                limiter.admit(who, submit=True, quotas=quotas, app=APP, estimate=estimate)
                for who, estimate, _ in calls
            ]
            if together:
                results = await asyncio.gather(*admits, return_exceptions=True)
            else:
                results = []
                for admit in admits:
                    try:
                        results.append(await admit)
                    except (BudgetExceeded, QuotaExceeded) as exc:
                        results.append(exc)
            outcomes: list[object] = []
            for i, (result, (who, estimate, then)) in enumerate(zip(results, calls, strict=True)):
                if not isinstance(result, Lease):
                    assert isinstance(result, (BudgetExceeded, QuotaExceeded)), result
                    outcomes.append((type(result).__name__, result.detail))
                    continue
                # What the call reports used of the quota and the budget (the script's
                # {0, used * nq}): the count, and the spend with every estimate held.
                outcomes.append(("admitted", result.used))
                model[who] += estimate
                held = Reservation((budget,), estimate, NOW, 1, APP)
                if then == "fail":
                    limiter.release(who, held)
                    model[who] -= estimate
                elif isinstance(then, int):
                    added = await limiter.add_units(who, APP, 1.0, f"r{n}-{i}", then, held)
                    assert added
                    model[who] += then - estimate
            seen.append(outcomes)
            if isinstance(limiter, RedisLimiter):
                await limiter.flush()  # settlements ride the next batch: send them
        for who in ("alice", "bob"):
            report = await limiter.usage(who, "default", quotas)
            spent = report.quotas[1].used
            assert spent == model[who], (who, spent, model[who])
            assert spent <= max(limit, 0) + sum(  # the overshoot bound
                max(cost - estimate, 0)
                for calls in plan
                for w, estimate, cost in calls
                if w == who and isinstance(cost, int)
            )
            seen.append(("usage", who, [u.used for u in report.quotas], report.apps))
        return seen

    memory_and_redis_agree(limits, run)
