"""A bridged socket's upstream side: where it goes, what of the client's handshake travels,
the handshake itself, and a failed one as the client's refusal.

The rules are pure: the URL (the gateway, or ``wss://fal.run`` for realtime when
``FAL_PROXY_REALTIME_DIRECT`` is on), the query without a client ``fal_jwt_token``, the
sub-protocols that may go up (no credential) and the one the client is accepted with.
:func:`open_upstream` then opens the socket with the proxy's key, never following a
redirect; it fails with :class:`UpstreamRefused` (the upstream's own status and body, a
non-standard status made standard by :func:`client_status`, two headers kept by
:func:`refusal_headers`) or :class:`~proxy.errors.UpstreamUnavailable` (502), both answered
by :func:`refuse`.
"""

from __future__ import annotations

import http
import re
from collections.abc import Awaitable, Iterable
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from starlette.types import Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from ..config.settings import Settings
from ..errors import ProxyError, UpstreamUnavailable
from ..policy.headers import CLIENT_PROXY_ID, InjectedHeaders
from ..upstream.breaker import Breaker, gateway_failed
from ..upstream.route import via_breaker
from .pump import Session

CREDENTIAL_SUBPROTOCOLS = ("fal-api-key.", "cf-aig-authorization.", "proxy-authorization.")
CALLER_SUBPROTOCOL = "proxy-authorization."
DIRECT_FAL = "wss://fal.run"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: what a sub-protocol may be
_T = _TOKEN.pattern
# RFC 9110 media type: type/subtype, then ;name=value parameters (a token, or a quoted string
# of printable ASCII without quoted-pairs): nothing that could end the header or the line.
_MEDIA_TYPE = re.compile(rf'{_T}/{_T}(?:[ \t]*;[ \t]*{_T}=(?:{_T}|"[ !#-\[\]-~]*"))*')
# RFC 9110 Retry-After: delay-seconds, or an IMF-fixdate.
_RETRY_AFTER = re.compile(r"[0-9]{1,9}|[A-Z][a-z]{2}, [0-9]{2} [A-Z][a-z]{2} [0-9]{4} "
                          r"[0-9]{2}:[0-9]{2}:[0-9]{2} GMT")  # fmt: skip
_MAX_CONTENT_TYPE = 200


class NotConnected(UpstreamUnavailable):
    """No connection was made (refused, DNS, TLS): the handshake provably never left."""


class UpstreamRefused(ProxyError):
    """The upstream answered the handshake with an HTTP status (a redirect included): relayed
    to the client with its status, body, type and ``Retry-After``
    (:func:`refusal_headers`); a status the client's server cannot send
    (:func:`client_status`) becomes a standard one with the proxy's JSON body naming it."""

    reason = "upstream_refused"

    def __init__(self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> None:
        headers = list(headers)
        # What the upstream said, for the breaker: was it fal's answer, or the gateway's page?
        self.upstream_status = status
        self.upstream_headers = {
            n.lower(): v for n, v in headers if n.lower() == "x-fal-request-id"
        }
        relayed = client_status(status)
        kept = refusal_headers(headers)
        if relayed == status:
            super().__init__("the upstream refused the handshake", f"HTTP {status}")
            self.upstream_body: bytes | None = body
            self.kept = kept
        else:
            detail = f"the upstream answered HTTP {status}, not a standard status"
            super().__init__("the upstream refused the handshake", detail)
            self.upstream_body = None  # the proxy's JSON, which says what the upstream said
            self.kept = [(n, v) for n, v in kept if n != b"content-type"]
        self.status = relayed

    def body(self) -> bytes:
        return super().body() if self.upstream_body is None else self.upstream_body

    def headers(self, body: bytes) -> list[tuple[bytes, bytes]]:
        if self.upstream_body is None:
            return [*super().headers(body), *self.kept]
        kept = dict(self.kept)
        out = [(b"content-type", kept[b"content-type"])] if b"content-type" in kept else []
        out.append((b"content-length", str(len(body)).encode()))
        if b"retry-after" in kept:
            out.append((b"retry-after", kept[b"retry-after"]))
        return out


def client_status(status: int) -> int:
    """The status an upstream refusal reaches the client with. Pure.

    The upstream's own when it is a standard final status (2xx to 5xx). Any other cannot be
    sent at all by uvicorn's WebSocket implementation (it calls ``http.HTTPStatus(status)``:
    a ValueError, then a 500 and a traceback), and means little to a client: Cloudflare's
    520-527 and 530 (its origin failed), or anything else outside 4xx, become 502, a bad
    gateway, which clients treat as worth a retry later. An unknown 4xx becomes 400: the
    upstream still blamed the request. Except 499 ("client closed request", nginx's code):
    the client that closed was the proxy, as the upstream saw it; the real client did
    nothing wrong and may well succeed if it retries, so 502 too (400 would tell it not to
    retry the same request).
    """
    try:
        standard = http.HTTPStatus(status)
    except ValueError:
        return 400 if 400 <= status < 500 and status != 499 else 502
    return status if 200 <= standard < 600 else 502


def refusal_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """The upstream refusal's headers that reach the client: ``content-type`` (a single,
    well-formed media type) and ``Retry-After`` (delay-seconds or an HTTP date), at most
    one each, as lowercase byte pairs. Pure.

    An allowlist, not :func:`proxy.policy.headers.downstream_response_headers`' denylist: that one
    passes ``Location``, which would hand the client the gateway's own path (account and
    gateway id) and invite it to follow a redirect the proxy refuses to, and every other
    header a refusal carries (``www-authenticate``, ``cf-ray``, …), none of which is any use
    to a socket that never opened.
    """
    found: dict[str, list[str]] = {}
    for name, value in headers:
        if name.lower() in ("content-type", "retry-after"):
            found.setdefault(name.lower(), []).append(value.strip(" \t"))
    out: list[tuple[bytes, bytes]] = []
    types = found.get("content-type", [])
    if len(types) == 1 and len(types[0]) <= _MAX_CONTENT_TYPE and _MEDIA_TYPE.fullmatch(types[0]):
        out.append((b"content-type", types[0].encode("ascii")))
    if len(delays := found.get("retry-after", [])) == 1 and _RETRY_AFTER.fullmatch(delays[0]):
        out.append((b"retry-after", delays[0].encode("ascii")))
    return out


class _connect_without_redirects(connect):
    """websockets' ``connect`` that never follows a redirect on the upstream handshake.

    It would follow up to 10, with the fal key on a same-origin ``Location`` (outside the
    gateway's ``/fal`` too) and ``cf-aig-authorization`` even cross-origin. A 3xx is
    relayed to the client like any other refusal.
    """

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


async def open_upstream(
    path: str, query: str, offered: list[str], *,
    gateway_ws: str, injected: InjectedHeaders, settings: Settings, metadata: str | None = None,
    bypass: bool = False, trace: list[tuple[str, str]] | None = None,
) -> ClientConnection:  # fmt: skip
    """The upstream socket for ``path`` and ``query``, the proxy's credentials in its handshake
    and only the client's non-credential sub-protocols offered.

    Raises UpstreamRefused (any HTTP answer but 101) or UpstreamUnavailable (unreachable,
    timed out, a broken handshake).
    """
    url, direct = upstream_ws_url(
        gateway_ws, path, query, realtime_direct=settings.realtime_direct, bypass=bypass,
        fal_origin=settings.gateway.fal_origin,
    )  # fmt: skip
    headers = [("x-fal-client-proxy", CLIENT_PROXY_ID)]
    if injected.authorization is not None:  # None: the gateway adds its stored key
        headers.append(("authorization", injected.authorization))
    if not direct:  # the gateway's own headers go to the gateway only
        if injected.cf_aig_authorization is not None:
            headers.append(("cf-aig-authorization", injected.cf_aig_authorization))
        headers.extend(injected.controls)
        if metadata is not None:
            headers.append(("cf-aig-metadata", metadata))
    if trace:  # (tracing on) W3C trace context; cf-aig-otel-* to the gateway only
        headers += [(n, v) for n, v in trace if not (direct and n.startswith("cf-aig-"))]
    passable = upstream_subprotocols(offered)
    # A test CA for a local TLS gateway (FAL_PROXY_TEST_GATEWAY_CA_FILE); fal's own is public.
    context = None if direct else settings.gateway.gateway_tls()
    tls: dict[str, Any] = (
        {"ssl": context} if context is not None and url.startswith("wss://") else {}
    )
    try:
        return await _connect_without_redirects(
            url,
            additional_headers=headers,
            subprotocols=[Subprotocol(p) for p in passable] or None,
            max_size=settings.ws_max_bytes,
            open_timeout=settings.connect_timeout,
            proxy=None,
            ping_interval=20,
            ping_timeout=20,
            compression=None,
            user_agent_header=CLIENT_PROXY_ID,
            **tls,
        )
    except InvalidStatus as exc:
        response = exc.response
        raise UpstreamRefused(
            response.status_code, bytes(response.body or b""), response.headers.raw_items()
        ) from None
    except OSError as exc:  # no connection (refused, DNS, TLS): the handshake never left
        raise NotConnected("the gateway could not be reached", type(exc).__name__) from None
    except (TimeoutError, InvalidHandshake) as exc:
        raise UpstreamUnavailable("the gateway could not be reached", type(exc).__name__) from None


async def refuse(scope: Scope, send: Send, exc: ProxyError) -> None:
    """Refuse the upgrade with ``exc``'s status and JSON body where the server allows it (ASGI's
    ``websocket.http.response``), else close before accepting (the server answers 403)."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = exc.body()
        start = {"type": "websocket.http.response.start", "status": exc.status,
                 "headers": exc.headers(body)}  # fmt: skip
        await send(start)
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008 if exc.status < 500 else 1011})


def is_credential_subprotocol(protocol: str) -> bool:
    """Sub-protocols that carry a credential, in any letter case (tokens are case-insensitive)."""
    return protocol.lower().startswith(CREDENTIAL_SUBPROTOCOLS)


def caller_from_subprotocols(offered: list[str]) -> str | None:
    """A browser's caller credential, sent as the sub-protocol ``proxy-authorization.<token>``."""
    return next(
        (p[len(CALLER_SUBPROTOCOL) :] for p in offered if p.lower().startswith(CALLER_SUBPROTOCOL)),
        None,
    )


def upstream_ws_url(
    gateway_ws: str,
    path: str,
    query: str,
    *,
    realtime_direct: bool,
    bypass: bool = False,
    fal_origin: str | None = None,
) -> tuple[str, bool]:
    """Where a bridged socket goes: ``(url, straight_to_fal)``. Pure.

    ``…/realtime`` paths go straight to ``wss://fal.run`` when ``FAL_PROXY_REALTIME_DIRECT``
    is on (the gateway documents only fal's HTTP-over-WebSocket protocol), and every path
    when the breaker says so (``bypass``); everything else goes to the gateway's WebSocket
    URL. ``fal_origin`` (tests only) stands in for fal as ``<origin>/fal.run``.
    """
    direct = bypass or (realtime_direct and path.endswith("/realtime"))
    fal = DIRECT_FAL if fal_origin is None else "ws" + fal_origin[4:] + "/fal.run"
    return (fal if direct else gateway_ws) + path + (f"?{query}" if query else ""), direct


def gateway_ws_url(gateway_url: str) -> str:
    """``https://gateway…/fal`` → ``wss://gateway…/fal``; ``http://…`` → ``ws://…`` (any case)."""
    parts = urlsplit(gateway_url)
    scheme = "wss" if parts.scheme.lower() == "https" else "ws"
    return f"{scheme}://{parts.netloc}{parts.path}"


def without_token(query: str) -> str:
    """Drop every client ``fal_jwt_token`` (any case, any percent-encoding of the name): the
    proxy's key authenticates the upstream socket. The rest goes on byte for byte."""
    if not query:
        return query
    kept = [
        part
        for part in query.split("&")
        if unquote_plus(part.partition("=")[0]).strip().lower() != "fal_jwt_token"
    ]
    return "&".join(kept)


def upstream_subprotocols(offered: list[str]) -> list[str]:
    """The client's offers that may travel upstream: well-formed tokens (websockets refuses
    to send an empty or non-token one) that carry no credential."""
    return [p for p in offered if _TOKEN.fullmatch(p) and not is_credential_subprotocol(p)]


def client_subprotocol(offered: list[str], upstream_choice: str | None) -> str | None:
    """The sub-protocol to accept the client with: always one of its own offers (Chrome aborts
    the handshake otherwise). The upstream's choice, else the first that went upstream, else
    (only credential ones were offered) the first well-formed one, which echoes its own value.
    """
    if upstream_choice in offered:
        return upstream_choice
    return next(iter(upstream_subprotocols(offered) or [p for p in offered if _TOKEN.fullmatch(p)]),
                None)  # fmt: skip


async def open_routed(
    path: str, query: str, offered: list[str], session: Session, *, gateway_ws: str,
    injected: InjectedHeaders, settings: Settings, breaker: Breaker | None,
) -> ClientConnection:  # fmt: skip
    """The upstream socket the breaker's way (``FAL_PROXY_FALLBACK=direct``), as the
    forwarder's requests: a handshake whose connection failed goes straight to fal."""
    # A realtime socket that goes straight to fal anyway (FAL_PROXY_REALTIME_DIRECT) says
    # nothing of the gateway: it neither asks the breaker nor reports to it.
    if settings.realtime_direct and path.endswith("/realtime"):
        breaker = None

    def open_socket(bypass: bool) -> Awaitable[ClientConnection]:
        if bypass:
            session.via = "direct"
        return open_upstream(
            path, query, offered, gateway_ws=gateway_ws, injected=injected,
            settings=settings, metadata=session.metadata, bypass=bypass,
            trace=session.trace_headers,
        )  # fmt: skip

    def judge_error(exc: BaseException) -> tuple[bool | None, bool]:
        if isinstance(exc, UpstreamRefused):  # the gateway answered: did it fail?
            return not gateway_failed(exc.upstream_status, exc.upstream_headers), False
        if isinstance(exc, NotConnected):  # never reached it: straight to fal instead
            return False, True
        return None, False

    return await via_breaker(
        breaker, lambda: open_socket(False), lambda: open_socket(True),
        judge=lambda _upstream: True, judge_error=judge_error,
    )  # fmt: skip
