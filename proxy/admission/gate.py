"""Admission: may this request go upstream at all? Every check before the first byte leaves.

One path for both transports (:meth:`Admission.admit`; the HTTP forwarder and the WebSocket
bridge both call it), in one order, cheapest and least revealing first: sizes → host →
browser context → method → caller → target → app; then, once the request is ready to go,
a concurrency slot and the rate windows (:meth:`Admission.take_slot`). Each refusal is a
:class:`~proxy.errors.ProxyError` with its own reason tag, answered as JSON and logged on
the request's canonical line. The policies themselves are pure functions in
:mod:`proxy.policy` (origins, callers, targets, allowed apps, client address); this module
only reads the request's headers once and applies them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace

from starlette.types import Scope

from ..config.access import AccessSettings
from ..config.settings import Settings
from ..errors import (
    BadRequest,
    BudgetExceeded,
    HeadersTooLarge,
    MethodNotAllowed,
    MisdirectedRequest,
    QuotaExceeded,
    RateLimited,
    TokensUnderQuota,
    URITooLong,
)
from ..limits import Lease, Limiter, LimitSettings, QuotaNear, create_limiter
from ..limits.prices import Prices
from ..limits.quotas import Plans, Quota
from ..limits.spend import Estimates, Parked, Reservation, units_decimal
from ..limits.usage import UsageReport
from ..observe.logs import get_logger
from ..observe.metrics import app_label
from ..policy.allowed_apps import AppPolicy, check_heartbeat
from ..policy.callers import CallerAuth, NoAuth, TokenAuth
from ..policy.metadata import CallerTags, derived_key, metadata_header
from ..policy.origins import (
    OriginPolicy,
    check_browser_request,
    check_origin,
    preflight_headers,
)
from ..policy.plan_requests import RequestPolicy, for_target
from ..policy.python_port import PythonSdkListener
from ..policy.request_head import RequestHeaders, host_allowed
from ..policy.targets import (
    Target,
    check_method,
    queue_request_id,
    resolve_target,
    starts_generation,
)
from .callers import JwtAuth
from .client_address import AddressBuckets, ClientAddresses
from .queue_owners import QueueOwners

log = get_logger("proxy.admission")


def _metadata_key(settings: Settings) -> bytes:
    """FAL_PROXY_METADATA_HASH_KEY, else a key derived from the gateway token or fal key."""
    configured = settings.gateway.metadata_hash_key
    if configured is not None:
        return configured.reveal().encode()
    secret = settings.cf_aig_token or settings.fal_key
    return derived_key(secret.reveal() if secret is not None else "")


def usage_app(target: Target, session_app: str | None = None) -> str:
    """The app a generation's usage is summed under: ``owner/alias`` (a world-model
    session's from its body, ``session_app``); a realtime token request (which names bare
    aliases) under ``realtime-tokens``."""
    if target.kind == "token":
        return "realtime-tokens"
    return app_label(session_app or target.path) or "other"


def warn_unpriced_budgets(plans: Plans, prices: Prices) -> None:
    """Say, once per budget, when apps it applies to have no price: their calls count no
    spend (units only), so the budget cannot bound them."""
    budgets = {q for quotas in (plans.default, *plans.plans.values()) for q in quotas if q.money}
    for budget in sorted(budgets, key=lambda q: q.key):
        if not prices.covers(budget.pattern):
            log.warning(
                "budget_unpriced_apps",
                budget=budget.spec(),
                note="apps it applies to have no price in FAL_PROXY_PRICES_FILE: their calls "
                'count billable units but no spend; add their prices (or a "*" price)',
            )


# A quota or budget at least this full once an admitted call is counted (used >= 80 % of its
# limit; a budget's used includes the estimates held, this call's too) is reported to
# ``Admission.on_limit`` as near (the dashboard's "callers near or over their quotas and
# budgets", docs/dashboard.md); one multiplication per quota of the call, no read of its own.
NEAR_LIMIT = 0.8

# What the fal SDKs send (run with a custom method included); anything else is refused.
FORWARDED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
ALLOWED_METHODS = ", ".join(sorted(FORWARDED_METHODS))


@dataclass
class Admitted:
    """What admission has learned of a request, filled in as each check passes (so a refused
    request's log line still shows what was known when it was refused)."""

    client_ip: str = "unknown"
    cors_origin: str | None = None  # a listed cross-origin caller, to answer with CORS headers
    caller: str | None = None
    declared_length: int | None = None  # the content-length, parsed
    target: Target | None = None
    app: str | None = None  # the allowed-apps pattern that admitted it ("*": all allowed)
    claimed_plan: str | None = None  # the plan the caller's credential claims (JWT)
    plan: str | None = None  # the caller's plan, once worked out (Admission.call_plan)
    token_apps: tuple[str, ...] = ()  # a realtime token request's aliases
    session_app: str | None = None  # a world-model session's endpoint, "/owner/alias" (body)
    limit_key: str | None = None  # whose limits, quotas and usage it counts against (slot taken)
    key: str | None = None  # the same, once worked out (Admission.key_of), slot or not
    generation: bool = False  # counted as a call that can start a generation
    quotas: tuple[Quota, ...] = ()  # the caller's quotas that count it (slot taken)
    reservation: Reservation | None = None  # what it holds of the caller's budgets


class Admission:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        access = settings.access
        self.access = access
        self.origins = OriginPolicy.build(
            list(access.allowed_origins), list(access.cors_extra_headers), access.auth_header
        )
        self.auth_header = access.auth_header.encode()
        self.auth: CallerAuth
        if access.auth == "token":
            self.auth = TokenAuth(list(access.tokens), access.auth_header)
        elif access.auth == "jwt":
            assert access.jwt is not None
            self.auth = JwtAuth(access.jwt, access.auth_header)
        else:
            self.auth = NoAuth()
        self.apps = AppPolicy(access.allowed_apps)
        self.tags = CallerTags(settings.gateway.metadata_caller, _metadata_key(settings))
        self.plans = access.plans
        self.prices = access.prices
        self.estimates = Estimates()  # a call's estimate: its endpoint's recent highest cost
        self.parked = Parked()  # queue submits' reservations, until their result
        # Who submitted each queue request, when callers are identified (None: not checked).
        self.queue_owners = (
            QueueOwners() if access.auth != "none" and access.queue_owner_check else None
        )
        self._unknown_plans: set[str] = set()
        self.addresses = ClientAddresses(access.trusted_proxies)
        self.buckets = AddressBuckets()
        self.limiter: Limiter = create_limiter(limit_settings(access))
        # Told of each refusal by a quota or a budget (the limit key, the refusal), and of
        # each admitted call that left one at NEAR_LIMIT or more (a QuotaNear), in O(1):
        # the dashboard's callers near or over their limits (proxy.dashboard.feed.NearLimits).
        self.on_limit: Callable[[str, RateLimited | QuotaNear], None] | None = None
        warn_unpriced_budgets(self.plans, self.prices)

    def header_reader(
        self, python: PythonSdkListener | None = None
    ) -> Callable[[Scope], RequestHeaders]:
        """How a port's requests are read, chosen once per port: the main port's
        (``FAL_PROXY_AUTH_HEADER`` carries the caller's credential, ``x-fal-target-url`` the
        target), or the Python client's TLS port's (``python``: ``Authorization: Key`` and
        the path)."""
        if python is not None:
            return python.read_headers
        auth_header = self.auth_header
        return lambda scope: RequestHeaders.read(scope["headers"], auth_header)

    async def admit(
        self, scope: Scope, seen: RequestHeaders, admitted: Admitted, *, method: str, query: str,
        target_header: str | None, websocket: bool = False,
    ) -> Admitted:  # fmt: skip
        """Every check but the slot, in order; fills ``admitted`` as it goes, raises a refusal.

        ``query`` is the raw query string (a WebSocket's without its ``fal_jwt_token``),
        ``target_header`` the SDK's ``x-fal-target-url`` (None on sockets).
        """
        await self.admit_caller(
            scope, seen, admitted, method=method,
            methods=None if websocket else (FORWARDED_METHODS, ALLOWED_METHODS),
        )  # fmt: skip
        if seen.content_length is not None:
            try:
                admitted.declared_length = int(seen.content_length)
            except ValueError:
                raise BadRequest("invalid content-length header") from None
        raw_path = scope.get("raw_path")
        admitted.target = target = resolve_target(
            raw_path.decode("latin-1") if raw_path else scope["path"],
            query,
            target_header,
            gateway_url=self.settings.gateway_url,
            proxy_route=self.settings.proxy_route,
        )
        if not websocket:
            check_method(method, target)
        admitted.app = self.apps.check(target)  # Forbidden, or the pattern that allowed it
        if self.queue_owners is not None and admitted.caller is not None:
            request_id = queue_request_id(target)
            if request_id is not None:
                self.queue_owners.check(request_id, admitted.caller)
        return admitted

    def note_queue_submit(self, admitted: Admitted, request_id: str) -> None:
        """A queue call counted as a generation that fal accepted (2xx, ``request_id`` in its
        answer): a submit's request is its caller's alone. A call on an existing request's
        path is no submit, whatever its method, and notes nothing."""
        target = admitted.target
        if self.queue_owners is None or admitted.caller is None or target is None:
            return
        if queue_request_id(target) is None:  # (checked when admitted: cannot raise here)
            self.queue_owners.note(request_id, admitted.caller)

    async def admit_caller(
        self, scope: Scope, seen: RequestHeaders, admitted: Admitted, *, method: str,
        methods: tuple[frozenset[str], str] | None,
    ) -> Admitted:  # fmt: skip
        """The checks every route shares, in order: sizes → host → browser context →
        method (``methods``: the allowed set and its ``Allow`` header; None on sockets) →
        caller. :meth:`admit` goes on to the target; the usage route stops here."""
        admitted.client_ip = self.client(scope, seen)
        self.check_sizes(scope, seen)
        self.check_host(seen)
        # Browsers apply no CORS to sockets, so the browser check is what refuses a page there.
        admitted.cors_origin = self.cors_origin(scope, seen)
        if methods is not None and method not in methods[0]:
            raise MethodNotAllowed(
                f"method {method} not allowed", f"allowed: {methods[1]}", allow=methods[1]
            )
        if seen.credentials > 1 and self.access.auth != "none":
            # Which one counts would be a guess, and a hop in front may have checked another.
            raise BadRequest(
                "caller credential sent more than once",
                "send one credential header",
                reason="caller_ambiguous",
            )
        admitted.caller, admitted.claimed_plan = await self.auth.identify(seen.credential)
        return admitted

    async def take_slot(self, admitted: Admitted, method: str, *, websocket: bool = False) -> Lease:
        """The rate windows, the quotas and a concurrency slot, once the request is ready
        to go. A WebSocket session counts as a generation when it opens, and each request
        message after its first as one more (:meth:`count_generation`)."""
        target = admitted.target
        assert target is not None, "admit() first"
        generation = websocket or starts_generation(method, target)
        key = admitted.limit_key = self.key_of(admitted)
        if not generation:
            return await self.limiter.admit(key, submit=False)
        admitted.generation = True
        if target.kind == "wma_session":
            assert admitted.session_app is not None, "check_wma_body() first"
        app = admitted.session_app or (target.path if target.kind != "token" else None)
        admitted.quotas = quotas = tuple(
            quota
            for quota in self.plans.quotas(self.call_plan(admitted, key))
            if quota.applies(app, admitted.token_apps)
        )
        if target.kind == "token" and quotas:
            # What a token's sockets run, fal alone sees: no quota could bound it.
            quota = quotas[0]
            raise TokensUnderQuota(apps=quota.pattern, limit=quota.limit, period=quota.period,
                                   described=quota.describe())  # fmt: skip
        estimate = 0
        budgets = tuple(quota for quota in quotas if quota.money)
        if budgets:
            endpoint = app or ""
            now = self.limiter.clock()
            estimate = self.estimates.estimate(endpoint, self.prices.price_of(endpoint), now)
            reserved = Reservation(budgets, estimate, now, 1, endpoint)
        try:
            lease = await self.limiter.admit(
                key, submit=True, quotas=quotas, app=usage_app(target, admitted.session_app),
                estimate=estimate,
            )  # fmt: skip
        except (QuotaExceeded, BudgetExceeded) as refusal:
            if self.on_limit is not None:
                self.on_limit(key, refusal)
            raise
        if lease.used:
            self._near(key, quotas, lease.used)
        # Reserved only if the limiter counted it: with quotas, an empty ``used`` is a call
        # admitted unchecked (Redis down under "open"). A reservation never taken must not
        # be given back (a failure) or netted off the cost (a success), else every call
        # made during an outage lowers the caller's spend once Redis is back; with none,
        # settle charges the call's full cost.
        if budgets and lease.used:
            admitted.reservation = reserved
        return lease

    async def count_generation(self, admitted: Admitted) -> None:
        """One more generation on an admitted session (a socket's request message after
        its first): the hourly window and the session's quotas count it, usage sums it.
        Raises the refusal (429's error, or 503's when Redis fails under "closed")."""
        assert admitted.limit_key is not None and admitted.target is not None, "take_slot() first"
        reservation = admitted.reservation
        try:
            used = await self.limiter.count_generation(
                admitted.limit_key,
                quotas=admitted.quotas,
                app=usage_app(admitted.target, admitted.session_app),
                estimate=reservation.estimate if reservation is not None else 0,
            )
        except (QuotaExceeded, BudgetExceeded) as refusal:
            if self.on_limit is not None:
                self.on_limit(admitted.limit_key, refusal)
            raise
        if used:
            self._near(admitted.limit_key, admitted.quotas, used)
        if reservation is not None:  # a socket's message: charged its estimate, for good
            admitted.reservation = replace(reservation, count=reservation.count + 1)

    def _near(self, key: str, quotas: tuple[Quota, ...], used: tuple[int, ...]) -> None:
        """Tell ``on_limit`` of each of ``quotas`` an admitted call left at
        :data:`NEAR_LIMIT` or more of its limit (``used``: the limiter's, after the call)."""
        on_limit = self.on_limit
        if on_limit is None:
            return
        for quota, now_used in zip(quotas, used, strict=False):  # () when Redis was skipped
            if now_used >= quota.limit * NEAR_LIMIT:
                on_limit(key, QuotaNear(quota, now_used))

    def request_policy(self, admitted: Admitted, method: str) -> RequestPolicy:
        """What of the caller's plan's ``[requests.<plan>]`` applies to this call
        (:func:`proxy.policy.plan_requests.for_target`); notes the plan on ``admitted``."""
        assert admitted.target is not None, "admit() first"
        plan = self.call_plan(admitted, self.key_of(admitted))
        return for_target(self.plans.request_policy(plan), method, admitted.target)

    def call_plan(self, admitted: Admitted, key: str) -> str:
        """The caller's plan for this call, worked out once (request policy, slot and
        settlement read the same one) and noted on ``admitted``."""
        if admitted.plan is None:
            admitted.plan = self.plan_of(key, admitted.claimed_plan)
        return admitted.plan

    def plan_of(self, key: str, claimed: str | None) -> str:
        """The caller's plan; a claimed plan this configuration lacks is said once."""
        if (
            claimed is not None
            and self.plans.unknown(claimed)
            and claimed not in self._unknown_plans
            and len(self._unknown_plans) < 100  # a bounded set, whatever tokens claim
        ):
            self._unknown_plans.add(claimed)
            log.warning(
                "unknown_plan",
                plan=claimed,
                note="not in FAL_PROXY_PLANS_FILE: the caller gets FAL_PROXY_QUOTAS",
            )
        return self.plans.plan_of(key, claimed)

    async def usage(self, key: str, claimed: str | None) -> UsageReport:
        """The caller's plan, quotas and this month's usage (see :mod:`proxy.app.usage_routes`)."""
        plan = self.plan_of(key, claimed)
        return await self.limiter.usage(key, plan, self.plans.quotas(plan))

    async def settle(
        self, admitted: Admitted, path: str | None, units: float, request_id: str | None, *,
        succeeded: bool,
    ) -> tuple[bool, int]:  # fmt: skip
        """What an admitted call cost, once its answer is through: fal's billable units
        added to its caller's usage (once per fal ``request_id``: a queue result fetched
        again adds nothing) with their cost, and the caller's budgets settled
        (:mod:`proxy.limits.spend`). Returns (whether the units were added here, and so
        belong in the metrics; their cost in micro-dollars).

        With no units: a queue submit that ``succeeded`` parks its reservation for its
        result; another success keeps its estimate (fal said no cost: the budget errs
        toward the money); a failure gives it back. ``succeeded`` is also true for a call
        whose whole request went up and got no answer (the client hung up, a timeout):
        fal may be running it, so it keeps its estimate rather than hand a caller who
        hangs up on every call free generations.
        """
        key = admitted.limit_key
        if key is None:
            return False, 0
        reservation = admitted.reservation
        if not units:
            if reservation is not None:
                if not succeeded:
                    self.limiter.release(key, reservation)
                elif request_id and admitted.target is not None and admitted.target.kind == "queue":
                    self.parked.park(key, request_id, reservation)
            return False, 0
        if reservation is None and request_id:  # a queue result: its submit's reservation
            reservation = self.parked.take(key, request_id)
        endpoint = reservation.endpoint if reservation else (admitted.session_app or path or "")
        cost = self.prices.cost_micros(endpoint, units_decimal(units)) or 0
        if reservation is None and cost:  # not reserved here: charged in full, now
            budgets = self._budgets(admitted, endpoint)
            if budgets:
                reservation = Reservation(budgets, 0, self.limiter.clock(), 0, endpoint)
        added = await self.limiter.add_units(
            key, app_label(admitted.session_app or path), units, request_id, cost, reservation
        )
        if added and cost:
            self.estimates.observe(endpoint, cost, self.limiter.clock())
        return added, cost if added else 0

    def _budgets(self, admitted: Admitted, endpoint: str) -> tuple[Quota, ...]:
        """The caller's budgets that apply to ``endpoint`` (a call admitted as no
        generation, e.g. a queue result fetched through another replica than its submit)."""
        assert admitted.limit_key is not None
        plan = self.call_plan(admitted, admitted.limit_key)
        return tuple(
            q for q in self.plans.quotas(plan) if q.money and q.applies(endpoint.strip("/"))
        )

    def check_sizes(self, scope: Scope, headers: RequestHeaders) -> None:
        url = len(scope.get("raw_path") or b"") + len(scope["query_string"])
        if url > self.access.max_url_bytes:
            raise URITooLong("URL too long", f"{url} bytes; at most {self.access.max_url_bytes}")
        if headers.size > self.access.max_header_bytes:
            raise HeadersTooLarge(
                "request headers too large",
                f"{headers.size} bytes; at most {self.access.max_header_bytes}",
            )

    def check_host(self, headers: RequestHeaders) -> None:
        """``FAL_PROXY_ALLOWED_HOSTS``: 421 for a Host the proxy does not answer to."""
        if not host_allowed(headers.host, self.access.allowed_hosts):
            raise MisdirectedRequest(
                "host not served here", "the Host header is not in FAL_PROXY_ALLOWED_HOSTS"
            )

    def cors_origin(self, scope: Scope, headers: RequestHeaders) -> str | None:
        """The origin to answer with CORS headers, None if none needed; raises Forbidden
        for a browser request from a page that is neither same-origin nor listed (the
        page's host as a forwarding dev server reports it: ClientAddresses.page_host)."""
        host = self.addresses.page_host(scope, headers)
        return check_browser_request(
            headers.origin, headers.referer, headers.fetch_site, host, self.origins
        )

    def preflight(self, scope: Scope, headers: RequestHeaders) -> list[tuple[bytes, bytes]]:
        """The answer to a CORS preflight (sizes, host and origin checked first)."""
        self.check_sizes(scope, headers)
        self.check_host(headers)
        origin = check_origin(
            headers.origin, self.addresses.page_host(scope, headers), self.origins
        )
        return preflight_headers(origin or headers.origin or "", self.origins)

    def client(self, scope: Scope, headers: RequestHeaders) -> str:
        """The client's address (X-Forwarded-For believed only from a trusted proxy)."""
        return self.addresses.client(scope, headers)

    def key_of(self, admitted: Admitted) -> str:
        """:meth:`limit_key` of an admitted call, worked out once: the request policy, the
        metadata and the slot all ask (an IPv6 client's /64 is parsed each time)."""
        if admitted.key is None:
            admitted.key = self.limit_key(admitted.caller, admitted.client_ip)
        return admitted.key

    def limit_key(self, caller: str | None, client: str) -> str:
        """Whose limits a request counts against: its caller, else its client's address
        bucket (:class:`~proxy.admission.client_address.AddressBuckets`)."""
        return caller if caller is not None else self.buckets.key(client)

    def metadata(self, admitted: Admitted, request_id: str, *, websocket: bool = False) -> str:
        """``cf-aig-metadata`` for an admitted call: its caller (tagged), app, id and kind."""
        target = admitted.target
        assert target is not None, "admit() first"
        return metadata_header(
            caller=self.tags.tag(self.key_of(admitted)),
            app=usage_app(target, admitted.session_app),
            request_id=request_id,
            route="websocket" if websocket else target.kind,
        )

    def check_token_body(self, body: bytes, admitted: Admitted) -> bytes:
        """The token request body to forward (re-serialised), or raise; notes its apps."""
        checked = self.apps.check_token(body, self.access.token_max_expiration)
        admitted.token_apps = tuple(json.loads(checked)["allowed_apps"])
        return checked

    def check_wma_body(self, body: bytes, admitted: Admitted) -> bytes:
        """The body of a ``wma.fal.run`` call to forward, or raise. A session offer's
        ``app_id`` is checked as a run of that app (and noted: its quotas, usage and the
        app label go by it), and what is forwarded is the checked offer re-serialised; a
        heartbeat's ``{"session_id"}`` re-serialised; an ICE request's body as it came."""
        target = admitted.target
        assert target is not None, "admit() first"
        if target.kind == "wma_session":
            admitted.app, app_id, checked = self.apps.check_session(body)
            admitted.session_app = f"/{app_id}"
            return checked
        if target.kind == "wma_heartbeat":
            return check_heartbeat(body)
        return body


def limit_settings(access: AccessSettings) -> LimitSettings:
    """The limiter's settings from the access settings."""
    return LimitSettings(
        requests_per_minute=access.requests_per_minute,
        concurrent=access.concurrent,
        submits_per_hour=access.submits_per_hour,
        redis_url=access.redis_url,
        redis_failure=access.redis_failure,
    )
