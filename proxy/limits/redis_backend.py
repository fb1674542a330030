"""The limits in Redis, shared by every replica: one Lua script, one round trip per turn.

The script (:mod:`proxy.limits.script`) does for each call what
:class:`~proxy.limits.memory.MemoryLimiter` does in memory, atomically: read both sliding windows
and every matching quota, take a concurrency lease, and only if all have room count the
call in all of them and in the caller's usage. The admits of one turn of the event loop
go in one script call (a batch, in order); it also applies, first, what this replica owes
Redis from earlier calls (lease releases, billable units), so giving a slot back costs no
round trip of its own; when no call comes to carry them within ``FLUSH_DELAY``, a batch
of no admits does.

State per caller is O(1): two integers per sliding window (this window's and the last
one's, expiring two windows on), one integer per quota and period (expiring when the
period ends), a sorted set of at most ``concurrent`` leases, and a hash of usage per
month. Keys name a BLAKE2b digest of the caller, never the caller.

Time is the replica's clock, passed to the script (as the leases always did): replicas'
clocks must agree to well under a second for the windows, and under ``lease_ttl`` for the
leases. A lease expires after ``lease_ttl`` unless renewed: one task per limiter renews
every lease it holds every ``lease_ttl / 3`` (``ZADD XX``, so a released lease never
comes back).

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
import random
from collections.abc import Coroutine
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from ..errors import LimiterUnavailable
from ..observe.logs import get_logger
from .base import GENERATIONS, HOUR, MINUTE, Lease, Limiter, LimitSettings, caller_key
from .quotas import Quota
from .script import ADMIT, Answer, joined
from .usage import MAX_APPS, OTHER, USAGE_PERIOD, QuotaUse, UsageReport
from .windows import period_bounds, sliding_wait

REDIS_TIMEOUT = 2.0  # seconds for any one Redis operation (connect or command)
REDIS_CONNECTIONS = 64  # per process; one call holds one for a round trip
UNAVAILABLE_RETRY_AFTER = 5  # Retry-After (s) on a 503 while Redis is down
FLUSH_DELAY = 0.02  # s a release or units may wait for a call to carry them
MAX_PENDING = 10_000  # owed operations kept while Redis is down; then dropped (leases expire)
MAX_BATCH = 64  # admits in one script call; a turn with more sends several
_MAX_FIELDS = 2 * MAX_APPS + 2  # a usage hash: g:<app> and u:<app> per app, "other" twice
_STORE_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

log = get_logger("proxy.limits")


class _Call:
    """One admit waiting for its batch: its KEYS and arguments (in the script's layout)
    and the future its answer (or the store's error) is given to."""

    __slots__ = ("answer", "args", "keys")

    def __init__(self, keys: list[str], args: list[Any], answer: asyncio.Future[Any]) -> None:
        self.keys, self.args, self.answer = keys, args, answer

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
        self._held: dict[str, str] = {}  # lease id → its sorted set's key, renewed while here
        self._renewer: asyncio.Task[None] | None = None
        self._releases: list[tuple[str, str]] = []  # (leases key, lease id) owed to Redis
        self._units: list[tuple[str, str, float, int]] = []  # (usage key, field, amount, until)
        self._flush: asyncio.TimerHandle | None = None
        self._queued: list[_Call] = []  # this turn's admits, sent together at its end
        self._sending: set[asyncio.Task[None]] = set()  # batches in flight
        windows = ((settings.requests_per_minute, MINUTE, "m"),
                   (settings.submits_per_hour, HOUR, "h"))  # fmt: skip
        self._windows = [(limit, period, name) for limit, period, name in windows if limit]

    async def start(self) -> None:
        """Connect lazily (start-up never fails on Redis) and start renewing leases."""
        url = self.settings.redis_url
        assert url is not None, "RedisLimiter needs a redis_url"
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
        self._renewer = asyncio.create_task(self._renew_forever(), name="limits-lease-renewal")
        if not await self.ready():
            log.warning("limiter_redis_unreachable", failure_mode=self.settings.redis_failure)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            try:
                await self._renewer
            except asyncio.CancelledError:
                pass
            self._renewer = None
        if self._redis is not None:
            if self._sending:  # batches in Redis: their answers, and what they owe, first
                await asyncio.wait(set(self._sending), timeout=REDIS_TIMEOUT)
            await self.flush()  # best effort: what is lost expires by itself
            self._held.clear()
            await self._redis.aclose()
            if self._pool is not None:
                await self._pool.disconnect()  # ours (passed in): the client leaves it open
            self._redis = None

    async def ready(self) -> bool:
        if self._redis is None:
            return False
        try:
            return bool(await self._redis.ping())
        except _STORE_ERRORS:
            return False

    def _key(self, kind: str, *parts: object) -> str:
        return ":".join([self.settings.key_prefix, kind, *map(str, parts)])

    async def admit(
        self, caller: str, *, submit: bool, quotas: tuple[Quota, ...] = (),
        app: str | None = None,
    ) -> Lease:  # fmt: skip
        assert self._script is not None, "Limiter.start() was not called"
        now, who = self.clock(), caller_key(caller)
        keys, args = [self._key("leases", who)], list[Any]()
        windows = [w for w in self._windows if submit or w[1] == MINUTE]
        for limit, period, name in windows:
            index = int(now / period)
            keys += [self._key("w", name, index, who), self._key("w", name, index - 1, who)]
            args += [limit, period]
        ends = []
        for quota in quotas if submit else ():
            index, _, end = period_bounds(quota.period, now)
            keys.append(self._key("q", quota.key, index, who))
            args += [quota.limit, math.ceil(end)]
            ends.append(end)
        if submit:
            usage_key, until = self._usage_key(who, now)
            keys.append(usage_key)
            args += [f"g:{_field(app)}", until]
        lease_id = _unique_id()
        answer = await self._answer(keys, [now, lease_id, len(windows), len(ends), int(submit),
                                           *args])  # fmt: skip
        if isinstance(answer, BaseException):
            return self._unavailable(answer)
        if answer[0] == Answer.WINDOW_FULL:
            limit, period, _ = windows[answer[1]]
            what = "requests per minute" if period == MINUTE else GENERATIONS
            wait = sliding_wait(int(answer[2]), int(answer[3]), limit, period, now)
            raise self.window_refusal(limit, what, wait)
        if answer[0] == Answer.QUOTA_USED:
            raise self.quota_refusal(quotas[answer[1]], ends[answer[1]], now)
        if answer[0] == Answer.NO_SLOT:
            raise self.concurrency_refusal()
        if not self.settings.concurrent:
            return Lease()
        self._held[lease_id] = keys[0]
        return Lease(lambda: self._release(lease_id))

    async def _answer(self, keys: list[str], args: list[Any]) -> Any:
        """Add an admit to this turn's batch and wait for its answer (or the store's error).
        The batch leaves once every callback of this turn has run."""
        loop = asyncio.get_running_loop()
        call = _Call(keys, args, loop.create_future())
        self._queued.append(call)
        if len(self._queued) == 1:
            loop.call_soon(self._send_queued)
        try:
            return await call.answer
        except asyncio.CancelledError:
            # Cancelled in the turn its answer came, before this task ran again: a slot
            # taken for it would have no holder.
            answer = call.answer
            if answer.done() and not answer.cancelled() and self._took_slot(answer.result()):
                self._owe([call.lease()], [])
            raise

    def _send_queued(self) -> None:
        queued, self._queued = self._queued, []
        for start in range(0, len(queued), MAX_BATCH):
            self._spawn(self._send(queued[start : start + MAX_BATCH]))

    def _spawn(self, send: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(send)
        self._sending.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self._sending.discard)
        return task

    async def _send(self, calls: list[_Call]) -> None:
        """One script call: what is owed, then ``calls`` in order (none: only what is owed).
        Every call is answered, whatever happens; a slot nobody will hold is given back."""
        calls = [call for call in calls if not call.answer.cancelled()]  # gone: nothing taken
        releases, units, keys, args = self._take_owed()
        if not (calls or releases or units) or self._script is None:
            return
        head = [len(calls), len(releases), len(units), self.settings.lease_ttl,
                self.settings.concurrent, _MAX_FIELDS, OTHER]  # fmt: skip
        keys.insert(0, self._key("batch", _unique_id()))
        for call in calls:
            keys += call.keys
            args += call.args
        try:
            answers: list[Any] = await self._script(keys=keys, args=[joined(head + args)])
            if len(answers) != len(calls):
                raise ResponseError(f"{len(answers)} answers for {len(calls)} calls")
        except BaseException as exc:
            # Redis may have run the batch (the reply lost or late): the slots it took for
            # the calls are given back, and what was owed is sent again. Releases repeat
            # harmlessly; units would count twice had it run (a reply over REDIS_TIMEOUT
            # late), which errs toward billing, not toward losing a paid generation's units.
            self._owe(releases, units)
            if self.settings.concurrent:
                self._owe([call.lease() for call in calls], [])
            if not isinstance(exc, _STORE_ERRORS):  # cancelled (shutdown), or a bug
                for call in calls:
                    if not call.answer.done():
                        call.answer.set_result(RedisError("the limiter stopped"))
                raise
            if not calls:
                log.warning("limiter_flush_failed", error=_describe(exc),
                            kept=len(releases) + len(units))  # fmt: skip
            answers = [exc] * len(calls)
        for call, answer in zip(calls, answers, strict=True):
            if (
                isinstance(answer, list) and answer[0] == Answer.REFUSED
            ):  # this call's commands failed
                if self.settings.concurrent:
                    self._owe([call.lease()], [])
                answer = ResponseError("Redis refused a command of this call")
            if not call.answer.cancelled():
                call.answer.set_result(answer)
            elif self._took_slot(answer):  # its waiter left: give the slot back
                self._owe([call.lease()], [])

    def _took_slot(self, answer: Any) -> bool:
        return (
            bool(self.settings.concurrent)
            and isinstance(answer, list)
            and answer[0] == Answer.ADMITTED
        )

    def _usage_key(self, who: str, now: float) -> tuple[str, int]:
        index, _, end = period_bounds(USAGE_PERIOD, now)
        return self._key("u", index, who), math.ceil(end) + 86400  # kept a day past the month

    def _unavailable(self, exc: BaseException) -> Lease:
        if self.settings.redis_failure != "open":
            log.warning("limiter_unavailable", error=_describe(exc), refused=True)
            raise LimiterUnavailable(
                "rate limiter unavailable",
                "the shared limit store did not answer; retry later",
                retry_after=UNAVAILABLE_RETRY_AFTER,
            ) from None
        log.warning("limiter_unavailable", error=_describe(exc), admitted_unchecked=True)
        return Lease()

    async def _release(self, lease_id: str) -> None:
        leases = self._held.pop(lease_id, None)  # stop renewing it at once
        if leases is not None:
            self._owe([(leases, lease_id)], [])

    async def add_units(self, caller: str, app: str | None, units: float) -> None:
        key, until = self._usage_key(caller_key(caller), self.clock())
        self._owe([], [(key, f"u:{_field(app)}", units, until)])

    def _owe(
        self, releases: list[tuple[str, str]], units: list[tuple[str, str, float, int]]
    ) -> None:
        """Keep what Redis must be told for the next call (or the flush) to carry."""
        room = MAX_PENDING - len(self._releases) - len(self._units)
        self._releases += releases[: max(room, 0)]
        self._units += units[: max(room - len(releases), 0)]
        if (self._releases or self._units) and self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(FLUSH_DELAY, self._start_flush)

    def _start_flush(self) -> None:
        self._flush = None
        self._spawn(self._send([]))

    def _take_owed(
        self,
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str, float, int]], list[str], list[Any]]:
        """What this replica owes Redis, taken for one script call: the releases and units,
        and their KEYS and arguments in the order the script reads them."""
        releases, units = self._releases, self._units
        self._releases, self._units = [], []
        keys = [key for key, _ in releases] + [key for key, *_ in units]
        args: list[Any] = [lease_id for _, lease_id in releases]
        for _, name, amount, expire_at in units:
            args += [name, amount, expire_at]
        return releases, units, keys, args

    async def flush(self) -> None:
        """Send what this replica owes Redis now (releases, units) instead of within
        ``FLUSH_DELAY``: at shutdown, and in tests that read Redis from another replica."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        await asyncio.shield(self._spawn(self._send([])))  # a caller cancelled: still sent

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
        except _STORE_ERRORS as exc:
            log.warning("limiter_unavailable", error=_describe(exc), reading="usage")
            raise LimiterUnavailable(
                "usage unavailable",
                "the shared limit store did not answer; retry later",
                retry_after=UNAVAILABLE_RETRY_AFTER,
            ) from None
        uses = [
            QuotaUse(quota, int(used or 0), end)
            for quota, used, (_, _, end) in zip(quotas, answers[:-1], bounds, strict=True)
        ]
        apps: dict[str, tuple[int, float]] = {}
        for name, value in answers[-1].items():
            kind, app = name.decode()[:2], name.decode()[2:]
            gens, units = apps.get(app, (0, 0.0))
            apps[app] = (int(value), units) if kind == "g:" else (gens, float(value))
        _, start, end = period_bounds(USAGE_PERIOD, now)
        return UsageReport(plan, uses, start, end, apps)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_ttl / 3)
            try:
                await self.renew()
            except _STORE_ERRORS as exc:
                log.warning("lease_renewal_failed", error=_describe(exc), leases=len(self._held))
            except Exception:  # a bug: keep renewing, or every held slot would expire
                log.exception("lease_renewal_error")

    async def renew(self) -> None:
        """Push back the expiry of every lease held here (called every ``lease_ttl / 3``)."""
        held = list(self._held.items())
        if not held or self._redis is None:
            return
        expiry = self.clock() + self.settings.lease_ttl
        async with self._redis.pipeline(transaction=False) as pipe:
            for lease_id, leases in held:
                pipe.zadd(leases, {lease_id: expiry}, xx=True)  # XX: never revive a released lease
            for leases in {leases for _, leases in held}:
                pipe.expire(leases, math.ceil(self.settings.lease_ttl) + 1)
            await pipe.execute()


def _unique_id() -> str:
    """A lease's or a batch's id: 96 random bits, unique across replicas (``random`` seeds
    itself from the OS in each process) without a getrandom() call per request."""
    return f"{random.getrandbits(96):024x}"


def _field(app: str | None) -> str:
    """An app's name as a usage field: never empty, never the argument separator."""
    return app.replace("\x1f", "?") if app else OTHER


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
