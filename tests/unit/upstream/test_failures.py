"""Failure classification (proxy/failures.py): phase and exception → the client's error."""

from __future__ import annotations

import aiohttp
import pytest

from proxy.errors import ClientGone, PayloadTooLarge, ProxyError, RequestTimeout, UpstreamTimeout
from proxy.upstream.failures import client_error, describe, timeout_error

TOO_LARGE = PayloadTooLarge("request body too large", "over 10 bytes")


@pytest.mark.parametrize(
    ("body_error", "phase", "expired", "expected", "detail"),
    [
        (TOO_LARGE, "send", True, PayloadTooLarge, "over 10 bytes"),  # the body's own failure wins
        (None, "receive", False, RequestTimeout, "nothing received for 3s"),  # the client stalled
        (None, "send", False, UpstreamTimeout, "no progress for 3s"),  # the gateway stopped reading
        (None, None, True, UpstreamTimeout, "no response headers within 60s"),
        (None, None, False, UpstreamTimeout, "no connection within 5s"),
    ],
)
def test_a_timeout_names_who_stalled(body_error, phase, expired, expected, detail) -> None:
    error = timeout_error(body_error=body_error, body_phase=phase, first_byte_expired=expired,
                          idle=3, first_byte=60, connect=5)  # fmt: skip
    assert type(error) is expected and error.detail == detail


@pytest.mark.parametrize(
    ("client_gone", "body_error", "expected"),
    [
        (True, TOO_LARGE, ClientGone),  # the client left: nothing more to say to it
        (False, TOO_LARGE, PayloadTooLarge),
        (False, None, ProxyError),  # the gateway's fault: 502
    ],
)
def test_an_aiohttp_error_is_whoever_caused_it(client_gone, body_error, expected) -> None:
    error = client_error(
        aiohttp.ServerDisconnectedError(),
        client_gone=client_gone,
        body_error=body_error,
        message="the gateway broke the response",
    )
    assert isinstance(error, expected)
    if expected is ProxyError:
        assert (error.status, error.detail) == (502, "the gateway closed the connection")


def test_descriptions_name_no_url_or_header() -> None:
    assert describe(aiohttp.ServerDisconnectedError()) == "the gateway closed the connection"
    assert describe(aiohttp.ClientPayloadError("x")) == "ClientPayloadError"
