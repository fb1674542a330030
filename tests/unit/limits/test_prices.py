"""Prices: the file's grammar and refusals, which pattern prices an app (specificity, letter
case, prefixes), whether a quota's pattern is covered, and costs in whole micro-dollars that
never undercount (checked against exact fractions)."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.envvars import SettingsError
from proxy.config.settings import Settings
from proxy.limits.prices import MICROS, Prices, parse_prices, read_prices

SOURCE = "FAL_PROXY_PRICES_FILE /etc/prices.toml"


def prices(**table: str) -> Prices:
    """``prices(**{"fal-ai/flux/dev": "0.025"})``."""
    return Prices({k: Decimal(v) for k, v in table.items()})


def toml(*lines: str) -> str:
    return "\n".join(["[prices]", *lines]) + "\n"


# --- the file ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "table"),
    [
        ("", {}),
        ("[prices]\n", {}),
        ("# nothing priced yet\n[prices]\n", {}),
        (toml('"fal-ai/flux/dev" = 0.025'), {"fal-ai/flux/dev": Decimal("0.025")}),
        (toml('"*" = 0.01', '"fal-ai/veo3/*" = 2'), {"*": Decimal("0.01"), "fal-ai/veo3/*": 2}),
        (toml("free = 0"), {"free": Decimal(0)}),
        (toml('"a/b" = 0.0'), {"a/b": Decimal("0.0")}),
        (toml('"a/b" = 1e-7'), {"a/b": Decimal("1e-7")}),
        (toml('"a/b" = 0.1'), {"a/b": Decimal("0.1")}),  # its text: not 0.1000000000000000055…
        (toml('"workflows/fal-ai/[a-c]?x!" = 3'), {"workflows/fal-ai/[a-c]?x!": Decimal(3)}),
        ('prices = { "a/b" = 1.5 }\n', {"a/b": Decimal("1.5")}),
    ],
)
def test_a_prices_file_parses(text: str, table: dict[str, Decimal]) -> None:
    parsed = parse_prices(text, SOURCE)
    assert dict(parsed.table) == table
    assert all(isinstance(v, Decimal) for v in parsed.table.values())
    assert len(parsed) == len(table) and parsed.enabled == bool(table)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[prices]\n"a/b" = \n', "line 2"),  # a syntax error: tomllib says where
        ('[prices]\n"a/b" = 1\n"a/b" = 2\n', "line 3"),
        ("[plans]\nfree = 1\n", "plans"),
        ('[prices]\n"a/b" = 1\n[extra]\n', "extra"),
        ("currency = 'USD'\n", "currency"),
        ("prices = 3\n", "[prices]"),
        (toml('"fal ai/flux" = 1'), "fal ai/flux"),
        (toml('"fal-ai/flüx" = 1'), "fal-ai/flüx"),
        (toml('"" = 1'), "''"),
        (toml('"a/b" = -0.01'), "a/b"),
        (toml('"a/b" = -1'), "a/b"),
        (toml('"a/b" = nan'), "a/b"),
        (toml('"a/b" = inf'), "a/b"),
        (toml('"a/b" = -inf'), "a/b"),
        (toml('"a/b" = true'), "a/b"),
        (toml('"a/b" = "0.025"'), "a/b"),
        (toml('"a/b" = [1]'), "a/b"),
        (toml('"a/b" = 1979-05-27'), "a/b"),
        (toml('"a/b" = { usd = 1 }'), "a/b"),
        (toml("fal-ai.flux = 1"), "fal-ai"),  # a dotted key is a table, not a pattern
        (toml('"fal-ai/flux/*" = 1', '"FAL-AI/flux/*" = 2'), "FAL-AI/flux/*"),
    ],
)
def test_a_bad_prices_file_names_the_source_and_the_key(text: str, named: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_prices(text, SOURCE)
    message = str(info.value)
    assert message.startswith(SOURCE) and named in message, message
    assert "\n" not in message


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=120))
def test_any_prices_file_parses_or_names_its_source(text: str) -> None:
    try:
        parsed = parse_prices(text, SOURCE)
    except ValueError as exc:
        assert str(exc).startswith(SOURCE) and "\n" not in str(exc)
        return
    assert all(v >= 0 and v.is_finite() for v in parsed.table.values())


def test_read_prices_names_the_variable_and_the_file(tmp_path: Path) -> None:
    good = tmp_path / "prices.toml"
    good.write_text(toml('"fal-ai/flux/dev" = 0.025'), encoding="utf-8")
    read = read_prices(str(good))
    assert read.price_of("fal-ai/flux/dev") == Decimal("0.025") and read.source == str(good)
    for path, content in [
        (tmp_path / "missing.toml", None),
        (tmp_path / "latin1.toml", b"[prices]\n# caf\xe9\n"),
        (tmp_path / "bad.toml", b'[prices]\n"a/b" = -1\n'),
    ]:
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ValueError) as info:
            read_prices(str(path))
        assert str(info.value).startswith("FAL_PROXY_PRICES_FILE")
        assert str(path) in str(info.value) and "\n" not in str(info.value)


GW = {"FAL_KEY": "k", "FAL_PROXY_GATEWAY_URL": "http://127.0.0.1:9000/v1/acct/gw/fal"}


def test_the_settings_read_the_prices_file(tmp_path: Path) -> None:
    assert not Settings.from_env(GW).access.prices.enabled
    file = tmp_path / "prices.toml"
    file.write_text(toml('"fal-ai/flux/dev" = 0.025', '"*" = 0.01'), encoding="utf-8")
    loaded = Settings.from_env({**GW, "FAL_PROXY_PRICES_FILE": str(file)}).access.prices
    assert len(loaded) == 2 and loaded.price_of("other/app") == Decimal("0.01")
    assert loaded.describe() == (
        f"2 patterns from {file} (fal-ai/flux/dev $0.025/unit, * $0.01/unit)"
    )
    file.write_text(toml('"fal-ai/flux/dev" = "cheap"'), encoding="utf-8")
    for path in (file, tmp_path / "missing.toml"):
        with pytest.raises(SettingsError, match=r"^FAL_PROXY_PRICES_FILE"):
            Settings.from_env({**GW, "FAL_PROXY_PRICES_FILE": str(path)})


# --- which price applies -------------------------------------------------------------------

TABLE = prices(**{
    "*": "0.01",
    "fal-ai/*": "0.02",
    "fal-ai/flux/*": "0.03",
    "fal-ai/flux/dev": "0.025",
    "fal-ai/flux/dev/*": "0.04",
    "fal-ai/flux/dev*": "0.05",
    "fal-ai/veo3": "0.40",
    "fal-ai/kling-video/v?/pro": "0.06",
    "fal-ai/kling-video/v[0-9]/pro": "0.07",
    "workflows/fal-ai/sdxl-sticker": "0.08",
})  # fmt: skip


@pytest.mark.parametrize(
    ("app", "price", "pattern"),
    [
        ("fal-ai/flux/dev", "0.025", "fal-ai/flux/dev"),  # exact beats dev* (same letters)
        ("FAL-AI/Flux/DEV", "0.025", "fal-ai/flux/dev"),  # any letter case
        ("fal-ai/flux/dev/image-to-image", "0.04", "fal-ai/flux/dev/*"),  # 16 letters > 15
        ("fal-ai/flux/devx", "0.05", "fal-ai/flux/dev*"),
        ("fal-ai/flux/schnell", "0.03", "fal-ai/flux/*"),
        ("fal-ai/flux", "0.02", "fal-ai/*"),
        ("fal-ai/veo3", "0.40", "fal-ai/veo3"),
        ("fal-ai/veo3/fast/image-to-video", "0.40", "fal-ai/veo3"),  # a prefix prices its ids
        ("fal-ai/veo3-fast", "0.02", "fal-ai/*"),  # but not a longer segment
        ("fal-ai/kling-video/v2/pro", "0.06", "fal-ai/kling-video/v?/pro"),  # tie: text order
        ("fal-ai/kling-video/v2/pro/image-to-video", "0.06", "fal-ai/kling-video/v?/pro"),
        ("fal-ai/kling-video/vx/pro", "0.06", "fal-ai/kling-video/v?/pro"),
        ("workflows/fal-ai/sdxl-sticker", "0.08", "workflows/fal-ai/sdxl-sticker"),
        ("someone/else", "0.01", "*"),
        (None, "0.01", "*"),  # a call naming no app: the * price alone
    ],
)
def test_the_most_specific_pattern_prices_an_app(app: str | None, price: str, pattern: str) -> None:
    assert TABLE.price_of(app) == Decimal(price)
    assert TABLE.pattern_of(app) == pattern


def test_an_app_no_pattern_matches_has_no_price_and_no_cost() -> None:
    table = prices(**{"fal-ai/flux/*": "0.03"})
    for app in ("fal-ai/veo3", "fal-ai/flux", "fal-ai/fluxx/dev", None):
        assert table.price_of(app) is None and table.cost_micros(app, Decimal(3)) is None
    assert table.price_of("fal-ai/flux/dev") == Decimal("0.03")
    empty = Prices()
    assert not empty.enabled and len(empty) == 0 and empty.price_of("a/b") is None
    assert empty.describe() == "none: spend is not counted"


def test_the_order_does_not_depend_on_the_file_order() -> None:
    keys = list(TABLE.table)
    reordered = Prices({k: TABLE.table[k] for k in reversed(keys)})
    for app in ("fal-ai/flux/dev", "fal-ai/kling-video/v2/pro", "fal-ai/flux/devx", "x/y"):
        assert reordered.pattern_of(app) == TABLE.pattern_of(app)


@pytest.mark.parametrize(
    ("table", "pattern", "covered"),
    [
        ({"*": "0"}, "fal-ai/anything/*", True),
        ({"*": "0"}, "*", True),
        ({"fal-ai/*": "1"}, "*", False),
        ({}, "*", False),
        ({}, "fal-ai/flux/dev", False),
        ({"fal-ai/veo3/*": "1"}, "fal-ai/veo3/*", True),  # the very same pattern
        ({"FAL-AI/Veo3/*": "1"}, "fal-ai/veo3/*", True),  # in any case
        ({"fal-ai/veo3": "1"}, "fal-ai/veo3/*", True),  # a prefix of every app it matches
        ({"fal-ai/veo3": "1"}, "fal-ai/veo3", True),
        ({"fal-ai/veo3": "1"}, "fal-ai/veo3/fast", True),
        ({"fal-ai/*": "1"}, "fal-ai/veo3/*", True),
        ({"fal-ai/*": "1"}, "fal-ai/veo3", True),
        ({"fal-ai": "1"}, "fal-ai/veo3*", True),
        ({"fal-ai/veo3": "1"}, "fal-ai/veo3*", False),  # also fal-ai/veo3-fast
        ({"fal-ai/veo3/*": "1"}, "fal-ai/veo3", False),  # fal-ai/veo3 itself is not priced
        ({"fal-ai/veo3/fast": "1"}, "fal-ai/veo3/*", False),
        ({"fal-ai/veo3/fast": "1"}, "fal-ai/veo3", False),
        ({"fal-ai/flux/dev": "1"}, "fal-ai/flux/*", False),
        ({"fal-ai/flux/*": "1"}, "*/flux/*", False),  # unsure: no
        ({"fal-ai/flux/*": "1"}, "fal-ai/flux/[ds]*", True),
        ({"fal-ai/flux/d*": "1"}, "fal-ai/flux/[ds]*", False),
        ({"fal-ai/flux/*": "1"}, "fal-ai/flux/dev*", True),
        ({"fal-ai/flux/*": "1"}, "fal-ai/flux*", False),  # also fal-ai/flux-pro
        ({"fal-ai/flux/*": "1"}, "fal-ai/flux", False),
    ],
)
def test_covers_a_quota_pattern_only_when_every_app_it_matches_is_priced(
    table: dict[str, str], pattern: str, covered: bool
) -> None:
    assert prices(**table).covers(pattern) is covered


# Apps in few letters, so that the property below meets patterns that match them.
_SEGMENT = st.text("abc", min_size=1, max_size=3)
_APPS = st.lists(_SEGMENT, min_size=1, max_size=4).map("/".join)
_PATTERNS = st.lists(
    st.one_of(_SEGMENT, st.just("*"), st.just("a*"), st.just("?"), st.just("[ab]")),
    min_size=1,
    max_size=4,
).map("/".join)


@settings(max_examples=500, deadline=None)
@given(table=st.lists(_PATTERNS, max_size=4), quota=_PATTERNS, app=_APPS)
def test_covers_is_never_wrong_about_an_app(table: list[str], quota: str, app: str) -> None:
    """When covers() says yes, every app the quota counts has a price (it may say no where
    a yes would have been right, never the other way round)."""
    from proxy.limits.quotas import Quota

    priced = Prices({p: Decimal(1) for p in dict.fromkeys(table)})
    if priced.covers(quota) and Quota(quota, 1, "day").applies(app):
        assert priced.price_of(app) is not None


# --- costs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("price", "units", "micros"),
    [
        ("0.025", "1", 25_000),
        ("0.025", "0", 0),
        ("0.025", "1.5", 37_500),
        ("0.1", "3", 300_000),  # not 300000.00000000006
        ("0.0000001", "1", 1),  # a tenth of a micro-dollar: rounded up
        ("0.0000001", "10", 1),
        ("0.0000001", "11", 2),
        ("0.003", "0.333333", 1_000),  # 999.999 → 1000
        ("0", "1000", 0),
        ("12345.678901", "1000000", 12_345_678_901_000_000),
        ("0.0000003", "3" * 40, 10**39),  # 10**39 - 0.1: past 28 digits, still exact
    ],
)  # fmt: skip
def test_cost_micros_rounds_up_to_a_whole_micro_dollar(price: str, units: str, micros: int) -> None:
    assert prices(**{"a/b": price}).cost_micros("a/b", Decimal(units)) == micros


@pytest.mark.parametrize("units", ["NaN", "Infinity", "-1", "-0.001"])
def test_cost_micros_refuses_units_that_are_not_a_count(units: str) -> None:
    with pytest.raises(ValueError):
        prices(**{"*": "0.01"}).cost_micros("a/b", Decimal(units))


_PRICES = st.decimals(min_value=0, max_value=1000, places=7, allow_nan=False)
_UNITS = st.decimals(min_value=0, max_value=10**6, places=6, allow_nan=False)


@settings(max_examples=500, deadline=None)
@given(price=_PRICES, units=_UNITS)
def test_a_cost_is_never_below_the_exact_product_nor_a_micro_dollar_above(
    price: Decimal, units: Decimal
) -> None:
    cost = prices(**{"*": str(price)}).cost_micros("a/b", units)
    exact = Fraction(units) * Fraction(price) * MICROS
    assert isinstance(cost, int)
    assert exact <= cost < exact + 1
    assert cost == math.ceil(exact)


@settings(max_examples=300, deadline=None)
@given(price=_PRICES, calls=st.lists(_UNITS, max_size=30))
def test_summed_costs_are_integer_arithmetic_and_never_undercount(
    price: Decimal, calls: list[Decimal]
) -> None:
    """Costs add up as integers: the same total in any order, never below the exact total
    of the calls, and at most a micro-dollar per call above it. Floats would drift."""
    table = prices(**{"*": str(price)})
    costs = [table.cost_micros("a/b", units) for units in calls]
    assert all(isinstance(c, int) for c in costs)
    total = sum(c for c in costs if c is not None)
    assert total == sum(reversed([c for c in costs if c is not None]))
    exact = sum((Fraction(u) * Fraction(price) * MICROS for u in calls), Fraction(0))
    assert exact <= total <= exact + len(calls)


@settings(max_examples=300, deadline=None)
@given(value=st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False))
def test_a_price_is_read_from_its_text_not_its_binary_float(value: float) -> None:
    """``0.1`` in the file is exactly 1/10: the decimal text TOML wrote, never the float's
    binary expansion."""
    parsed = parse_prices(toml(f'"a/b" = {value!r}'), SOURCE)
    assert parsed.price_of("a/b") == Decimal(repr(value))
    assert Fraction(parsed.table["a/b"]) == Fraction(repr(value))
