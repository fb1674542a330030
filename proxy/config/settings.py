"""Settings: read once from the environment, validated, frozen.

Every problem raises :class:`SettingsError` whose message names the variable, so
the CLI can print one line and exit 2. Secrets are wrapped in :class:`Secret`,
whose ``repr``/``str`` never show the value.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..policy.headers import InjectedHeaders
from .access import AccessSettings
from .envvars import (
    Doc,
    Secret,
    SettingsError,
    _check_header_safe,
    _get,
    _int,
    _read_secret_file,
    choice,
    declared,
    declared_factory,
    declared_required,
    documented,
    flag,
    read_fields,
    seconds,
    text,
    whole,
)
from .gateway import GatewaySettings, check_modes, credential_mode
from .python_port import PythonSdkSettings

GATEWAY_HOST = "https://gateway.ai.cloudflare.com"
DEFAULT_ROUTE = "/api/fal/proxy"
ADMIN_TOKEN_MIN = 16  # characters of FAL_PROXY_ADMIN_TOKEN
RESERVED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

_ACCOUNT_ID = re.compile(r"[0-9a-f]{32}")
# Cloudflare gateway names: lower-case letters, digits, hyphens, at most 64 characters.
_GATEWAY_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the proxy needs, valid once built. Build with :meth:`from_env`.

    Each field declares its variable, parser, default and meaning once; ``from_env``,
    ``--help`` and docs/configuration.md are all driven by these declarations.
    """

    fal_key: Secret | None = declared_required(  # None: the gateway holds it, or pays fal
        lambda env, _: _fal_key(env),
        Doc(
            "FAL_KEY",
            "(required)",
            "fal API key, sent upstream as 'Authorization: Key <key>' (not with "
            "CF_AIG_BYOK_ALIAS or FAL_PROXY_UNIFIED_BILLING)",
        ),
        Doc("FAL_KEY_FILE", "", "file holding the fal key (a mounted secret); instead of FAL_KEY"),
        Doc(
            "FAL_KEY_ID, FAL_KEY_SECRET",
            "",
            "key id and secret, sent as 'Key id:secret'; instead of FAL_KEY",
        ),
    )
    fal_key_file: str | None = declared(lambda env, _: _get(env, "FAL_KEY_FILE"), default=None)
    # No trailing slash, e.g. https://gateway.ai.cloudflare.com/v1/a/g/fal
    gateway_url: str = declared_required(
        lambda env, _: _gateway_url(env),
        Doc("CF_ACCOUNT_ID", "(required)", "Cloudflare account id, 32 hex characters"),
        Doc("CF_GATEWAY_ID", "(required)", "AI Gateway name"),
        Doc(
            "FAL_PROXY_GATEWAY_URL",
            "",
            "replaces the whole gateway base URL (then CF_ACCOUNT_ID/CF_GATEWAY_ID are not needed)",
        ),
    )
    cf_aig_token: Secret | None = declared(
        lambda env, _: _optional_secret(env, "CF_AIG_TOKEN"),
        Doc("CF_AIG_TOKEN", "", "gateway token, sent as 'cf-aig-authorization: Bearer <token>'"),
        Doc("CF_AIG_TOKEN_FILE", "", "file holding the gateway token; instead of CF_AIG_TOKEN"),
        default=None,
    )
    cf_aig_token_file: str | None = declared(
        lambda env, _: _get(env, "CF_AIG_TOKEN_FILE"), default=None
    )
    host: str = text("FAL_PROXY_HOST", "127.0.0.1", "address to listen on (--host)")
    # Refused at start-up: FAL_PROXY_AUTH=none on a FAL_PROXY_HOST other than loopback, unless
    # this says it is meant (a network policy, a mesh or an authenticating proxy in front).
    allow_unauthenticated: bool = flag(
        "FAL_PROXY_ALLOW_UNAUTHENTICATED",
        False,
        "true: start with FAL_PROXY_AUTH=none on an address other than loopback (anyone who "
        "reaches it spends your fal credits)",
    )
    port: int = whole(
        "FAL_PROXY_PORT", 8787, "port to listen on, 0 = any free port (--port)", low=0, high=65535
    )
    proxy_route: str = declared(
        lambda env, _: _route(env),
        Doc("FAL_PROXY_ROUTE", DEFAULT_ROUTE, "path of the fal SDK proxyUrl route"),
        default=DEFAULT_ROUTE,
    )
    connect_timeout: float = seconds(
        "FAL_PROXY_CONNECT_TIMEOUT", 10.0, "seconds to open a connection to the gateway"
    )
    first_byte_timeout: float = seconds(
        "FAL_PROXY_FIRST_BYTE_TIMEOUT", 600.0, "seconds to wait for the gateway's response headers"
    )
    idle_timeout: float = seconds(
        "FAL_PROXY_IDLE_TIMEOUT", 300.0, "seconds allowed between two body chunks, either way"
    )
    header_timeout: float = seconds(
        "FAL_PROXY_HEADER_TIMEOUT",
        10.0,
        "seconds a client has to send a whole request head (then 408, closed)",
    )
    max_body_bytes: int = whole(
        "FAL_PROXY_MAX_BODY_BYTES",
        100 * 1024 * 1024,
        "largest request body accepted (413 above)",
        low=0,
    )
    upstream_connections: int = whole(
        "FAL_PROXY_UPSTREAM_CONNECTIONS",
        0,
        "most connections to the gateway at once, 0 = no limit",
        low=0,
    )
    log_format: str = choice(
        "FAL_PROXY_LOG_FORMAT",
        "auto",
        ("auto", "json", "console"),
        "auto (console on a terminal, else JSON), json or console",
    )
    log_level: str = choice(
        "FAL_PROXY_LOG_LEVEL",
        "info",
        ("debug", "info", "warning", "error"),
        "debug, info, warning or error",
    )
    metrics_port: int | None = declared(  # None: /metrics on the main port
        lambda env, _: _int(env, "FAL_PROXY_METRICS_PORT", 0, low=0, high=65535) or None,
        Doc(
            "FAL_PROXY_METRICS_PORT",
            "",
            "serve /metrics and /usage/<caller> on this port (on FAL_PROXY_METRICS_HOST) "
            "instead of /metrics on the main one",
        ),
        default=None,
    )
    # The operator's port answers any caller's plan and usage: loopback unless said otherwise.
    metrics_host: str = declared(
        lambda env, _: _listen_address(env, "FAL_PROXY_METRICS_HOST", "127.0.0.1"),
        Doc(
            "FAL_PROXY_METRICS_HOST",
            "127.0.0.1",
            "address FAL_PROXY_METRICS_PORT listens on (0.0.0.0 or the pod's address for a "
            "scraper in another pod)",
        ),
        default="127.0.0.1",
    )
    # The admin API (docs/admin.md) on the operator's port: only when a token is set.
    admin_token: Secret | None = declared(
        lambda env, _: _admin_token(env),
        Doc(
            "FAL_PROXY_ADMIN_TOKEN",
            "",
            "serve the admin API (list callers' usage and spend, reset, block, unblock) on "
            "FAL_PROXY_METRICS_PORT to requests with 'Authorization: Bearer <token>'; at least "
            f"{ADMIN_TOKEN_MIN} characters",
        ),
        Doc(
            "FAL_PROXY_ADMIN_TOKEN_FILE",
            "",
            "file holding the admin token (re-read when it changes); instead of "
            "FAL_PROXY_ADMIN_TOKEN",
        ),
        default=None,
    )
    admin_token_file: str | None = declared(
        lambda env, _: _get(env, "FAL_PROXY_ADMIN_TOKEN_FILE"), default=None
    )
    workers: int = whole(
        "FAL_PROXY_WORKERS",
        1,
        "processes sharing the port (--workers); share limits with FAL_PROXY_REDIS_URL",
        low=1,
        high=64,
    )
    drain_seconds: float = seconds(
        "FAL_PROXY_DRAIN_SECONDS",
        30.0,
        "on SIGTERM, how long in-flight requests and streams may finish",
    )
    secret_reload_seconds: float = seconds(
        "FAL_PROXY_SECRET_RELOAD_SECONDS",
        10.0,
        "the reload interval: how often the files re-read while running are checked for "
        "changes (FAL_KEY_FILE, CF_AIG_TOKEN_FILE, the tokens, JWKS, plans and prices files); "
        "SIGHUP checks at once",
    )
    ws_max_bytes: int = whole(
        "FAL_PROXY_WS_MAX_BYTES",
        16 * 1024 * 1024,
        "largest WebSocket message, either way",
        low=1024,
    )
    realtime_direct: bool = flag(
        "FAL_PROXY_REALTIME_DIRECT",
        False,
        "send .../realtime sockets straight to wss://fal.run, not via the gateway",
    )
    access: AccessSettings = declared_factory(
        lambda env, _: AccessSettings.from_env(env),
        *documented(AccessSettings),
        factory=AccessSettings,
    )
    gateway: GatewaySettings = declared_factory(
        lambda env, _: GatewaySettings.from_env(env),
        *documented(GatewaySettings),
        factory=GatewaySettings,
    )
    python_sdk: PythonSdkSettings = declared_factory(
        lambda env, _: PythonSdkSettings.from_env(env),
        *documented(PythonSdkSettings),
        factory=PythonSdkSettings,
    )

    def injected_headers(self) -> InjectedHeaders:
        """The headers the proxy adds upstream: the fal key, the gateway token, the gateway
        controls of the credential mode (built again when a key file changes)."""
        return InjectedHeaders.build(
            fal_key=self.fal_key.reveal() if self.fal_key is not None else None,
            cf_aig_token=self.cf_aig_token.reveal() if self.cf_aig_token is not None else None,
            caller_header=self.access.auth_header,
            controls=self.gateway.controls(),
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Validate ``env`` (usually ``os.environ``) and return the settings."""
        settings = cls(**read_fields(cls, env))
        usage = settings.access.usage_route
        if usage == settings.proxy_route or usage in RESERVED_PATHS:
            raise SettingsError(
                "FAL_PROXY_USAGE_ROUTE must differ from FAL_PROXY_ROUTE and /healthz, /readyz, "
                "/metrics"
            )
        token = settings.access.realtime_token_route
        if token in (settings.proxy_route, usage) or token in RESERVED_PATHS:
            raise SettingsError(
                "FAL_PROXY_REALTIME_TOKEN_ROUTE must differ from FAL_PROXY_ROUTE, "
                "FAL_PROXY_USAGE_ROUTE and /healthz, /readyz, /metrics"
            )
        if (
            settings.access.auth == "none"
            and not is_loopback(settings.host)
            and not settings.allow_unauthenticated
        ):
            raise SettingsError(
                f"FAL_PROXY_AUTH=none on FAL_PROXY_HOST={settings.host} (not loopback) lets "
                "anyone who reaches the proxy spend your fal credits: set FAL_PROXY_AUTH=token "
                "or jwt, or FAL_PROXY_ALLOW_UNAUTHENTICATED=true if something in front "
                "authenticates callers"
            )
        if settings.admin_token is not None and settings.metrics_port is None:
            raise SettingsError(
                "FAL_PROXY_ADMIN_TOKEN is set but FAL_PROXY_METRICS_PORT is not: the admin API "
                "is served on the operator's port only; set FAL_PROXY_METRICS_PORT"
            )
        if settings.metrics_port is not None and settings.metrics_port == settings.port:
            raise SettingsError("FAL_PROXY_METRICS_PORT must differ from FAL_PROXY_PORT")
        check_modes(
            settings.gateway,
            token=settings.cf_aig_token is not None,
            realtime_direct=settings.realtime_direct,
        )
        if (
            settings.gateway.fallback == "direct"
            and settings.first_byte_timeout <= settings.connect_timeout
        ):
            # Else the first-byte deadline ends a failing connect first: never counted, never
            # retried directly.
            raise SettingsError(
                "FAL_PROXY_FIRST_BYTE_TIMEOUT must be longer than FAL_PROXY_CONNECT_TIMEOUT "
                "with FAL_PROXY_FALLBACK=direct"
            )
        python_port = settings.python_sdk.port
        if python_port is not None and python_port in (settings.port, settings.metrics_port):
            raise SettingsError(
                "FAL_PROXY_PYTHON_SDK_PORT must differ from FAL_PROXY_PORT and "
                "FAL_PROXY_METRICS_PORT"
            )
        if settings.workers > 1 and settings.metrics_port is not None:
            raise SettingsError(
                "FAL_PROXY_METRICS_PORT works with one worker only (FAL_PROXY_WORKERS=1): "
                "each worker would need the port"
            )
        return settings


# What --help and docs/configuration.md are written from: (variable, default, meaning).
DOCUMENTED_VARIABLES: tuple[Doc, ...] = documented(Settings)


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the port to this machine (or pod)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to anything
        return False


def local_address(listen: str) -> str:
    """The address a client on this machine reaches a server listening on ``listen`` by:
    loopback for an unspecified address (``0.0.0.0``, ``::``, empty), else ``listen``."""
    if not listen:
        return "127.0.0.1"
    try:
        unspecified = ipaddress.ip_address(listen).is_unspecified
    except ValueError:  # localhost, or a name
        return listen
    return ("::1" if ":" in listen else "127.0.0.1") if unspecified else listen


def _listen_address(env: Mapping[str, str], name: str, default: str) -> str:
    """An IP address to bind, or ``localhost``; a name that DNS decides is refused."""
    value = _get(env, name) or default
    if value != "localhost":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise SettingsError(
                f"{name} must be an IP address (e.g. 127.0.0.1, 0.0.0.0, ::) or localhost"
            ) from None
    return value


def _fal_key(env: Mapping[str, str]) -> Secret | None:
    mode = credential_mode(env)
    if mode != "key":
        given = [
            n for n in ("FAL_KEY", "FAL_KEY_FILE", "FAL_KEY_ID", "FAL_KEY_SECRET") if _get(env, n)
        ]
        if given:
            chooser = "CF_AIG_BYOK_ALIAS" if mode == "byok" else "FAL_PROXY_UNIFIED_BILLING"
            raise SettingsError(
                f"{given[0]} must not be set with {chooser}: the gateway supplies fal's "
                "credential, and a key sent as well makes the gateway's answer ambiguous"
            )
        return None
    if _get(env, "FAL_KEY_FILE"):
        return Secret(_read_secret_file(env, "FAL_KEY_FILE"))
    key = _get(env, "FAL_KEY")
    if key:
        _check_header_safe("FAL_KEY", key)
        return Secret(key)
    key_id, key_secret = _get(env, "FAL_KEY_ID"), _get(env, "FAL_KEY_SECRET")
    if key_id and key_secret:
        _check_header_safe("FAL_KEY_ID", key_id)
        _check_header_safe("FAL_KEY_SECRET", key_secret)
        return Secret(f"{key_id}:{key_secret}")
    if key_id or key_secret:
        missing = "FAL_KEY_SECRET" if key_id else "FAL_KEY_ID"
        raise SettingsError(f"{missing} is not set (FAL_KEY_ID and FAL_KEY_SECRET go together)")
    raise SettingsError("no fal key: set FAL_KEY, FAL_KEY_FILE, or FAL_KEY_ID and FAL_KEY_SECRET")


def _admin_token(env: Mapping[str, str]) -> Secret | None:
    token = _optional_secret(env, "FAL_PROXY_ADMIN_TOKEN")
    if token is not None:
        name = "FAL_PROXY_ADMIN_TOKEN_FILE" if _get(env, "FAL_PROXY_ADMIN_TOKEN_FILE") else ""
        check_admin_token(name or "FAL_PROXY_ADMIN_TOKEN", token.reveal())
    return token


def check_admin_token(name: str, value: str) -> str:
    """The admin token, refused if too short to resist guessing (start-up and reload)."""
    if len(value) < ADMIN_TOKEN_MIN:
        raise SettingsError(f"{name} must be at least {ADMIN_TOKEN_MIN} characters")
    return value


def _optional_secret(env: Mapping[str, str], name: str) -> Secret | None:
    if _get(env, f"{name}_FILE"):
        return Secret(_read_secret_file(env, f"{name}_FILE"))
    value = _get(env, name)
    if value is None:
        return None
    _check_header_safe(name, value)
    return Secret(value)


def _gateway_url(env: Mapping[str, str]) -> str:
    override = _get(env, "FAL_PROXY_GATEWAY_URL")
    if override:
        try:
            parts = urlsplit(override)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise SettingsError("FAL_PROXY_GATEWAY_URL is not a valid URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError("FAL_PROXY_GATEWAY_URL must be an absolute http(s) URL")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise SettingsError(
                "FAL_PROXY_GATEWAY_URL must not have a query, fragment or user info"
            )
        return override.rstrip("/")
    account, gateway = _get(env, "CF_ACCOUNT_ID"), _get(env, "CF_GATEWAY_ID")
    if account is None:
        raise SettingsError("CF_ACCOUNT_ID is not set (or set FAL_PROXY_GATEWAY_URL)")
    if not _ACCOUNT_ID.fullmatch(account.lower()):
        raise SettingsError("CF_ACCOUNT_ID must be 32 hexadecimal characters")
    if gateway is None:
        raise SettingsError("CF_GATEWAY_ID is not set (or set FAL_PROXY_GATEWAY_URL)")
    if not _GATEWAY_ID.fullmatch(gateway):
        raise SettingsError("CF_GATEWAY_ID must be 1-64 lower-case letters, digits, '-' or '_'")
    return f"{GATEWAY_HOST}/v1/{account.lower()}/{gateway}/fal"


def _route(env: Mapping[str, str]) -> str:
    route = _get(env, "FAL_PROXY_ROUTE") or DEFAULT_ROUTE
    if not route.startswith("/") or route in RESERVED_PATHS or any(c in route for c in "?# \t"):
        raise SettingsError("FAL_PROXY_ROUTE must be a path like /api/fal/proxy")
    return route.rstrip("/") or "/"
