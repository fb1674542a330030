"""The limits in Redis, shared by every replica: one Lua script, one round trip per turn.

The script (:mod:`proxy.limits.script`) does for each call what
:class:`~proxy.limits.memory.MemoryLimiter` does in memory, atomically: read both sliding windows
and every matching quota, take a concurrency lease, and only if all have room count the
call in all of them and in the caller's usage. The admits of one turn of the event loop
go in one script call (a batch, in order); it also applies, first, what this replica owes
Redis from earlier calls (lease releases, billable units), so giving a slot back costs no
round trip of its own; when no call comes to carry them within ``FLUSH_DELAY``, a batch
of no admits does (:mod:`proxy.limits.redis_batches`).

State per caller is O(1): two integers per sliding window (this window's and the last
one's, expiring two windows on), one integer per quota and period (expiring when the
period ends), a sorted set of at most ``concurrent`` leases, and a hash of usage per
month. Keys name a BLAKE2b digest of the caller, never the caller.

Time is the replica's clock, passed to the script (as the leases always did): replicas'
clocks must agree to well under a second for the windows, and under ``lease_ttl`` for the
leases. A lease expires after ``lease_ttl`` unless renewed: one task per limiter renews
every lease it holds every ``lease_ttl / 3`` (``ZADD XX``, so a released lease never
comes back; :mod:`proxy.limits.redis_leases`).

**Failure modes.** If Redis fails (refused, reset, timeout; after one immediate retry on
a fresh connection, and at most ``REDIS_TIMEOUT`` per operation), ``redis_failure="closed"``
refuses with :class:`~proxy.errors.LimiterUnavailable` (503) and ``"open"`` admits with a
warning and no lease. Releases and units that could not be sent are kept for the next
call (up to ``MAX_PENDING``); a lease whose release is lost frees itself within
``lease_ttl``. If Redis loses its data, the counts and leases of that moment are
forgotten. A batch that failed may still have run (the reply late or lost): the slots it
may have taken are given back, and a batch sent again by redis-py's retry counts nothing
twice (:mod:`proxy.limits.script`). A key of another type fails only its own call.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from ..errors import CallerBlocked, LimiterUnavailable
from ..observe.logs import get_logger
from .admin_ops import CallerPage, id_arg, redis_page, usage_apps
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
from .redis_batches import MAX_BATCH as MAX_BATCH  # re-exported: tests import it from here
from .redis_batches import STORE_ERRORS, Batches, Owed, describe, unique_id
from .redis_leases import HeldLeases
from .script import ADMIT, NO_LEASE, NO_ONCE, Answer
from .spend import Reservation
from .usage import OTHER, USAGE_PERIOD, QuotaUse, UsageReport
from .windows import period_bounds, sliding_wait

REDIS_TIMEOUT = 2.0  # seconds for any one Redis operation (connect or command)
REDIS_CONNECTIONS = 64  # per process; one call holds one for a round trip
UNAVAILABLE_RETRY_AFTER = 5  # Retry-After (s) on a 503 while Redis is down

log = get_logger("proxy.limits")


class _Call:
    """One admit waiting for its batch: its KEYS and arguments (in the script's layout)
    and the future its answer (or the store's error) is given to. Built by :meth:`admit`,
    beside the layout :meth:`lease` reads; sent by :class:`~.redis_batches.Batches`."""

    __slots__ = ("answer", "args", "keys")

    def __init__(self, keys: list[str], args: list[Any]) -> None:
        self.keys, self.args = keys, args
        self.answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def lease(self) -> tuple[str, str]:
        """(leases key, lease id): what releases the slot this call may have taken."""
        return self.keys[0], self.args[1]


class RedisLimiter(Limiter):
    """Shared by every replica using the same Redis and ``key_prefix``."""

    def __init__(self, settings: LimitSettings) -> None:
        super().__init__(settings)
        assert settings.redis_url is not None
        self._redis: aioredis.Redis | None = None
        self._pool: aioredis.BlockingConnectionPool | None = None
        self._script: Any = None  # redis-py's AsyncScript: EVALSHA, EVAL on NOSCRIPT
        # Both read the clock, the client and the script when they use them (tests swap them).
        self._leases = HeldLeases(settings.lease_ttl, lambda: self.clock(), lambda: self._redis)
        # The script calls: this turn's admits, what is owed Redis, the batches in flight.
        self._batches = Batches(settings, lambda: self._script)
        self._sending = self._batches.sending  # the same set: the batches in flight
        windows = ((settings.requests_per_minute, MINUTE, "m"),
                   (settings.submits_per_hour, HOUR, "h"))  # fmt: skip
        self._windows = [(limit, period, name) for limit, period, name in windows if limit]

    async def start(self) -> None:
        """Connect lazily (start-up never fails on Redis) and start renewing leases."""
        url = self.settings.redis_url
        assert url is not None, "RedisLimiter needs a redis_url"
        if self._redis is not None:  # started already: one pool, one renewal task
            return
        # A blocking pool: a call beyond REDIS_CONNECTIONS in flight waits for a connection
        # (at most REDIS_TIMEOUT) instead of failing at once with "Too many connections",
        # which the default pool does at 100 (measured under load: 503s with "closed").
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_CONNECTIONS,
            timeout=REDIS_TIMEOUT,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            # Explicit (redis-py's defaults differ between versions and constructors): one
            # immediate retry when a connection breaks (Redis restarted), none on a timeout,
            # so a hung Redis costs one REDIS_TIMEOUT per request, not several.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._pool = pool
        self._redis = aioredis.Redis(connection_pool=pool)
        self._script = self._redis.register_script(ADMIT)
        self._leases.start()
        if not await self.ready():
            log.warning("limiter_redis_unreachable", failure_mode=self.settings.redis_failure)

    async def close(self) -> None:
        await self._leases.stop()
        if self._redis is not None:
            if self._sending:  # batches in Redis: their answers, and what they owe, first
                await asyncio.wait(set(self._sending), timeout=REDIS_TIMEOUT)
            await self.flush()  # best effort: what is lost expires by itself
            # Closed: a release or units owed from now on are dropped (the leases expire)
            # instead of opening a new connection on the closed client.
            self._script = None
            self._leases.clear()
            await self._redis.aclose()
            if self._pool is not None:
                await self._pool.disconnect()  # ours (passed in): the client leaves it open
            self._redis = None

    async def ready(self) -> bool:
        if self._redis is None:
            return False
        try:
            return bool(await self._redis.ping())
        except STORE_ERRORS:
            return False

    def _key(self, kind: str, *parts: object) -> str:
        return ":".join([self.settings.key_prefix, kind, *map(str, parts)])

    async def admit(
        self, caller: str, *, submit: bool, quotas: tuple[Quota, ...] = (),
        app: str | None = None, estimate: int = 0,
    ) -> Lease:  # fmt: skip
        lease_id = unique_id()
        admitted = await self._ask(caller, lease_id, request=True, submit=submit,
                                   quotas=quotas, app=app, estimate=estimate)  # fmt: skip
        if admitted is None:
            return Lease()
        keys, used = admitted
        if not self.settings.concurrent:
            return Lease(None, used)
        self._leases.hold(lease_id, keys)
        return Lease(lambda: self._release(lease_id), used)

    async def count_generation(
        self, caller: str, *, quotas: tuple[Quota, ...] = (), app: str | None = None,
        estimate: int = 0,
    ) -> tuple[int, ...]:  # fmt: skip
        admitted = await self._ask(caller, NO_LEASE, request=False, submit=True, quotas=quotas,
                                   app=app, estimate=estimate)  # fmt: skip
        return NO_USE if admitted is None else admitted[1]

    async def _ask(
        self, caller: str, lease_id: str, *, request: bool, submit: bool,
        quotas: tuple[Quota, ...], app: str | None, estimate: int,
    ) -> tuple[str, tuple[int, ...]] | None:  # fmt: skip
        """One call through the script: once admitted, its leases key and what is used of
        each of ``quotas`` after it; None when admitted unchecked (Redis down under
        "open"); raises the refusal otherwise. ``request``: a request of the minute;
        ``submit``: a generation; ``lease_id``: the slot to take (:data:`NO_LEASE`: none)."""
        assert self._script is not None, "Limiter.start() was not called"
        now, who = self.clock(), caller_key(caller)
        keys, args = [self._key("leases", who)], list[Any]()
        windows = [
            w for w in self._windows if (submit and w[1] == HOUR) or (request and w[1] == MINUTE)
        ]
        for limit, period, name in windows:
            index = int(now / period)
            keys += [self._key("w", name, index, who), self._key("w", name, index - 1, who)]
            args += [limit, period]
        ends = []
        for quota in quotas if submit else ():
            index, _, end = period_bounds(quota.period, now)
            keys.append(self._key("q", quota.key, index, who))
            args += [quota.limit, math.ceil(end), estimate if quota.money else 1]
            ends.append(end)
        if submit:
            usage_key, until = self._usage_key(who, now)
            keys += [usage_key, self._ids_key(now)]
            args += [f"g:{_field(app)}", until, id_arg(caller)]
        keys.append(self._key("blocked", who))
        call = _Call(keys, [now, lease_id, len(windows), len(ends), int(submit), *args])
        answer = await self._batches.answer(call)
        if isinstance(answer, BaseException):
            self._unavailable(answer)
            return None
        if answer[0] == Answer.BLOCKED:
            raise CallerBlocked()
        if answer[0] == Answer.WINDOW_FULL:
            limit, period, _ = windows[answer[1]]
            what = "requests per minute" if period == MINUTE else GENERATIONS
            wait = sliding_wait(int(answer[2]), int(answer[3]), limit, period, now)
            raise self.window_refusal(limit, what, wait)
        if answer[0] == Answer.QUOTA_USED:
            quota = quotas[answer[1]]
            used = int(answer[2]) if len(answer) > 2 else 0
            raise self.quota_refusal(quota, ends[answer[1]], now, used,
                                     estimate if quota.money else 0)  # fmt: skip
        if answer[0] == Answer.NO_SLOT:
            raise self.concurrency_refusal()
        # Admitted: {0, used * nq} (script.py); just {0} with no quota.
        return keys[0], tuple(map(int, answer[1:])) if len(answer) > 1 else NO_USE

    def _usage_key(self, who: str, now: float) -> tuple[str, int]:
        index, _, end = period_bounds(USAGE_PERIOD, now)
        return self._key("u", index, who), math.ceil(end) + 86400  # kept a day past the month

    def _ids_key(self, now: float) -> str:
        """The month's digest → caller id hash (the admin listing; proxy.limits.admin_ops)."""
        return self._key("ids", period_bounds(USAGE_PERIOD, now)[0])

    async def block(self, caller: str) -> bool:
        # No expiry: a block holds until unblocked (one key per blocked caller).
        key = self._key("blocked", caller_key(caller))
        return bool(await self._admin("block", lambda r: r.set(key, 1, nx=True)))

    async def unblock(self, caller: str) -> bool:
        key = self._key("blocked", caller_key(caller))
        return bool(await self._admin("unblock", lambda r: r.delete(key)))

    async def reset(self, caller: str, quotas: tuple[Quota, ...]) -> int:
        if not quotas:
            return 0
        await self.flush()  # settlements owed for this caller land before, not after
        now, who = self.clock(), caller_key(caller)
        keys = [self._key("q", q.key, period_bounds(q.period, now)[0], who) for q in quotas]
        return int(await self._admin("reset", lambda r: r.delete(*keys)))

    async def list_callers(self, cursor: str | None, limit: int) -> CallerPage:
        assert self._redis is not None, "Limiter.start() was not called"
        await self.flush()
        now = self.clock()
        month = period_bounds(USAGE_PERIOD, now)[0]
        try:
            return await redis_page(
                self._redis, self._ids_key(now), lambda who: self._usage_key(who, now)[0],
                lambda who: self._key("blocked", who), month, cursor, limit,
            )  # fmt: skip
        except STORE_ERRORS as exc:
            raise self._store_failed(exc, "list_callers") from None

    async def _admin(self, what: str, command: Callable[[aioredis.Redis], Awaitable[Any]]) -> Any:
        """One admin command on the client; 503 when Redis fails."""
        assert self._redis is not None, "Limiter.start() was not called"
        try:
            return await command(self._redis)
        except STORE_ERRORS as exc:
            raise self._store_failed(exc, what) from None

    def _store_failed(self, exc: BaseException, what: str) -> LimiterUnavailable:
        log.warning("limiter_unavailable", error=describe(exc), admin=what)
        return LimiterUnavailable(
            "limit store unavailable",
            "the shared limit store did not answer; retry later",
            retry_after=UNAVAILABLE_RETRY_AFTER,
        )

    def _unavailable(self, exc: BaseException) -> None:
        if self.settings.redis_failure != "open":
            log.warning("limiter_unavailable", error=describe(exc), refused=True)
            raise LimiterUnavailable(
                "rate limiter unavailable",
                "the shared limit store did not answer; retry later",
                retry_after=UNAVAILABLE_RETRY_AFTER,
            ) from None
        log.warning("limiter_unavailable", error=describe(exc), admitted_unchecked=True)

    async def _release(self, lease_id: str) -> None:
        leases = self._leases.drop(lease_id)  # stop renewing it at once
        if leases is not None:
            self._batches.owe([(leases, lease_id)], [])

    def _add_units(
        self, caller: str, app: str | None, units: float, once: str | None, cost: int,
        reservation: Reservation | None, delta: int,
    ) -> None:  # fmt: skip
        who = caller_key(caller)
        key, until = self._usage_key(who, self.clock())
        # Another replica may have counted these units: a marker says so.
        marker = self._key("once", caller_key(once)) if once is not None else NO_ONCE
        budgets: list[tuple[str, int, int]] = []
        if reservation is not None and delta:
            now = self.clock()
            for q in reservation.budgets:
                # Only in the period the estimate was counted in, if it is still the current
                # one (as in memory): an ended period is gone, a new one starts from nothing.
                index, _, end = period_bounds(q.period, now)
                if index == period_bounds(q.period, reservation.at)[0]:
                    budgets.append((self._key("q", q.key, index, who), delta, math.ceil(end)))
        self._batches.owe([], [Owed(key, marker, _field(app), units, cost, until, tuple(budgets))])

    async def flush(self) -> None:
        """Send what this replica owes Redis now (releases, units) instead of within
        ``FLUSH_DELAY``: at shutdown, and in tests that read Redis from another replica."""
        await self._batches.flush()

    async def usage(self, caller: str, plan: str, quotas: tuple[Quota, ...]) -> UsageReport:
        assert self._redis is not None, "Limiter.start() was not called"
        await self.flush()  # what this replica still owes is part of the answer
        now, who = self.clock(), caller_key(caller)
        bounds = [period_bounds(q.period, now) for q in quotas]
        usage_key, _ = self._usage_key(who, now)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for quota, (index, _, _) in zip(quotas, bounds, strict=True):
                    pipe.get(self._key("q", quota.key, index, who))
                pipe.hgetall(usage_key)
                answers = await pipe.execute()
        except STORE_ERRORS as exc:
            log.warning("limiter_unavailable", error=describe(exc), reading="usage")
            raise LimiterUnavailable(
                "usage unavailable",
                "the shared limit store did not answer; retry later",
                retry_after=UNAVAILABLE_RETRY_AFTER,
            ) from None
        uses = [
            QuotaUse(quota, int(used or 0), end)
            for quota, used, (_, _, end) in zip(quotas, answers[:-1], bounds, strict=True)
        ]
        _, start, end = period_bounds(USAGE_PERIOD, now)
        return UsageReport(plan, uses, start, end, usage_apps(answers[-1]))

    async def renew(self) -> None:
        """Push back the expiry of every lease held here (called every ``lease_ttl / 3``)."""
        await self._leases.renew()


def _field(app: str | None) -> str:
    """An app's name as a usage field: never empty, never the argument separator."""
    return app.replace("\x1f", "?") if app else OTHER
