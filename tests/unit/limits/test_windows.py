"""The counting windows: the same answers as the `limits` library on the same hits.

``SlidingWindows`` re-implements limits' sliding-window-counter strategy (see
proxy/windows.py for why); hypothesis feeds both the same sequences of hits, at the same
(frozen) clock, and every answer must agree. ``wait`` (our Retry-After) is checked by its
own property: a retry after it is admitted, one just before it is not.
"""

from __future__ import annotations

import copy
import time
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from proxy.limits.windows import PeriodCounts, SlidingWindows, period_bounds, retry_after

BASE = 1_764_000_000.0  # a day in November 2025, on a window edge for small periods

hits = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=3.0, allow_nan=False),  # seconds since the last
        st.sampled_from(["alice", "bob", "carol"]),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=6),
    period=st.integers(min_value=1, max_value=10),
    start=st.floats(min_value=0.0, max_value=100.0, allow_nan=False),
    sequence=hits,
)
def test_the_same_answers_as_limits(
    limit: int, period: int, start: float, sequence: list[tuple[float, str]]
) -> None:
    now = BASE + start
    ours = SlidingWindows(limit, period)
    item = RateLimitItemPerSecond(limit, period)
    with mock.patch.object(time, "time", lambda: now):
        theirs = SlidingWindowCounterRateLimiter(MemoryStorage())
        for step, key in sequence:
            now += step
            admitted = ours.wait(key, now) == 0.0
            if admitted:
                ours.add(key, now)
            assert admitted == theirs.hit(item, key), (now, key)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=6),
    period=st.integers(min_value=1, max_value=120),
    start=st.floats(min_value=0.0, max_value=1000.0, allow_nan=False),
    sequence=hits,
)
def test_wait_is_exactly_how_long_to_wait(
    limit: int, period: int, start: float, sequence: list[tuple[float, str]]
) -> None:
    now = BASE + start
    windows = SlidingWindows(limit, period)
    for step, key in sequence:
        now += step
        wait = windows.wait(key, now)
        if wait == 0.0:
            windows.add(key, now)
            continue
        later = copy.deepcopy(windows)
        assert later.wait(key, now + wait + 1e-6) == 0.0, "refused after the wait"
        if wait > 1e-3:
            sooner = copy.deepcopy(windows)
            assert sooner.wait(key, now + wait - 1e-3) > 0.0, "admitted before the wait"


def test_state_is_forgotten_two_windows_after_the_last_hit() -> None:
    windows = SlidingWindows(5, 60)
    for caller in range(1000):
        windows.add(f"caller-{caller}", BASE + 1)
    assert windows.keys_held() == 1000
    windows.wait("someone", BASE + 61)  # next window: the counts are the previous ones
    assert windows.keys_held() == 1000
    windows.wait("someone", BASE + 121)  # two windows on: nothing left to remember
    assert windows.keys_held() == 0


def test_a_full_window_weighs_on_the_next_one() -> None:
    windows = SlidingWindows(3, 60)
    for _ in range(3):
        assert windows.wait("a", BASE + 30) == 0.0
        windows.add("a", BASE + 30)
    # Full: the next window opens in 1 s, and there 3 * 60/60 = 3 still weighs; but the
    # weight falls at once, so the refusal says 1 s (and a hit just after it passes).
    assert windows.wait("a", BASE + 59) == pytest.approx(1.0)
    assert 0.0 < windows.wait("a", BASE + 60) <= 1e-6
    assert windows.wait("a", BASE + 60.1) == 0.0
    windows.add("a", BASE + 60.1)
    # 3 * (time left)/60 + 1 must fall under 3: at 40 s left, 20 s into the window.
    assert windows.wait("a", BASE + 75) == pytest.approx(5.0)
    assert windows.wait("a", BASE + 80.01) == 0.0
    assert retry_after(windows.wait("b", BASE + 75)) == 1  # another caller is not touched


@pytest.mark.parametrize(
    ("period", "when", "start", "end"),
    [
        ("hour", "2026-11-25T21:37:14", "2026-11-25T21:00:00", "2026-11-25T22:00:00"),
        ("day", "2026-11-25T21:37:14", "2026-11-25T00:00:00", "2026-11-26T00:00:00"),
        ("week", "2026-11-25T21:37:14", "2026-11-23T00:00:00", "2026-11-30T00:00:00"),
        ("week", "2026-11-23T00:00:00", "2026-11-23T00:00:00", "2026-11-30T00:00:00"),
        ("month", "2026-11-25T21:37:14", "2026-11-01T00:00:00", "2026-12-01T00:00:00"),
        ("month", "2026-12-31T23:59:59", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
        ("month", "2028-02-29T12:00:00", "2028-02-01T00:00:00", "2028-03-01T00:00:00"),
    ],
)
def test_calendar_periods_in_utc(period: str, when: str, start: str, end: str) -> None:
    def epoch(text: str) -> float:
        return float(time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S")) - time.timezone)

    _, got_start, got_end = period_bounds(period, epoch(when))
    assert (got_start, got_end) == (epoch(start), epoch(end))


def test_period_counts_reset_when_the_period_ends() -> None:
    counts = PeriodCounts("day")
    day = 86400.0
    counts.add("alice", 20_000 * day + 5)
    counts.add("alice", 20_000 * day + 6)
    assert counts.count("alice", 20_001 * day - 1) == 2
    assert counts.count("alice", 20_001 * day) == 0
    assert counts.keys_held() == 0
    with pytest.raises(ValueError, match="unknown period"):
        PeriodCounts("fortnight")
