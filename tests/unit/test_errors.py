"""The one error vocabulary: every refusal's body, headers and raw HTTP form (proxy/errors.py)."""

from __future__ import annotations

import json

import pytest

from proxy.errors import (
    BadRequest,
    LimiterUnavailable,
    MethodNotAllowed,
    ProxyError,
    RateLimited,
    RequestTimeout,
    ShuttingDown,
)


@pytest.mark.parametrize(
    ("error", "extra"),
    [
        (BadRequest("bad", "why"), []),
        (RateLimited("slow down", "at most 1", retry_after=7), [(b"retry-after", b"7")]),
        (LimiterUnavailable("no redis", "later", retry_after=5), [(b"retry-after", b"5")]),
        (MethodNotAllowed("no", "POST only", allow="POST"), [(b"allow", b"POST")]),
        (ShuttingDown("bye", "retry"), []),
        (ProxyError("internal", "request id 1"), []),
    ],
)
def test_every_error_answers_json_with_the_headers_its_status_needs(
    error: ProxyError, extra
) -> None:
    body = error.body()
    assert json.loads(body) == {"message": error.message, "detail": error.detail}
    assert error.headers(body) == [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]


def test_the_raw_form_is_a_whole_http_response() -> None:
    raw = RequestTimeout("too slow", "10 s").http_response()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 408 Request Timeout"
    assert b"connection: close" in lines and b"content-length: %d" % len(body) in lines
    assert json.loads(body) == {"message": "too slow", "detail": "10 s"}
