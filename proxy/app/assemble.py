"""The ASGI application: the forwarding handler for fal traffic, Starlette for the rest.

Requests on reserved paths (``/healthz``) go to a small Starlette app; every other
HTTP request goes to the pure-ASGI :class:`~proxy.forward.handler.Forwarder`. The lifespan
owns the one upstream session, so it is created inside the server's event loop and
closed on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive

from ..admission import Admission
from ..bridge.handler import Bridge
from ..config.settings import Settings
from ..dashboard import DashboardRoutes, Feed, NearLimits
from ..errors import NotFound
from ..forward.handler import Forwarder
from ..forward.round_trip import ClientLost
from ..limits.redis_backend import RedisLimiter
from ..observe.logs import get_logger
from ..observe.metrics import Metrics
from ..observe.redaction import register_header_names, register_secret
from ..policy.headers import InjectedHeaders
from ..policy.metadata import CallerTags
from ..policy.python_port import PythonSdkListener
from ..upstream.breaker import Breaker
from ..upstream.route import UpstreamRoute
from ..upstream.session import create_session
from .admin_routes import AdminApi
from .config_reload import Reloader, config_files
from .realtime_token import RealtimeTokenRoute
from .routing import PortApp, ProxyApp
from .secrets_reload import admin_token_file, secret_files
from .usage_routes import CallerUsage, any_caller_usage


def create_app(
    settings: Settings, *, body_in_hand: Callable[[Receive], bool] | None = None,
    on_client_lost: ClientLost | None = None, dashboard_on_proxy: bool = False,
) -> ProxyApp:  # fmt: skip
    """Build the proxy's ASGI app for ``settings``. ``body_in_hand``: the server's word on
    whether a request's whole body has arrived (:attr:`Forwarder.body_in_hand`);
    ``on_client_lost``: its way of telling a call that its client left
    (:attr:`Forwarder.on_client_lost`).
    ``dashboard_on_proxy``: the dashboard's routes in the proxy's own Starlette app too
    (``ProxyApp.starlette``; the demo serves them on its one port)."""
    register_secret(
        settings.fal_key.reveal() if settings.fal_key is not None else None,
        settings.cf_aig_token.reveal() if settings.cf_aig_token else None,
        settings.access.jwt.secret if settings.access.jwt else None,
    )
    register_secret(
        urlsplit(settings.access.redis_url).password if settings.access.redis_url else None,
        key.reveal() if (key := settings.gateway.metadata_hash_key) is not None else None,
    )
    register_header_names([settings.access.auth_header])
    admission = Admission(settings)
    metrics = Metrics()
    route = UpstreamRoute(settings)  # one session and one breaker for every port
    route.breaker = fallback_breaker(settings, metrics)
    metrics.workers.set(settings.workers)
    metrics.upstream_connections.session = lambda: route.session
    if isinstance(admission.limiter, RedisLimiter):  # each script call's round trip
        admission.limiter._batches.on_call = metrics.observe_redis
    python_port = settings.python_sdk.port
    # The Python client's TLS port gets its own transports, configured once for it.
    python = PythonSdkListener(settings.python_sdk.origin) if python_port is not None else None
    ports = [None, python] if python is not None else [None]
    forwarders = [Forwarder(settings, admission, metrics, route, python=p) for p in ports]
    for forwarder in forwarders:
        if body_in_hand is not None:
            forwarder.body_in_hand = body_in_hand
        if on_client_lost is not None:
            forwarder.on_client_lost = on_client_lost
    bridges = [Bridge(settings, admission, metrics, python=p) for p in ports]
    for bridge in bridges:
        bridge.breaker = route.breaker
    draining = asyncio.Event()
    log = get_logger("proxy")
    # One watcher, one interval (FAL_PROXY_SECRET_RELOAD_SECONDS): the key files and the
    # access files (tokens, JWKS, plans).
    watched = [*secret_files(settings, lambda h: install_headers(h)),
               *config_files(settings, admission)]  # fmt: skip
    # FAL_PROXY_ADMIN_TOKEN: the admin API on the operator's port (none without it).
    admin_token = settings.admin_token
    admin_api = AdminApi(admission, admin_token.reveal()) if admin_token is not None else None
    # The dashboard (proxy/dashboard, docs/dashboard.md): on the operator's port, behind the
    # admin token when one is set; refusals by a quota or budget noted by the caller's tag.
    near = NearLimits(CallerTags("hash", admission.tags.key))
    admission.on_limit = near.refused
    feed = Feed(metrics, near, show_ids=admin_token is not None,
                breaker=route.breaker is not None, workers=settings.workers)  # fmt: skip
    dashboard = DashboardRoutes(feed, admin_token.reveal() if admin_token else None, draining)
    if admin_api is not None:

        def use_admin_token(token: str) -> None:
            admin_api.use_token(token)
            dashboard.use_token(token)

        watched += admin_token_file(settings, use_admin_token)
    reloader = Reloader(watched, settings.secret_reload_seconds)
    sampled = settings.metrics_port is not None or dashboard_on_proxy

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        warn_about_open_settings(settings, log)
        await admission.limiter.start()
        route.session = create_session(settings)
        reloader.start()  # the watched files re-read when they change, and on SIGHUP
        metrics.lag.start()  # the event loop's lag: a timer every 0.5 s, no thread
        if sampled:
            feed.start()  # the dashboard's rings: a timer every 10 s (1 s while one is open)
        try:
            yield
        finally:
            feed.stop()
            metrics.lag.stop()
            reloader.stop()
            await route.session.close()
            route.session = None
            await admission.limiter.close()

    def install_headers(injected: InjectedHeaders) -> None:
        register_secret(injected.authorization, injected.cf_aig_authorization)  # before first use
        # One assignment each: calls in flight keep the headers they started with.
        for forwarder in forwarders:
            forwarder.injected = injected
        for bridge in bridges:
            bridge.injected = injected

    async def readyz(_request: Request) -> JSONResponse:
        # Ready: configuration loaded (we are running), upstream client open, Redis reachable
        # when configured, and not draining. Orchestrators stop routing here while draining.
        problems = []
        if draining.is_set():
            problems.append("draining")
        if route.session is None or route.session.closed:
            problems.append("upstream client not ready")
        if not await admission.limiter.ready():
            problems.append("rate-limit store (Redis) unreachable")
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def healthz(_request: Request) -> JSONResponse:
        # Served only once the lifespan has run, i.e. the upstream session exists.
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(_request: Request) -> Response:
        if settings.metrics_port is not None:
            error = NotFound("not found", "metrics are on FAL_PROXY_METRICS_PORT")
            body = error.body()
            return Response(body, error.status, headers={"content-type": "application/json"})
        return render_metrics()

    def render_metrics(_request: Request | None = None) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # FAL_PROXY_METRICS_PORT: the server's second socket, for the operator only.
    admin = Starlette(
        routes=[
            Route("/metrics", render_metrics, methods=["GET"]),
            Route("/usage/{caller:path}", any_caller_usage(admission), methods=["GET"]),
            *(admin_api.routes() if admin_api is not None else []),
            *dashboard.routes(),
        ]
    )

    starlette = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            *(dashboard.routes() if dashboard_on_proxy else []),
        ],
        lifespan=lifespan,
    )

    usage_route = settings.access.usage_route
    token = RealtimeTokenRoute(forwarders[0], settings.proxy_route)
    main = PortApp(forwarders[0], bridges[0], starlette, usage_route, CallerUsage(admission),
                   (settings.access.realtime_token_route, token))  # fmt: skip
    apps: dict[int, ASGIApp] = {}
    if settings.metrics_port is not None:  # the operator's port: /metrics, /usage/<caller>
        apps[settings.metrics_port] = admin
    if python is not None and python_port is not None:  # fal's Python client: fal routes only
        apps[python_port] = PortApp(forwarders[1], bridges[1], starlette, usage_route,
                                    CallerUsage(admission, python))  # fmt: skip
    return ProxyApp(main, apps, starlette, bridges, draining)


def fallback_breaker(settings: Settings, metrics: Metrics) -> Breaker | None:
    """``FAL_PROXY_FALLBACK=direct``: the breaker the forwarder and the bridge share; each
    change of way is logged once and shown by the ``fal_proxy_gateway_bypassed`` gauge."""
    gateway = settings.gateway
    if gateway.fallback != "direct":
        return None
    log = get_logger("proxy.fallback")

    def changed(old: str, new: str) -> None:
        metrics.gateway_bypassed.set(0 if new == "closed" else 1)
        metrics.observe_breaker(new, time.time())
        if new == "open":
            log.warning("gateway_bypassed", state=new, previous=old,
                        note=f"calls go straight to fal for {gateway.fallback_seconds:g}s, "
                        "then one probes the gateway")  # fmt: skip
        elif new == "closed":
            log.warning("gateway_restored", state=new, previous=old,
                        note="calls go through the gateway again")  # fmt: skip
        else:
            log.info("gateway_probe", state=new, previous=old)

    return Breaker(gateway.fallback_failures, gateway.fallback_window,
                   gateway.fallback_seconds, on_change=changed)  # fmt: skip


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def warn_about_open_settings(settings: Settings, log: Any) -> None:
    """Say at start-up what is open by default, so nobody ships it by accident.

    FAL_PROXY_AUTH=none off loopback starts only with FAL_PROXY_ALLOW_UNAUTHENTICATED=true
    (Settings.from_env refuses it otherwise); it is still said at every start."""
    from ..config.settings import is_loopback

    access = settings.access
    if access.auth == "none" and not is_loopback(settings.host):
        log.warning(
            "caller authentication is off (FAL_PROXY_AUTH=none, allowed by "
            f"FAL_PROXY_ALLOW_UNAUTHENTICATED) and the proxy listens on {settings.host}: "
            "anyone who can reach it spends your fal credits. Set FAL_PROXY_AUTH=token or jwt.",
            setting="FAL_PROXY_AUTH",
        )
    if not access.allowed_apps or "*" in access.allowed_apps:
        log.warning(
            "every fal app is allowed: set FAL_PROXY_ALLOWED_APPS (e.g. fal-ai/flux/*) "
            "to the apps your product uses",
            setting="FAL_PROXY_ALLOWED_APPS",
        )
