"""The admin API on the operator's port (``FAL_PROXY_METRICS_PORT``), docs/admin.md.

Served only when ``FAL_PROXY_ADMIN_TOKEN`` (or ``_FILE``) is set, and only on the operator's
port; without it its paths are 404 as any unknown path. Every request carries
``Authorization: Bearer <token>``, compared in constant time; anything else is a 401 (the
same for every path under ``/admin``, so a guess learns nothing of what exists), logged
as ``admin_refused`` at warning, never with what was sent.

* ``GET /admin/callers?cursor=&limit=``: the callers with usage this month, a page at a
  time (``limit`` ≤ 500, default 100), each with its generations, billable units and
  spend, per app and in all, and whether it is blocked; ``next_cursor`` (opaque) gives the
  next page, null after the last.
* ``POST /admin/callers/<caller>/reset[?period=hour|day|week|month][&plan=]``: clears the
  caller's quota and budget counters of their current periods (all of them, or those of
  one period): it has room again. Its usage record (what it used and spent this month)
  is kept: that is what happened, and what fal bills.
* ``POST /admin/callers/<caller>/block`` and ``/unblock``: every call, socket, token
  request and usage read of a blocked caller is refused with 403 ``caller_blocked``
  before anything goes upstream (in Redis, on every replica at the next call).

Every action logs one ``admin_action`` line: the action, the caller, the result and the
admin client's address; never the token.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..admission import Admission
from ..errors import BadRequest, MethodNotAllowed, NotFound, ProxyError, Unauthorized
from ..limits.admin_ops import MAX_PAGE, BadCursor
from ..limits.windows import PERIODS
from ..observe.logs import get_logger
from ..observe.redaction import register_secret

log = get_logger("proxy.admin")
DEFAULT_PAGE = 100
ACTIONS = ("reset", "block", "unblock")


class AdminApi:
    """The admin routes; :meth:`use_token` swaps the token in (file reload)."""

    def __init__(self, admission: Admission, token: str) -> None:
        self.admission = admission
        self._token = b""
        self.use_token(token)

    def use_token(self, token: str) -> None:
        register_secret(token)  # never in a log line, whatever logs it
        self._token = token.encode()  # one assignment: the old token stops working at once

    def routes(self) -> list[Route]:
        methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
        return [
            Route("/admin", self.endpoint, methods=methods),
            Route("/admin/{rest:path}", self.endpoint, methods=methods),
        ]

    async def endpoint(self, request: Request) -> Response:
        client = request.client.host if request.client else "unknown"
        try:
            self._check_token(request, client)
            return await self._dispatch(request, client)
        except ProxyError as exc:
            return _error(exc)
        except Exception:  # a bug: logged with its traceback, answered as JSON
            log.exception("internal_error", route="admin")
            return _error(ProxyError("internal proxy error", "see the proxy's log"))

    def _check_token(self, request: Request, client: str) -> None:
        given = [v for k, v in request.scope["headers"] if k == b"authorization"]
        scheme, _, sent = given[0].partition(b" ") if len(given) == 1 else (b"", b"", b"")
        # Compared whatever the scheme, so the time taken says nothing of what was sent.
        matches = hmac.compare_digest(sent.strip(), self._token)
        if matches and scheme.lower() == b"bearer":
            return
        log.warning(
            "admin_refused",
            client_ip=client,
            method=request.method,
            reason="missing" if not given else "wrong",  # never what was sent
        )
        raise Unauthorized(
            "admin token required",
            "send 'Authorization: Bearer <token>' with the token of FAL_PROXY_ADMIN_TOKEN",
        )

    async def _dispatch(self, request: Request, client: str) -> Response:
        rest = request.path_params.get("rest", "")
        if rest == "callers":
            _method(request, "GET")
            return await self._list(request)
        if rest.startswith("callers/"):
            caller, _, action = rest[len("callers/") :].rpartition("/")
            if action in ACTIONS:
                _method(request, "POST")
                if not caller:
                    raise BadRequest("no caller", "POST /admin/callers/<caller>/" + action)
                return await self._act(request, action, caller, client)
        raise NotFound("not found", "admin paths: /admin/callers, /admin/callers/<caller>/"
                       "reset|block|unblock")  # fmt: skip

    async def _list(self, request: Request) -> Response:
        query = request.query_params
        raw = query.get("limit", str(DEFAULT_PAGE))
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
            raise BadRequest("invalid limit", f"a whole number from 1 to {MAX_PAGE}")
        cursor = query.get("cursor") or None
        try:
            page = await self.admission.limiter.list_callers(cursor, int(raw))
        except BadCursor as exc:
            raise BadRequest("invalid cursor", f"{exc}; pass next_cursor as given") from None
        body = {"period": "month", "callers": [row.to_json() for row in page.callers],
                "next_cursor": page.cursor}  # fmt: skip
        return _json(body)

    async def _act(self, request: Request, action: str, caller: str, client: str) -> Response:
        limiter = self.admission.limiter
        out: dict[str, Any] = {"caller": caller, "action": action}
        if action == "reset":
            period = request.query_params.get("period") or None
            if period is not None and period not in PERIODS:
                raise BadRequest("invalid period", f"one of {', '.join(PERIODS)}, or none: all")
            plan = self.admission.plan_of(caller, request.query_params.get("plan"))
            quotas = tuple(
                q for q in self.admission.plans.quotas(plan) if period in (None, q.period)
            )
            cleared = await limiter.reset(caller, quotas)
            out.update(plan=plan, reset=[q.spec() for q in quotas], cleared=cleared)
            result = f"cleared {cleared} of {len(quotas)} counters"
        else:
            changed = await (limiter.block if action == "block" else limiter.unblock)(caller)
            out.update(blocked=action == "block", changed=changed)
            result = ("blocked" if action == "block" else "unblocked") if changed else "unchanged"
        log.info("admin_action", action=action, caller=caller, result=result, client_ip=client)
        return _json(out)


def _method(request: Request, allowed: str) -> None:
    if request.method != allowed:
        raise MethodNotAllowed(
            f"method {request.method} not allowed", f"allowed: {allowed}", allow=allowed
        )


def _json(body: dict[str, Any]) -> Response:
    return Response(json.dumps(body).encode(), media_type="application/json",
                    headers={"cache-control": "no-store"})  # fmt: skip


def _error(exc: ProxyError) -> Response:
    body = exc.body()
    headers = {k.decode(): v.decode() for k, v in exc.headers(body)}
    if exc.status == 401:
        headers["www-authenticate"] = "Bearer"
    return Response(body, exc.status, headers=headers)
