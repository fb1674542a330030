"""A started in-memory limiter at a fixed clock, for the limiter unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from proxy.limits import Limiter, LimitSettings, create_limiter

NOW = 1_764_000_000.0 + 15  # 1764000000 is on an hour's edge


@asynccontextmanager
async def running(**limits: int) -> AsyncIterator[Limiter]:
    """An in-memory limiter at ``NOW``, every limit off but those given."""
    settings = {"requests_per_minute": 0, "concurrent": 0, "submits_per_hour": 0, **limits}
    limiter = create_limiter(LimitSettings(**settings))  # type: ignore[arg-type]
    limiter.clock = lambda: NOW
    await limiter.start()
    try:
        yield limiter
    finally:
        await limiter.close()
