"""Prometheus metrics (prometheus-client), served at ``/metrics``.

One registry per app (so tests and several apps in one process never share counters).
Everything is recorded once per request, where its canonical log line is written, plus
two gauges moved at the start and end of requests and sockets. What every request moves is a
:mod:`.loop_metrics` metric (the same series, without the library's locks); the rest are the
library's own. Labels are bounded, whatever clients send: the route kind, the status class,
the app (:class:`AppLabels`), the refusal reason, the transfer direction.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..policy.allowed_apps import NAMESPACES
from .loop_metrics import CounterCell, HistogramCell, LoopCounter, LoopGauge, LoopHistogram
from .runtime_stats import (
    LAG_BUCKETS,
    LoopLag,
    UpstreamConnections,
    WorkerRestarts,
    process_collector,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
REDIS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# The breaker's state as a number: a dashboard's line and an alert's threshold.
BREAKER_STATES = {"closed": 0.0, "half_open": 0.5, "open": 1.0}
# Streaming responses (SSE) counted open, by route kind: a /stream run, a queue status stream.
STREAM_ROUTES = ("stream", "queue")
# One label set's cells of fal_proxy_requests, its duration and its time to first byte.
RequestCells = tuple[CounterCell, HistogramCell, HistogramCell]


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = LoopCounter(
            "fal_proxy_requests",
            "Requests answered, by route kind, status class and app",
            ["route", "status", "app"],
            registry=registry,
        )
        self.duration = LoopHistogram(
            "fal_proxy_request_duration_seconds",
            "Whole request, proxy in to last byte out",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttfb = LoopHistogram(
            "fal_proxy_upstream_ttfb_seconds",
            "Time to the gateway's response headers",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.bytes = LoopCounter(
            "fal_proxy_body_bytes",
            "Body bytes moved, by direction (in: from clients)",
            ["direction"],
            registry=registry,
        )
        self.in_flight = LoopGauge(
            "fal_proxy_in_flight_requests", "HTTP requests being handled", registry
        )
        self.open_websockets = Gauge(
            "fal_proxy_open_websockets", "Bridged WebSocket sessions", registry=registry
        )
        self.gateway_bypassed = Gauge(
            "fal_proxy_gateway_bypassed",
            "1 while calls go straight to fal, the gateway failing (FAL_PROXY_FALLBACK=direct)",
            registry=registry,
        )
        # By app, never by caller (unbounded labels): per-caller figures are on /usage.
        self.generations = LoopCounter(
            "fal_proxy_generations",
            "Admitted calls that can start a generation (quota-counted), by app",
            ["app"],
            registry=registry,
        )
        # By app, never by caller: a caller's spend is in their usage (bounded labels).
        self.spend = Counter(
            "fal_proxy_spend_usd",
            "What fal's billable units cost at FAL_PROXY_PRICES_FILE's prices, by app (USD)",
            ["app"],
            registry=registry,
        )
        self.billable_units = Counter(
            "fal_proxy_billable_units",
            "fal's x-fal-billable-units on successful responses, summed by app",
            ["app"],
            registry=registry,
        )
        self.refusals = Counter(
            "fal_proxy_refusals",
            "Requests the proxy answered itself, by reason",
            ["reason"],
            registry=registry,
        )
        # Operators' questions (docs/deployment.md#metrics); none adds a label per caller.
        self.upstream_duration = LoopHistogram(
            "fal_proxy_upstream_duration_seconds",
            "The upstream round trip: the request sent to the answer's last byte relayed",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # Whole minus upstream, per call: the proxy's own work (docs/deployment.md#metrics).
        self.overhead = LoopHistogram(
            "fal_proxy_overhead_seconds",
            "The proxy's own work on a forwarded HTTP call: fal_proxy_request_duration_seconds "
            "minus fal_proxy_upstream_duration_seconds of the same call (admission, the "
            "limiter and its Redis round trip, header policy, the wait for the body's first "
            "message, the slot given back and usage settled after, an error answer sent; "
            "not the log line), for every call whose upstream round trip started",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.open_streams = Gauge(
            "fal_proxy_open_streams",
            "Streaming (SSE) calls in flight, by route kind (stream: a /stream run; queue: "
            "a queue status stream)",
            ["route"],
            registry=registry,
        )
        self._open_streams = {route: self.open_streams.labels(route) for route in STREAM_ROUTES}
        self.breaker_state = Gauge(
            "fal_proxy_breaker_state",
            "FAL_PROXY_FALLBACK=direct's breaker: 0 closed (through the gateway), "
            "0.5 half-open (one probe through it), 1 open (straight to fal)",
            registry=registry,
        )
        self.breaker_changed = Gauge(
            "fal_proxy_breaker_last_change_timestamp_seconds",
            "Unix time of the breaker's last change of state (0: none since the start)",
            registry=registry,
        )
        self.breaker_transitions = Counter(
            "fal_proxy_breaker_transitions",
            "The breaker's changes of state, by the state it entered",
            ["state"],
            registry=registry,
        )
        for state in BREAKER_STATES:
            self.breaker_transitions.labels(state)
        self.redis_duration = Histogram(
            "fal_proxy_redis_script_seconds",
            "One limiter script call to Redis (a batch of admits and what is owed), round trip",
            buckets=REDIS_BUCKETS,
            registry=registry,
        )
        self.redis_errors = Counter(
            "fal_proxy_redis_errors",
            "Limiter script calls that failed (Redis unreachable, too slow, or refusing)",
            registry=registry,
        )
        self.loop_lag_last = Gauge(
            "fal_proxy_event_loop_lag_last_seconds",
            "How late the event loop ran its last lag timer",
            registry=registry,
        )
        self.loop_lag = Histogram(
            "fal_proxy_event_loop_lag_seconds",
            "How late the event loop ran a timer it sets every 0.5 s",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.lag = LoopLag(self.loop_lag_last, self.loop_lag)
        self.workers = Gauge(
            "fal_proxy_workers",
            "Processes serving the port (FAL_PROXY_WORKERS; 1: no supervisor)",
            registry=registry,
        )
        self.workers.set(1)
        # Read at scrape time: the upstream pool (set by the app), restarts, /proc.
        self.upstream_connections = UpstreamConnections(lambda: None)
        registry.register(self.upstream_connections)
        registry.register(WorkerRestarts())
        process_collector(registry)
        self._bytes_in = self.bytes.labels("in")
        self._bytes_out = self.bytes.labels("out")
        # A request's three cells, looked up together once per label set.
        self._cells: dict[tuple[str, str, str], RequestCells] = {}
        self.app_labels = AppLabels()

    def observe(
        self,
        route: str | None,
        status: int,
        app: str | None,
        duration: float,
        ttfb: float | None,
        bytes_in: int,
        bytes_out: int,
        error: str | None,
    ) -> None:
        key = (route or "none", f"{status // 100}xx" if status else "none", app or "none")
        cells = self._cells.get(key)
        if cells is None:
            cells = self._cells[key] = (
                self.requests.labels(*key),
                self.duration.labels(key[0]),
                self.ttfb.labels(key[0]),
            )
        requests, duration_cell, ttfb_cell = cells
        # Added in place (counts and byte totals never go down): no call per counter.
        requests.value += 1.0
        duration_cell.observe(duration)
        if ttfb is not None:
            ttfb_cell.observe(ttfb)
        self._bytes_in.value += bytes_in
        self._bytes_out.value += bytes_out
        if error is not None:
            self.refusals.labels(error).inc()

    def observe_generation(self, app: str) -> None:
        """A generation admitted under ``app`` (a bounded label)."""
        self.generations.labels(app).value += 1.0

    def observe_units(self, app: str, units: float, cost: int = 0) -> None:
        """fal's billable units of a request under ``app``, counted once per fal request
        (a run's answer, or its queue result the first time it is fetched), and what they
        cost (micro-dollars; 0: the app has no price in FAL_PROXY_PRICES_FILE)."""
        self.billable_units.labels(app).inc(units)
        if cost:
            self.spend.labels(app).inc(cost / 1_000_000)

    def observe_upstream(self, route: str, seconds: float) -> None:
        """One call's upstream round trip on ``route`` (a target kind: bounded)."""
        self.upstream_duration.labels(route).observe(seconds)

    def observe_overhead(self, route: str, seconds: float) -> None:
        """One forwarded call's own work on ``route`` (a target kind: bounded): its whole
        duration minus its upstream round trip, never below 0."""
        self.overhead.labels(route).observe(seconds if seconds > 0.0 else 0.0)

    def stream_opened(self, route: str) -> Any:
        """The gauge child of a streaming call on ``route`` (moved up now, down by the
        caller at its end), or None when ``route`` is not one of :data:`STREAM_ROUTES`."""
        child = self._open_streams.get(route)
        if child is not None:
            child.inc()
        return child

    def observe_breaker(self, state: str, now: float) -> None:
        """The breaker entered ``state`` at unix time ``now``."""
        self.breaker_state.set(BREAKER_STATES[state])
        self.breaker_changed.set(now)
        self.breaker_transitions.labels(state).inc()

    def observe_redis(self, seconds: float, failed: bool) -> None:
        """One limiter script call to Redis: its round trip, and whether it failed."""
        self.redis_duration.observe(seconds)
        if failed:
            self.redis_errors.inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


MAX_APP_LABELS = 100  # distinct apps named in labels when every app is allowed; then "other"


class AppLabels:
    """The ``app`` label: always from a bounded set, whatever paths clients invent.

    With ``FAL_PROXY_ALLOWED_APPS`` set, the pattern that admitted the request. With every
    app allowed, the app's ``owner/alias``, but only once fal answered it with a success
    (made-up apps get 404s) and only for the first ``MAX_APP_LABELS`` apps; else ``other``.
    Refused requests and calls that name no app: ``none``.
    """

    def __init__(self, limit: int = MAX_APP_LABELS) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(
        self, admitted_by: str | None, path: str | None, upstream_status: int | None
    ) -> str:
        if admitted_by is None:
            return "none"
        if admitted_by != "*":
            return admitted_by
        label = app_label(path)
        if label is None or upstream_status is None or upstream_status >= 400:
            return "other"
        if label not in self.seen:
            if len(self.seen) >= self.limit:
                return "other"
            self.seen.add(label)
        return label


def app_label(path: str | None) -> str | None:
    """``/fal-ai/flux/dev/stream`` → ``fal-ai/flux`` (``workflows/x/y`` keeps its namespace)."""
    if not path:
        return None
    parts = path.strip("/").split("/")
    keep = 3 if parts[0] in NAMESPACES else 2
    return "/".join(parts[:keep]) if len(parts) >= keep else None
