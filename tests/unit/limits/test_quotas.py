"""Quotas: the setting's grammar, plans, which calls each quota counts, and the memory
limiter's quotas, usage and forgetting (with a frozen clock)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import QuotaExceeded, RateLimited
from proxy.limits import LimitSettings, MemoryLimiter
from proxy.limits.quotas import DEFAULT_PLAN, Quota, parse_plans, parse_quotas
from proxy.limits.usage import MAX_APPS, parse_units
from proxy.policy.plan_requests import RequestPolicy

DAY = 86400.0
NOW = 20_000 * DAY + 3600 * 10 + 15  # 10:00:15 UTC on some day


@pytest.mark.parametrize(
    ("text", "quotas"),
    [
        ("", ()),
        ("*=500/month", (Quota("*", 500, "month"),)),
        (
            " fal-ai/flux/*=50/day , *=500/Month ",
            (Quota("fal-ai/flux/*", 50, "day"), Quota("*", 500, "month")),
        ),
        ("fal-ai/flux/*=0/hour", (Quota("fal-ai/flux/*", 0, "hour"),)),
        ("a=1/day,a=2/week", (Quota("a", 1, "day"), Quota("a", 2, "week"))),
    ],
)
def test_parse_quotas(text: str, quotas: tuple[Quota, ...]) -> None:
    assert parse_quotas(text, "FAL_PROXY_QUOTAS") == quotas


@pytest.mark.parametrize(
    "text",
    ["*=5", "*/day", "=5/day", "*=-1/day", "*=x/day", "*=5/fortnight", "a b=1/day",
     "*=1/day,*=2/day", "*=1.5/day"],
)  # fmt: skip
def test_bad_quotas_name_the_variable(text: str) -> None:
    with pytest.raises(ValueError, match=r"^FAL_PROXY_QUOTAS"):
        parse_quotas(text, "FAL_PROXY_QUOTAS")


@pytest.mark.parametrize(
    ("pattern", "app", "aliases", "applies"),
    [
        ("*", None, (), True),
        ("fal-ai/flux/*", "/fal-ai/flux/dev", (), True),
        ("fal-ai/flux/*", "/fal-ai/flux-pro", (), False),
        ("fal-ai/fast-sdxl", "/fal-ai/fast-sdxl/stream", (), True),  # a prefix matches
        ("fal-ai/fast-sdxl", "/fal-ai/fast-sdxl-turbo", (), False),
        ("fal-ai/fast-lcm*", None, ("fast-lcm-diffusion",), True),  # a token's alias
        ("fal-ai/flux/*", None, ("fast-lcm-diffusion",), False),
        ("workflows/me/*", "/workflows/me/thing", (), True),
        ("fal-ai", None, ("x",), False),  # no alias segment to match
        # Any letter case counts: a spelling fal may accept must not escape the quota.
        ("fal-ai/flux/*", "/FAL-AI/Flux/dev", (), True),
        ("fal-ai/fast-lcm*", None, ("Fast-LCM-Diffusion",), True),
        ("Fal-AI/Flux/*", "/fal-ai/flux/dev", (), True),
    ],
)
def test_which_calls_a_quota_counts(
    pattern: str, app: str | None, aliases: tuple[str, ...], applies: bool
) -> None:
    assert Quota(pattern, 1, "day").applies(app, aliases) is applies


def test_plans_file() -> None:
    default = parse_quotas("*=1/day", "Q")
    plans = parse_plans(
        '[plans]\nfree = "*=5/day"\npro = "*=50/day, fal-ai/flux/*=10/hour"\nunlimited = ""\n'
        '[callers]\n"user 1" = "pro"\n',
        "F",
        default,
    )
    assert plans.plan_of("user 1", "free") == "pro"  # the file wins over a claim
    assert plans.plan_of("user 2", "free") == "free"
    assert plans.plan_of("user 2", "gold") == DEFAULT_PLAN and plans.unknown("gold")
    assert plans.quotas(DEFAULT_PLAN) == default
    assert plans.quotas("unlimited") == ()
    assert plans.quotas("pro")[1] == Quota("fal-ai/flux/*", 10, "hour")


def test_plans_file_request_policies() -> None:
    plans = parse_plans(
        '[plans]\nfree = "*=5/day"\npro = ""\n'
        '[requests.free]\nqueue_priority = "low"\nmax_queue_length = 10\n'
        "[requests.default]\nstore_io = false\n",
        "F",
        (),
    )
    assert plans.request_policy("free") == RequestPolicy(queue_priority="low", max_queue_length=10)
    assert plans.request_policy(DEFAULT_PLAN) == RequestPolicy(store_io=False)
    assert plans.request_policy("pro") == RequestPolicy()  # no table: everything passes
    assert plans.request_policy(plans.plan_of("x", "gold")) == RequestPolicy(store_io=False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[plans]\nfree = ""\n[requests.gold]\nstore_io = false\n', r"\[requests\.gold\]"),
        ('[plans]\nfree = ""\n[requests.free]\npriority = "low"\n', r"unknown key 'priority'"),
        ('[plans]\nfree = ""\n[requests.free]\nstore_io = "no"\n', r"store_io"),
        ('[plans]\nfree = ""\n[requests]\nfree = 5\n', r"must be a table"),
        ("requests = 5\n", r"requests must be tables"),
    ],
)
def test_bad_request_policies_name_the_file_and_key(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^FAL_PROXY_PLANS_FILE.*{message}"):
        parse_plans(text, "FAL_PROXY_PLANS_FILE", ())


@pytest.mark.parametrize(
    "text",
    [
        "not toml [",
        '[plans]\ndefault = "*=1/day"\n',  # reserved for FAL_PROXY_QUOTAS
        "[plans]\nfree = 5\n",
        '[plans]\nfree = "*=5"\n',
        '[callers]\n"a" = "gold"\n',
        '[extra]\nx = "y"\n',
    ],
)
def test_bad_plans_files_name_the_variable(text: str) -> None:
    with pytest.raises(ValueError, match=r"^FAL_PROXY_PLANS_FILE"):
        parse_plans(text, "FAL_PROXY_PLANS_FILE", ())


@pytest.mark.parametrize(
    ("value", "units"),
    [(b"3", 3.0), (b"0.25", 0.25), (b"", 0.0), (b"-4", 0.0), (b"nan", 0.0), (b"inf", 0.0),
     (b"1e400", 0.0), (b"x", 0.0), (None, 0.0), (b"1e13", 0.0)],
)  # fmt: skip
def test_billable_units_from_a_header(value: bytes | None, units: float) -> None:
    assert parse_units(value) == units


def limiter(**limits: int) -> tuple[MemoryLimiter, list[float]]:
    clock = [NOW]
    settings = {"requests_per_minute": 0, "concurrent": 0, "submits_per_hour": 0, **limits}
    memory = MemoryLimiter(LimitSettings(**settings))  # type: ignore[arg-type]
    memory.clock = lambda: clock[0]
    return memory, clock


def test_a_quota_counts_generations_and_says_when_it_resets() -> None:
    memory, clock = limiter()
    day = (Quota("*", 2, "day"),)

    async def scenario() -> None:
        await memory.admit("a", submit=False, quotas=day)  # not a generation: not counted
        await memory.admit("a", submit=True, quotas=day, app="fal-ai/x")
        await memory.admit("a", submit=True, quotas=day, app="fal-ai/x")
        with pytest.raises(QuotaExceeded) as info:
            await memory.admit("a", submit=True, quotas=day, app="fal-ai/x")
        assert info.value.retry_after == 86400 - (3600 * 10 + 15)
        assert isinstance(info.value, RateLimited) and info.value.status == 429
        await memory.admit("b", submit=True, quotas=day)  # b has its own count
        clock[0] = 20_001 * DAY  # midnight: a new day
        await memory.admit("a", submit=True, quotas=day, app="fal-ai/x")
        report = await memory.usage("a", "default", day)
        assert [(u.used, u.resets_at) for u in report.quotas] == [(1, 20_002 * DAY)]
        assert report.apps == {"fal-ai/x": (3, 0.0, 0)}  # the month still holds yesterday's

    asyncio.run(scenario())


def test_a_refusal_for_one_quota_spends_none_of_the_others() -> None:
    memory, _ = limiter(requests_per_minute=100)
    quotas = (Quota("*", 10, "month"), Quota("fal-ai/flux/*", 1, "day"))

    async def scenario() -> None:
        await memory.admit("a", submit=True, quotas=quotas)
        for _ in range(3):
            with pytest.raises(QuotaExceeded):
                await memory.admit("a", submit=True, quotas=quotas)
        report = await memory.usage("a", "default", quotas)
        assert [u.used for u in report.quotas] == [1, 1]

    asyncio.run(scenario())


def test_usage_names_at_most_max_apps_per_caller() -> None:
    memory, _ = limiter()

    async def scenario() -> None:
        for n in range(MAX_APPS + 20):
            await memory.admit("a", submit=True, app=f"owner/app-{n}")
            await memory.add_units("a", f"owner/app-{n}", 0.5)
        apps = (await memory.usage("a", "default", ())).apps
        assert len(apps) == MAX_APPS + 1
        assert apps["other"] == (20, 10.0, 0)

    asyncio.run(scenario())


def test_idle_callers_are_forgotten_after_the_longest_window() -> None:
    """Nothing walks the callers: each structure drops its state when its window rolls."""
    memory, clock = limiter(requests_per_minute=10, submits_per_hour=10, concurrent=5)
    quotas = (Quota("*", 10, "day"),)

    async def scenario() -> None:
        for n in range(1000):
            lease = await memory.admit(f"caller-{n}", submit=True, quotas=quotas, app="o/a")
            await lease.release()
        assert memory.keys_held() == 4000  # minute, hour, day, month: one entry each
        clock[0] = NOW + 2 * 3600  # two hours on: the windows have forgotten them
        memory.forget(clock[0])  # what the limiter's one timer does when a window rolls
        assert memory.keys_held() == 1000 + 1000  # today's quota, this month's usage
        clock[0] = 20_001 * DAY + 1
        memory.forget(clock[0])
        assert memory.keys_held() == 1000  # the month's usage is all that is left
        clock[0] = 20_100 * DAY
        memory.forget(clock[0])
        assert memory.keys_held() == 0
        await memory.close()

    asyncio.run(scenario())


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=80))
def test_any_quota_text_parses_or_names_the_variable(text: str) -> None:
    """Whatever an operator types: quotas, or a ValueError naming the variable; never a
    crash at start-up with a traceback."""
    try:
        quotas = parse_quotas(text, "FAL_PROXY_QUOTAS")
    except ValueError as exc:
        assert str(exc).startswith("FAL_PROXY_QUOTAS")
        return
    assert all(q.limit >= 0 and q.period in ("hour", "day", "week", "month") for q in quotas)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=120))
def test_any_plans_file_parses_or_names_the_variable(text: str) -> None:
    try:
        parse_plans(text, "FAL_PROXY_PLANS_FILE", ())
    except ValueError as exc:
        assert str(exc).startswith("FAL_PROXY_PLANS_FILE")
