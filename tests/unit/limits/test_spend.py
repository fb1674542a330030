"""Estimates and reservations of budgets (proxy/limits/spend.py) and money (money.py)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.limits.money import MICROS, as_usd, parse_usd, usd
from proxy.limits.quotas import Quota
from proxy.limits.spend import ESTIMATE_WINDOW, Estimates, Parked, Reservation

CENT = Decimal("0.01")


def test_the_first_call_on_an_endpoint_is_estimated_at_one_unit() -> None:
    assert Estimates().estimate("/fal-ai/flux/dev", CENT, 0.0) == 10_000
    assert Estimates().estimate("/fal-ai/flux/dev", None, 0.0) == 0  # no price: no spend
    assert Estimates().estimate("x", Decimal("0.0000001"), 0.0) == 1  # rounded up


def test_a_cheap_call_does_not_lower_the_estimate_of_the_dear_ones_after_it() -> None:
    estimates = Estimates()
    estimates.observe("/fal-ai/veo3", 400_000, 100.0)
    estimates.observe("/fal-ai/veo3", 10_000, 101.0)  # one cheap call
    assert estimates.estimate("/fal-ai/veo3", CENT, 102.0) == 400_000
    # A spelling buys no fresh estimate.
    assert estimates.estimate("fal-ai/VEO3/", CENT, 102.0) == 400_000


def test_the_highest_cost_is_forgotten_after_the_window() -> None:
    estimates = Estimates()
    estimates.observe("a/b", 400_000, 0.0)
    assert estimates.estimate("a/b", CENT, ESTIMATE_WINDOW) == 400_000
    assert estimates.estimate("a/b", CENT, ESTIMATE_WINDOW + 1) == 10_000
    estimates.observe("a/b", 20_000, ESTIMATE_WINDOW + 1)  # a new window from this cost
    assert estimates.estimate("a/b", CENT, ESTIMATE_WINDOW + 2) == 20_000


def test_estimates_and_parked_reservations_are_bounded() -> None:
    estimates = Estimates(size=3)
    for n in range(10):
        estimates.observe(f"made/up-{n}", 1, 0.0)
    assert estimates.estimate("made/up-0", CENT, 1.0) == 10_000  # forgotten
    assert estimates.estimate("made/up-9", CENT, 1.0) == 1
    parked = Parked(size=2)
    held = Reservation((Quota("*", 5, "day", money=True),), 7, 0.0)
    for n in range(3):
        parked.park("c", f"r{n}", held)
    assert len(parked) == 2 and parked.take("c", "r0") is None
    assert parked.take("c", "r2") == held and parked.take("c", "r2") is None  # once
    assert parked.take("other", "r1") is None  # another caller's id is not theirs


@pytest.mark.parametrize(
    ("text", "micros"),
    [("5", 5_000_000), ("0.03", 30_000), ("12.50", 12_500_000), ("0", 0), ("0.000001", 1)],
)
def test_dollars_parse_to_whole_micro_dollars(text: str, micros: int) -> None:
    assert parse_usd(text, "X") == micros


@pytest.mark.parametrize("text", ["", "-1", "1e3", "0.0000001", "1,5", "nan", "inf", "$5", " . "])
def test_what_is_not_dollars_is_refused_naming_where(text: str) -> None:
    with pytest.raises(ValueError, match=r"^FAL_PROXY_QUOTAS: a budget is dollars like"):
        parse_usd(text, "FAL_PROXY_QUOTAS")


@given(st.integers(min_value=0, max_value=10**15 - 1))  # up to $999,999,999.999999
def test_dollars_shown_read_back_exactly(micros: int) -> None:
    assert parse_usd(usd(micros, plain=True)[1:], "X") == micros
    assert usd(micros).startswith("$")
    assert round(as_usd(micros) * MICROS) == micros


@given(st.lists(st.integers(min_value=0, max_value=10**12), max_size=200))
def test_integer_spend_never_drifts(costs: list[int]) -> None:
    # What floats would get wrong (0.1 + 0.2), integers of micro-dollars never do.
    assert sum(costs) == sum(reversed(costs))
    assert parse_usd(usd(sum(costs), plain=True)[1:], "X") == sum(costs)
