"""Origin policy (CORS), pure functions over plain values.

Browsers send ``Origin`` on cross-origin requests, on every POST, and on WebSocket
handshakes. A request whose ``Origin`` is neither the proxy's own nor listed in
``FAL_PROXY_ALLOWED_ORIGINS`` is refused outright (403) before anything goes upstream:
CORS response headers alone would not stop a cross-site page, because a "simple" POST
needs no preflight (the browser sends it and only hides the answer) and browsers apply
no CORS at all to WebSockets. Requests without ``Origin`` (servers, curl, the SDK in
Node) are not browser cross-site requests and pass this check; the caller check
(``FAL_PROXY_AUTH``) is what guards those.

Listed origins get preflights answered with the methods and headers the fal SDK sends,
and responses that expose the headers the SDK reads back. No
``Access-Control-Allow-Credentials``: callers prove who they are with a header, never
with cookies, so a cross-site page can never ride on a user's cookies.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import OriginRefused

METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE"
# What @fal-ai/client sends (fal-sdk-protocol.md §2.3, §3.4), lower-case.
SDK_REQUEST_HEADERS = (
    "content-type",
    "accept",
    "authorization",
    "x-fal-target-url",
    "x-fal-queue-priority",
    "x-fal-runner-hint",
    "x-fal-request-timeout",
    "x-fal-object-lifecycle",
    "x-fal-object-lifecycle-preference",
)
# x-fal-billable-units: what a call cost, for an app to show its user.
EXPOSED_HEADERS = "x-fal-request-id, x-fal-request-timeout-type, x-fal-billable-units"
MAX_AGE = "600"


@dataclass(frozen=True)
class OriginPolicy:
    allowed: frozenset[str]  # exact origins, normalised by normalise_origin
    allow_headers: str  # the Access-Control-Allow-Headers value

    @classmethod
    def build(
        cls, origins: list[str], extra_headers: list[str], auth_header: str | None
    ) -> OriginPolicy:
        names = [*SDK_REQUEST_HEADERS, *([auth_header] if auth_header else []), *extra_headers]
        unique = list(dict.fromkeys(n.lower() for n in names))
        return cls(frozenset(normalise_origin(o) for o in origins), ", ".join(unique))


def normalise_origin(origin: str) -> str:
    """``HTTPS://App.example:443`` → ``https://app.example``; raises ValueError if not an origin."""
    parts = urlsplit(origin.strip())
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username
        or parts.password
    ):
        raise ValueError(origin)
    port = parts.port  # raises ValueError on a bad port
    default = {"http": 80, "https": 443}[parts.scheme]
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


def _host_of(origin: str) -> str:
    """The ``host[:port]`` of a normalised origin, default port dropped."""
    return origin.split("://", 1)[1]


def _strip_default_port(host: str) -> str:
    for suffix in (":80", ":443"):
        if host.endswith(suffix):
            return host[: -len(suffix)]
    return host


def _is_address(host: str) -> bool:
    """Is the ``Host`` header an IP literal or ``localhost`` (names DNS rebinding cannot take)?"""
    name = host.lower()
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def check_origin(origin: str | None, host: str | None, policy: OriginPolicy) -> str | None:
    """Decide on a request's ``Origin``.

    Returns the origin to echo in CORS headers (a listed cross-origin caller), or None
    (no ``Origin``, or the proxy's own origin: no CORS headers needed). Raises
    :class:`Forbidden` for any other origin, ``null`` included.
    """
    if origin is None:
        return None
    try:
        normal = normalise_origin(origin)
    except ValueError:
        raise OriginRefused(
            "origin not allowed",
            "the Origin header is not a web origin (e.g. 'null': a sandboxed page or a file)",
            origin=origin[:200],
        ) from None
    if normal in policy.allowed:
        return normal
    # Same origin: the page was served from the host it is calling. Compared on host and
    # port only, so a TLS-terminating front (browser sees https, proxy sees http) still matches.
    # Only for an IP address or localhost: with a domain name, a DNS-rebinding page
    # (evil.example re-pointed at this proxy) would be "same origin" with itself. Serve
    # the page under a name? List its origin in FAL_PROXY_ALLOWED_ORIGINS.
    if (
        host is not None
        and _is_address(host)
        and _strip_default_port(_host_of(normal)) == _strip_default_port(host.lower())
    ):
        return None
    raise OriginRefused(
        "origin not allowed",
        f"{normal} is not in FAL_PROXY_ALLOWED_ORIGINS: the proxy's operator can add it "
        f"(FAL_PROXY_ALLOWED_ORIGINS={normal}), or serve the page through the proxy's origin",
        origin=normal,
    )


def _referer_origin(referer: str | None) -> str | None:
    """The origin of a ``Referer`` URL, or None (absent, ``about:client``, garbage)."""
    if not referer:
        return None
    try:
        parts = urlsplit(referer.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return None
        return normalise_origin(f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}")
    except ValueError:  # "http://[::1", a bad port, ...: no origin, and so no pass
        return None


def check_browser_request(
    origin: str | None,
    referer: str | None,
    fetch_site: str | None,
    host: str | None,
    policy: OriginPolicy,
) -> str | None:
    """Decide whether a request may have come from a page that is allowed to spend credits.

    Browsers send ``Origin`` on cross-origin fetches, every POST and WebSocket handshakes,
    but not on a GET from ``<img src>``, a ``no-cors`` fetch or a navigation: those carry
    ``Sec-Fetch-Site`` (every current browser) and usually ``Referer``. So without
    ``Origin``:

    * no ``Sec-Fetch-Site`` and no ``Referer``: not a browser (curl, a server-side SDK): pass;
    * ``Sec-Fetch-Site: none``: the user typed the URL or opened a bookmark: pass;
    * otherwise the page's origin, from ``Referer``, must pass :func:`check_origin`, or,
      with no ``Referer`` (a no-referrer policy), ``Sec-Fetch-Site`` must say
      ``same-origin`` and the ``Host`` be an address or a listed origin's host.

    Returns what :func:`check_origin` returns for an ``Origin`` (the origin to echo in CORS
    headers) and None otherwise; raises :class:`Forbidden`.
    """
    if origin is not None:
        return check_origin(origin, host, policy)
    site = fetch_site.strip().lower() if fetch_site is not None else None
    if site is None and referer is None:
        return None
    if site == "none":
        return None
    page = _referer_origin(referer)
    if page is not None:
        check_origin(page, host, policy)
        return None
    if (
        site == "same-origin"
        and host is not None
        and (
            _is_address(host)
            or any(
                _strip_default_port(_host_of(o)) == _strip_default_port(host.lower())
                for o in policy.allowed
            )
        )
    ):
        return None
    raise OriginRefused(
        "cross-site request refused",
        "a browser request from a page that is neither this proxy's "
        "nor in FAL_PROXY_ALLOWED_ORIGINS",
        origin=None,
    )


def cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    """Headers for an actual (non-preflight) response to a listed cross-origin caller."""
    return [
        (b"access-control-allow-origin", origin.encode()),
        (b"access-control-expose-headers", EXPOSED_HEADERS.encode()),
        (b"vary", b"Origin"),
    ]


def preflight_headers(origin: str, policy: OriginPolicy) -> list[tuple[bytes, bytes]]:
    """Headers for a 204 answer to a preflight from a listed origin."""
    return [
        (b"access-control-allow-origin", origin.encode()),
        (b"access-control-allow-methods", METHODS.encode()),
        (b"access-control-allow-headers", policy.allow_headers.encode()),
        (b"access-control-max-age", MAX_AGE.encode()),
        (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
    ]
