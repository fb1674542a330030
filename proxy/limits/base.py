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

Two backends with the same answers: :class:`~proxy.limits.memory.MemoryLimiter` (one
process; O(1) per call and per caller, no thread, nothing walks the callers) and
:class:`~proxy.limits.redis_backend.RedisLimiter` (shared by replicas: one Lua script, one
round trip per turn of the event loop). This module is what both share: the settings, the
lease, the face they answer to and the refusals they raise. Usage
(:mod:`proxy.limits.usage`) is summed in the same store.

Caller ids can hold any character and may be sensitive: refusals name the limit and its
value, never the caller, and Redis keys use a digest of them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..errors import BudgetExceeded, QuotaExceeded, RateLimited
from .admin_ops import CallerPage
from .money import as_usd, usd
from .quotas import Quota
from .spend import Reservation
from .usage import RecentIds, UsageReport, iso
from .windows import retry_after

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


NO_USE: tuple[int, ...] = ()  # an admitted call's ``used`` when no quota or budget counted it


class Lease:
    """A concurrency slot, held until :meth:`release` (idempotent, never raises).

    ``used``: for each quota or budget the call was admitted with (in the order passed to
    :meth:`Limiter.admit`), how much of it is used once this call is counted: generations,
    or micro-dollars (spent, plus the estimates held, this one's included). Empty when no
    quota applied, or when Redis failed under "open" (admitted unchecked: not known)."""

    __slots__ = ("_release", "used")

    def __init__(
        self, release: Callable[[], Awaitable[None]] | None = None,
        used: tuple[int, ...] = NO_USE,
    ) -> None:  # fmt: skip
        self._release = release  # None: nothing held (unlimited, or Redis down under "open")
        self.used = used

    async def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            await release()


class QuotaNear:
    """An admitted call left ``quota`` (a quota or a budget) at ``used`` (generations, or
    micro-dollars with the estimates held), near its limit: what the admission gate tells
    the dashboard, beside the refusals (:attr:`proxy.admission.gate.Admission.on_limit`)."""

    __slots__ = ("quota", "used")

    def __init__(self, quota: Quota, used: int) -> None:
        self.quota, self.used = quota, used


class Limiter:
    """The limits of :class:`LimitSettings`; the backends decide where the counts live."""

    def __init__(self, settings: LimitSettings) -> None:
        self.settings = settings
        self.clock: Callable[[], float] = time.time  # epoch seconds: windows are calendar-aligned
        self._units_seen = RecentIds()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ready(self) -> bool:
        return True

    async def admit(
        self, caller: str, *, submit: bool, quotas: tuple[Quota, ...] = (),
        app: str | None = None, estimate: int = 0,
    ) -> Lease:  # fmt: skip
        """Check every limit of the call; if all have room, count it and take a slot.
        The lease's ``used`` says how much of each of ``quotas`` is used after it.

        ``submit``: the call can start a generation (the hourly window and ``quotas``, the
        caller's quotas and budgets that apply to it, count it; usage sums it under
        ``app``). A budget counts ``estimate`` micro-dollars, and has room when nothing of
        it is spent up and the estimate fits (:mod:`proxy.limits.spend`). Raises
        :class:`RateLimited`, :class:`QuotaExceeded` or :class:`BudgetExceeded` (429) or,
        when Redis fails under "closed", :class:`~proxy.errors.LimiterUnavailable` (503).
        """
        raise NotImplementedError

    async def count_generation(
        self, caller: str, *, quotas: tuple[Quota, ...] = (), app: str | None = None,
        estimate: int = 0,
    ) -> tuple[int, ...]:  # fmt: skip
        """One more generation inside a call admitted already (a request message on an
        open WebSocket session): the hourly window and ``quotas`` check and count it and
        usage sums it, as :meth:`admit` with ``submit`` would; it is no request of the
        minute and takes no slot. Returns how much of each of ``quotas`` is used after it
        (as :attr:`Lease.used`). Raises as :meth:`admit` does."""
        raise NotImplementedError

    async def add_units(
        self, caller: str, app: str | None, units: float, request_id: str | None = None,
        cost: int = 0, reservation: Reservation | None = None,
    ) -> bool:  # fmt: skip
        """Add fal's billable units (from a response) to the caller's usage, once per fal
        ``request_id`` and caller (a result the caller fetches again adds nothing; one
        another caller fetches with a leaked id is theirs, never a reason to drop the
        owner's; no id: always added). Returns whether they were added here (False: this
        process counted them already).

        ``cost``: what they cost (micro-dollars; 0: the app has no price), added to the
        caller's spend; ``reservation``: the budgets the call counted its estimate in,
        which now get ``cost - estimate`` (once, as the units)."""
        once = f"{caller}\n{request_id}" if request_id else None
        if once is not None and not self._units_seen.first_time(once):
            return False
        adjust = reservation.held if reservation is not None else 0
        self._add_units(caller, app, units, once, cost, reservation, cost - adjust)
        return True

    def _add_units(
        self, caller: str, app: str | None, units: float, once: str | None, cost: int,
        reservation: Reservation | None, delta: int,
    ) -> None:  # fmt: skip
        """Add the units and their cost; ``once``: their (caller, request id) mark, None if
        they have none; ``delta`` to the budgets of ``reservation``, in its periods."""
        raise NotImplementedError

    def release(self, caller: str, reservation: Reservation) -> None:
        """A call that ended with no cost known gives its budgets' estimate back."""
        if reservation.held:
            self._add_units(caller, None, 0.0, None, 0, reservation, -reservation.held)

    async def usage(self, caller: str, plan: str, quotas: tuple[Quota, ...]) -> UsageReport:
        """The caller's ``quotas`` with what is used of each, and this month's usage."""
        raise NotImplementedError

    # The admin API's (proxy.app.admin_routes; proxy.limits.admin_ops): off the request path.

    async def block(self, caller: str) -> bool:
        """Refuse every call of ``caller`` from now on, on every replica sharing the store
        (:class:`~proxy.errors.CallerBlocked`, checked first in :meth:`admit` and
        :meth:`count_generation`). Returns whether it was not blocked already."""
        raise NotImplementedError

    async def unblock(self, caller: str) -> bool:
        """Admit ``caller`` again. Returns whether it was blocked."""
        raise NotImplementedError

    async def reset(self, caller: str, quotas: tuple[Quota, ...]) -> int:
        """Clear the caller's counters of ``quotas`` (quotas and budgets) in their current
        periods, so it has room again; its usage record and rate windows are left alone.
        Returns how many counters held something."""
        raise NotImplementedError

    async def list_callers(self, cursor: str | None, limit: int) -> CallerPage:
        """A page of at most ``limit`` callers with usage this month and the cursor of the
        next (None: the last page). Raises :class:`~proxy.limits.admin_ops.BadCursor`."""
        raise NotImplementedError

    def window_refusal(self, limit: int, what: str, wait: float) -> RateLimited:
        return RateLimited(
            "rate limit exceeded", f"at most {limit} {what}", retry_after=retry_after(wait)
        )

    def quota_refusal(
        self, quota: Quota, resets_at: float, now: float, used: int = 0, estimate: int = 0
    ) -> QuotaExceeded | BudgetExceeded:
        if quota.money:
            return BudgetExceeded(
                apps=quota.pattern, period=quota.period, described=quota.describe(),
                limit_usd=as_usd(quota.limit), spent_usd=as_usd(used), spent=usd(used),
                estimate=usd(estimate) if estimate else None, resets_at=iso(resets_at),
                retry_after=seconds_until(resets_at, now),
            )  # fmt: skip
        return QuotaExceeded(
            apps=quota.pattern, limit=quota.limit, period=quota.period,
            described=quota.describe(), resets_at=iso(resets_at),
            retry_after=seconds_until(resets_at, now),
        )  # fmt: skip

    def concurrency_refusal(self) -> RateLimited:
        return RateLimited(
            "rate limit exceeded",
            f"at most {self.settings.concurrent} concurrent requests",
            retry_after=1,  # a slot frees when any of the caller's requests ends
        )
