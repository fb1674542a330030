"""The limits in memory, for one process: O(1) per call and per caller, no thread, no sweep.

Every structure is a dict keyed by caller id (:mod:`proxy.limits.windows`); state a window no
longer needs is dropped when the window rolls over, on one timer armed only while something
is held.
"""

from __future__ import annotations

import asyncio
import itertools
import math

from ..errors import CallerBlocked
from .admin_ops import BadCursor, CallerPage, CallerRow, decode_cursor, encode_cursor
from .base import (
    GENERATIONS,
    HOUR,
    MINUTE,
    NO_USE,
    Lease,
    Limiter,
    LimitSettings,
    caller_key,
)
from .quotas import Quota
from .spend import Reservation
from .usage import QuotaUse, UsageBook, UsageReport
from .windows import PeriodCounts, SlidingWindows, period_bounds


class MemoryLimiter(Limiter):
    """One process. Every structure is a dict keyed by caller id, touched O(1) times per
    call; state a window no longer needs is dropped when the window rolls over
    (:mod:`proxy.limits.windows`), so idle callers cost nothing after the longest window."""

    def __init__(self, settings: LimitSettings) -> None:
        super().__init__(settings)
        rpm, per_hour = settings.requests_per_minute, settings.submits_per_hour
        self._per_minute = SlidingWindows(rpm, MINUTE) if rpm else None
        self._per_hour = SlidingWindows(per_hour, HOUR) if per_hour else None
        self._quotas: dict[str, PeriodCounts] = {}  # Quota.key → counts
        self._in_use: dict[str, int] = {}
        self._usage = UsageBook()
        self._timer: asyncio.TimerHandle | None = None
        self._blocked: set[str] = set()  # by the operator (admin API); kept until unblocked

    async def admit(
        self, caller: str, *, submit: bool, quotas: tuple[Quota, ...] = (),
        app: str | None = None, estimate: int = 0,
    ) -> Lease:  # fmt: skip
        # No await until the counts are taken: the check and the count are one atomic step.
        now = self.clock()
        before = self._check(caller, now, request=True, submit=submit, quotas=quotas,
                             estimate=estimate)  # fmt: skip
        limit = self.settings.concurrent
        if limit and self._in_use.get(caller, 0) >= limit:
            raise self.concurrency_refusal()
        used = self._count(caller, now, request=True, submit=submit, quotas=quotas, app=app,
                           estimate=estimate, used=before)  # fmt: skip
        if not limit:
            return Lease(None, used)
        self._in_use[caller] = self._in_use.get(caller, 0) + 1
        return Lease(lambda: self._release(caller), used)

    async def count_generation(
        self, caller: str, *, quotas: tuple[Quota, ...] = (), app: str | None = None,
        estimate: int = 0,
    ) -> tuple[int, ...]:  # fmt: skip
        now = self.clock()
        used = self._check(caller, now, request=False, submit=True, quotas=quotas,
                           estimate=estimate)  # fmt: skip
        return self._count(caller, now, request=False, submit=True, quotas=quotas, app=app,
                           estimate=estimate, used=used)  # fmt: skip

    def _check(
        self, caller: str, now: float, *, request: bool, submit: bool,
        quotas: tuple[Quota, ...], estimate: int,
    ) -> list[int] | None:  # fmt: skip
        """Raise the first refusal among the windows and quotas the call counts in; else
        what is used of each of ``quotas`` before the call (None when there are none)."""
        if self._blocked and caller in self._blocked:  # first, as in the Redis script
            raise CallerBlocked()
        if self._timer is None:
            self._forget_later(now)
        if (
            request
            and self._per_minute is not None
            and (wait := self._per_minute.wait(caller, now))
        ):
            raise self.window_refusal(self._per_minute.limit, "requests per minute", wait)
        if submit:
            if self._per_hour is not None and (wait := self._per_hour.wait(caller, now)):
                raise self.window_refusal(self._per_hour.limit, GENERATIONS, wait)
            if not quotas:
                return None
            seen = []
            for quota in quotas:
                counts = self._counts(quota)
                used = counts.count(caller, now)
                # A budget: nothing spent up, and room for the call's estimate (spend.py).
                if used >= quota.limit or (quota.money and used + estimate > quota.limit):
                    end = counts.bounds(now)[2]
                    raise self.quota_refusal(quota, end, now, used, estimate if quota.money else 0)
                seen.append(used)
            return seen
        return None

    def _count(
        self, caller: str, now: float, *, request: bool, submit: bool,
        quotas: tuple[Quota, ...], app: str | None, estimate: int, used: list[int] | None,
    ) -> tuple[int, ...]:  # fmt: skip
        """Count the call; returns what is used of each of ``quotas`` after it (``used``:
        before it, from :meth:`_check`)."""
        if request and self._per_minute is not None:
            self._per_minute.add(caller, now)
        if not submit:
            return NO_USE
        if self._per_hour is not None:
            self._per_hour.add(caller, now)
        self._usage.add(caller, app, now, 1, 0.0)
        if used is None:
            return NO_USE
        for i, quota in enumerate(quotas):
            if not quota.money:
                used[i] = self._counts(quota).add(caller, now)
            elif estimate:
                used[i] = self._counts(quota).add(caller, now, estimate)
        return tuple(used)

    async def _release(self, caller: str) -> None:
        left = self._in_use[caller] - 1
        if left:
            self._in_use[caller] = left
        else:
            del self._in_use[caller]

    def _add_units(
        self, caller: str, app: str | None, units: float, once: str | None, cost: int,
        reservation: Reservation | None, delta: int,
    ) -> None:  # fmt: skip
        now = self.clock()
        if units or cost:
            self._usage.add(caller, app, now, 0, units, cost)
        if reservation is None or not delta:
            return
        for quota in reservation.budgets:
            counts = self._counts(quota)
            # Only in the period the estimate was counted in: a new one starts from nothing.
            if counts.bounds(now)[0] == period_bounds(quota.period, reservation.at)[0]:
                counts.add(caller, now, max(delta, -counts.count(caller, now)))

    async def usage(self, caller: str, plan: str, quotas: tuple[Quota, ...]) -> UsageReport:
        now = self.clock()
        uses = []
        for quota in quotas:
            counts = self._counts(quota)
            uses.append(QuotaUse(quota, counts.count(caller, now), counts.bounds(now)[2]))
        start, end, apps = self._usage.read(caller, now)
        return UsageReport(plan, uses, start, end, apps)

    async def block(self, caller: str) -> bool:
        new = caller not in self._blocked
        self._blocked.add(caller)
        return new

    async def unblock(self, caller: str) -> bool:
        was = caller in self._blocked
        self._blocked.discard(caller)
        return was

    async def reset(self, caller: str, quotas: tuple[Quota, ...]) -> int:
        now, cleared = self.clock(), 0
        for quota in quotas:
            counts = self._counts(quota)
            used = counts.count(caller, now)
            if used:  # a budget's reservations settle later against nothing (never below 0)
                counts.add(caller, now, -used)
                cleared += 1
        return cleared

    async def list_callers(self, cursor: str | None, limit: int) -> CallerPage:
        """The month's callers in first-use order (a dict only appended to within the
        month): the cursor is an offset into it."""
        now = self.clock()
        book = self._usage
        book.roll(now)
        month = int(book._start)  # the month's first second: a cursor of another month restarts
        offset = 0
        if cursor is not None:
            at, position = decode_cursor(cursor, "m")
            if not position.isdigit():
                raise BadCursor("not a cursor this proxy wrote")
            offset = int(position) if at == month else 0
        callers = list(itertools.islice(book._gens, offset, offset + limit + 1))
        more = len(callers) > limit
        rows = [
            CallerRow(caller_key(c), c, book.read(c, now)[2], c in self._blocked)
            for c in callers[:limit]
        ]
        return CallerPage(rows, encode_cursor("m", month, str(offset + limit)) if more else None)

    def keys_held(self) -> int:
        """Entries held for callers, over every structure (tests, the benchmark)."""
        return sum(part.keys_held() for part in self._parts()) + len(self._in_use)

    def forget(self, now: float) -> None:
        """Roll every structure to ``now``: what no window or period needs is dropped."""
        for part in self._parts():
            part.roll(now)

    def _parts(self) -> list[SlidingWindows | PeriodCounts | UsageBook]:
        windows = [w for w in (self._per_minute, self._per_hour) if w is not None]
        return [*windows, *self._quotas.values(), self._usage]

    def _forget_later(self, now: float) -> None:
        """Arm one timer for the next time a structure holding callers rolls over, so an
        idle process forgets them too. Nothing runs while nothing is held; under traffic
        the timer is already armed and this costs one attribute test per call."""
        when = min(part.next_change() for part in self._parts())
        if when == math.inf:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(when - now, 0.0) + 0.01, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.clock()
        self.forget(now)
        self._forget_later(now)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _counts(self, quota: Quota) -> PeriodCounts:
        counts = self._quotas.get(quota.key)
        if counts is None:
            counts = self._quotas[quota.key] = PeriodCounts(quota.period)
        return counts
