"""Admission: may this request go upstream at all? Every check before the first byte leaves.

The order is cheapest and least revealing first: sizes → origin → caller → (target
resolution, in the forwarder) → app → rate limits. Each refusal is a
:class:`~proxy.errors.ProxyError` with its own reason tag, answered as JSON and logged on
the request's canonical line. The policies themselves are pure functions in
:mod:`proxy.origins`, :mod:`proxy.callers`, :mod:`proxy.allowed_apps` and
:mod:`proxy.client_ip`; this module only reads the request's headers once and applies them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.types import Scope

from .allowed_apps import AppPolicy
from .callers import CallerAuth, JwtAuth, NoAuth, TokenAuth
from .client_ip import client_ip, limit_key
from .errors import HeadersTooLarge, MisdirectedRequest, URITooLong
from .limits import Limiter, LimitSettings, create_limiter
from .origins import (
    OriginPolicy,
    check_browser_request,
    check_origin,
    cors_headers,
    preflight_headers,
)
from .request_head import host_allowed
from .settings import Settings
from .targets import Target, starts_generation


@dataclass
class RequestHeaders:
    """The request headers admission and forwarding look at, read in one pass."""

    target: str | None = None
    content_length: bytes | None = None
    origin: str | None = None
    host: str | None = None
    credential: str | None = None
    preflight_method: str | None = None
    referer: str | None = None
    fetch_site: str | None = None
    forwarded_for: list[str] = field(default_factory=list)
    size: int = 0

    @classmethod
    def read(cls, raw: list[tuple[bytes, bytes]], auth_header: bytes) -> RequestHeaders:
        out = cls()
        size = 0
        for name, value in raw:
            size += len(name) + len(value) + 4
            if name == b"x-fal-target-url":
                if out.target is None:  # the first one counts, as in fal's proxy
                    out.target = value.decode("latin-1")
            elif name == b"content-length":
                out.content_length = value
            elif name == b"origin":
                out.origin = value.decode("latin-1")
            elif name == b"host":
                out.host = value.decode("latin-1")
            elif name == auth_header:
                out.credential = value.decode("latin-1")
            elif name == b"access-control-request-method":
                out.preflight_method = value.decode("latin-1")
            elif name == b"x-forwarded-for":
                out.forwarded_for.append(value.decode("latin-1"))
            elif name == b"sec-fetch-site":
                out.fetch_site = value.decode("latin-1")
            elif name == b"referer":
                out.referer = value.decode("latin-1")
        out.size = size
        return out


class Admission:
    def __init__(self, settings: Settings) -> None:
        access = settings.access
        self.access = access
        self.origins = OriginPolicy.build(
            list(access.allowed_origins), list(access.cors_extra_headers), access.auth_header
        )
        self.auth_header = access.auth_header.encode()
        self.auth: CallerAuth
        if access.auth == "token":
            self.auth = TokenAuth(list(access.tokens), access.auth_header)
        elif access.auth == "jwt":
            assert access.jwt is not None
            self.auth = JwtAuth(access.jwt, access.auth_header)
        else:
            self.auth = NoAuth()
        self.apps = AppPolicy(access.allowed_apps)
        self.limiter: Limiter = create_limiter(
            LimitSettings(
                requests_per_minute=access.requests_per_minute,
                concurrent=access.concurrent,
                submits_per_hour=access.submits_per_hour,
                redis_url=access.redis_url,
                redis_failure=access.redis_failure,
            )
        )

    def check_sizes(self, scope: Scope, headers: RequestHeaders) -> None:
        url = len(scope.get("raw_path") or b"") + len(scope["query_string"])
        if url > self.access.max_url_bytes:
            raise URITooLong("URL too long", f"{url} bytes; at most {self.access.max_url_bytes}")
        if headers.size > self.access.max_header_bytes:
            raise HeadersTooLarge(
                "request headers too large",
                f"{headers.size} bytes; at most {self.access.max_header_bytes}",
            )

    def check_host(self, headers: RequestHeaders) -> None:
        """``FAL_PROXY_ALLOWED_HOSTS``: 421 for a Host the proxy does not answer to."""
        if not host_allowed(headers.host, self.access.allowed_hosts):
            raise MisdirectedRequest(
                "host not served here", "the Host header is not in FAL_PROXY_ALLOWED_HOSTS"
            )

    def cors_origin(self, headers: RequestHeaders) -> str | None:
        """The origin to answer with CORS headers, None if none needed; raises Forbidden
        for a browser request from a page that is neither same-origin nor listed."""
        return check_browser_request(
            headers.origin, headers.referer, headers.fetch_site, headers.host, self.origins
        )

    def preflight(self, headers: RequestHeaders) -> list[tuple[bytes, bytes]]:
        origin = check_origin(headers.origin, headers.host, self.origins)
        return preflight_headers(origin or headers.origin or "", self.origins)

    @staticmethod
    def cors(origin: str | None) -> list[tuple[bytes, bytes]]:
        return cors_headers(origin) if origin else []

    async def caller(self, headers: RequestHeaders) -> str | None:
        return await self.auth.authenticate(headers.credential)

    def client(self, scope: Scope, headers: RequestHeaders) -> str:
        peer = scope.get("client")
        return client_ip(
            peer[0] if peer else None, headers.forwarded_for, self.access.trusted_proxies
        )

    @staticmethod
    def limit_key(caller: str | None, client: str) -> str:
        """Whose limits a request counts against: its caller, else its client address."""
        return caller if caller is not None else f"ip:{limit_key(client)}"

    def check_app(self, target: Target) -> str | None:
        """Raise Forbidden for an app not allowed; else the pattern that allowed it."""
        return self.apps.check(target)

    def check_token_body(self, body: bytes) -> bytes:
        """The token request body to forward (re-serialised), or raise."""
        return self.apps.check_token(body, self.access.token_max_expiration)

    @staticmethod
    def starts_generation(method: str, target: Target) -> bool:
        return starts_generation(method, target)
