"""Prices: what one billable unit of an app costs, in US dollars. Pure (but :func:`read_prices`).

fal reports what a call used as billable units (``x-fal-billable-units``: images, megapixels,
seconds of video, as the app bills). ``FAL_PROXY_PRICES_FILE`` says what a unit costs, so the
proxy can count money as well as units::

    [prices]
    "fal-ai/flux/dev" = 0.025      # USD per billable unit
    "fal-ai/veo3/*" = 0.40
    "*" = 0.01                     # every other app

Grammar: one table, ``[prices]``. Each key is an endpoint-id pattern, in the same characters
and with the same matching as a quota's (:mod:`proxy.limits.quotas`): a glob
(:func:`fnmatch.fnmatchcase`, ``*`` may cross ``/``) that matches an app when it matches the
endpoint id or any shorter prefix of it (``fal-ai/flux/dev`` also prices
``fal-ai/flux/dev/image-to-image``), in any letter case (a spelling must not make a call
free). Each value is a number of dollars, 0 or more and finite (an integer or a TOML float,
read through its decimal text: ``0.025`` is exactly 25/1000). Nothing else is accepted:
another table, a bad pattern, a string, a boolean, a negative or non-finite number, two keys
differing only in letter case; the error names the file and the key.

When several patterns match an app, the **most specific** wins:

1. the pattern with more literal characters (every character but the wildcards ``*``, ``?``
   and a ``[...]`` class) wins;
2. on equal counts, the one with fewer wildcards wins (an exact id beats a glob of the same
   letters);
3. then the pattern's lower-case text, in code-point order: ties are never left to chance.

``*`` has no literal character, so it is always last: the price of every app no other
pattern prices. An app no pattern matches has no price: it is counted in units only.

Money is whole micro-dollars (:data:`MICROS` to the dollar) everywhere: integers add up
without float drift, and a call's cost is rounded **up** to the next micro-dollar, so the
sum of costs is never below what the calls cost.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fnmatch import fnmatchcase
from fractions import Fraction
from pathlib import Path

from ..policy.allowed_apps import endpoint_prefixes
from .money import MICROS

VARIABLE = "FAL_PROXY_PRICES_FILE"
# The characters of a quota's pattern (proxy.limits.quotas._PATTERN): one grammar for both.
PATTERN = re.compile(r"[A-Za-z0-9*?_.\-/\[\]!]+")
_CLASS = re.compile(r"\[[^\]]*\]")  # a [...] character class: one wildcard


def _wildcards(pattern: str) -> tuple[int, int]:
    """(literal characters, wildcards) of ``pattern``: ``fal-ai/flux/*`` → (12, 1)."""
    classes = len(_CLASS.findall(pattern))
    rest = _CLASS.sub("", pattern)
    stars = rest.count("*") + rest.count("?")
    return len(rest) - stars, classes + stars


def _specificity(pattern: str) -> tuple[int, int, str]:
    """A sort key: most specific first (see the module's docstring)."""
    literal, wild = _wildcards(pattern)
    return -literal, wild, pattern.lower()


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


@dataclass(frozen=True)
class Prices:
    """USD per billable unit, by endpoint-id pattern (see the module's docstring).

    ``table`` maps each pattern, as written, to its price; ``source`` is the file it came
    from (shown by ``fal-gateway-proxy check``). Empty: nothing is priced.
    """

    table: Mapping[str, Decimal] = field(default_factory=dict)
    source: str = ""
    # (pattern in lower case, price), most specific first: built once.
    _order: tuple[tuple[str, Decimal], ...] = field(
        init=False, repr=False, compare=False, default=()
    )

    def __post_init__(self) -> None:
        ordered = sorted(self.table.items(), key=lambda item: _specificity(item[0]))
        object.__setattr__(self, "_order", tuple((p.lower(), price) for p, price in ordered))

    def __len__(self) -> int:
        return len(self.table)

    @property
    def enabled(self) -> bool:
        return bool(self.table)

    def pattern_of(self, app: str | None) -> str | None:
        """The pattern (in lower case) whose price applies to ``app``, or None."""
        found = self._match(app)
        return None if found is None else found[0]

    def price_of(self, app: str | None) -> Decimal | None:
        """USD per billable unit of endpoint ``app`` (``fal-ai/flux/dev``, or with a sub-path:
        ``fal-ai/flux/dev/image-to-image``); None when no pattern prices it. A call that names
        no app (``None``) is priced by ``*`` alone, as it counts against ``*`` quotas alone."""
        found = self._match(app)
        return None if found is None else found[1]

    def _match(self, app: str | None) -> tuple[str, Decimal] | None:
        """The most specific (pattern, price) that matches ``app``."""
        candidates = () if app is None else endpoint_prefixes(app.lower())
        for pattern, price in self._order:
            if pattern == "*" or any(fnmatchcase(c, pattern) for c in candidates):
                return pattern, price
        return None

    def cost_micros(self, app: str | None, units: Decimal) -> int | None:
        """What ``units`` billable units of ``app`` cost, in micro-dollars, rounded up to the
        next whole micro-dollar (never below the exact cost); None when ``app`` has no price.

        ``units`` must be finite and 0 or more (ValueError otherwise). Computed exactly (as
        fractions), whatever the number of digits.
        """
        price = self.price_of(app)
        if price is None:
            return None
        if not units.is_finite() or units < 0:
            raise ValueError(f"billable units must be finite and 0 or more, not {units}")
        return math.ceil(Fraction(units) * Fraction(price) * MICROS)

    def covers(self, pattern: str) -> bool:
        """Does every app that the quota pattern ``pattern`` matches have a price?

        True when ``*`` is priced; when a price has the very same pattern (in any case);
        when a price pattern matches a segment prefix that every app of ``pattern`` starts
        with (``fal-ai/veo3`` or ``fal-ai/*`` for ``fal-ai/veo3/*``: the literal segments
        before its first wildcard); or, for a glob, when ``<those segments>/*`` is priced
        (``fal-ai/flux/*`` for ``fal-ai/flux/dev*``). Otherwise False, even where a cleverer
        proof might exist: a quota in dollars must never meet an app it cannot price.
        """
        if not self._order:
            return False
        wanted = pattern.lower()
        if any(p == "*" or p == wanted for p, _ in self._order):
            return True
        glob = _is_glob(wanted)
        if glob:
            head = re.split(r"[*?\[]", wanted, maxsplit=1)[0]
            # Only whole segments: fal-ai/flux* also matches fal-ai/flux-pro.
            head = head.rpartition("/")[0]
        else:
            head = wanted  # a plain id matches itself and the ids under it
        if not head or head != head.strip("/") or "//" in head:
            return False
        candidates = endpoint_prefixes(head)
        # Every app of a glob has a prefix <head>/<something>: <head>/* matches it.
        under = f"{head}/*" if glob else None
        return any(p == under or any(fnmatchcase(c, p) for c in candidates) for p, _ in self._order)

    def describe(self) -> str:
        """``3 patterns from /etc/p.toml (fal-ai/flux/dev $0.025/unit, * $0.01/unit)``."""
        if not self.table:
            return "none: spend is not counted"
        shown = ", ".join(
            f"{p} ${_dollars(self.table[p])}/unit" for p in sorted(self.table, key=_specificity)
        )
        where = f" from {self.source}" if self.source else ""
        count = f"{len(self.table)} pattern{'s' if len(self.table) != 1 else ''}"
        return f"{count}{where} ({shown})"


def _dollars(price: Decimal) -> str:
    """A price as plain decimal text: ``0.025``, never ``2.5E-2``."""
    return format(price, "f")


def parse_prices(text: str, source: str) -> Prices:
    """A prices file (TOML, see the module's docstring); ValueError naming ``source``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message has the line and column
        raise ValueError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(data) - {"prices"}
    if unknown:
        raise ValueError(f"{source}: unknown table(s) or key(s) {sorted(unknown)}; use [prices]")
    table = data.get("prices", {})
    if not isinstance(table, dict):
        raise ValueError(f"{source}: prices must be a table: [prices]")
    prices: dict[str, Decimal] = {}
    seen: dict[str, str] = {}
    for pattern, value in table.items():
        if not PATTERN.fullmatch(pattern):
            raise ValueError(
                f"{source}: {pattern!r} is not an endpoint-id pattern like fal-ai/flux/* "
                "(letters, digits, and _ . - / * ? [ ] !)"
            )
        if pattern.lower() in seen:
            raise ValueError(
                f"{source}: {pattern!r} and {seen[pattern.lower()]!r} differ only in letter case"
            )
        seen[pattern.lower()] = pattern
        prices[pattern] = _price(value, pattern, source)
    return Prices(prices, source)


def _price(value: object, pattern: str, source: str) -> Decimal:
    """A TOML value as dollars: an int or float, finite, 0 or more."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"{source}: {pattern!r}: the price must be a number of US dollars, like 0.025"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{source}: {pattern!r}: the price must be a finite number")
    if value < 0:
        raise ValueError(f"{source}: {pattern!r}: the price must be 0 or more")
    return Decimal(str(value))


def read_prices(path: str) -> Prices:
    """The prices in file ``path``; ValueError naming FAL_PROXY_PRICES_FILE, on one line.

    (The settings turn it into their SettingsError: this layer cannot import them.)
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{VARIABLE}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{VARIABLE}: {path} is not UTF-8 text") from None
    prices = parse_prices(text, f"{VARIABLE} {path}")
    return Prices(prices.table, path)
