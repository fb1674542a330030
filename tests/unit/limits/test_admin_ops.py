"""The memory limiter's admin operations (block, unblock, reset, the paged listing) and the
pieces both backends share: cursors, and a caller id as one argument of the Redis script."""

from __future__ import annotations

import pytest

from proxy.errors import BudgetExceeded, CallerBlocked, QuotaExceeded
from proxy.limits import caller_key
from proxy.limits.admin_ops import (
    SEPARATOR,
    BadCursor,
    decode_cursor,
    encode_cursor,
    id_arg,
    id_from_store,
)
from proxy.limits.quotas import Quota
from proxy.limits.script import SEPARATOR as SCRIPT_SEPARATOR
from tests.unit.limits.support import running

pytestmark = pytest.mark.anyio


DAY = Quota("*", 1, "day")
BUDGET = Quota("*", 30_000, "day", money=True)  # $0.03


async def test_a_blocked_caller_is_refused_first_and_only_it() -> None:
    async with running(requests_per_minute=1, concurrent=2) as limiter:
        await (await limiter.admit("alice", submit=False)).release()
        assert await limiter.block("alice") is True
        assert await limiter.block("alice") is False  # already
        # Blocked is said before the full minute window: the same order as the script's.
        with pytest.raises(CallerBlocked) as refused:
            await limiter.admit("alice", submit=False)
        assert refused.value.status == 403 and refused.value.reason == "caller_blocked"
        with pytest.raises(CallerBlocked):
            await limiter.count_generation("alice", quotas=(DAY,))
        await (await limiter.admit("bob", submit=True)).release()
        assert await limiter.unblock("alice") is True
        assert await limiter.unblock("alice") is False
        await limiter.count_generation("alice", quotas=(DAY,))  # admitted again


async def test_reset_clears_the_current_periods_of_the_given_quotas_only() -> None:
    async with running(concurrent=2) as limiter:
        month = Quota("*", 5, "month")
        for quota in ((DAY, month), (DAY, month)):
            try:
                await (await limiter.admit("alice", submit=True, quotas=quota)).release()
            except QuotaExceeded:
                pass
        with pytest.raises(QuotaExceeded):
            await limiter.admit("alice", submit=True, quotas=(DAY,))
        assert await limiter.reset("alice", (DAY,)) == 1
        assert await limiter.reset("alice", (DAY,)) == 0  # nothing left to clear
        await (await limiter.admit("alice", submit=True, quotas=(DAY, month))).release()
        report = await limiter.usage("alice", "default", (DAY, month))
        assert [use.used for use in report.quotas] == [1, 2]  # the month's count kept
        assert report.apps["other"][0] == 2  # usage is what happened: reset leaves it


async def test_reset_of_a_budget_and_a_late_settlement_never_go_below_zero() -> None:
    async with running(concurrent=2) as limiter:
        await (
            await limiter.admit("alice", submit=True, quotas=(BUDGET,), estimate=20_000)
        ).release()
        with pytest.raises(BudgetExceeded):
            await limiter.admit("alice", submit=True, quotas=(BUDGET,), estimate=20_000)
        assert await limiter.reset("alice", (BUDGET,)) == 1
        await (
            await limiter.admit("alice", submit=True, quotas=(BUDGET,), estimate=20_000)
        ).release()
        report = await limiter.usage("alice", "default", (BUDGET,))
        assert report.quotas[0].used == 20_000


async def test_the_listing_pages_in_first_use_order_each_caller_once() -> None:
    async with running(concurrent=2) as limiter:
        names = [f"caller-{i:02d}" for i in range(25)]
        for name in names:
            await (await limiter.admit(name, submit=True, app="fal-ai/x")).release()
        await limiter.add_units("caller-03", "fal-ai/x", 2.5, "req-1", cost=1234)
        await limiter.block("caller-07")
        rows, cursor, pages = [], None, 0
        while True:
            page = await limiter.list_callers(cursor, 10)
            rows += page.callers
            pages += 1
            cursor = page.cursor
            if cursor is None:
                break
        assert pages == 3 and [row.caller for row in rows] == names
        by_id = {row.caller: row.to_json() for row in rows}
        assert by_id["caller-03"]["billable_units"] == 2.5
        assert by_id["caller-03"]["spend_usd"] == 0.001234
        assert by_id["caller-03"]["apps"]["fal-ai/x"]["generations"] == 1
        assert by_id["caller-07"]["blocked"] is True and by_id["caller-08"]["blocked"] is False
        assert by_id["caller-00"]["key"] == caller_key("caller-00")
        exact = await limiter.list_callers(None, 25)
        assert len(exact.callers) == 25 and exact.cursor is None


async def test_a_cursor_of_another_month_restarts_and_garbage_is_refused() -> None:
    async with running(concurrent=2) as limiter:
        await (await limiter.admit("alice", submit=True)).release()
        stale = encode_cursor("m", 12345, "7")
        assert [r.caller for r in (await limiter.list_callers(stale, 10)).callers] == ["alice"]
        for garbage in ["", "x", "!!!", "bS4xLng", encode_cursor("r", 1, "0-"), "A" * 300]:
            with pytest.raises(BadCursor):
                await limiter.list_callers(garbage or "=", 10)


def test_cursors_round_trip() -> None:
    assert decode_cursor(encode_cursor("r", 672, "13-abc"), "r") == (672, "13-abc")
    with pytest.raises(BadCursor):
        decode_cursor(encode_cursor("r", 672, "13"), "m")


@pytest.mark.parametrize(
    "caller",
    ["alice", "", "%", "%1F", "%25", "a\x1fb", "a%1Fb\x1f%25", "☃/ü", "x" * 10_000],
)
def test_a_caller_id_as_a_script_argument(caller: str) -> None:
    arg = id_arg(caller)
    assert arg and SEPARATOR not in arg and SEPARATOR == SCRIPT_SEPARATOR
    assert id_from_store(arg.encode()) == caller


def test_an_id_that_is_not_utf8_is_shown_escaped() -> None:
    arg = id_arg("a\ud800b")
    arg.encode("utf-8")  # the script's argument is valid UTF-8 (redis-py encodes strictly)
    assert id_from_store(arg) == "a\\xed\\xa0\\x80b"
    assert id_from_store(None) is None and id_from_store(b"no-marker") is None
