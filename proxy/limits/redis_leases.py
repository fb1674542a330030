"""The leases one replica holds in Redis, kept alive until they are given back.

A lease expires after ``lease_ttl`` unless renewed: one task per limiter renews every lease
it holds every ``lease_ttl / 3`` (``ZADD XX``, so a released lease never comes back).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import redis.asyncio as aioredis

from ..observe.logs import get_logger
from .redis_batches import STORE_ERRORS, describe

log = get_logger("proxy.limits")


class HeldLeases:
    """The leases held here and the task renewing them. ``clock`` and ``redis`` give the
    limiter's clock and client (None until it starts, and once it has closed)."""

    def __init__(
        self,
        lease_ttl: float,
        clock: Callable[[], float],
        redis: Callable[[], aioredis.Redis | None],
    ) -> None:
        self._lease_ttl = lease_ttl
        self._clock = clock
        self._redis = redis
        self._held: dict[str, str] = {}  # lease id → its sorted set's key, renewed while here
        self._renewer: asyncio.Task[None] | None = None

    def hold(self, lease_id: str, leases: str) -> None:
        self._held[lease_id] = leases

    def drop(self, lease_id: str) -> str | None:
        """Stop renewing a lease at once: its sorted set's key, or None if not held."""
        return self._held.pop(lease_id, None)

    def clear(self) -> None:
        self._held.clear()

    def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew_forever(), name="limits-lease-renewal")

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            try:
                await self._renewer
            except asyncio.CancelledError:
                pass
            self._renewer = None

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ttl / 3)
            try:
                await self.renew()
            except STORE_ERRORS as exc:
                log.warning("lease_renewal_failed", error=describe(exc), leases=len(self._held))
            except Exception:  # a bug: keep renewing, or every held slot would expire
                log.exception("lease_renewal_error")

    async def renew(self) -> None:
        """Push back the expiry of every lease held here (called every ``lease_ttl / 3``)."""
        held, redis = list(self._held.items()), self._redis()
        if not held or redis is None:
            return
        expiry = self._clock() + self._lease_ttl
        async with redis.pipeline(transaction=False) as pipe:
            for lease_id, leases in held:
                pipe.zadd(leases, {lease_id: expiry}, xx=True)  # XX: never revive a released lease
            for leases in {leases for _, leases in held}:
                pipe.expire(leases, math.ceil(self._lease_ttl) + 1)
            await pipe.execute()
