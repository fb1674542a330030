"""Rules for a request's head that the HTTP parser leaves to the server. Pure.

httptools (llhttp) parses what it is given: an ``HTTP/0.9`` request line, an absolute-form
target naming another host (uvicorn keeps only its path), an ``HTTP/1.1`` request with no
``Host``, or with two. RFC 9112 §3.2 says to answer each with 400; a proxy holding a key
must, since each is a way to make one component read a request differently from the next.
:func:`head_problem` says what is wrong, :mod:`proxy.serve.protocol` refuses it before the
app (and so anything upstream) sees the request.

:func:`host_allowed` is the ``FAL_PROXY_ALLOWED_HOSTS`` rule (as Starlette's
``TrustedHostMiddleware`` and Django's ``ALLOWED_HOSTS``): exact names, or ``*.domain``
for any sub-domain; the port is ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

SERVED_VERSIONS = ("1.0", "1.1")


def head_problem(
    target: bytes, http_version: str, headers: Iterable[tuple[bytes, bytes]]
) -> str | None:
    """Why this request head must be refused with 400, or None if it is well-formed.

    ``target`` is the request-target as received, ``headers`` the (lower-cased) header pairs.
    """
    if http_version not in SERVED_VERSIONS:
        return f"HTTP/{http_version} is not served: send HTTP/1.1"
    if not target.startswith(b"/"):
        # absolute-form is for forward proxies, authority-form for CONNECT, '*' for OPTIONS *:
        # this server takes only a path, so no second host can hide in the request line.
        return "the request target must be a path starting with '/'"
    headers = list(headers)
    hosts = sum(1 for name, _ in headers if name == b"host")
    if any(name == b"upgrade" for name, _ in headers):
        if http_version == "1.0":
            return "a protocol upgrade (WebSocket) needs HTTP/1.1"  # RFC 6455 §4.1, RFC 9110 §7.8
        if not all(value.isascii() for _, value in headers):
            # uvicorn's WebSocket handshake reader fails on them (a 500 and a traceback), and
            # no WebSocket client sends any.
            return "WebSocket handshake headers must be ASCII"
    if hosts > 1:
        return "more than one Host header"
    if hosts == 0 and http_version == "1.1":
        return "an HTTP/1.1 request needs a Host header"
    return None


def normalise_host_pattern(pattern: str) -> str:
    """``App.Example.com`` → ``app.example.com``; ``*.example.com`` and ``[::1]`` kept.

    Raises ValueError for anything else."""
    value = pattern.strip().lower()
    if value.startswith("[") and value.endswith("]"):  # an IPv6 literal, as Host writes it
        return f"[{ipaddress.IPv6Address(value[1:-1])}]"
    name = value[2:] if value.startswith("*.") else value
    if value != "*" and (not name or "*" in name or any(c in name for c in "/:@[] \t")):
        raise ValueError(pattern)
    return value


def host_name(host: str) -> str:
    """The name part of a ``Host`` value: port dropped, brackets of an IPv6 literal kept."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.split(":", 1)[0]


def host_allowed(host: str | None, patterns: tuple[str, ...]) -> bool:
    """Does ``host`` (a ``Host`` header value) match one of ``patterns``? Empty patterns: any."""
    if not patterns or "*" in patterns:
        return True
    if not host:
        return False
    name = host_name(host).rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
                return True
        elif name == pattern:
            return True
    return False


@dataclass
class RequestHeaders:
    """The request headers admission and forwarding look at, read in one pass."""

    target: str | None = None
    content_length: bytes | None = None
    origin: str | None = None
    host: str | None = None
    credential: str | None = None
    credentials: int = 0  # how many credential headers came (more than one is refused)
    preflight_method: str | None = None
    referer: str | None = None
    fetch_site: str | None = None
    forwarded_for: list[str] = field(default_factory=list)
    forwarded_host: str | None = None  # X-Forwarded-Host (a dev server's rewrite proxy)
    forwarded_port: str | None = None  # X-Forwarded-Port
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
                out.credentials += 1
            elif name == b"access-control-request-method":
                out.preflight_method = value.decode("latin-1")
            elif name == b"x-forwarded-for":
                out.forwarded_for.append(value.decode("latin-1"))
            elif name == b"x-forwarded-host":
                if out.forwarded_host is None:
                    out.forwarded_host = value.decode("latin-1")
            elif name == b"x-forwarded-port":
                if out.forwarded_port is None:
                    out.forwarded_port = value.decode("latin-1")
            elif name == b"sec-fetch-site":
                out.fetch_site = value.decode("latin-1")
            elif name == b"referer":
                out.referer = value.decode("latin-1")
        out.size = size
        return out
