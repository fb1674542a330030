"""Gateway-native settings: who holds fal's key, what the gateway's logs are told, and what
happens when the gateway is down (``CF_AIG_BYOK_ALIAS``, ``FAL_PROXY_UNIFIED_BILLING``,
``FAL_PROXY_METADATA_*``, ``FAL_PROXY_FALLBACK*``).

Three credential modes (docs/gateway-modes.md):

* ``key`` (the default): the proxy holds the fal key and sends ``Authorization: Key …``;
* ``byok``: the gateway holds it ("Store Keys"): the proxy sends no ``Authorization``, only
  ``cf-aig-authorization`` and ``cf-aig-byok-alias``;
* ``unified``: nobody holds one: the gateway pays fal from its credits (Unified Billing).

Outside Unified Billing every call carries ``cf-aig-no-wholesale: true``, so the gateway never
falls back to Cloudflare-paid credentials without being asked.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from .envvars import (
    Doc,
    Secret,
    SettingsError,
    _check_header_safe,
    _flag,
    _get,
    _read_secret_file,
    choice,
    declared,
    flag,
    read_fields,
    seconds,
    whole,
)

# Cloudflare's alias names: we keep to what a header and a Secrets Store name both take.
_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def credential_mode(env: Mapping[str, str]) -> str:
    """``key``, ``byok`` or ``unified``, from the two variables that choose it."""
    if _get(env, "CF_AIG_BYOK_ALIAS"):
        return "byok"
    if _flag(env, "FAL_PROXY_UNIFIED_BILLING", False):
        return "unified"
    return "key"


@dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    """Each field declares its variable once (see envvars)."""

    byok_alias: str | None = declared(
        lambda env, _: _alias(env),
        Doc(
            "CF_AIG_BYOK_ALIAS",
            "",
            "the gateway holds the fal key (Store Keys) under this alias: the proxy then holds "
            "none (FAL_KEY refused) and needs CF_AIG_TOKEN",
        ),
        default=None,
    )
    unified_billing: bool = flag(
        "FAL_PROXY_UNIFIED_BILLING",
        False,
        "let the gateway pay fal from its credits (Unified Billing): no fal key anywhere; "
        "else every call says cf-aig-no-wholesale: true",
    )
    metadata_caller: str = choice(
        "FAL_PROXY_METADATA_CALLER",
        "hash",
        ("hash", "raw", "off"),
        "the caller in cf-aig-metadata: a keyed hash, the caller id itself, or left out",
    )
    metadata_hash_key: Secret | None = declared(
        lambda env, _: _hash_key(env),
        Doc(
            "FAL_PROXY_METADATA_HASH_KEY / FAL_PROXY_METADATA_HASH_KEY_FILE",
            "(from the gateway token, else the fal key)",
            "the key of that hash (16+ characters): set it to keep callers' hashes stable "
            "across key rotations and deployments",
        ),
        default=None,
        secret=True,
    )
    fallback: str = choice(
        "FAL_PROXY_FALLBACK",
        "off",
        ("off", "direct"),
        "direct: when the gateway itself fails, go straight to fal for a while (key mode only)",
    )
    fallback_failures: int = whole(
        "FAL_PROXY_FALLBACK_FAILURES",
        5,
        "consecutive gateway failures that open the breaker",
        low=1,
        high=1000,
    )
    fallback_window: float = seconds(
        "FAL_PROXY_FALLBACK_WINDOW",
        30.0,
        "seconds those failures must fall within",
    )
    fallback_seconds: float = seconds(
        "FAL_PROXY_FALLBACK_SECONDS",
        30.0,
        "seconds calls go straight to fal before one call probes the gateway again",
    )
    fal_origin: str | None = declared(
        lambda env, _: _fal_origin(env),
        Doc(
            "FAL_PROXY_TEST_FAL_ORIGIN",
            "",
            "tests only: a loopback http origin playing fal's hosts for the direct path "
            "(<origin>/<host>/<path>)",
        ),
        default=None,
    )

    gateway_ca_file: str | None = declared(
        lambda env, _: _ca_file(env),
        Doc(
            "FAL_PROXY_TEST_GATEWAY_CA_FILE",
            "",
            "tests and benchmarks only: a CA (PEM) the gateway's TLS certificate is checked "
            "against, e.g. a local fake gateway's",
        ),
        default=None,
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GatewaySettings:
        return cls(**read_fields(cls, env))

    def gateway_tls(self) -> ssl.SSLContext | None:
        """The TLS context for the gateway when a test CA is set (else the default one)."""
        return _context(self.gateway_ca_file) if self.gateway_ca_file is not None else None

    @property
    def mode(self) -> str:
        if self.byok_alias is not None:
            return "byok"
        return "unified" if self.unified_billing else "key"

    def controls(self) -> tuple[tuple[str, str], ...]:
        """The gateway headers every upstream call carries for the credential mode."""
        out: list[tuple[str, str]] = []
        if self.byok_alias is not None:
            out.append(("cf-aig-byok-alias", self.byok_alias))
        if not self.unified_billing:
            out.append(("cf-aig-no-wholesale", "true"))
        return tuple(out)

    def __repr__(self) -> str:  # the hash key stays out
        return (
            f"GatewaySettings(mode={self.mode!r}, byok_alias={self.byok_alias!r}, "
            f"metadata_caller={self.metadata_caller!r}, fallback={self.fallback!r})"
        )


def _alias(env: Mapping[str, str]) -> str | None:
    alias = _get(env, "CF_AIG_BYOK_ALIAS")
    if alias is not None and not _ALIAS.fullmatch(alias):
        raise SettingsError(
            "CF_AIG_BYOK_ALIAS must be 1-64 letters, digits, '-' or '_' (the stored key's alias)"
        )
    return alias


def _hash_key(env: Mapping[str, str]) -> Secret | None:
    name = "FAL_PROXY_METADATA_HASH_KEY"
    value: str | None
    if _get(env, f"{name}_FILE"):
        name += "_FILE"
        value = _read_secret_file(env, name)
    else:
        value = _get(env, name)
        if value is None:
            return None
    _check_header_safe(name, value)
    if len(value) < 16:
        raise SettingsError(f"{name} must be at least 16 characters")
    return Secret(value)


def _fal_origin(env: Mapping[str, str]) -> str | None:
    origin = _get(env, "FAL_PROXY_TEST_FAL_ORIGIN")
    if origin is None:
        return None
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 - raises ValueError on a bad port
        acceptable = (
            parts.scheme == "http" and ipaddress.ip_address(parts.hostname or "").is_loopback
            and not (parts.query or parts.fragment or parts.username or parts.password)
        )  # fmt: skip
    except ValueError:
        acceptable = False
    if not acceptable:
        raise SettingsError(
            "FAL_PROXY_TEST_FAL_ORIGIN is for tests only: an http origin on loopback, "
            "e.g. http://127.0.0.1:9000/_fal"
        )
    return origin.rstrip("/")


def _ca_file(env: Mapping[str, str]) -> str | None:
    path = _get(env, "FAL_PROXY_TEST_GATEWAY_CA_FILE")
    if path is not None:
        try:
            _context(path)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(
                f"FAL_PROXY_TEST_GATEWAY_CA_FILE: cannot load {path}: "
                f"{getattr(exc, 'strerror', None) or exc}"
            ) from None
    return path


@functools.lru_cache(maxsize=4)
def _context(ca_file: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


def check_modes(gateway: GatewaySettings, *, token: bool, realtime_direct: bool) -> None:
    """The combinations start-up refuses (``token``: CF_AIG_TOKEN is set)."""
    mode = gateway.mode
    if mode == "key":
        return
    name = "CF_AIG_BYOK_ALIAS" if mode == "byok" else "FAL_PROXY_UNIFIED_BILLING"
    if not token:
        raise SettingsError(
            f"CF_AIG_TOKEN is required with {name}: only an authenticated gateway uses its "
            "stored keys or credits"
        )
    if realtime_direct:
        raise SettingsError(
            f"FAL_PROXY_REALTIME_DIRECT needs a fal key held by the proxy, not {name}"
        )
    if gateway.fallback != "off":
        raise SettingsError(
            f"FAL_PROXY_FALLBACK=direct needs a fal key held by the proxy, not {name}"
        )
