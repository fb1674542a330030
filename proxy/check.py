"""``fal-gateway-proxy check``: validate the configuration, show it with secrets masked, and
optionally probe the gateway (and Redis) before going live. Exit 0 when all is well."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from .config.envvars import Secret
from .config.settings import Settings
from .limits.prices import Prices
from .limits.quotas import Plans, Quota
from .observe import tracing
from .serve.open_files import planned_open_files

# What an empty list means, per setting: "(none)" read as "nothing allowed" where it is "all".
_EMPTY = {
    "allowed_apps": "all fal apps (FAL_PROXY_ALLOWED_APPS unset)",
    "allowed_hosts": "any Host",
    "allowed_origins": "none besides the proxy's own origin",
    "trusted_proxies": "none",
    "cors_extra_headers": "none",
}
_UNLIMITED_AT_ZERO = (
    "requests_per_minute",
    "concurrent",
    "submits_per_hour",
    "upstream_connections",
)


def _plans(plans: Plans) -> str:
    """``default: fal-ai/flux/*=50/day; free: *=500/month; 2 caller(s) pinned``."""

    def quotas(items: tuple[Quota, ...]) -> str:
        return ", ".join(q.spec() for q in items) or "no quota"

    parts = [f"default: {quotas(plans.default)}"]
    parts += [f"{name}: {quotas(items)}" for name, items in plans.plans.items()]
    if plans.callers:
        parts.append(f"{len(plans.callers)} caller(s) pinned to a plan")
    return "; ".join(parts)


def _shown(name: str, value: Any) -> str:
    if isinstance(value, Secret):
        return "********"
    if value is None:
        return "(not set)"
    if isinstance(value, Plans):
        return _plans(value)
    if isinstance(value, Prices):
        return value.describe()
    if name in _UNLIMITED_AT_ZERO and value == 0:
        return "0 (unlimited)" if name != "upstream_connections" else "0 (no cap)"
    if name == "tokens":
        return f"{len(value)} caller token(s)"
    if name == "jwt" and value is not None:
        mode = "HS256 secret" if value.secret else ("JWKS file" if value.jwks_file else "JWKS URL")
        return (
            f"{mode}, issuer={value.issuer}, audience={value.audience}, "
            f"caller claim={value.caller_claim}"
        )
    if name == "redis_url" and value:
        parts = urlsplit(value)
        if parts.password:  # redis://:password@host
            netloc = f"{parts.username or ''}:********@{parts.hostname}" + (
                f":{parts.port}" if parts.port else ""
            )
            return str(urlunsplit(parts._replace(netloc=netloc)))
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value) or _EMPTY.get(name, "(none)")
    return str(value)


def describe(settings: Settings) -> list[str]:
    """The effective settings, one ``name = value`` line each, secrets masked."""
    lines = []
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if dataclasses.is_dataclass(value):
            lines += [
                f"{field.name}.{f.name} = {_shown(f.name, getattr(value, f.name))}"
                for f in dataclasses.fields(value)
            ]
        else:
            lines.append(f"{field.name} = {_shown(field.name, value)}")
    return lines


def probe(settings: Settings) -> list[tuple[bool, str]]:
    """Ask the gateway (and Redis) whether they answer and accept our credentials."""
    import httpx

    results: list[tuple[bool, str]] = [(True, f"credentials: {describe_mode(settings)}")]
    injected = settings.injected_headers()
    # The status of a request that does not exist: it goes through the gateway's auth and the
    # credential mode to fal, which answers 404 when it accepted the key. Nothing is run.
    headers = {"x-fal-client-proxy": injected.client_proxy, "x-fal-target-url": PROBE_TARGET}
    if injected.authorization is not None:
        headers["authorization"] = injected.authorization
    if injected.cf_aig_authorization:
        headers["cf-aig-authorization"] = injected.cf_aig_authorization
    headers.update(injected.controls)
    try:
        with httpx.Client(trust_env=False, timeout=settings.connect_timeout) as client:
            r = client.get(settings.gateway_url, headers=headers)
        results.append(_probe_verdict(r.status_code, r.content, r.headers))
    except httpx.HTTPError as exc:
        results.append((False, f"gateway: {settings.gateway_url} not reachable "
                               f"({type(exc).__name__}: {exc}): check FAL_PROXY_GATEWAY_URL "
                               "(or CF_ACCOUNT_ID / CF_GATEWAY_ID) and the network"))  # fmt: skip
    if settings.access.redis_url:
        import redis

        try:
            with redis.Redis.from_url(
                settings.access.redis_url, socket_timeout=2, socket_connect_timeout=2
            ) as client:
                client.ping()
            results.append((True, "redis: reachable"))
        except (redis.RedisError, OSError) as exc:
            where = _shown("redis_url", settings.access.redis_url)  # its password masked
            results.append((False, f"redis: {where} not reachable ({type(exc).__name__}): "
                                   "check FAL_PROXY_REDIS_URL"))  # fmt: skip
    return results


PROBE_TARGET = (
    "https://queue.fal.run/fal-ai/fast-sdxl/requests/00000000-0000-4000-8000-000000000000/status"
)


def describe_mode(settings: Settings) -> str:
    """Who holds which credential, in words (docs/gateway-modes.md)."""
    gateway = settings.gateway
    wholesale = (
        "the gateway may fall back to its credits (Unified Billing)"
        if gateway.unified_billing
        else "cf-aig-no-wholesale: true"
    )
    if gateway.byok_alias is not None:
        return f"the gateway's stored fal key {gateway.byok_alias!r} (BYOK); {wholesale}"
    if gateway.unified_billing:
        return "no fal key: the gateway pays fal from its credits (Unified Billing)"
    return f"the proxy's fal key; {wholesale}"


def _probe_verdict(status: int, body: bytes, headers: Mapping[str, str]) -> tuple[bool, str]:
    gateway = any(name.lower().startswith("cf-aig-") for name in headers)
    if status == 404 and gateway:
        return True, "gateway: took the credentials (fal answered 404 for a made-up request)"
    if status == 404:
        return False, (
            "gateway: a 404 without the gateway's cf-aig-* headers: FAL_PROXY_GATEWAY_URL (or "
            "CF_ACCOUNT_ID / CF_GATEWAY_ID) does not lead to an AI Gateway"
        )
    if status == 401 and b"2009" in body:
        return (
            False,
            "gateway: refused cf-aig-authorization (Cloudflare code 2009): check CF_AIG_TOKEN",
        )
    if status in (400, 401, 403):
        text = body[:200].decode("utf-8", "replace")
        return False, f"gateway or fal refused the credentials (HTTP {status}): {text}"
    return False, f"gateway: unexpected answer HTTP {status} to the probe"


def run_check(settings: Settings, with_probe: bool, out: TextIO = sys.stdout) -> int:
    print("configuration: valid", file=out)
    for line in describe(settings):
        print(f"  {line}", file=out)
    # OpenTelemetry: the standard OTEL_* variables, not ours (the URL only: never the headers).
    print(f"  {tracing.describe(os.environ)}", file=out)
    if (limits := planned_open_files()) is not None:  # as start-up will raise it
        prefix = "warn  " if limits.low else "  "
        print(f"{prefix}at start-up, {limits.sentence()}", file=out)
    ok = True
    if (missing := tracing.missing_sdk(os.environ)) is not None:
        ok = False
        print(f"FAIL  {missing}", file=out)
    if with_probe:
        for passed, message in probe(settings):
            ok &= passed
            print(("ok    " if passed else "FAIL  ") + message, file=out)
    return 0 if ok else 1
