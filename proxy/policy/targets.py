"""Target resolution: where does this request go? A pure function, no I/O.

Two request shapes arrive:

* fal SDK ``proxyUrl`` shape: any path, real destination in ``x-fal-target-url``.
* fal.run shape: ``POST /fal-ai/fast-sdxl?x=1`` means ``https://fal.run/fal-ai/fast-sdxl?x=1``.

Both resolve to a :class:`Target`. ``fal.run`` targets go to the gateway in
*path mode* (``<gateway>/fal-ai/fast-sdxl?x=1``); every other allowed fal host
goes in *target mode* (``<gateway>`` with ``x-fal-target-url``), which is how
Cloudflare AI Gateway reaches ``queue.fal.run`` and ``rest.fal.ai`` (and, like them though
the gateway documents only the queue, ``wma.fal.run``'s world-model session calls).

Queries are kept byte for byte (no decoding, no re-encoding), so
``fal_webhook=https%3A%2F%2F...`` reaches fal as the SDK wrote it. A ``fal.run`` or
queue path is the endpoint id, matched raw by allowed apps and quotas, so it must be
written plainly (see :func:`_check_plain_endpoint`); the paths that pass are plain and
are sent as they came.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from ..errors import BadRequest, Forbidden, MethodNotAllowed, NotFound

RUN_HOST = "fal.run"
QUEUE_HOST = "queue.fal.run"
REST_HOST = "rest.fal.ai"
# fal's world-model (WebRTC) sessions: the SDK's ``fal.realtime.open(wma(...))`` negotiates
# here. Only its three calls, each a POST with a small JSON body and no query.
WMA_HOST = "wma.fal.run"
WMA_PATHS = {"/session": "wma_session", "/session/heartbeat": "wma_heartbeat", "/ice": "wma_ice"}
WMA_KINDS = frozenset(WMA_PATHS.values())
# fal's backup domains (its Python client falls back to them when fal.run does not connect):
# the same service, so sent as the primary host, which the gateway surely routes.
BACKUP_HOSTS = {"falrun.com": RUN_HOST, "queue.falrun.com": QUEUE_HOST}
ALLOWED_HOSTS = frozenset({RUN_HOST, QUEUE_HOST, REST_HOST, WMA_HOST, *BACKUP_HOSTS})
# rest.fal.ai is fal's account API: only the calls the JS SDK makes through a proxy.
REST_PATHS = frozenset(
    {"/storage/upload/initiate", "/storage/upload/initiate-multipart", "/tokens/"}
)
MAX_TARGET_LENGTH = 16 * 1024  # Cloudflare's URL limit

# Visible ASCII only: no space, no control character, nothing non-ASCII.
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]*")
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?]*)(.*)", re.DOTALL)
_ENCODED_CONTROL = re.compile(r"%(?:[01][0-9a-fA-F]|7[fF])")
# A URL parser ends a segment at any of these, so "..?x" or "..;x" is a dot segment too.
_SEGMENT_SPLIT = re.compile(r"[/?#;]")


@dataclass(frozen=True, slots=True)
class Target:
    """A resolved, allowed destination."""

    kind: str  # run | stream | queue | storage | token | wma_session | wma_heartbeat | wma_ice
    host: str  # the fal host: fal.run, queue.fal.run, rest.fal.ai or wma.fal.run
    path: str  # raw path on that host, starts with "/"
    query: str  # raw query without "?", may be ""
    upstream_url: str  # the gateway URL the request is sent to
    target_url: str | None  # value of x-fal-target-url upstream (target mode), else None

    @property
    def fal_url(self) -> str:
        return f"https://{self.host}{self.path}" + (f"?{self.query}" if self.query else "")


def resolve_target(
    raw_path: str, query: str, target_header: str | None, *, gateway_url: str, proxy_route: str
) -> Target:
    """Resolve a request to a :class:`Target`, or raise a 4xx :class:`~proxy.errors.ProxyError`.

    ``raw_path`` is the request path as received (percent-encoding intact), ``query`` the
    raw query string, ``target_header`` the first ``x-fal-target-url`` value if any.
    """
    if target_header is not None:
        host, path, query = _parse_target_url(target_header)
    elif raw_path == proxy_route or raw_path == proxy_route + "/":
        raise BadRequest(
            "missing x-fal-target-url header",
            f"{proxy_route} is the fal SDK proxyUrl route: "
            "the SDK names the fal URL in x-fal-target-url",
        )
    elif raw_path.startswith(proxy_route + "/"):
        # Not an app: a socket (browsers cannot send x-fal-target-url), or a dev server's
        # proxy entry that kept the route in front of the path. fal would see "api/fal".
        raise NotFound(
            "not a fal app path",
            f"paths under the SDK route {proxy_route} are not forwarded: the SDK names its "
            "target in x-fal-target-url; open sockets on /<app id>/realtime (a dev server "
            "needs a proxy entry for that path too)",
        )
    elif raw_path in ("", "/"):
        raise NotFound(
            "nothing to forward",
            "send fal.run-shaped requests (POST /fal-ai/fast-sdxl) or use the SDK proxy route",
        )
    else:
        if not _VISIBLE_ASCII.fullmatch(raw_path):
            raise BadRequest("invalid path", "the path has characters not allowed in a URL")
        host, path = RUN_HOST, raw_path
    _check_path(path)
    return _route(host, path, query, gateway_url)


def _parse_target_url(value: str) -> tuple[str, str, str]:
    """Split an x-fal-target-url value into (host, path, query), strictly."""
    if not value:
        raise BadRequest("invalid x-fal-target-url", "the header is empty")
    if len(value) > MAX_TARGET_LENGTH:
        raise BadRequest("invalid x-fal-target-url", f"longer than {MAX_TARGET_LENGTH} characters")
    if not _VISIBLE_ASCII.fullmatch(value):
        raise BadRequest(
            "invalid x-fal-target-url",
            "it has spaces, control or non-ASCII characters; percent-encode them",
        )
    if "\\" in value or "#" in value:
        raise BadRequest("invalid x-fal-target-url", "backslashes and fragments are not allowed")
    match = _ABSOLUTE.fullmatch(value)
    if match is None:
        raise BadRequest(
            "invalid x-fal-target-url", "not an absolute URL like https://fal.run/fal-ai/fast-sdxl"
        )
    scheme, authority, rest = match.groups()
    if scheme.lower() != "https":
        raise Forbidden(
            "target not allowed", f"only https targets are forwarded, not {scheme.lower()}"
        )
    if "@" in authority:
        raise Forbidden("target not allowed", "user info in the target URL is not allowed")
    if not authority:
        raise BadRequest("invalid x-fal-target-url", "the URL has no host")
    if authority.startswith("["):
        raise Forbidden("target not allowed", "IP address targets are not allowed")
    host, colon, port = authority.partition(":")
    host = host.lower()
    if colon and port != "443":
        raise Forbidden("target not allowed", "only the default https port is allowed")
    if host not in ALLOWED_HOSTS:
        raise Forbidden(
            "target not allowed",
            f"host {host or '(empty)'!r} is not a fal host this proxy serves "
            f"({', '.join(sorted(ALLOWED_HOSTS))})",
        )
    path, _, query = rest.partition("?")
    return BACKUP_HOSTS.get(host, host), path or "/", query


def _check_path(path: str) -> None:
    """Refuse paths that could leave the gateway's ``/fal`` prefix or change host.

    The gateway decodes the path before appending it to fal's; a ``..`` that survives
    to it would climb out of ``/fal`` into another provider or gateway, and a ``//`` or
    ``\\`` could be read as a new host. Checked after percent-decoding (up to three
    levels), so ``%2e%2e`` and ``%252e%252e`` are caught too.
    """
    if not path.startswith("/"):
        raise BadRequest("invalid path", "the path must start with '/'")
    decoded = path
    if "%" in path:
        if _ENCODED_CONTROL.search(path):
            raise BadRequest("invalid path", "percent-encoded control characters are not allowed")
        for _ in range(3):
            decoded = unquote(decoded, errors="replace")
            if "%" not in decoded:
                break
        if unquote(decoded, errors="replace") != decoded:
            raise BadRequest("invalid path", "more than three levels of percent-encoding")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
            raise BadRequest("invalid path", "percent-encoded control characters are not allowed")
    if "\\" in decoded or decoded.startswith("//"):
        raise BadRequest(
            "invalid path", "backslashes and a leading '//' are not allowed, encoded or not"
        )
    if "." in decoded:
        for segment in _SEGMENT_SPLIT.split(decoded):
            if segment in (".", ".."):
                raise BadRequest(
                    "invalid path", "dot segments ('.', '..') are not allowed, encoded or not"
                )


def _check_plain_endpoint(path: str) -> None:
    """Refuse a ``fal.run`` or queue path that spells its endpoint id oddly.

    Allowed apps, quotas, metrics and usage all read the endpoint id from the raw path,
    while the gateway normalises it (decodes ``%66lux`` to ``flux`` and ``%2F`` to ``/``,
    merges ``//``) before fal routes it. ``/fal-ai/%66lux/dev`` would run ``fal-ai/flux/dev``
    yet match no ``fal-ai/flux/*`` quota. The fal SDKs write endpoint ids plainly
    (``owner/alias[/path]``, request ids are plain too), so any percent-escape in the path,
    or an empty segment, is refused rather than canonicalised: one spelling, one id.
    A trailing ``/`` (the SDK adds one to URL-shaped ids) is not an empty segment here.
    """
    if "%" in path or "//" in path:
        raise BadRequest(
            "invalid path",
            "the endpoint id must be written plainly, like /fal-ai/flux/dev: "
            "no percent-encoding ('%XX') and no empty path segments ('//') in the path; "
            "send the path as the fal SDK builds it",
        )


def check_method(method: str, target: Target) -> None:
    """``rest.fal.ai`` calls are POSTs (upload initiation, tokens) and a token call has no
    query: anything else would reach fal's account API unchecked. ``wma.fal.run``'s three
    calls are POSTs too."""
    if target.host in (REST_HOST, WMA_HOST) and method != "POST":
        raise MethodNotAllowed(
            f"method {method} not allowed",
            f"{target.path} on {target.host} takes POST only",
            allow="POST",
        )
    if target.kind == "token" and target.query:
        raise BadRequest("invalid token request", "a token request has no query string")


# Queue calls that only read or cancel a request already made (fal-sdk-protocol.md §4):
# status, status stream, result (GET) and cancel (PUT). Every other queue call can start one.
_QUEUE_READ = re.compile(r"/[^?]+/requests/[^/?]+(?:/status(?:/stream)?)?/?")
_QUEUE_CANCEL = re.compile(r"/[^?]+/requests/[^/?]+/cancel/?")


# A queue call about one request: /<app>/requests/<id>[/status[/stream] | /cancel | ...], its
# id a UUID as fal hands them out; and any path segment that may read as "requests".
_QUEUE_REQUEST = re.compile(
    r"/.+?/requests/((?i:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}))(?:/.*)?"
)
_REQUESTS_SEGMENT = re.compile(r"/requests(?:;[^/]*)?(?=/|$)", re.IGNORECASE)


def queue_request_id(target: Target) -> str | None:
    """The fal request id a queue call names (its status, status stream, result, cancel),
    lower-cased, or None for a call that names none.

    Raises BadRequest for a path that could name a request some other way than fal's SDKs
    write it (two ``requests`` segments, one cased or with parameters, an id that is not a
    plain UUID: braces, ``urn:uuid:``, hyphens moved): how fal would read those is fal's
    business, and the caller check must not be got past by them.
    """
    if target.kind != "queue":
        return None
    segments = len(_REQUESTS_SEGMENT.findall(target.path))
    if segments == 0:
        return None
    match = _QUEUE_REQUEST.fullmatch(target.path)
    if segments > 1 or match is None:
        raise BadRequest(
            "invalid queue request path",
            "a call about a queue request names it as /<owner>/<alias>/requests/<request id>, "
            "the id as fal gave it (a UUID); send the path as the fal SDK builds it",
        )
    return match.group(1).lower()


def starts_generation(method: str, target: Target) -> bool:
    """Can this call start a paid generation (and so count against the submit cap)?

    Every call on ``fal.run`` runs the model (a GET too: the SDK's ``method: "get"``), every
    queue call except reading or cancelling an existing request, and every realtime token
    (it lets its holder run the app), and every new world-model session (``wma.fal.run/session``:
    fal bills it; its app is in the body). Storage upload initiation, a session's heartbeat
    and its ICE servers do not.
    """
    if target.kind in ("run", "stream", "token", "wma_session"):
        return True
    if target.kind != "queue":
        return False
    if method in ("GET", "HEAD"):
        return _QUEUE_READ.fullmatch(target.path) is None
    if method == "PUT":
        return _QUEUE_CANCEL.fullmatch(target.path) is None
    return True


def _route(host: str, path: str, query: str, gateway_url: str) -> Target:
    suffix = f"?{query}" if query else ""
    if host in (RUN_HOST, QUEUE_HOST):
        _check_plain_endpoint(path)
    if host == RUN_HOST:
        if path == "/":
            raise Forbidden(
                "target not allowed", "the target names no fal app (https://fal.run/<app>)"
            )
        kind = "stream" if path.endswith("/stream") else "run"
        return Target(kind, host, path, query, f"{gateway_url}{path}{suffix}", None)
    if host == QUEUE_HOST:
        if path == "/":
            raise Forbidden(
                "target not allowed", "the target names no fal app (https://queue.fal.run/<app>)"
            )
        kind = "queue"
    elif host == WMA_HOST:
        kind = _wma_kind(path, query)
    else:
        if path not in REST_PATHS:
            raise Forbidden(
                "target not allowed",
                f"on {REST_HOST} only {', '.join(sorted(REST_PATHS))} are forwarded",
            )
        kind = "token" if path == "/tokens/" else "storage"
    return Target(kind, host, path, query, gateway_url, f"https://{host}{path}{suffix}")


def _wma_kind(path: str, query: str) -> str:
    """The kind of a ``wma.fal.run`` call: one of its three paths, exactly, with no query."""
    kind = WMA_PATHS.get(path)
    if kind is None:
        raise Forbidden(
            "target not allowed",
            f"on {WMA_HOST} only {', '.join(sorted(WMA_PATHS))} are forwarded",
        )
    if query:
        raise Forbidden("target not allowed", f"{WMA_HOST}{path} takes no query string")
    return kind
