"""Prometheus metrics (prometheus-client), served at ``/metrics``.

One registry per app (so tests and several apps in one process never share counters).
Everything is recorded once per request, where its canonical log line is written, plus
two gauges moved at the start and end of requests and sockets. Labels are bounded, whatever
clients send: the route kind, the status class, the app (:class:`AppLabels`), the refusal
reason, the transfer direction.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..policy.allowed_apps import NAMESPACES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "fal_proxy_requests",
            "Requests answered, by route kind, status class and app",
            ["route", "status", "app"],
            registry=registry,
        )
        self.duration = Histogram(
            "fal_proxy_request_duration_seconds",
            "Whole request, proxy in to last byte out",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttfb = Histogram(
            "fal_proxy_upstream_ttfb_seconds",
            "Time to the gateway's response headers",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.bytes = Counter(
            "fal_proxy_body_bytes",
            "Body bytes moved, by direction (in: from clients)",
            ["direction"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "fal_proxy_in_flight_requests", "HTTP requests being handled", registry=registry
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
        self.generations = Counter(
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
        self._bytes_in = self.bytes.labels("in")
        self._bytes_out = self.bytes.labels("out")
        # Labelled children, looked up once per label set: .labels() costs more than the update.
        self._children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
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
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(*key),
                self.duration.labels(key[0]),
                self.ttfb.labels(key[0]),
            )
        requests, duration_child, ttfb_child = children
        requests.inc()
        duration_child.observe(duration)
        if ttfb is not None:
            ttfb_child.observe(ttfb)
        self._bytes_in.inc(bytes_in)
        self._bytes_out.inc(bytes_out)
        if error is not None:
            self.refusals.labels(error).inc()

    def observe_generation(self, app: str) -> None:
        """A generation admitted under ``app`` (a bounded label)."""
        self.generations.labels(app).inc()

    def observe_units(self, app: str, units: float, cost: int = 0) -> None:
        """fal's billable units of a request under ``app``, counted once per fal request
        (a run's answer, or its queue result the first time it is fetched), and what they
        cost (micro-dollars; 0: the app has no price in FAL_PROXY_PRICES_FILE)."""
        self.billable_units.labels(app).inc(units)
        if cost:
            self.spend.labels(app).inc(cost / 1_000_000)

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
