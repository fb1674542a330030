"""Per-caller limits: requests per minute, generations per hour, quotas, concurrent requests.

Every admitted call is checked against all of its limits at once and, only if every one
has room, counted against all of them (a call refused for one limit spends nothing of
the others):

* **requests per minute** (every call) and **generations per hour** (calls that can
  start a generation): sliding window counters (:mod:`proxy.limits.windows`), the algorithm of
  the `limits` library's sliding-window-counter strategy. The refusal's ``Retry-After`` is
  the time until the call would pass.
* **quotas** (generations per calendar hour/day/week/month, per app pattern, by plan;
  :mod:`proxy.limits.quotas`): a counter per caller and period; ``Retry-After`` points at the
  next period.
* **concurrency** (in-flight requests and streams): a lease, given back by
  :meth:`Lease.release`.

Two backends with the same answers: :class:`MemoryLimiter` (one process; O(1) per call
and per caller, no thread, nothing walks the callers) and
:class:`~proxy.limits.redis_backend.RedisLimiter` (shared by replicas: one Lua script, one round
trip per turn of the event loop). Usage (:mod:`proxy.limits.usage`) is summed in the same store.

Caller ids can hold any character and may be sensitive: refusals name the limit and its
value, never the caller, and Redis keys use a digest of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..errors import QuotaExceeded, RateLimited
from .quotas import Quota
from .usage import QuotaUse, UsageBook, UsageReport, iso
from .windows import PeriodCounts, SlidingWindows, retry_after

MINUTE, HOUR = 60, 3600
GENERATIONS = "generations per hour (runs, queue submits, streams, realtime tokens and sockets)"


@dataclass(frozen=True)
class LimitSettings:
    requests_per_minute: int = 600  # 0 = unlimited
    concurrent: int = 32  # in-flight requests and streams per caller; 0 = unlimited
    submits_per_hour: int = 1000  # calls that can start a generation, per caller; 0 = unlimited
    redis_url: str | None = None  # None = in-memory (one process)
    redis_failure: str = "closed"  # "closed": refuse (503) when Redis fails; "open": admit and log
    key_prefix: str = "fal-gateway-proxy"
    lease_ttl: float = 300.0


def caller_key(caller: str) -> str:
    """A fixed-length, key-safe name for a caller id (any characters, maybe sensitive)."""
    return hashlib.blake2b(caller.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def seconds_until(reset: float, now: float) -> int:
    """Whole seconds to wait until ``reset``, for Retry-After: rounded up, at least 1."""
    return retry_after(reset - now)


class Lease:
    """A concurrency slot, held until :meth:`release` (idempotent, never raises)."""

    __slots__ = ("_release",)

    def __init__(self, release: Callable[[], Awaitable[None]] | None = None) -> None:
        self._release = release  # None: nothing held (unlimited, or Redis down under "open")

    async def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            await release()


class Limiter:
    """The limits of :class:`LimitSettings`; the backends decide where the counts live."""

    def __init__(self, settings: LimitSettings) -> None:
        self.settings = settings
        self.clock: Callable[[], float] = time.time  # epoch seconds: windows are calendar-aligned

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ready(self) -> bool:
        return True

    async def admit(
        self, caller: str, *, submit: bool, quotas: tuple[Quota, ...] = (),
        app: str | None = None,
    ) -> Lease:  # fmt: skip
        """Check every limit of the call; if all have room, count it and take a slot.

        ``submit``: the call can start a generation (the hourly window and ``quotas``, the
        caller's quotas that apply to it, count it; usage sums it under ``app``). Raises
        :class:`RateLimited` or :class:`QuotaExceeded` (429) or, when Redis fails under
        "closed", :class:`~proxy.errors.LimiterUnavailable` (503).
        """
        raise NotImplementedError

    async def add_units(self, caller: str, app: str | None, units: float) -> None:
        """Add fal's billable units (from a response) to the caller's usage."""
        raise NotImplementedError

    async def usage(self, caller: str, plan: str, quotas: tuple[Quota, ...]) -> UsageReport:
        """The caller's ``quotas`` with what is used of each, and this month's usage."""
        raise NotImplementedError

    def window_refusal(self, limit: int, what: str, wait: float) -> RateLimited:
        return RateLimited(
            "rate limit exceeded", f"at most {limit} {what}", retry_after=retry_after(wait)
        )

    def quota_refusal(self, quota: Quota, resets_at: float, now: float) -> QuotaExceeded:
        return QuotaExceeded(quota, iso(resets_at), retry_after=seconds_until(resets_at, now))

    def concurrency_refusal(self) -> RateLimited:
        return RateLimited(
            "rate limit exceeded",
            f"at most {self.settings.concurrent} concurrent requests",
            retry_after=1,  # a slot frees when any of the caller's requests ends
        )


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

    async def admit(
        self, caller: str, *, submit: bool, quotas: tuple[Quota, ...] = (),
        app: str | None = None,
    ) -> Lease:  # fmt: skip
        # No await until the counts are taken: the check and the count are one atomic step.
        now = self.clock()
        if self._timer is None:
            self._forget_later(now)
        if self._per_minute is not None and (wait := self._per_minute.wait(caller, now)):
            raise self.window_refusal(self._per_minute.limit, "requests per minute", wait)
        if submit:
            if self._per_hour is not None and (wait := self._per_hour.wait(caller, now)):
                raise self.window_refusal(self._per_hour.limit, GENERATIONS, wait)
            for quota in quotas:
                counts = self._counts(quota)
                if counts.count(caller, now) >= quota.limit:
                    raise self.quota_refusal(quota, counts.bounds(now)[2], now)
        limit = self.settings.concurrent
        if limit and self._in_use.get(caller, 0) >= limit:
            raise self.concurrency_refusal()
        if self._per_minute is not None:
            self._per_minute.add(caller, now)
        if submit:
            if self._per_hour is not None:
                self._per_hour.add(caller, now)
            for quota in quotas:
                self._counts(quota).add(caller, now)
            self._usage.add(caller, app, now, 1, 0.0)
        if not limit:
            return Lease()
        self._in_use[caller] = self._in_use.get(caller, 0) + 1
        return Lease(lambda: self._release(caller))

    async def _release(self, caller: str) -> None:
        left = self._in_use[caller] - 1
        if left:
            self._in_use[caller] = left
        else:
            del self._in_use[caller]

    async def add_units(self, caller: str, app: str | None, units: float) -> None:
        self._usage.add(caller, app, self.clock(), 0, units)

    async def usage(self, caller: str, plan: str, quotas: tuple[Quota, ...]) -> UsageReport:
        now = self.clock()
        uses = []
        for quota in quotas:
            counts = self._counts(quota)
            uses.append(QuotaUse(quota, counts.count(caller, now), counts.bounds(now)[2]))
        start, end, apps = self._usage.read(caller, now)
        return UsageReport(plan, uses, start, end, apps)

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


def create_limiter(settings: LimitSettings) -> Limiter:
    """The in-memory limiter, or the Redis one when ``settings.redis_url`` is set."""
    if settings.redis_failure not in ("closed", "open"):
        raise ValueError(f"redis_failure must be 'closed' or 'open': {settings.redis_failure!r}")
    if min(settings.requests_per_minute, settings.concurrent, settings.submits_per_hour) < 0:
        raise ValueError("limits must be 0 (unlimited) or more")
    if not settings.lease_ttl > 0:
        raise ValueError("lease_ttl must be positive")
    if settings.redis_url:
        from .redis_backend import RedisLimiter

        return RedisLimiter(settings)
    return MemoryLimiter(settings)
