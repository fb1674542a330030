"""Budgets: spend counted in integer micro-dollars, reserved at admission, settled on fal's answer.

A budget (``*=$5/month``, :mod:`proxy.limits.quotas`) counts spend: fal's billable units ×
the app's price (:mod:`proxy.limits.prices`). What a call costs is known only when fal's
answer arrives (``x-fal-billable-units`` on a run's response, on a queue result), so:

1. **Reserve at admission.** A call on an app under a budget is admitted only if the
   budget's spend so far plus the call's *estimate* (:class:`Estimates`: the last cost seen
   for that endpoint in this process, else one unit at its price) stays within the budget,
   and nothing of it is spent up yet; the estimate is then counted at once, in the same
   atomic step as every other limit (memory, or the Redis script).
2. **Settle on the answer.** When the units arrive, the budget gets ``cost - estimate``
   (:class:`Reservation`); a call that ends with no units (refused upstream, failed,
   cancelled) gives its estimate back. A queue submit's reservation waits, in the process
   that admitted it, for its result (:class:`Parked`), where the units come.

**Overshoot.** Admission keeps ``spent + estimates in flight <= budget``, so a budget is
exceeded only by what calls in flight cost *beyond* their estimates: at most the sum, over
the caller's calls in flight, of ``cost - estimate`` (zero when estimates are right; a
call's estimate is its endpoint's last cost, so an endpoint whose cost varies can exceed it).
WebSocket messages carry no units: each is charged its estimate, for good.

Money is integer micro-dollars everywhere (:mod:`proxy.limits.money`; no float drift): a
cost is rounded *up* to the next micro-dollar, so a sum of costs never undercounts.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from .money import MICROS
from .quotas import Quota

ESTIMATED_ENDPOINTS = 1024  # endpoints whose last cost one process remembers
PARKED = 100_000  # queue submits whose reservation waits for its result, per process


def units_decimal(units: float) -> Decimal:
    """fal's units (parsed as a float) as the decimal the header said (its shortest repr)."""
    try:
        return Decimal(repr(units))
    except InvalidOperation:  # nan/inf never get here (parse_units), but never raise
        return Decimal(0)


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a call holds of its caller's budgets until its cost is known: ``estimate``
    micro-dollars per generation, ``count`` generations (a socket's messages), counted in
    the periods holding ``at`` of each of ``budgets``."""

    budgets: tuple[Quota, ...]
    estimate: int
    at: float
    count: int = 1
    endpoint: str = ""  # what it is priced as (a queue result's path names no endpoint)

    @property
    def held(self) -> int:
        return self.estimate * self.count


class Estimates:
    """The last cost seen per endpoint, in this process: a call's estimate. Bounded (the
    oldest endpoint is forgotten), so made-up paths cannot grow it."""

    def __init__(self, size: int = ESTIMATED_ENDPOINTS) -> None:
        self._last: OrderedDict[str, int] = OrderedDict()
        self._size = size

    def estimate(self, endpoint: str, price: Decimal | None) -> int:
        """Micro-dollars a call on ``endpoint`` will likely cost (0: it has no price)."""
        if price is None:
            return 0
        last = self._last.get(endpoint)
        return last if last is not None else math.ceil(Fraction(price) * MICROS)  # one unit

    def observe(self, endpoint: str, cost: int) -> None:
        self._last[endpoint] = cost
        self._last.move_to_end(endpoint)
        if len(self._last) > self._size:
            self._last.popitem(last=False)


class Parked:
    """Queue submits' reservations, by (caller, fal request id), until the result brings
    the units. Bounded: the oldest is dropped, and stays charged its estimate."""

    def __init__(self, size: int = PARKED) -> None:
        self._held: OrderedDict[tuple[str, str], Reservation] = OrderedDict()
        self._size = size

    def park(self, caller: str, request_id: str, reservation: Reservation) -> None:
        self._held[(caller, request_id)] = reservation
        if len(self._held) > self._size:
            self._held.popitem(last=False)

    def take(self, caller: str, request_id: str) -> Reservation | None:
        return self._held.pop((caller, request_id), None)

    def __len__(self) -> int:
        return len(self._held)
