"""Quotas: how many generations a caller may start per calendar period. Pure.

A quota is ``pattern=N/period``: at most N calls that can start a paid generation (runs,
queue submits, streams, realtime tokens, sockets; see
:func:`proxy.policy.targets.starts_generation`)
per UTC hour, day, week or month, for the apps whose endpoint id matches ``pattern`` (a
glob as in ``FAL_PROXY_ALLOWED_APPS``; ``*`` is every app). A call counts against every
quota that matches it and is refused (429) when any of them is used up.

A **budget** is the same with dollars: ``pattern=$5/month`` is at most $5 of fal spend per
UTC month on the matching apps, spend being fal's billable units × the app's price
(:mod:`proxy.limits.prices`, ``FAL_PROXY_PRICES_FILE``). How it is counted, and by how much
it can be overshot: :mod:`proxy.limits.spend`. Quotas and budgets mix in one list:
``*=500/month, *=$5/month, fal-ai/veo3/*=$1/day``.

Who gets which quotas:

* ``FAL_PROXY_QUOTAS``: every caller without a plan, e.g. ``fal-ai/flux/*=50/day,*=500/month``;
* ``FAL_PROXY_PLANS_FILE`` (TOML): named plans, and callers pinned to a plan::

      [plans]
      free = "fal-ai/flux/*=50/day, *=500/month"
      pro = "*=5000/month"
      unlimited = ""

      [callers]
      "user_8f14e45f" = "pro"

      [requests.free]            # what a plan's callers may ask fal for (optional)
      queue_priority = "low"     # pinned, whatever the caller sent
      object_expiration_max_seconds = 3600

  ``[requests.<plan>]`` (``[requests.default]`` for callers without a plan) pins or caps
  fal's platform headers and ``fal_max_queue_length``: :mod:`proxy.policy.plan_requests`.
* ``FAL_PROXY_JWT_PLAN_CLAIM``: with JWT callers, the claim naming the caller's plan
  (the file's ``[callers]`` entry wins over the claim).

Counts are kept per (pattern, period), not per plan, so a caller who moves from ``free``
to ``pro`` keeps what they already used today and gets the new limit at once.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from ..policy.allowed_apps import NAMESPACES, endpoint_prefixes
from ..policy.plan_requests import PASS_THROUGH, RequestPolicy, parse_request_policy
from .money import parse_usd, usd
from .windows import PERIODS

DEFAULT_PLAN = "default"  # the plan of callers with none: FAL_PROXY_QUOTAS
_PLAN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PATTERN = re.compile(r"[A-Za-z0-9*?_.\-/\[\]!]+")


@dataclass(frozen=True)
class Quota:
    pattern: str  # glob over endpoint ids; "*" = every app
    limit: int  # generations per period (a budget: micro-dollars); 0 = none at all
    period: str  # hour | day | week | month
    money: bool = False  # a budget: ``limit`` is spend in micro-dollars (proxy.limits.spend)

    @property
    def key(self) -> str:
        """The counter's name: shared by every plan with the same pattern and period (a
        budget's apart from a count's: ``$`` is no character of a pattern)."""
        return f"{self.period}:{'$' if self.money else ''}{self.pattern}"

    def describe(self) -> str:
        """``50 generations per day for fal-ai/flux/*`` or ``$5.00 per month``, as
        refusals and usage say it."""
        apps = "" if self.pattern == "*" else f" for {self.pattern}"
        if self.money:
            return f"{usd(self.limit)} per {self.period}{apps}"
        return f"{self.limit} generations per {self.period}{apps}"

    def spec(self) -> str:
        """The quota as written: ``fal-ai/flux/*=50/day``, ``*=$5/month``."""
        amount = usd(self.limit, plain=True) if self.money else str(self.limit)
        return f"{self.pattern}={amount}/{self.period}"

    def applies(self, app: str | None, aliases: tuple[str, ...] = ()) -> bool:
        """Does a call on endpoint ``app`` (or a realtime token for ``aliases``) count?

        An endpoint id matches when it or a shorter prefix of it matches the pattern (as
        allowed apps do: ``fal-ai/fast-sdxl`` covers ``fal-ai/fast-sdxl/stream``). A token
        request names bare aliases: one matches the pattern's alias segment.

        In any letter case: whether fal tells ``FAST-SDXL`` from ``fast-sdxl`` or not, a
        spelling must not escape a quota (allowed apps, the other way round, stay exact:
        an odd spelling is refused there).
        """
        if self.pattern == "*":
            return True
        pattern = self.pattern.lower()
        if app is not None and any(
            fnmatchcase(candidate, pattern) for candidate in endpoint_prefixes(app.lower())
        ):
            return True
        if aliases:
            parts = pattern.split("/")
            alias = parts[2 if parts[0] in NAMESPACES else 1] if len(parts) > 1 else None
            return alias is not None and any(fnmatchcase(a.lower(), alias) for a in aliases)
        return False


def parse_quotas(text: str, source: str) -> tuple[Quota, ...]:
    """``fal-ai/flux/*=50/day, *=500/month`` → quotas; ValueError naming ``source``."""
    quotas: list[Quota] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        pattern, equals, amount = item.rpartition("=")
        limit_text, slash, period = amount.partition("/")
        pattern, period = pattern.strip(), period.strip().lower()
        if not equals or not slash or not _PATTERN.fullmatch(pattern):
            raise ValueError(f"{source}: {item!r} is not like fal-ai/flux/*=50/day")
        limit_text = limit_text.strip()
        money = limit_text.startswith("$")
        if money:
            limit = parse_usd(limit_text[1:], f"{source}: {item!r}")
        else:
            try:
                limit = int(limit_text)
            except ValueError:
                raise ValueError(
                    f"{source}: {item!r}: the limit must be a whole number of generations, "
                    "or dollars like $5 or $0.50"
                ) from None
        if limit < 0:
            raise ValueError(f"{source}: {item!r}: the limit must be 0 or more")
        if period not in PERIODS:
            raise ValueError(f"{source}: {item!r}: the period must be one of {', '.join(PERIODS)}")
        quota = Quota(pattern, limit, period, money)
        if any(q.key == quota.key for q in quotas):
            kind = "budgets" if money else "quotas"
            raise ValueError(f"{source}: {pattern} has two {kind} per {period}")
        quotas.append(quota)
    return tuple(quotas)


@dataclass(frozen=True)
class Plans:
    """Quotas by plan, and the plan of each caller listed by name."""

    default: tuple[Quota, ...] = ()
    plans: dict[str, tuple[Quota, ...]] = field(default_factory=dict)
    callers: dict[str, str] = field(default_factory=dict)  # caller id → plan
    requests: dict[str, RequestPolicy] = field(default_factory=dict)  # plan → [requests.<plan>]

    @property
    def enabled(self) -> bool:
        return bool(self.default) or any(self.plans.values())

    def plan_of(self, caller: str, claimed: str | None) -> str:
        """The caller's plan: their ``[callers]`` entry, else the claimed plan if it exists,
        else the default. (An unknown claimed plan gets the default quotas: see
        :meth:`unknown`.)"""
        listed = self.callers.get(caller)
        if listed is not None:
            return listed
        if claimed is not None and claimed in self.plans:
            return claimed
        return DEFAULT_PLAN

    def unknown(self, claimed: str | None) -> bool:
        """A claimed plan this configuration does not define (worth a warning)."""
        return claimed is not None and claimed not in self.plans

    def quotas(self, plan: str) -> tuple[Quota, ...]:
        return self.plans.get(plan, self.default)

    def request_policy(self, plan: str) -> RequestPolicy:
        """The plan's ``[requests.<plan>]``; none: every caller value passes through."""
        return self.requests.get(plan, PASS_THROUGH)


def parse_plans(text: str, source: str, default: tuple[Quota, ...]) -> Plans:
    """A plans file (TOML, see the module's docstring); ValueError naming ``source``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(data) - {"plans", "callers", "requests"}
    if unknown:
        raise ValueError(
            f"{source}: unknown table(s) {sorted(unknown)}; "
            "use [plans], [callers], [requests.<plan>]"
        )
    plans: dict[str, tuple[Quota, ...]] = {}
    for name, spec in dict(data.get("plans", {})).items():
        if not _PLAN_NAME.fullmatch(name) or name == DEFAULT_PLAN:
            raise ValueError(f"{source}: {name!r} is not a plan name (letters, digits, _.-)")
        if not isinstance(spec, str):
            raise ValueError(f"{source}: plan {name!r} must be a string like '*=500/month'")
        plans[name] = parse_quotas(spec, f"{source} plan {name!r}")
    callers: dict[str, str] = {}
    for caller, plan in dict(data.get("callers", {})).items():
        if not isinstance(plan, str) or plan not in plans:
            raise ValueError(f"{source}: caller {caller!r} names no plan of [plans]")
        callers[caller] = plan
    requests: dict[str, RequestPolicy] = {}
    if not isinstance(data.get("requests", {}), dict):
        raise ValueError(f"{source}: requests must be tables: [requests.<plan>]")
    for plan, table in data.get("requests", {}).items():
        if plan != DEFAULT_PLAN and plan not in plans:
            raise ValueError(
                f"{source}: [requests.{plan}] names no plan of [plans] (nor {DEFAULT_PLAN!r})"
            )
        requests[plan] = parse_request_policy(table, f"{source} [requests.{plan}]")
    return Plans(default=default, plans=plans, callers=callers, requests=requests)
