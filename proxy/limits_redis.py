"""The limits in Redis, shared by every replica: one Lua script, one round trip per call.

The script (:data:`ADMIT`) does for one call what :class:`~proxy.limits.MemoryLimiter`
does in memory, atomically: read both sliding windows and every matching quota, take a
concurrency lease, and only if all have room count the call in all of them and in the
caller's usage. It also applies, first, what this replica owes Redis from earlier calls
(lease releases, billable units), so giving a slot back costs no round trip of its own;
when no call comes to carry them within ``FLUSH_DELAY``, one pipeline does.

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
forgotten.
"""

from __future__ import annotations

import asyncio
import math
import os
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .errors import LimiterUnavailable
from .limits import GENERATIONS, HOUR, MINUTE, Lease, Limiter, LimitSettings, caller_key
from .logs import get_logger
from .quotas import Quota
from .usage import MAX_APPS, OTHER, USAGE_PERIOD, QuotaUse, UsageReport
from .windows import period_bounds, sliding_wait

REDIS_TIMEOUT = 2.0  # seconds for any one Redis operation (connect or command)
REDIS_CONNECTIONS = 64  # per process; one call holds one for a round trip
UNAVAILABLE_RETRY_AFTER = 5  # Retry-After (s) on a 503 while Redis is down
FLUSH_DELAY = 0.02  # s a release or units may wait for a call to carry them
MAX_PENDING = 10_000  # owed operations kept while Redis is down; then dropped (leases expire)
_MAX_FIELDS = 2 * MAX_APPS + 2  # a usage hash: g:<app> and u:<app> per app, "other" twice
_STORE_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

log = get_logger("proxy.limits")

# KEYS: leases, (window current, window previous) * nw, quota * nq, usage * nu (0 or 1),
#       release leases * nr, units usage * nn
# ARGV: now, lease_ttl, concurrent, lease_id, nw, nq, nu, nr, nn, max_fields, other,
#       (limit, period) * nw, (limit, expire_at) * nq, (field, expire_at) * nu,
#       lease_id * nr, (field, amount, expire_at) * nn
# Returns {0} admitted, {1, i, previous, current} window i full, {2, i} quota i used up,
# {3} no concurrency slot.
ADMIT = """
-- Every argument comes in ARGV[1], joined by \\31: redis-py packs each argument of a
-- command in Python, and one string instead of ~30 saved ~10 % of a call's client CPU.
local A = {}
for value in string.gmatch(ARGV[1], '[^\\31]+') do A[#A + 1] = value end
local now, ttl, concurrent = tonumber(A[1]), tonumber(A[2]), tonumber(A[3])
local lease_id = A[4]
local nw, nq, nu = tonumber(A[5]), tonumber(A[6]), tonumber(A[7])
local nr, nn = tonumber(A[8]), tonumber(A[9])
local max_fields, other = tonumber(A[10]), A[11]
local kw, aw = 2, 12
local kq, aq = kw + 2 * nw, aw + 2 * nw
local ku, au = kq + nq, aq + 2 * nq
local kr, ar = ku + nu, au + 2 * nu
local kn, an = kr + nr, ar + nr

local function bump(key, field, amount, expire_at)
  if redis.call('HEXISTS', key, field) == 0 and redis.call('HLEN', key) >= max_fields then
    field = string.sub(field, 1, 2) .. other
  end
  if string.sub(field, 1, 2) == 'u:' then
    redis.call('HINCRBYFLOAT', key, field, amount)
  else
    redis.call('HINCRBY', key, field, amount)
  end
  redis.call('EXPIREAT', key, expire_at)
end

-- What earlier calls owe: a slot given back here is free for this call.
for i = 0, nr - 1 do redis.call('ZREM', KEYS[kr + i], A[ar + i]) end
for i = 0, nn - 1 do
  bump(KEYS[kn + i], A[an + 3 * i], A[an + 3 * i + 1], A[an + 3 * i + 2])
end

for i = 0, nw - 1 do
  local limit, period = tonumber(A[aw + 2 * i]), tonumber(A[aw + 2 * i + 1])
  local current = tonumber(redis.call('GET', KEYS[kw + 2 * i]) or '0')
  local previous = tonumber(redis.call('GET', KEYS[kw + 2 * i + 1]) or '0')
  local left = 0
  if previous > 0 then
    local x = (now - period) / period
    left = (1 - (x - math.floor(x))) * period
  end
  if math.floor(previous * left / period + current) + 1 > limit then
    return {1, i, previous, current}
  end
end
for i = 0, nq - 1 do
  if tonumber(redis.call('GET', KEYS[kq + i]) or '0') >= tonumber(A[aq + 2 * i]) then
    return {2, i}
  end
end
if concurrent > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= concurrent then return {3} end
  redis.call('ZADD', KEYS[1], now + ttl, lease_id)
  redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 1)
end

for i = 0, nw - 1 do
  if redis.call('INCR', KEYS[kw + 2 * i]) == 1 then
    redis.call('EXPIRE', KEYS[kw + 2 * i], 2 * tonumber(A[aw + 2 * i + 1]))
  end
end
for i = 0, nq - 1 do
  if redis.call('INCR', KEYS[kq + i]) == 1 then
    redis.call('EXPIREAT', KEYS[kq + i], A[aq + 2 * i + 1])
  end
end
for i = 0, nu - 1 do bump(KEYS[ku + i], A[au + 2 * i], 1, A[au + 2 * i + 1]) end
return {0}
"""


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
        self._flushing: set[asyncio.Task[None]] = set()
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
        releases, units, owed_keys, owed_args = self._take_owed()
        keys += owed_keys
        args += owed_args
        lease_id = os.urandom(12).hex()
        head = [now, self.settings.lease_ttl, self.settings.concurrent, lease_id, len(windows),
                len(ends), int(submit), len(releases), len(units), _MAX_FIELDS, OTHER]  # fmt: skip
        try:
            answer = await self._script(keys=keys, args=[_joined(head + args)])
        except _STORE_ERRORS as exc:
            self._owe(releases, units)
            return self._unavailable(exc)
        if answer[0] == 1:
            limit, period, _ = windows[answer[1]]
            what = "requests per minute" if period == MINUTE else GENERATIONS
            wait = sliding_wait(int(answer[2]), int(answer[3]), limit, period, now)
            raise self.window_refusal(limit, what, wait)
        if answer[0] == 2:
            raise self.quota_refusal(quotas[answer[1]], ends[answer[1]], now)
        if answer[0] == 3:
            raise self.concurrency_refusal()
        if not self.settings.concurrent:
            return Lease()
        self._held[lease_id] = keys[0]
        return Lease(lambda: self._release(lease_id))

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
        task = asyncio.ensure_future(self._send_owed())
        self._flushing.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self._flushing.discard)

    def _take_owed(
        self,
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str, float, int]], list[str], list[Any]]:
        """What this replica owes Redis, taken for one script call: the releases and units,
        and their KEYS and arguments in the order ADMIT reads them."""
        releases, units = self._releases, self._units
        self._releases, self._units = [], []
        keys = [key for key, _ in releases] + [key for key, *_ in units]
        args: list[Any] = [lease_id for _, lease_id in releases]
        for _, name, amount, expire_at in units:
            args += [name, amount, expire_at]
        return releases, units, keys, args

    async def _send_owed(self) -> None:
        if not (self._releases or self._units) or self._script is None:
            return
        releases, units, owed_keys, owed_args = self._take_owed()
        # An admit with no windows, quotas or slot: the script only applies what is owed.
        head: list[Any] = [self.clock(), self.settings.lease_ttl, 0, "-", 0, 0, 0,
                           len(releases), len(units), _MAX_FIELDS, OTHER]  # fmt: skip
        keys = [self._key("leases", "-"), *owed_keys]
        try:
            await asyncio.shield(self._script(keys=keys, args=[_joined(head + owed_args)]))
        except _STORE_ERRORS as exc:
            log.warning("limiter_flush_failed", error=_describe(exc), kept=len(releases))
            self._owe(releases, units)

    async def flush(self) -> None:
        """Send what this replica owes Redis now (releases, units) instead of within
        ``FLUSH_DELAY``: at shutdown, and in tests that read Redis from another replica."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        await self._send_owed()

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


def _joined(args: list[Any]) -> str:
    """The script's arguments as one (see ADMIT); none is empty or holds the separator."""
    return "\x1f".join(map(str, args))


def _field(app: str | None) -> str:
    """An app's name as a usage field: never empty, never the argument separator."""
    return app.replace("\x1f", "?") if app else OTHER


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
