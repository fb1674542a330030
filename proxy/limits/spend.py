"""Budgets: spend counted in integer micro-dollars, reserved at admission, settled on fal's answer.

A budget (``*=$5/month``, :mod:`proxy.limits.quotas`) counts spend: fal's billable units ×
the app's price (:mod:`proxy.limits.prices`). What a call costs is known only when fal's
answer arrives (``x-fal-billable-units`` on a run's response, on a queue result), so:

1. **Reserve at admission.** A call on an app under a budget is admitted only if the
   budget's spend so far plus the call's *estimate* (:class:`Estimates`: the most a call on
   that endpoint cost in this process this past hour, else one unit at its price) stays
   within the budget,
   and nothing of it is spent up yet; the estimate is then counted at once, in the same
   atomic step as every other limit (memory, or the Redis script).
2. **Settle on the answer.** When the units arrive, the budget gets ``cost - estimate``
   (:class:`Reservation`); a call that fal (or the gateway) answers with a failure, or
   that never left whole, gives its estimate back; one that succeeds with no units keeps
   it, and so does one whose whole request went up with no answer back (the client hung
   up, a timeout): fal may be running it. A queue submit's
   reservation waits, in the process that admitted it, for its result (:class:`Parked`),
   where the units come.

**Overshoot.** Admission keeps ``spent + estimates in flight <= budget``, so a budget is
exceeded only by what calls in flight cost *beyond* their estimates: at most the sum, over
the caller's calls in flight, of ``cost - estimate`` (zero when estimates are right; a
call's estimate is its endpoint's highest recent cost, so only a call dearer than any in the
past hour, or the first calls on an endpoint, exceed it).
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

ESTIMATED_ENDPOINTS = 1024  # endpoints whose costs one process remembers
ESTIMATE_WINDOW = 3600.0  # s a call's cost stays an estimate for its endpoint's next calls
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
    """A call's estimate: the most a call on its endpoint cost in this process within the
    last :data:`ESTIMATE_WINDOW` seconds, else one unit at its price.

    The most, not the last: a caller who makes one cheap call (one image, one second of
    video) must not lower the estimate of the expensive calls they send next. Endpoints are
    told apart in lower case without slashes at the ends (a spelling buys no fresh
    estimate); bounded (the oldest endpoint is forgotten), so made-up paths cannot grow it.
    """

    def __init__(self, size: int = ESTIMATED_ENDPOINTS) -> None:
        self._most: OrderedDict[str, tuple[int, float]] = OrderedDict()  # → (cost, since)
        self._size = size

    def estimate(self, endpoint: str, price: Decimal | None, now: float) -> int:
        """Micro-dollars a call on ``endpoint`` will likely cost (0: it has no price)."""
        if price is None:
            return 0
        one_unit = math.ceil(Fraction(price) * MICROS)
        seen = self._most.get(endpoint.strip("/").lower())
        if seen is None or now - seen[1] > ESTIMATE_WINDOW:
            return one_unit
        return max(seen[0], 1)

    def observe(self, endpoint: str, cost: int, now: float) -> None:
        key = endpoint.strip("/").lower()
        seen = self._most.get(key)
        if seen is None or now - seen[1] > ESTIMATE_WINDOW:
            self._most[key] = (cost, now)  # a new window starts from this cost
        elif cost > seen[0]:
            self._most[key] = (cost, seen[1])
        self._most.move_to_end(key)
        if len(self._most) > self._size:
            self._most.popitem(last=False)


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
