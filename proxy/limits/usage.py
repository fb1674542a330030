"""Usage: generations and fal's billable units per caller and app, this calendar month.

Counted where the limits are counted (memory or Redis), so every replica sharing a Redis
sees the same figures. A generation is counted when the call is admitted (as quotas count
it); billable units are added when a response carries ``x-fal-billable-units`` (fal sets
it on run responses and queue results), once per fal request id: a result fetched again
adds nothing (:class:`RecentIds` in each process, and in Redis a marker kept ``ONCE_TTL``
across replicas). Apps are named ``owner/alias``
(:func:`proxy.observe.metrics.app_label`); a caller's first ``MAX_APPS`` apps are named, the rest
summed under ``other``, so made-up paths cannot grow the store.

:class:`UsageReport` is what ``GET /usage/<caller>`` (metrics port) and a caller's own
``GET /api/fal/usage`` answer.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .money import as_usd
from .quotas import Quota
from .windows import period_bounds

MAX_APPS = 50  # named apps per caller and month; then "other"
RECENT_IDS = 100_000  # fal request ids whose units one process remembers having counted
ONCE_TTL = 86_400  # s Redis remembers a fal request id whose units were counted
OTHER = "other"
USAGE_PERIOD = "month"


@dataclass
class QuotaUse:
    quota: Quota
    used: int
    resets_at: float  # the end of the quota's current period (epoch seconds)


@dataclass
class UsageReport:
    plan: str
    quotas: list[QuotaUse] = field(default_factory=list)
    period_start: float = 0.0
    period_end: float = 0.0
    # app → (generations, billable units, spend in micro-dollars)
    apps: dict[str, tuple[int, float, int]] = field(default_factory=dict)

    def to_json(self, caller: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {} if caller is None else {"caller": caller}
        out["plan"] = self.plan
        out["quotas"] = [_quota_json(use) for use in self.quotas if not use.quota.money]
        out["budgets"] = [_budget_json(use) for use in self.quotas if use.quota.money]
        apps = sorted(self.apps.items())
        out["usage"] = {
            "period": USAGE_PERIOD,
            "start": iso(self.period_start),
            "end": iso(self.period_end),
            "spend_usd": as_usd(sum(spend for _, (_, _, spend) in apps)),
            "apps": {
                app: {
                    "generations": gens,
                    "billable_units": round(units, 6),
                    "spend_usd": as_usd(spend),
                }
                for app, (gens, units, spend) in apps
            },
        }
        return out


def _quota_json(use: QuotaUse) -> dict[str, Any]:
    quota = use.quota
    return {
        "quota": quota.spec(),
        "apps": quota.pattern,
        "period": quota.period,
        "limit": quota.limit,
        "used": min(use.used, quota.limit),
        "remaining": max(quota.limit - use.used, 0),
        "resets_at": iso(use.resets_at),
    }


def _budget_json(use: QuotaUse) -> dict[str, Any]:
    """A budget in dollars (JSON numbers, for a page's "$0.42 of $1.00 used"). ``spent_usd``
    includes the estimates of calls still in flight (proxy.limits.spend)."""
    quota, used = use.quota, max(use.used, 0)
    return {
        "budget": quota.spec(),
        "apps": quota.pattern,
        "period": quota.period,
        "limit_usd": as_usd(quota.limit),
        "spent_usd": as_usd(used),
        "remaining_usd": as_usd(max(quota.limit - used, 0)),
        "resets_at": iso(use.resets_at),
    }


def iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class UsageBook:
    """In memory: caller → app → generations, and caller → app → units, for the current
    month; forgotten in one go when the month ends (no scan, no timer).

    Two dicts of plain numbers rather than one of ``[gens, units]`` lists: a dict that
    holds only strings and numbers is not tracked by the garbage collector, so 100,000
    callers add nothing to the cost of a collection (measured: lists made the proxy's CPU
    per request grow with the number of callers).
    """

    __slots__ = ("_end", "_gens", "_spend", "_start", "_units")

    def __init__(self) -> None:
        self._gens: dict[str, dict[str, int]] = {}
        self._units: dict[str, dict[str, float]] = {}
        self._spend: dict[str, dict[str, int]] = {}  # micro-dollars
        self._start, self._end = 0.0, 0.0

    def add(
        self, caller: str, app: str | None, now: float, gens: int, units: float, cost: int = 0
    ) -> None:
        self.roll(now)
        apps = self._gens.get(caller)
        if apps is None:
            apps = self._gens[caller] = {}
        name = app or OTHER
        if name not in apps and len(apps) >= MAX_APPS:
            name = OTHER
        apps[name] = apps.get(name, 0) + gens
        if units:
            sums = self._units.get(caller)
            if sums is None:
                sums = self._units[caller] = {}
            sums[name] = sums.get(name, 0.0) + units
        if cost:
            spend = self._spend.get(caller)
            if spend is None:
                spend = self._spend[caller] = {}
            spend[name] = spend.get(name, 0) + cost

    def read(
        self, caller: str, now: float
    ) -> tuple[float, float, dict[str, tuple[int, float, int]]]:
        """(month start, month end, app → (generations, units, spend)) for ``caller``."""
        self.roll(now)
        gens, units = self._gens.get(caller, {}), self._units.get(caller, {})
        spend = self._spend.get(caller, {})
        return (
            self._start,
            self._end,
            {a: (n, units.get(a, 0.0), spend.get(a, 0)) for a, n in gens.items()},
        )

    def keys_held(self) -> int:
        return len(self._gens)

    def next_change(self) -> float:
        return self._end if self._gens else float("inf")

    def roll(self, now: float) -> None:
        if not self._start <= now < self._end:
            _, self._start, self._end = period_bounds(USAGE_PERIOD, now)
            self._gens, self._units, self._spend = {}, {}, {}


class RecentIds:
    """The last ``size`` ids seen: a fal request's billable units are counted once, however
    often its result is fetched. O(1) per id, bounded memory (the oldest is forgotten)."""

    def __init__(self, size: int = RECENT_IDS) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def first_time(self, request_id: str) -> bool:
        if request_id in self._ids:
            return False
        self._ids[request_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)
        return True


def parse_units(value: bytes | str | None) -> float:
    """``x-fal-billable-units`` as a number of units; 0 for anything that is not one."""
    if value is None:
        return 0.0
    try:
        units = float(value)
    except ValueError:
        return 0.0
    # A hostile or broken upstream must not make usage negative, infinite or NaN.
    return units if 0.0 < units < 1e12 else 0.0
