"""Errors the proxy answers itself, and the one JSON shape they take.

    ProxyError                 status + message + detail
    ├── BadRequest        400  malformed target URL or path, missing header
    ├── Forbidden         403  target outside the allowlist
    ├── NotFound          404  nothing to forward to
    ├── MethodNotAllowed  405  a method fal does not take (TRACE, CONNECT, ...)
    ├── RequestTimeout    408  the client stopped sending its body
    ├── PayloadTooLarge   413  request body over FAL_PROXY_MAX_BODY_BYTES
    ├── UpstreamUnavailable 502  the gateway could not be reached or broke the connection
    └── UpstreamTimeout   504  the gateway did not answer in time

Messages are written for the caller: they say what was wrong and never echo a
secret (the proxy never puts header values in them).
"""

from __future__ import annotations

import json


class ProxyError(Exception):
    """An error answered by the proxy itself, before or instead of the upstream."""

    status = 500
    reason = "internal"  # short machine-readable tag for the log line

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def body(self) -> bytes:
        return json.dumps({"message": self.message, "detail": self.detail}).encode()


class BadRequest(ProxyError):
    status = 400
    reason = "bad_request"


class Forbidden(ProxyError):
    status = 403
    reason = "target_refused"


class NotFound(ProxyError):
    status = 404
    reason = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    reason = "method_not_allowed"


class RequestTimeout(ProxyError):
    status = 408
    reason = "client_body_timeout"


class PayloadTooLarge(ProxyError):
    status = 413
    reason = "body_too_large"


class UpstreamUnavailable(ProxyError):
    status = 502
    reason = "upstream_unavailable"


class UpstreamTimeout(ProxyError):
    status = 504
    reason = "upstream_timeout"
