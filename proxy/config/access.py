"""Access settings: origins, callers, apps, limits, sizes, client addresses.

Read from the environment with the same rules as :mod:`proxy.config.settings` (every problem
names its variable). Safe by default: no cross-origin page may call the proxy, limits
are on, sizes are bounded; only caller authentication and the app list are open by
default, and the CLI warns about both at start-up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from pathlib import Path
from urllib.parse import urlsplit

from ..limits.prices import Prices, read_prices
from ..limits.quotas import Plans, parse_plans, parse_quotas
from ..policy.callers import JwtConfig, hs256_secret_error, load_tokens
from ..policy.client_ip import Network, parse_networks
from ..policy.origins import normalise_origin
from ..policy.request_head import normalise_host_pattern
from .envvars import (
    Doc,
    SettingsError,
    _get,
    _read_secret_file,
    choice,
    declared,
    flag,
    read_fields,
    whole,
)

_AUTH_HEADER = "x-proxy-authorization"
_USAGE_ROUTE = "/api/fal/usage"
_REALTIME_TOKEN_ROUTE = "/api/fal/realtime-token"
_HEADER_NAME = "abcdefghijklmnopqrstuvwxyz0123456789-_!#$%&'*+.^`|~"


@dataclass(frozen=True, kw_only=True)
class AccessSettings:
    """Who may call, what, how often. Each field declares its variable once (see envvars)."""

    allowed_origins: tuple[str, ...] = declared(
        lambda env, _: _origins(env),
        Doc(
            "FAL_PROXY_ALLOWED_ORIGINS",
            "",
            "exact origins (comma-separated) whose pages may call the proxy cross-origin",
        ),
        default=(),
    )
    cors_extra_headers: tuple[str, ...] = declared(
        lambda env, _: tuple(h.lower() for h in _list(env, "FAL_PROXY_CORS_EXTRA_HEADERS")),
        Doc(
            "FAL_PROXY_CORS_EXTRA_HEADERS",
            "",
            "request headers to allow in preflights besides the fal SDK's",
        ),
        default=(),
    )
    auth: str = choice(  # none | token | jwt
        "FAL_PROXY_AUTH",
        "none",
        ("none", "token", "jwt"),
        "how callers prove who they are: none, token or jwt",
    )
    auth_header: str = declared(
        lambda env, _: _auth_header(env),
        Doc("FAL_PROXY_AUTH_HEADER", _AUTH_HEADER, "header carrying the caller's credential"),
        default=_AUTH_HEADER,
    )
    # (sha256 digest, caller), read only with auth=token
    tokens: tuple[tuple[bytes, str], ...] = declared(
        lambda env, got: _tokens(env) if got["auth"] == "token" else (),
        Doc(
            "FAL_PROXY_CLIENT_TOKENS_FILE",
            "",
            "with auth=token: file of '<caller-id> <token>' lines",
        ),
        default=(),
        secret=True,
    )
    # Where the tokens came from: re-read when it changes (proxy.app.config_reload).
    tokens_file: str | None = declared(
        lambda env, got: _get(env, "FAL_PROXY_CLIENT_TOKENS_FILE") if got["tokens"] else None,
        default=None,
    )
    jwt: JwtConfig | None = declared(
        lambda env, got: _jwt(env) if got["auth"] == "jwt" else None,
        Doc(
            "FAL_PROXY_JWT_SECRET, FAL_PROXY_JWT_SECRET_FILE",
            "",
            "with auth=jwt: HS256 secret (32+ characters)",
        ),
        Doc("FAL_PROXY_JWT_JWKS_FILE", "", "with auth=jwt: JWKS file of RS256/ES256 public keys"),
        Doc(
            "FAL_PROXY_JWT_JWKS_URL",
            "",
            "with auth=jwt: JWKS URL (https; http only on loopback); "
            "keys cached 5 min, an unknown kid re-fetches (at most every 10 s)",
        ),
        Doc("FAL_PROXY_JWT_ISSUER", "", "with auth=jwt: required iss"),
        Doc("FAL_PROXY_JWT_AUDIENCE", "", "with auth=jwt: required aud"),
        Doc("FAL_PROXY_JWT_CALLER_CLAIM", "sub", "with auth=jwt: claim naming the caller"),
        Doc(
            "FAL_PROXY_JWT_PLAN_CLAIM",
            "",
            "with auth=jwt: claim naming the caller's plan (FAL_PROXY_PLANS_FILE)",
        ),
        default=None,
        secret=True,
    )
    allowed_apps: tuple[str, ...] = declared(  # empty = every app
        lambda env, _: tuple(_list(env, "FAL_PROXY_ALLOWED_APPS")),
        Doc(
            "FAL_PROXY_ALLOWED_APPS",
            "(all)",
            "glob patterns of fal endpoint ids, e.g. fal-ai/flux/*",
        ),
        default=(),
    )
    queue_owner_check: bool = flag(
        "FAL_PROXY_QUEUE_OWNER_CHECK",
        True,
        "with auth=token or jwt: a queue request's status, result and cancel are refused (403) "
        "to any caller but the one who submitted it (false: any caller holding its id)",
    )
    token_max_expiration: int = whole(
        "FAL_PROXY_TOKEN_MAX_EXPIRATION",
        300,
        "longest token_expiration a realtime token request may ask",
        low=1,
        high=86400,
    )
    requests_per_minute: int = whole(
        "FAL_PROXY_RATE_LIMIT_RPM", 600, "requests per minute per caller (0 = no limit)", low=0
    )
    concurrent: int = whole(
        "FAL_PROXY_MAX_CONCURRENT",
        32,
        "in-flight requests and streams per caller (0 = no limit)",
        low=0,
    )
    submits_per_hour: int = whole(
        "FAL_PROXY_SUBMITS_PER_HOUR",
        1000,
        "calls that can start a generation (runs, queue submits, streams, realtime tokens, "
        "sockets) per hour per caller (0 = no limit)",
        low=0,
    )
    plans: Plans = declared(
        lambda env, _: _plans(env),
        Doc(
            "FAL_PROXY_QUOTAS",
            "(none)",
            "generations per period for callers without a plan, e.g. "
            "fal-ai/flux/*=50/day,*=500/month (periods: hour, day, week, month; UTC)",
        ),
        Doc(
            "FAL_PROXY_PLANS_FILE",
            "",
            'TOML file of named plans ([plans] free = "*=50/day") and callers\' plans '
            '([callers] "user-1" = "pro")',
        ),
        default=Plans(),
    )
    # Where the plans came from: re-read when it changes (proxy.app.config_reload).
    plans_file: str | None = declared(
        lambda env, _: _get(env, "FAL_PROXY_PLANS_FILE"), default=None
    )
    prices: Prices = declared(
        lambda env, _: _prices(env),
        Doc(
            "FAL_PROXY_PRICES_FILE",
            "",
            "TOML file of US dollars per billable unit by endpoint pattern ([prices] "
            '"fal-ai/flux/dev" = 0.025, "*" = 0.01; most specific wins; written by '
            "fal-gateway-proxy prices); an app with no price is counted in units only",
        ),
        default=Prices(),
    )
    # Where the prices came from: re-read when it changes (proxy.app.config_reload).
    prices_file: str | None = declared(
        lambda env, _: _get(env, "FAL_PROXY_PRICES_FILE"), default=None
    )
    usage_route: str = declared(
        lambda env, _: _usage_route(env),
        Doc(
            "FAL_PROXY_USAGE_ROUTE",
            _USAGE_ROUTE,
            "path where a caller reads their own quotas and usage (GET)",
        ),
        default=_USAGE_ROUTE,
    )
    realtime_token_route: str = declared(
        lambda env, _: _route(env, "FAL_PROXY_REALTIME_TOKEN_ROUTE", _REALTIME_TOKEN_ROUTE),
        Doc(
            "FAL_PROXY_REALTIME_TOKEN_ROUTE",
            _REALTIME_TOKEN_ROUTE,
            "path where a page gets a realtime token for the JS SDK's tokenProvider (POST "
            '{"app": "<endpoint id>"} → {"token", "expires_in"})',
        ),
        default=_REALTIME_TOKEN_ROUTE,
    )
    redis_url: str | None = declared(  # may hold a password
        lambda env, _: _redis_url(env),
        Doc("FAL_PROXY_REDIS_URL", "", "share the limits across replicas in Redis (redis://...)"),
        default=None,
        secret=True,
    )
    redis_failure: str = choice(
        "FAL_PROXY_REDIS_FAILURE",
        "closed",
        ("closed", "open"),
        "when Redis fails: closed (refuse, 503) or open (serve)",
    )
    max_header_bytes: int = whole(
        "FAL_PROXY_MAX_HEADER_BYTES",
        32 * 1024,
        "largest request header block (431 above)",
        low=1024,
    )
    max_url_bytes: int = whole(
        "FAL_PROXY_MAX_URL_BYTES", 16 * 1024, "longest path + query (414 above)", low=256
    )
    trusted_proxies: tuple[Network, ...] = declared(
        lambda env, _: _trusted(env),
        Doc(
            "FAL_PROXY_TRUSTED_PROXIES",
            "",
            "addresses/CIDRs whose X-Forwarded-For is believed",
        ),
        default=(),
    )
    allowed_hosts: tuple[str, ...] = declared(  # Host names the proxy answers to; empty = any
        lambda env, _: _hosts(env),
        Doc(
            "FAL_PROXY_ALLOWED_HOSTS",
            "(any)",
            "Host names the proxy answers to (421 otherwise), e.g. proxy.example.com,*.internal",
        ),
        default=(),
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AccessSettings:
        return cls(**read_fields(cls, env))


def _plans(env: Mapping[str, str]) -> Plans:
    try:
        default = parse_quotas(_get(env, "FAL_PROXY_QUOTAS") or "", "FAL_PROXY_QUOTAS")
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    name = "FAL_PROXY_PLANS_FILE"
    file = _get(env, name)
    if file is None:
        return Plans(default=default)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{name}: cannot read {file}: {exc}") from None
    try:
        return parse_plans(text, name, default)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def _prices(env: Mapping[str, str]) -> Prices:
    file = _get(env, "FAL_PROXY_PRICES_FILE")
    if file is None:
        return Prices()
    try:
        return read_prices(file)
    except ValueError as exc:  # it names FAL_PROXY_PRICES_FILE
        raise SettingsError(str(exc)) from None


def _usage_route(env: Mapping[str, str]) -> str:
    return _route(env, "FAL_PROXY_USAGE_ROUTE", _USAGE_ROUTE)


def _route(env: Mapping[str, str], name: str, default: str) -> str:
    route = _get(env, name) or default
    if not route.startswith("/") or any(c in route for c in "?# \t"):
        raise SettingsError(f"{name} must be a path like {default}")
    return route.rstrip("/") or "/"


def _auth_header(env: Mapping[str, str]) -> str:
    header = (_get(env, "FAL_PROXY_AUTH_HEADER") or _AUTH_HEADER).lower()
    if not all(c in _HEADER_NAME for c in header) or header in (
        "authorization",
        "cookie",
        "host",
    ):
        raise SettingsError(
            "FAL_PROXY_AUTH_HEADER must be a header name other than authorization/cookie/host"
        )
    return header


def _list(env: Mapping[str, str], name: str) -> list[str]:
    return [item.strip() for item in (_get(env, name) or "").split(",") if item.strip()]


def _normalised(
    env: Mapping[str, str], name: str, normalise: Callable[[str], str], example: str
) -> tuple[str, ...]:
    """A comma-separated list, each item normalised; a bad one names the variable and itself."""
    out = []
    for item in _list(env, name):
        try:
            out.append(normalise(item))
        except ValueError:
            raise SettingsError(f"{name}: {item!r} is not {example}") from None
    return tuple(out)


def _origins(env: Mapping[str, str]) -> tuple[str, ...]:
    return _normalised(
        env, "FAL_PROXY_ALLOWED_ORIGINS", normalise_origin, "an origin like https://app.example.com"
    )


def _tokens(env: Mapping[str, str]) -> tuple[tuple[bytes, str], ...]:
    name = "FAL_PROXY_CLIENT_TOKENS_FILE"
    if not _get(env, name):
        raise SettingsError(f"{name} is not set (needed with FAL_PROXY_AUTH=token)")
    path = Path(env[name].strip())
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        return tuple(load_tokens(text, name))
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def _jwt(env: Mapping[str, str]) -> JwtConfig:
    secret = (
        _read_secret_file(env, "FAL_PROXY_JWT_SECRET_FILE")
        if _get(env, "FAL_PROXY_JWT_SECRET_FILE")
        else _get(env, "FAL_PROXY_JWT_SECRET")
    )
    jwks_file, jwks_url = _get(env, "FAL_PROXY_JWT_JWKS_FILE"), _get(env, "FAL_PROXY_JWT_JWKS_URL")
    if sum(x is not None for x in (secret, jwks_file, jwks_url)) != 1:
        raise SettingsError(
            "FAL_PROXY_AUTH=jwt needs exactly one of FAL_PROXY_JWT_SECRET(_FILE), "
            "FAL_PROXY_JWT_JWKS_FILE, FAL_PROXY_JWT_JWKS_URL"
        )
    if secret is not None and len(secret) < 32:
        raise SettingsError("FAL_PROXY_JWT_SECRET must be at least 32 characters")
    if secret is not None and (why := hs256_secret_error(secret)) is not None:
        # Else every caller's token would be refused with this, one 401 at a time.
        name = "FAL_PROXY_JWT_SECRET" + ("_FILE" if _get(env, "FAL_PROXY_JWT_SECRET_FILE") else "")
        raise SettingsError(f"{name}: not usable as an HS256 secret: {why}")
    if jwks_file is not None:
        import jwt

        try:
            jwt.PyJWKSet.from_json(Path(jwks_file).read_text(encoding="utf-8"))
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            raise SettingsError(
                f"FAL_PROXY_JWT_JWKS_FILE: cannot load a JWKS from {jwks_file}: {exc}"
            ) from None
    if jwks_url is not None and "@" in urlsplit(jwks_url).netloc:
        # A JWKS is public: a user or password here could only end up in an error message.
        raise SettingsError("FAL_PROXY_JWT_JWKS_URL must not hold a user or password (user@)")
    if jwks_url is not None and not _https_or_loopback_http(jwks_url):
        raise SettingsError("FAL_PROXY_JWT_JWKS_URL must be https (http only on loopback)")
    return JwtConfig(
        secret=secret,
        jwks_file=jwks_file,
        jwks_url=jwks_url,
        issuer=_get(env, "FAL_PROXY_JWT_ISSUER"),
        audience=_get(env, "FAL_PROXY_JWT_AUDIENCE"),
        caller_claim=_get(env, "FAL_PROXY_JWT_CALLER_CLAIM") or "sub",
        plan_claim=_get(env, "FAL_PROXY_JWT_PLAN_CLAIM"),
    )


def _https_or_loopback_http(url: str) -> bool:
    """``https://<host>…``, or ``http://`` whose host is exactly ``localhost``, an address in
    127.0.0.0/8 or ``::1``, with no user info (``http://127.0.0.1@evil.example/`` and
    ``http://localhost.evil.example/`` only start like loopback)."""
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port: ValueError unless a port number
    except ValueError:
        return False
    if not host:
        return False
    if parts.scheme == "https":
        return True
    if parts.scheme != "http" or "@" in parts.netloc:
        return False
    if host == "localhost":
        return True
    try:
        address = ip_address(host)
    except ValueError:
        return False
    return address in ip_network("127.0.0.0/8") or address == ip_address("::1")


def _redis_url(env: Mapping[str, str]) -> str | None:
    url = _get(env, "FAL_PROXY_REDIS_URL")
    if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError("FAL_PROXY_REDIS_URL must start with redis://, rediss:// or unix://")
    return url


def _hosts(env: Mapping[str, str]) -> tuple[str, ...]:
    return _normalised(
        env,
        "FAL_PROXY_ALLOWED_HOSTS",
        normalise_host_pattern,
        "a host name like proxy.example.com or *.example.com",
    )


def _trusted(env: Mapping[str, str]) -> tuple[Network, ...]:
    try:
        return parse_networks(_list(env, "FAL_PROXY_TRUSTED_PROXIES"))
    except ValueError as exc:
        raise SettingsError(f"FAL_PROXY_TRUSTED_PROXIES: {exc}") from None
