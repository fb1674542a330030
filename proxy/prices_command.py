"""``fal-gateway-proxy prices``: write a ``FAL_PROXY_PRICES_FILE`` from fal's pricing API.

Run by an operator, by hand or on a schedule, never by the proxy and never on a request's
path. It calls fal's platform API, ``https://api.fal.ai/v1`` (``--base-url`` points it at
the emulator: ``http://HOST:PORT/_fal/api.fal.ai``), with the fal key of the environment
(``FAL_KEY_FILE``, ``FAL_KEY``, or ``FAL_KEY_ID`` and ``FAL_KEY_SECRET``) as
``Authorization: Key …``:

* ``GET /v1/models?limit=…&cursor=…``: every endpoint id, page by page (``next_cursor``,
  ``has_more``), when ``--apps`` is absent or holds a glob;
* ``GET /v1/models/pricing?endpoint_id=…`` (repeated, at most 50 a call, paged likewise):
  ``{"prices": [{"endpoint_id", "unit_price", "unit", "currency"}]}``.

A price in another currency than USD is left out with a warning (the file is in US dollars).
Any failure (no key, 401, unreachable, an answer not of that shape) is one line on stderr
naming the URL and what to check, exit status 2; the key is never printed.

May import: config, limits, policy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx

from .config.envvars import SettingsError, read_secret_file
from .limits.prices import PATTERN, parse_prices
from .policy.allowed_apps import endpoint_prefixes

DEFAULT_BASE_URL = "https://api.fal.ai"
BATCH = 50  # endpoint ids per pricing call: fal's documented maximum
PAGE = 50  # models per listing call
MAX_PAGES = 10_000  # a cursor that never ends is an error, not a hang
TIMEOUT = 30.0
PROG = "fal-gateway-proxy"


class Failure(Exception):
    """One line for stderr: what failed and what to check."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", "-o", default=None, metavar="FILE", help="write here (default: stdout)"
    )
    parser.add_argument(
        "--apps",
        default=None,
        metavar="LIST",
        help="only these endpoint ids or patterns, comma-separated (fal-ai/flux/*,fal-ai/veo3); "
        "default: every model fal lists",
    )
    parser.add_argument(
        "--base-url",
        default=DEFAULT_BASE_URL,
        help=f"fal's platform API (default {DEFAULT_BASE_URL}; the emulator: "
        "http://HOST:PORT/_fal/api.fal.ai)",
    )


def run(args: argparse.Namespace, environ: Mapping[str, str], err: TextIO = sys.stderr) -> int:
    """The command: 0 when the file is written, 2 (one line on stderr) otherwise."""
    try:
        key = _fal_key(environ)
        patterns = _patterns(args.apps)
        base = _base_url(args.base_url)
        with httpx.Client(
            timeout=TIMEOUT,
            follow_redirects=False,
            headers={"authorization": f"Key {key}", "accept": "application/json"},
        ) as client:
            api = _Api(client, base)
            ids = api.endpoint_ids(patterns)
            prices = api.prices(ids)
        text = render(prices, base, ids, err)
        parse_prices(text, "the written file")  # what the proxy will read: checked here
        _write(text, args.output)
    except (Failure, SettingsError) as exc:
        print(f"{PROG} prices: error: {exc}", file=err)
        return 2
    return 0


def _fal_key(env: Mapping[str, str]) -> str:
    def get(name: str) -> str:
        return (env.get(name) or "").strip()

    if get("FAL_KEY_FILE"):
        return read_secret_file("FAL_KEY_FILE", get("FAL_KEY_FILE"))
    key = get("FAL_KEY") or (
        f"{get('FAL_KEY_ID')}:{get('FAL_KEY_SECRET')}"
        if get("FAL_KEY_ID") and get("FAL_KEY_SECRET")
        else ""
    )
    if not key:
        raise Failure(
            "no fal key: set FAL_KEY or FAL_KEY_FILE (fal's pricing API needs your account's key)"
        )
    if not key.isascii() or not key.isprintable():
        raise Failure("FAL_KEY holds characters that cannot go in an HTTP header")
    return key


def _patterns(apps: str | None) -> tuple[str, ...]:
    """``--apps`` as patterns (empty: every app)."""
    items = tuple(item.strip() for item in (apps or "").split(",") if item.strip())
    for item in items:
        if not PATTERN.fullmatch(item):
            raise Failure(f"--apps: {item!r} is not an endpoint id or pattern like fal-ai/flux/*")
    return items


def _base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise Failure(f"--base-url: {url!r} is not a URL like {DEFAULT_BASE_URL}")
    return url.rstrip("/")


class _Api:
    """fal's platform API, one GET at a time."""

    def __init__(self, client: httpx.Client, base: str) -> None:
        self.client, self.base = client, base

    def get(self, path: str, params: list[tuple[str, str]]) -> dict[str, Any]:
        url = f"{self.base}{path}"
        try:
            response = self.client.get(url, params=tuple(params))
        except httpx.HTTPError as exc:
            raise Failure(
                f"cannot reach {url} ({type(exc).__name__}): check --base-url and the network"
            ) from None
        if response.status_code in (401, 403):
            raise Failure(
                f"{url} answered {response.status_code}: check FAL_KEY (a key of your fal "
                "account, allowed to read its pricing)"
            )
        if response.status_code != 200:
            raise Failure(f"{url} answered {response.status_code}: check --base-url and --apps")
        try:
            data = json.loads(response.content, parse_float=Decimal)
        except ValueError:
            raise Failure(f"{url} did not answer JSON: check --base-url") from None
        if not isinstance(data, dict):
            raise Failure(f"{url} did not answer a JSON object: check --base-url")
        return data

    def pages(self, path: str, key: str, params: list[tuple[str, str]]) -> Iterator[Any]:
        """Every item of ``key`` over the pages of ``path`` (``next_cursor``, ``has_more``)."""
        cursor: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            data = self.get(path, [*params, *([("cursor", cursor)] if cursor else [])])
            items, cursor = data.get(key), data.get("next_cursor")
            if not isinstance(items, list) or not (cursor is None or isinstance(cursor, str)):
                raise Failure(
                    f"{self.base}{path} answered without a list {key!r} or with a bad "
                    "next_cursor: check --base-url"
                )
            yield from items
            if not data.get("has_more") or not cursor:
                return
            if cursor in seen:
                raise Failure(f"{self.base}{path} repeated the cursor {cursor!r}")
            seen.add(cursor)
        raise Failure(f"{self.base}{path} kept paging past {MAX_PAGES} pages")

    def endpoint_ids(self, patterns: tuple[str, ...]) -> list[str]:
        """The ids to price: ``--apps`` itself when it names plain ids, else every listed
        model's id that a pattern matches (as a quota would: a prefix, any letter case)."""
        if patterns and not any(_is_glob(p) for p in patterns):
            return list(dict.fromkeys(patterns))
        ids: list[str] = []
        for model in self.pages("/v1/models", "models", [("limit", str(PAGE))]):
            endpoint_id = model.get("endpoint_id") if isinstance(model, dict) else None
            if not isinstance(endpoint_id, str):
                raise Failure(f"{self.base}/v1/models listed a model without an endpoint_id")
            if not patterns or any(_matches(endpoint_id, p) for p in patterns):
                ids.append(endpoint_id)
        return list(dict.fromkeys(ids))

    def prices(self, ids: list[str]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for start in range(0, len(ids), BATCH):
            batch = [("endpoint_id", i) for i in ids[start : start + BATCH]]
            for item in self.pages("/v1/models/pricing", "prices", batch):
                if not isinstance(item, dict):
                    raise Failure(f"{self.base}/v1/models/pricing listed a non-object price")
                found.append(item)
        return found


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _matches(endpoint_id: str, pattern: str) -> bool:
    pattern = pattern.lower()
    return any(fnmatchcase(c, pattern) for c in endpoint_prefixes(endpoint_id.lower()))


def render(prices: list[dict[str, Any]], base: str, ids: list[str], err: TextIO) -> str:
    """The TOML file: a header, then one ``"id" = price  # per unit`` line per USD price.
    Prices that cannot go in (another currency, no number, an odd id) are warned about."""
    lines: list[str] = []
    priced: set[str] = set()
    refused: set[str] = set()
    for item in prices:
        endpoint_id, price = item.get("endpoint_id"), item.get("unit_price")
        unit, currency = item.get("unit"), item.get("currency")
        if not isinstance(endpoint_id, str) or not PATTERN.fullmatch(endpoint_id):
            print(f"warning: left out a price for {endpoint_id!r}: not an endpoint id", file=err)
            continue
        if endpoint_id.lower() in priced:
            continue
        if currency != "USD":
            refused.add(endpoint_id.lower())
            print(f"warning: left out {endpoint_id}: priced in {currency!r}, not USD", file=err)
            continue
        if isinstance(price, int) and not isinstance(price, bool):
            price = Decimal(price)
        if not isinstance(price, Decimal) or not price.is_finite() or price < 0:
            refused.add(endpoint_id.lower())
            print(f"warning: left out {endpoint_id}: unit_price {price!r} is not a price", file=err)
            continue
        priced.add(endpoint_id.lower())
        per = f"  # unit: {_comment(unit)}" if isinstance(unit, str) and unit else ""
        lines.append(f"{json.dumps(endpoint_id)} = {_toml_number(price)}{per}")
    for endpoint_id in ids:
        if endpoint_id.lower() not in priced | refused:
            print(f"warning: fal gave no USD price for {endpoint_id}", file=err)
    host = urlsplit(base).netloc
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    header = [
        "# FAL_PROXY_PRICES_FILE: US dollars per billable unit (x-fal-billable-units), by",
        '# endpoint id; the most specific pattern wins (docs/prices.md). Add "*" = <price>',
        "# to price every other app; an app with no price is counted in units only.",
        f"# Written by `{PROG} prices` at {now} from {host}:",
        f"# {base}/v1/models/pricing, the prices fal quotes the key's account.",
        "# The comment after each price is fal's billing unit for that app.",
        "",
        "[prices]",
    ]
    return "\n".join([*header, *sorted(lines)]) + "\n"


def _comment(text: str) -> str:
    """fal's unit name, safe on one comment line."""
    return "".join(c if c.isprintable() else "?" for c in text)[:60]


def _toml_number(price: Decimal) -> str:
    """Plain decimal text that TOML reads as the same number: ``0.025``, ``100``, never
    ``2.5E-2``."""
    return format(price.normalize(), "f")


def _write(text: str, output: str | None) -> None:
    if output is None:
        sys.stdout.write(text)
        return
    target = Path(output)
    tmp: str | None = None
    try:  # whole or not at all: a proxy reading the file never sees half of it
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, target)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise Failure(f"--output: cannot write {output}: {exc.strerror or exc}") from None
