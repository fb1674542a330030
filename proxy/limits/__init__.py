"""Limits: per-caller windows, quotas and usage, counted in memory or in Redis behind one face.

:func:`create_limiter` (below) picks the backend from :class:`LimitSettings`; both backends
answer the same :class:`Limiter` protocol (``base``). The Redis backend's Lua script ships as
package data (``admit.lua``).

May import: errors, policy, observe.
"""

from __future__ import annotations

from .base import GENERATIONS, Lease, Limiter, LimitSettings, QuotaNear, caller_key
from .memory import MemoryLimiter
from .redis_backend import RedisLimiter

__all__ = [
    "GENERATIONS",
    "Lease",
    "LimitSettings",
    "Limiter",
    "MemoryLimiter",
    "QuotaNear",
    "RedisLimiter",
    "caller_key",
    "create_limiter",
]


def create_limiter(settings: LimitSettings) -> Limiter:
    """The in-memory limiter, or the Redis one when ``settings.redis_url`` is set."""
    if settings.redis_failure not in ("closed", "open"):
        raise ValueError(f"redis_failure must be 'closed' or 'open': {settings.redis_failure!r}")
    if min(settings.requests_per_minute, settings.concurrent, settings.submits_per_hour) < 0:
        raise ValueError("limits must be 0 (unlimited) or more")
    if not settings.lease_ttl > 0:
        raise ValueError("lease_ttl must be positive")
    if settings.redis_url:
        return RedisLimiter(settings)
    return MemoryLimiter(settings)
