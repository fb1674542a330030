"""admission/client_address: the address buckets anonymous calls count against are bounded."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.admission.client_address import SHARED_BUCKET, AddressBuckets
from proxy.limits import LimitSettings, MemoryLimiter

MONTH_START = 1_764_547_200.0  # 2025-12-01T00:00:00Z


def v6(n: int) -> str:
    """An address in the n-th /64 of one /48."""
    return f"2001:db8:1:{n:x}::1"


def test_the_first_buckets_of_the_month_are_their_own_the_rest_share_one(
    caplog: Any,
) -> None:
    now = [MONTH_START + 5]
    buckets = AddressBuckets(limit=3, clock=lambda: now[0])
    keys = [buckets.key(v6(n)) for n in range(3)]
    assert keys == ["ip:2001:db8:1::/64", "ip:2001:db8:1:1::/64", "ip:2001:db8:1:2::/64"]
    # Another address in a known /64 is that bucket; a fourth /64 shares one with the rest.
    assert buckets.key("2001:db8:1:1::ffff") == keys[1]
    assert buckets.key(v6(3)) == buckets.key(v6(4)) == buckets.key("192.0.2.9") == SHARED_BUCKET
    assert buckets.key(v6(0)) == keys[0]  # the known keep their own
    # A new month: buckets are handed out again.
    now[0] = MONTH_START + 31 * 86_400 + 1
    assert buckets.key(v6(9)) == "ip:2001:db8:1:9::/64"


def test_spraying_addresses_holds_a_bounded_number_of_callers_in_the_limiter() -> None:
    """10,000 /64s of one /48, one generation each: the limiter's per-caller state stays at
    the bound plus the shared bucket, however many addresses come."""
    buckets = AddressBuckets(limit=100, clock=lambda: MONTH_START + 5)
    limiter = MemoryLimiter(LimitSettings(requests_per_minute=0, concurrent=0, submits_per_hour=0))
    limiter.clock = lambda: MONTH_START + 5

    async def spray() -> None:
        for n in range(10_000):
            await limiter.admit(buckets.key(v6(n)), submit=True, app="fal-ai/flux")

    asyncio.run(spray())
    assert limiter.keys_held() <= 101


@pytest.mark.parametrize("address", ["203.0.113.7", "::ffff:203.0.113.7", "unknown"])
def test_ipv4_and_unknown_addresses_are_buckets_too(address: str) -> None:
    buckets = AddressBuckets(limit=1)
    first = buckets.key(address)
    assert first.startswith("ip:") and first != SHARED_BUCKET
    assert buckets.key(address) == first
