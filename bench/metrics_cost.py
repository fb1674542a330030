#!/usr/bin/env python3
"""What one request's metrics cost: the proxy's loop metrics against prometheus-client's own.

A small request moves nine series: the requests counter, four histograms (whole duration,
time to first byte, upstream round trip, the proxy's own work), the two byte counters, the
generations counter and the in-flight gauge (up, then down). This runs that sequence on
``proxy.observe.metrics.Metrics`` (its per-request metrics are
``proxy.observe.loop_metrics``) and, as the baseline, on prometheus-client's ``Counter``,
``Histogram`` and ``Gauge`` with the same names, buckets and cached label children (what
``Metrics`` did before). Rounds alternate between the two; the table gives the median of
the rounds' best-of-3 and the ratio. In-process, one thread: no server, no load generator.

Usage: ``.venv/bin/python bench/metrics_cost.py [--rounds N] [--number N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.observe.metrics import LATENCY_BUCKETS, Metrics


def proxy_request() -> Callable[[], None]:
    metrics = Metrics()

    def one() -> None:
        metrics.in_flight.inc()
        app = metrics.app_labels("*", "/fal-ai/fast-sdxl", 200)
        metrics.observe_generation(app)
        metrics.observe("run", 200, app, 0.0031, 0.0022, 17, 120, None)
        metrics.observe_upstream("run", 0.0026)
        metrics.observe_overhead("run", 0.0005)
        metrics.in_flight.dec()

    return one


def library_request() -> Callable[[], None]:
    registry, metrics = CollectorRegistry(), Metrics()  # Metrics: the same app label work
    requests = Counter("fal_proxy_requests", "", ["route", "status", "app"], registry=registry)
    histograms = [
        Histogram(name, "", ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        for name in ("duration", "ttfb", "upstream", "overhead")
    ]
    body = Counter("fal_proxy_body_bytes", "", ["direction"], registry=registry)
    generations = Counter("fal_proxy_generations", "", ["app"], registry=registry)
    in_flight = Gauge("fal_proxy_in_flight_requests", "", registry=registry)
    children: dict[tuple[str, str, str], tuple[Any, ...]] = {}
    up = {"run": histograms[2].labels("run")}
    own = {"run": histograms[3].labels("run")}
    apps: dict[str, Any] = {}
    body_in, body_out = body.labels("in"), body.labels("out")

    def one() -> None:  # as Metrics was: children cached per label set
        in_flight.inc()
        app = metrics.app_labels("*", "/fal-ai/fast-sdxl", 200)
        gen = apps.get(app)
        if gen is None:
            gen = apps[app] = generations.labels(app)
        gen.inc()
        key = ("run", "2xx", app)
        cells = children.get(key)
        if cells is None:
            cells = children[key] = (
                requests.labels(*key),
                histograms[0].labels("run"),
                histograms[1].labels("run"),
            )
        count, duration, ttfb = cells
        count.inc()
        duration.observe(0.0031)
        ttfb.observe(0.0022)
        body_in.inc(17)
        body_out.inc(120)
        up["run"].observe(0.0026)
        own["run"].observe(0.0005)
        in_flight.dec()

    return one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=20000, help="requests per timing")
    args = parser.parse_args()
    runs = {"prometheus-client's own metrics": library_request(), "loop metrics": proxy_request()}
    per: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, one in runs.items():
            best = min(timeit.repeat(one, number=args.number, repeat=3))
            per[name].append(best / args.number * 1e6)
    base, ours = (statistics.median(v) for v in per.values())
    ratios = [o / b for b, o in zip(*per.values(), strict=True)]
    print("| one request's metrics | µs (median of rounds) | against the library |")
    print("|---|---:|---:|")
    print(f"| prometheus-client's Counter, Histogram, Gauge (the baseline) | {base:.2f} | 1.00× |")
    print(f"| the proxy's `Metrics` (loop metrics) | {ours:.2f} | "
          f"{statistics.median(ratios):.2f}× |")  # fmt: skip


if __name__ == "__main__":
    main()
