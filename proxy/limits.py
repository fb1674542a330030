"""Per-caller limits: requests per minute, generations per hour, concurrent requests.

Two kinds of limit, two mechanisms, neither written here:

* **Windows** (requests per minute, submits per hour) are counted by the `limits` library
  with its moving-window strategy: exact (the N+1th hit inside any 60 s is refused, with no
  burst at a fixed window's edge, so a test or a caller sees the same count every time), and
  the library's window reset time becomes ``Retry-After``. In memory for one process
  (``limits.storage.MemoryStorage``); in Redis (``RedisStorage``), where each hit is one
  of the library's own Lua scripts, atomic across replicas.
* **Concurrency** (in-flight requests and streams) is a lease, not a counter, because a
  counter leaks forever when a replica crashes between increment and decrement. In Redis each
  caller has a sorted set of lease id → expiry time; taking a slot is one MULTI/EXEC
  transaction (drop expired leases, add ours, count, refresh the key's TTL), and if the count
  is over the limit the lease is removed again and the request refused. A lease expires after
  ``lease_ttl`` unless renewed: one background task per limiter renews every lease it holds
  every ``lease_ttl / 3`` (``ZADD XX``, so a lease released meanwhile is never brought back).
  Under contention at the limit a request can be refused while another's refused lease is
  briefly in the set (over-refusal, never over-admission). In memory a lease is a count.

Checks run in order: requests/minute (always), submits/hour (submits only), then the
concurrency slot. A hit counted by an earlier check stays counted when a later one refuses
(an rpm hit spent on a request refused for concurrency): undoing it is not atomic, and it
errs on the side of refusing.

**Failure modes.** If Redis fails (refused, reset, timeout; after one immediate retry on a
fresh connection, and at most ``REDIS_TIMEOUT`` per operation), ``redis_failure="closed"``
refuses with :class:`~proxy.errors.LimiterUnavailable` (503) and ``"open"`` admits with a
warning and no lease. A lease whose state is unknown (transaction sent, answer lost, or a
failed release) frees itself within ``lease_ttl``. Leases still held at :meth:`Limiter.close`
are not released (as after a crash); they expire. Leases use each replica's clock, as the
`limits` moving window does: clocks must agree to well under ``lease_ttl``. If Redis loses
its data, leases held at that moment are forgotten (their requests finish uncounted).

Caller ids can hold any character and may be sensitive: Redis keys use a BLAKE2b digest of
them, and refusals name the limit and its value, never the caller.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from limits import RateLimitItem, RateLimitItemPerHour, RateLimitItemPerMinute
from limits.aio.storage import RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from limits.storage import MemoryStorage as SyncMemoryStorage
from limits.strategies import MovingWindowRateLimiter as SyncMovingWindow
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .errors import LimiterUnavailable, RateLimited
from .logs import get_logger

REDIS_TIMEOUT = 2.0  # seconds for any one Redis operation (connect or command)
UNAVAILABLE_RETRY_AFTER = 5  # Retry-After (s) on a 503 while Redis is down
_STORE_ERRORS = (RedisError, StorageError, OSError, asyncio.TimeoutError)

log = get_logger("proxy.limits")


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
    return max(1, math.ceil(reset - now))


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
    """The limits of :class:`LimitSettings`; the backends below decide where state lives."""

    def __init__(self, settings: LimitSettings) -> None:
        self.settings = settings
        rpm, per_hour = settings.requests_per_minute, settings.submits_per_hour
        self._per_minute = RateLimitItemPerMinute(rpm, namespace="rpm") if rpm else None
        self._per_hour = RateLimitItemPerHour(per_hour, namespace="submits") if per_hour else None
        self._windows: MovingWindowRateLimiter | None = None  # set by start()

    async def start(self) -> None:
        self._windows = MovingWindowRateLimiter(self._storage())

    async def close(self) -> None:
        pass

    async def ready(self) -> bool:
        return True

    async def admit(self, caller: str, *, submit: bool) -> Lease:
        """Check requests/minute, submits/hour (if ``submit``), then take a concurrency slot.

        Raises :class:`RateLimited` (429) or, when Redis fails under "closed",
        :class:`LimiterUnavailable` (503).
        """
        key = caller_key(caller)
        try:
            await self._hit(self._per_minute, key, "requests per minute")
            if submit:
                await self._hit(
                    self._per_hour,
                    key,
                    "generations per hour "
                    "(runs, queue submits, streams, realtime tokens and sockets)",
                )
            if not self.settings.concurrent:
                return Lease()
            lease = await self._take_slot(key, self.settings.concurrent)
        except _STORE_ERRORS as exc:
            if self.settings.redis_failure != "open":
                log.warning("limiter_unavailable", error=_describe(exc), refused=True)
                raise LimiterUnavailable(
                    "rate limiter unavailable",
                    "the shared limit store did not answer; retry later",
                    retry_after=UNAVAILABLE_RETRY_AFTER,
                ) from None
            log.warning("limiter_unavailable", error=_describe(exc), admitted_unchecked=True)
            return Lease()
        if lease is None:
            raise RateLimited(
                "rate limit exceeded",
                f"at most {self.settings.concurrent} concurrent requests",
                retry_after=1,  # a slot frees when any of the caller's requests ends
            )
        return lease

    async def _hit(self, item: RateLimitItem | None, key: str, what: str) -> None:
        if item is None:
            return
        assert self._windows is not None, "Limiter.start() was not called"
        if await self._windows.hit(item, key):
            return
        stats = await self._windows.get_window_stats(item, key)
        # remaining > 0: the window moved on between the two calls; a retry now will pass.
        retry = 1 if stats.remaining > 0 else seconds_until(stats.reset_time, time.time())
        raise RateLimited("rate limit exceeded", f"at most {item.amount} {what}", retry_after=retry)

    def _storage(self) -> Storage:
        raise NotImplementedError

    async def _take_slot(self, key: str, limit: int) -> Lease | None:
        """A lease on one of ``limit`` slots, or None if all are taken."""
        raise NotImplementedError


class MemoryLimiter(Limiter):
    """One process: windows in ``limits``' synchronous MemoryStorage, slots as a count per caller.

    The synchronous storage, not ``limits.aio``'s: the async one schedules an expiry sweep
    through a thread on every hit, which cost ~70 µs of CPU per request (measured with
    ``make bench``); the synchronous one never blocks (a dict under a lock) and sweeps on a
    timer of its own.
    """

    def __init__(self, settings: LimitSettings) -> None:
        super().__init__(settings)
        self._in_use: dict[str, int] = {}
        self._sync_windows: SyncMovingWindow | None = None

    async def start(self) -> None:
        self._sync_windows = SyncMovingWindow(SyncMemoryStorage())

    async def _hit(self, item: RateLimitItem | None, key: str, what: str) -> None:
        if item is None:
            return
        assert self._sync_windows is not None, "Limiter.start() was not called"
        if self._sync_windows.hit(item, key):
            return
        stats = self._sync_windows.get_window_stats(item, key)
        retry = 1 if stats.remaining > 0 else seconds_until(stats.reset_time, time.time())
        raise RateLimited("rate limit exceeded", f"at most {item.amount} {what}", retry_after=retry)

    async def _take_slot(self, key: str, limit: int) -> Lease | None:
        if self._in_use.get(key, 0) >= limit:
            return None
        self._in_use[key] = self._in_use.get(key, 0) + 1

        async def release() -> None:
            left = self._in_use[key] - 1
            if left:
                self._in_use[key] = left
            else:
                del self._in_use[key]

        return Lease(release)


class RedisLimiter(Limiter):
    """Shared by every replica using the same Redis and ``key_prefix``."""

    def __init__(self, settings: LimitSettings) -> None:
        super().__init__(settings)
        assert settings.redis_url is not None
        self._redis: aioredis.Redis | None = None
        self._held: dict[str, str] = {}  # lease id → its sorted set's key, renewed while here
        self._renewer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect lazily (start-up never fails on Redis) and start renewing leases."""
        url = self.settings.redis_url
        assert url is not None, "RedisLimiter needs a redis_url"
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            # Explicit (redis-py's defaults differ between versions and constructors): one
            # immediate retry when a connection breaks (Redis restarted), none on a timeout,
            # so a hung Redis costs one REDIS_TIMEOUT per request, not several.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        await super().start()
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
        self._held.clear()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def ready(self) -> bool:
        if self._redis is None:
            return False
        try:
            return bool(await self._redis.ping())
        except _STORE_ERRORS:
            return False

    def _storage(self) -> Storage:
        assert self._redis is not None
        # unix:// must be spelled redis+unix:// for limits to pick its Redis (not Valkey) client.
        url = self.settings.redis_url or ""
        url = "redis+unix://" + url.removeprefix("unix://") if url.startswith("unix://") else url
        # Share our connection pool (and its timeouts); closing our client closes it.
        return RedisStorage(
            url,
            wrap_exceptions=True,
            implementation="redispy",
            key_prefix=f"{self.settings.key_prefix}:window",
            # limits types this as its own (sync-or-async) pool; redis.asyncio's is what its
            # "redispy" implementation uses at run time (tests/e2e/test_limits_redis.py).
            connection_pool=self._redis.connection_pool,  # type: ignore[arg-type]
        )

    def _leases_key(self, key: str) -> str:
        return f"{self.settings.key_prefix}:leases:{key}"

    def _key_ttl(self) -> int:
        return math.ceil(self.settings.lease_ttl) + 1

    async def _take_slot(self, key: str, limit: int) -> Lease | None:
        assert self._redis is not None, "Limiter.start() was not called"
        leases, lease_id = self._leases_key(key), os.urandom(12).hex()
        now = time.time()
        async with self._redis.pipeline(transaction=True) as tx:
            tx.zremrangebyscore(leases, "-inf", now)
            tx.zadd(leases, {lease_id: now + self.settings.lease_ttl})
            tx.zcard(leases)
            tx.expire(leases, self._key_ttl())
            _, _, count, _ = await tx.execute()
        if count > limit:
            await self._remove(self._redis, leases, lease_id)  # on failure it expires by itself
            return None
        self._held[lease_id] = leases
        return Lease(lambda: self._release(lease_id))

    async def _release(self, lease_id: str) -> None:
        leases = self._held.pop(lease_id, None)  # stop renewing it at once
        if leases is not None and self._redis is not None:
            # Shielded: a cancelled request still gives its slot back.
            await asyncio.shield(self._remove(self._redis, leases, lease_id))

    @staticmethod
    async def _remove(client: aioredis.Redis, leases: str, lease_id: str) -> None:
        try:
            await client.zrem(leases, lease_id)
        except _STORE_ERRORS as exc:
            log.warning(
                "lease_release_failed",
                error=_describe(exc),
                note="the slot frees itself within lease_ttl",
            )

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
        expiry = time.time() + self.settings.lease_ttl
        async with self._redis.pipeline(transaction=False) as pipe:
            for lease_id, leases in held:
                pipe.zadd(leases, {lease_id: expiry}, xx=True)  # XX: never revive a released lease
            for leases in {leases for _, leases in held}:
                pipe.expire(leases, self._key_ttl())
            await pipe.execute()


def _describe(exc: BaseException) -> str:
    exc = getattr(exc, "storage_error", exc)  # limits wraps the Redis error in StorageError
    return f"{type(exc).__name__}: {exc}"


def create_limiter(settings: LimitSettings) -> Limiter:
    """The in-memory limiter, or the Redis one when ``settings.redis_url`` is set."""
    if settings.redis_failure not in ("closed", "open"):
        raise ValueError(f"redis_failure must be 'closed' or 'open': {settings.redis_failure!r}")
    if min(settings.requests_per_minute, settings.concurrent, settings.submits_per_hour) < 0:
        raise ValueError("limits must be 0 (unlimited) or more")
    if not settings.lease_ttl > 0:
        raise ValueError("lease_ttl must be positive")
    return RedisLimiter(settings) if settings.redis_url else MemoryLimiter(settings)
