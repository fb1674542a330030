"""What went wrong with an upstream exchange, as the error the client gets. Pure.

aiohttp reports most failures as a ``ClientError`` or a timeout, whoever caused them: the
client leaving or its body failing are raised inside aiohttp's writer task and come back
wrapped. These functions tell the cases apart from what the exchange recorded, and never
put a URL or a header in what they say.
"""

from __future__ import annotations

import zlib

import aiohttp

from ..errors import ClientGone, ProxyError, RequestTimeout, UpstreamTimeout, UpstreamUnavailable


def client_error(
    exc: aiohttp.ClientError, *, client_gone: bool, body_error: ProxyError | None, message: str
) -> Exception:
    """What an aiohttp error really was: the client leaving or its body failing, else the
    gateway's fault."""
    if client_gone:
        return ClientGone()
    if body_error is not None:
        return body_error
    return UpstreamUnavailable(message, describe(exc))


def timeout_error(
    *, body_error: ProxyError | None, body_phase: str | None, first_byte_expired: bool,
    idle: float, first_byte: float, connect: float,
) -> ProxyError:  # fmt: skip
    """Who stalled when the deadline for the response headers fired.

    ``body_phase`` is where a streamed upload was ("receive": waiting for the client,
    "send": waiting for the gateway to read); ``first_byte_expired`` whether the first-byte
    clock (which starts once the body is sent) ran out, else it was the connection.
    """
    if body_error is not None:
        return body_error
    if body_phase == "receive":
        return RequestTimeout("request body stalled", f"nothing received for {idle:g}s")
    if body_phase == "send":
        return UpstreamTimeout(
            "the gateway stopped reading the request body", f"no progress for {idle:g}s"
        )
    return UpstreamTimeout(
        "the gateway did not answer in time",
        f"no response headers within {first_byte:g}s"
        if first_byte_expired
        else f"no connection within {connect:g}s",
    )


def describe(exc: BaseException) -> str:
    """A description of a connection failure for the caller; no URLs, no headers."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection failed: {exc.os_error.strerror or type(exc.os_error).__name__}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the gateway closed the connection"
    return type(exc).__name__


def gateway_auth_error(first_chunk: bytes, content_encoding: str) -> str | None:
    """Tell a Cloudflare gateway 401 (code 2009: bad cf-aig-authorization) from a fal 401.

    Bodies pass through compressed, so a gzip/deflate head is inflated (2 KiB at most)
    just for this check.
    """
    head = first_chunk[:4096]
    if content_encoding.strip().lower() in ("gzip", "deflate", "x-gzip"):
        try:
            # wbits 47: accept a zlib or a gzip header.
            head = zlib.decompressobj(47).decompress(head, 2048)
        except zlib.error:
            return None
    head = head[:2048]
    if b"2009" in head and (
        b'"code"' in head or b"AiGatewayError" in head or b"internalCode" in head
    ):
        return "cf_gateway_unauthorized_2009"
    return None
