"""Reading usage: a caller's own quotas and usage, and any caller's on the metrics port.

* ``GET /api/fal/usage`` (``FAL_PROXY_USAGE_ROUTE``) on the public port: the caller's own
  plan, quotas (used, remaining, reset time) and this month's usage, so an app can show
  "12 of 50 images left today". Admitted like a proxied call (sizes, host, browser
  context, caller credential, and it counts as a request of the minute), never a
  generation. The body never names the caller (with ``FAL_PROXY_AUTH=none`` the caller
  is a client address).
* ``GET /usage/<caller>`` on ``FAL_PROXY_METRICS_PORT`` only (the operator's port): any
  caller's, by id; ``?plan=`` names the plan whose quotas to show when the plan comes
  from a JWT claim (the proxy keeps no record of claims).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..admission import Admission, Admitted
from ..errors import ProxyError
from ..observe.logs import get_logger
from ..observe.request_ids import new_request_id
from ..policy.origins import cors_headers
from ..policy.python_port import PythonSdkListener

log = get_logger("proxy.request")
_METHODS = frozenset({"GET", "HEAD"})
_ALLOWED = "GET, HEAD"


class CallerUsage:
    """The public route: a pure-ASGI handler, like the forwarder."""

    def __init__(self, admission: Admission, python: PythonSdkListener | None = None) -> None:
        """``python``: the route on the Python client's TLS port (its credential: ``Key``)."""
        self.admission = admission
        self.read_headers = admission.header_reader(python)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        admission, started = self.admission, time.perf_counter()
        request_id = new_request_id()
        seen = self.read_headers(scope)
        method: str = scope["method"]
        fields: dict[str, object] = {"request_id": request_id, "method": method}
        cors: list[tuple[bytes, bytes]] = []
        status = 200
        admitted = Admitted()
        try:
            if method == "OPTIONS" and seen.origin and seen.preflight_method:
                fields["client_ip"] = admission.client(scope, seen)
                headers = admission.preflight(scope, seen)
                await send_answer(send, 204, headers, b"", request_id)
                status = 204
                return
            try:
                await admission.admit_caller(
                    scope, seen, admitted, method=method, methods=(_METHODS, _ALLOWED)
                )
            finally:  # what was learned, for the log line and the refusal's CORS headers
                fields["client_ip"] = admitted.client_ip
                if admitted.caller is not None:
                    fields["caller"] = admitted.caller
                cors = cors_headers(admitted.cors_origin) if admitted.cors_origin else []
            key = admission.limit_key(admitted.caller, admitted.client_ip)
            await (await admission.limiter.admit(key, submit=False)).release()
            report = await admission.usage(key, admitted.claimed_plan)
            body = json.dumps(report.to_json()).encode()
            headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
            await send_answer(
                send, 200, headers + cors, b"" if method == "HEAD" else body, request_id
            )
        except ProxyError as exc:
            status, fields["error"] = exc.status, exc.reason
            body = exc.body()
            await send_answer(send, exc.status, exc.headers(body) + cors, body, request_id)
        except Exception:  # a bug: logged with its traceback, answered as JSON
            log.exception("internal_error", request_id=request_id)
            error = ProxyError("internal proxy error", f"request id {request_id}")
            status, fields["error"], body = 500, error.reason, error.body()
            await send_answer(send, 500, error.headers(body) + cors, body, request_id)
        finally:
            duration = round((time.perf_counter() - started) * 1000, 2)
            log.info("request", route="usage", status=status, duration_ms=duration, **fields)


async def send_answer(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes, request_id: str
) -> None:
    """A whole answer of the proxy's own routes: its request id, and its length if unsaid."""
    headers = [*headers, (b"x-proxy-request-id", request_id.encode())]
    if not any(name == b"content-length" for name, _ in headers):
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def any_caller_usage(admission: Admission) -> Callable[[Request], Awaitable[Response]]:
    """The metrics port's ``GET /usage/{caller}`` endpoint (Starlette)."""

    async def endpoint(request: Request) -> Response:
        caller = request.path_params["caller"]
        try:
            report = await admission.usage(caller, request.query_params.get("plan"))
        except ProxyError as exc:
            body = exc.body()
            return Response(body, exc.status, headers=dict(_text(exc.headers(body))))
        except Exception:  # a bug: logged with its traceback, answered as JSON
            log.exception("internal_error", route="usage_admin")
            error = ProxyError("internal proxy error", "see the proxy's log")
            body = error.body()
            return Response(body, 500, headers=dict(_text(error.headers(body))))
        body = json.dumps(report.to_json(caller)).encode()
        return Response(body, media_type="application/json", headers={"cache-control": "no-store"})

    return endpoint


def _text(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode(), value.decode()) for name, value in headers]
