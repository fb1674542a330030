"""Header policy, both ways. Pure functions over (name, value) pairs; no I/O.

Request side (client → gateway): forward what fal needs (``content-type``, ``accept``,
``user-agent``, ``accept-encoding``, every ``x-fal-*``, custom submit headers), drop what
must not travel (credentials, cookies, hop-by-hop headers and those named in
``Connection``, client addressing, browser context, the client's ``cf-aig-*``), and set
what the proxy owns (``authorization``, ``cf-aig-authorization``, ``x-fal-client-proxy``,
``x-fal-target-url`` and the gateway's cache/retry controls).

Response side (gateway → client): pass end-to-end headers untouched (including
``content-encoding`` with ``content-length``: the body bytes are not decoded), drop
hop-by-hop headers, ``set-cookie`` and ``alt-svc``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .. import __version__
from .targets import Target

# RFC 9110 §7.6.1 connection-specific headers, plus the legacy ones proxies still see.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Request headers never forwarded, besides HOP_BY_HOP and the prefixes below.
_REQUEST_DROP = HOP_BY_HOP | {
    "host",  # the upstream's own
    "authorization",  # the caller's credential, never fal's: the proxy sets its own
    "cookie",
    "cookie2",
    "expect",  # 100-continue is between the client and this server
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "cf-connecting-ipv6",
    "cf-ipcountry",
    "cf-ray",
    "cf-visitor",
    "cf-worker",
    "cdn-loop",
    "origin",  # browser context: where the user was is none of the upstream's business
    "referer",
    "x-fal-target-url",  # re-set by the proxy from the validated target
    "x-fal-client-proxy",
    "x-proxy-authorization",  # the caller's credential for this proxy
    # Other providers' key headers: with stored keys, the gateway is reported to prefer one
    # sent by the client over the stored key (a caller must not pick the key).
    "x-api-key",
    "api-key",
}
# "cf-" covers every gateway control (cf-aig-*, and the legacy cf-cache-ttl / cf-skip-cache)
# and Cloudflare's client-addressing headers: none of them is the client's to set.
_REQUEST_DROP_PREFIXES = ("x-forwarded-", "sec-", "x-stainless-", "cf-")

# x-proxy-request-id: ours is added below; one from upstream would make two.
_RESPONSE_DROP = HOP_BY_HOP | {"set-cookie", "set-cookie2", "alt-svc", "x-proxy-request-id"}

CLIENT_PROXY_ID = f"fal-gateway-proxy/{__version__}"


class _Masked(str):
    """A header value that is a secret: a plain ``str`` on the wire, masked in ``repr``.

    Tracebacks that show local variables (structlog's rich console, debuggers) print the
    header list; this keeps the key out of them.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "'**********'"


@dataclass(frozen=True, slots=True)
class InjectedHeaders:
    """The headers the proxy adds from its configuration, built once at start-up."""

    authorization: str | None  # None: the gateway holds fal's key (BYOK), or pays fal
    cf_aig_authorization: str | None
    client_proxy: str = CLIENT_PROXY_ID
    caller_header: str = "x-proxy-authorization"  # the caller's credential: never forwarded
    # The credential mode's gateway headers: cf-aig-byok-alias, cf-aig-no-wholesale.
    controls: tuple[tuple[str, str], ...] = ()

    @classmethod
    def build(
        cls, *, fal_key: str | None, cf_aig_token: str | None, caller_header: str,
        controls: tuple[tuple[str, str], ...] = (),
    ) -> InjectedHeaders:  # fmt: skip
        """From the configured secrets (``Settings.injected_headers`` passes them)."""
        return cls(
            authorization=_Masked(f"Key {fal_key}") if fal_key is not None else None,
            cf_aig_authorization=_Masked(f"Bearer {cf_aig_token}")
            if cf_aig_token is not None else None,
            caller_header=caller_header,
            controls=controls,
        )  # fmt: skip

    def __repr__(self) -> str:  # never show the credentials
        return "InjectedHeaders(**********)"


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[str]:
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(
                t.strip().lower() for t in value.decode("latin-1").split(",") if t.strip()
            )
    return frozenset(tokens)


def upstream_request_headers(
    client_headers: Iterable[tuple[bytes, bytes]],
    target: Target,
    injected: InjectedHeaders,
    *,
    method: str,
    request_id: str,
    metadata: str | None = None,
) -> list[tuple[str, str]]:
    """Headers to send to the gateway for a request whose client sent ``client_headers``.

    Values are decoded as UTF-8 (the upstream client encodes them back as UTF-8, so a
    non-ASCII value travels unchanged); a value that is not UTF-8 raises ``UnicodeDecodeError``.
    """
    client_headers = list(client_headers)
    named = _connection_tokens(client_headers)
    out: list[tuple[str, str]] = []
    client_skip_cache = False
    for raw_name, raw_value in client_headers:
        name = raw_name.decode("latin-1").lower()
        # "_" in a name: nginx and others drop these by default, since a hop that maps "_"
        # to "-" (CGI, WSGI) would read cf_aig_authorization as a gateway credential.
        if "_" in name:
            continue
        if (
            name in _REQUEST_DROP
            or name in named
            or name.startswith(_REQUEST_DROP_PREFIXES)
            or name == injected.caller_header
        ):
            # The one gateway control a client may use: opting out of the cache is harmless.
            if name == "cf-aig-skip-cache" and raw_value.strip().lower() == b"true":
                client_skip_cache = True
            continue
        out.append((name, raw_value.decode("utf-8")))

    if injected.authorization is not None:
        out.append(("authorization", injected.authorization))
    if injected.cf_aig_authorization is not None:
        out.append(("cf-aig-authorization", injected.cf_aig_authorization))
    out.extend(injected.controls)
    if metadata is not None:  # the client's own cf-aig-metadata was dropped above
        out.append(("cf-aig-metadata", metadata))
    out.append(("x-fal-client-proxy", injected.client_proxy))
    if target.target_url is not None:
        out.append(("x-fal-target-url", target.target_url))
    out.append(("cf-aig-event-id", request_id))

    # A cached queue answer would hand back an old request_id or freeze a status; a cached
    # token or upload URL would be shared between callers; a cached stream makes no sense.
    if client_skip_cache or target.kind in ("queue", "storage", "token", "stream"):
        out.append(("cf-aig-skip-cache", "true"))
    # A gateway retry could start a second paid generation: even a GET on fal.run runs the
    # model (the SDK's method "get"). The fal SDKs retry by themselves, with backoff.
    out.append(("cf-aig-max-attempts", "1"))
    return out


def downstream_response_headers(
    upstream_headers: Iterable[tuple[bytes, bytes]], *, status: int, request_id: str
) -> list[tuple[bytes, bytes]]:
    """Headers to send to the client for an upstream response with ``upstream_headers``."""
    upstream_headers = list(upstream_headers)
    named = _connection_tokens(upstream_headers)
    # A 204/304 has no body, but may legally announce the length of the body it stands for;
    # the server would then wait for bytes that never come.
    bodiless = status in (204, 304)
    out: list[tuple[bytes, bytes]] = []
    stream = False
    for raw_name, value in upstream_headers:
        name = raw_name.lower()
        text = name.decode("latin-1")
        if text in _RESPONSE_DROP or text in named or (bodiless and text == "content-length"):
            continue
        if text == "content-type" and value.split(b";", 1)[0].strip().lower() == _SSE:
            stream = True
        out.append((name, value))
    if stream:
        out = _live_stream(out)
    out.append((b"x-proxy-request-id", request_id.encode()))
    return out


_SSE = b"text/event-stream"


def _live_stream(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An event stream's headers, so that what sits between the proxy and the browser (a dev
    server's rewrite proxy, nginx) passes each event on as it comes: ``no-transform`` added
    to ``Cache-Control`` (Next.js compresses, and so buffers, a stream without it) and
    ``X-Accel-Buffering: no`` (nginx buffers proxied answers by default)."""
    controls = [v for n, v in headers if n == b"cache-control"]
    directives = {d.strip().lower() for v in controls for d in v.split(b",") if d.strip()}
    rest = [(n, v) for n, v in headers if n not in (b"cache-control", b"x-accel-buffering")]
    merged = b", ".join(d.strip() for v in controls for d in v.split(b",") if d.strip())
    if b"no-cache" not in directives and b"no-store" not in directives:
        merged = b"no-cache, " + merged if merged else b"no-cache"
    if b"no-transform" not in directives:
        merged += b", no-transform"
    return [*rest, (b"cache-control", merged), (b"x-accel-buffering", b"no")]


# W3C Trace Context (https://www.w3.org/TR/trace-context/): the client's, replaced when the
# proxy traces (its own span is then the upstream's parent); passed as sent when it does not.
TRACE_CONTEXT = ("traceparent", "tracestate")


def trace_headers(
    trace_id: int, span_id: int, *, sampled: bool, tracestate: str = "", gateway: bool = True
) -> list[tuple[str, str]]:
    """The headers that make span ``span_id`` of trace ``trace_id`` the upstream's parent: W3C
    ``traceparent`` (and ``tracestate``, carried on), and for the gateway (``gateway``) its
    ``cf-aig-otel-trace-id`` (32 lower hex) and ``cf-aig-otel-parent-span-id`` (16 lower
    hex), so that its spans join the trace: only for a sampled span (one that is exported).
    """
    trace_hex, span_hex = f"{trace_id:032x}", f"{span_id:016x}"
    out = [("traceparent", f"00-{trace_hex}-{span_hex}-{'01' if sampled else '00'}")]
    if tracestate:
        out.append(("tracestate", tracestate))
    if gateway and sampled:
        out += [("cf-aig-otel-trace-id", trace_hex), ("cf-aig-otel-parent-span-id", span_hex)]
    return out


def with_trace(
    headers: Iterable[tuple[str, str]], trace: Iterable[tuple[str, str]]
) -> list[tuple[str, str]]:
    """``headers`` (the policy's, above) with the client's trace context replaced by ``trace``
    (:func:`trace_headers`). The client's ``cf-aig-otel-*`` never got this far ("cf-")."""
    return [(n, v) for n, v in headers if n not in TRACE_CONTEXT] + list(trace)
