"""Errors the proxy answers itself, and the one JSON shape they take.

May import: nothing (every layer raises these).

    ProxyError                 status + message + detail
    ├── BadRequest        400  malformed target URL or path, missing header
    ├── Unauthorized      401  the caller did not prove who it is (FAL_PROXY_AUTH)
    ├── Forbidden         403  target, origin or app outside what is allowed
    │   ├── OriginRefused 403  a browser page not in FAL_PROXY_ALLOWED_ORIGINS
    │   └── CallerBlocked 403  the operator blocked the caller (admin API)
    ├── NotFound          404  nothing to forward to
    ├── MethodNotAllowed  405  a method fal does not take (TRACE, CONNECT, ...)
    ├── RequestTimeout    408  the client stopped sending its body
    ├── PayloadTooLarge   413  request body over FAL_PROXY_MAX_BODY_BYTES
    ├── URITooLong        414  path + query over FAL_PROXY_MAX_URL_BYTES
    ├── MisdirectedRequest 421 a Host outside FAL_PROXY_ALLOWED_HOSTS
    ├── RateLimited       429  a caller's rate or concurrency limit was reached (Retry-After)
    │   └── QuotaExceeded 429  a caller's quota is used up until its period ends
    ├── TokensUnderQuota  429  a realtime token asked for apps under a quota
    ├── HeadersTooLarge   431  request headers over FAL_PROXY_MAX_HEADER_BYTES
    ├── UpstreamUnavailable 502  the gateway could not be reached or broke the connection
    ├── LimiterUnavailable 503  the shared rate-limit store (Redis) failed (Retry-After)
    ├── ShuttingDown      503  the drain deadline passed before the request could be answered
    └── UpstreamTimeout   504  the gateway did not answer in time

Messages are written for the caller: they say what was wrong and never echo a
secret (the proxy never puts header values in them).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


class ClientGone(Exception):
    """The client disconnected (a send failed, or the server said so): nothing more can be
    sent to it. Not an answer: the call's line records ``client_gone``."""


class ProxyError(Exception):
    """An error answered by the proxy itself, before or instead of the upstream."""

    status = 500
    reason = "internal"  # short machine-readable tag for the log line
    # For the operator, on the refusal's log line (logged as a warning when set): what
    # setting to change when the refusal is likely a mistake of the proxy's configuration.
    hint: str | None = None

    def __init__(self, message: str, detail: str = "", *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        if reason is not None:  # a finer tag than the class's, e.g. "origin_refused"
            self.reason = reason

    def body(self) -> bytes:
        return json.dumps({"message": self.message, "detail": self.detail}).encode()

    def log_fields(self) -> dict[str, str]:
        """What the refusal's log line adds (never a secret)."""
        return {}

    def headers(self, body: bytes) -> list[tuple[bytes, bytes]]:
        """The response headers for this error with ``body``: its type and length, and what
        its status calls for (``Retry-After``, ``Allow``)."""
        return [(b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()), *self.extra_headers()]  # fmt: skip

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        return []

    def http_response(self) -> bytes:
        """The whole answer as HTTP/1.1 bytes, for the server protocol (before any ASGI
        app runs); the connection closes after it."""
        body = self.body()
        head = [b"HTTP/1.1 %d %s" % (self.status, HTTPStatus(self.status).phrase.encode())]
        head += [name + b": " + value for name, value in self.headers(body)]
        return b"\r\n".join([*head, b"connection: close", b"", b""]) + body


class _RetryLater(ProxyError):
    """A refusal that says when to come back (``Retry-After``)."""

    def __init__(self, message: str, detail: str = "", *, retry_after: int = 1) -> None:
        super().__init__(message, detail)
        self.retry_after = retry_after

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(self.retry_after).encode())]


class BadRequest(ProxyError):
    status = 400
    reason = "bad_request"


class Forbidden(ProxyError):
    status = 403
    reason = "target_refused"


class OriginRefused(Forbidden):
    """A browser request from a page that may not spend through this proxy. Usually a
    development setup the operator has not listed yet, so the log line says which origin
    and where to list it."""

    reason = "origin_refused"
    hint = (
        "a page from this origin was refused: if it is yours, add it to "
        "FAL_PROXY_ALLOWED_ORIGINS (comma-separated origins, e.g. http://localhost:3000)"
    )

    def __init__(self, message: str, detail: str, *, origin: str | None) -> None:
        super().__init__(message, detail)
        self.origin = origin

    def log_fields(self) -> dict[str, str]:
        return {"origin": self.origin} if self.origin is not None else {}


class CallerBlocked(Forbidden):
    """The operator blocked this caller (``POST /admin/callers/<caller>/block``): every
    call, socket and token request is refused before anything goes upstream."""

    reason = "caller_blocked"

    def __init__(self) -> None:
        super().__init__(
            "caller blocked",
            "this caller's calls are refused by the proxy's operator; ask the operator",
        )


class Unauthorized(ProxyError):
    status = 401
    reason = "unauthorized"


class NotFound(ProxyError):
    status = 404
    reason = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    reason = "method_not_allowed"

    def __init__(self, message: str, detail: str = "", *, allow: str) -> None:
        super().__init__(message, detail)
        self.allow = allow  # the Allow header

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"allow", self.allow.encode())]


class RequestTimeout(ProxyError):
    status = 408
    reason = "client_body_timeout"


class PayloadTooLarge(ProxyError):
    status = 413
    reason = "body_too_large"

    @classmethod
    def over(cls, limit: int, declared: int | None = None) -> PayloadTooLarge:
        """A request body over ``FAL_PROXY_MAX_BODY_BYTES`` (``declared``: its length)."""
        size = f"{declared} bytes" if declared is not None else "more"
        error = cls(
            "request body too large",
            f"{size}; this proxy accepts at most {limit} bytes (FAL_PROXY_MAX_BODY_BYTES); "
            "upload large files to fal's storage and send their URL",
        )
        error.hint = "raise FAL_PROXY_MAX_BODY_BYTES if your app sends bodies this large"
        return error


class URITooLong(ProxyError):
    status = 414
    reason = "url_too_long"


class MisdirectedRequest(ProxyError):
    status = 421
    reason = "host_refused"


class RateLimited(_RetryLater):
    """A limit in :mod:`proxy.limits` was reached; ``retry_after`` feeds the Retry-After header."""

    status = 429
    reason = "rate_limited"


class QuotaExceeded(RateLimited):
    """A caller's quota (:mod:`proxy.limits.quotas`) is used up until its period ends.

    The body names the quota (``quota``: its apps, limit, period and reset time) so an app
    can tell its user "50 images a day; more tomorrow", not just "slow down".
    """

    reason = "quota_exceeded"

    def __init__(
        self, *, apps: str, limit: int, period: str, described: str, resets_at: str,
        retry_after: int,
    ) -> None:  # fmt: skip
        # Plain fields, not the quota itself: the error vocabulary imports nothing of ours.
        super().__init__("quota exceeded", f"{described}; resets at {resets_at}",
                         retry_after=retry_after)  # fmt: skip
        self.quota = {"apps": apps, "limit": limit, "period": period, "resets_at": resets_at}

    def body(self) -> bytes:
        return json.dumps(
            {"message": self.message, "detail": self.detail, "quota": self.quota}
        ).encode()


class BudgetExceeded(RateLimited):
    """A caller's budget (a quota in dollars, :mod:`proxy.limits.spend`) has no room for the
    call: what is spent already, plus the call's estimate, would pass it.

    The body names the budget, the spend and the reset (``budget``), so an app can show
    "$0.42 of $1.00 used; resets on the 1st".
    """

    reason = "budget_exceeded"

    def __init__(
        self, *, apps: str, period: str, described: str, limit_usd: float, spent_usd: float,
        spent: str, estimate: str | None, resets_at: str, retry_after: int,
    ) -> None:  # fmt: skip
        call = f"; this call is estimated at {estimate}" if estimate else ""
        super().__init__("budget exceeded",
                         f"{described}: {spent} spent{call}; resets at {resets_at}",
                         retry_after=retry_after)  # fmt: skip
        self.budget = {"apps": apps, "period": period, "limit_usd": limit_usd,
                       "spent_usd": spent_usd, "resets_at": resets_at}  # fmt: skip

    def body(self) -> bytes:
        return json.dumps(
            {"message": self.message, "detail": self.detail, "budget": self.budget}
        ).encode()


class TokensUnderQuota(ProxyError):
    """A realtime token asked for apps under a quota. A token's sockets go to fal directly,
    where the proxy cannot count what they run, so it would buy generations past the quota;
    sockets through the proxy are counted message by message instead. No Retry-After: the
    same request is refused while the quota applies, whatever is used of it."""

    status = 429
    reason = "quota_tokens_refused"

    def __init__(self, *, apps: str, limit: int, period: str, described: str) -> None:
        super().__init__(
            "realtime tokens refused under a quota",
            f"{described} applies to the token's apps, and a token's sockets go to fal "
            "directly, where the proxy cannot count them: open the socket through the proxy "
            "(ws://<proxy>/<app>/realtime), which counts each request message",
        )
        self.quota = {"apps": apps, "limit": limit, "period": period}

    def body(self) -> bytes:
        return json.dumps(
            {"message": self.message, "detail": self.detail, "quota": self.quota}
        ).encode()


class HeadersTooLarge(ProxyError):
    status = 431
    reason = "headers_too_large"


class UpstreamUnavailable(ProxyError):
    status = 502
    reason = "upstream_unavailable"


class BadGateway(ProxyError):
    """The gateway answered, but with something the proxy must read and cannot."""

    status = 502
    reason = "bad_upstream_answer"


class LimiterUnavailable(_RetryLater):
    """Redis failed and FAL_PROXY_REDIS_FAILURE is "closed": refuse rather than admit unchecked."""

    status = 503
    reason = "limiter_unavailable"


class ShuttingDown(ProxyError):
    status = 503
    reason = "shutdown"


class UpstreamTimeout(ProxyError):
    status = 504
    reason = "upstream_timeout"
