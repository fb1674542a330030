"""proxy.observe.loop_metrics: the same series as prometheus-client's own metrics, given the
same updates (the library is the reference answer)."""

from __future__ import annotations

import random

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    enable_created_metrics,
    generate_latest,
)

from proxy.observe.loop_metrics import LoopCounter, LoopGauge, LoopHistogram
from proxy.observe.metrics import LATENCY_BUCKETS


def samples(registry: CollectorRegistry) -> list[tuple[str, str, dict[str, str], float | None]]:
    """Every family's type and every sample, ``_created`` values left out (a clock reading)."""
    return [
        (family.type, s.name, s.labels, None if s.name.endswith("_created") else s.value)
        for family in registry.collect()
        for s in family.samples
    ]


def without_created(text: bytes) -> list[bytes]:
    return [line for line in text.splitlines() if b"_created" not in line]


def test_histograms_give_the_librarys_buckets_count_and_sum_for_the_same_observations() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = LoopHistogram("t_seconds", "help", ["route"], ours, buckets=LATENCY_BUCKETS)
    lib = Histogram("t_seconds", "help", ["route"], buckets=LATENCY_BUCKETS, registry=theirs)
    rng = random.Random(7)
    # Every bound exactly (a value on a bound is in that bound's bucket), 0, past the last.
    values = [*LATENCY_BUCKETS, 0.0, 1e9, *(rng.expovariate(2.0) for _ in range(2000))]
    for i, value in enumerate(values):
        route = ("run", "queue", "stream")[i % 3]
        mine.labels(route).observe(value)
        lib.labels(route).observe(value)
    assert samples(ours) == samples(theirs)
    assert without_created(generate_latest(ours)) == without_created(generate_latest(theirs))


def test_counters_give_the_librarys_totals_and_refuse_to_go_down_as_it_does() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = LoopCounter("t_requests", "help", ["route", "status"], ours)
    lib = Counter("t_requests", "help", ["route", "status"], registry=theirs)
    for i in range(300):
        labels = (("run", "queue")[i % 2], ("2xx", "4xx", "5xx")[i % 3])
        mine.labels(*labels).inc(i % 5)
        lib.labels(*labels).inc(i % 5)
    mine.labels("run", "2xx").value += 2.5  # what Metrics.observe does in place
    lib.labels("run", "2xx").inc(2.5)
    assert samples(ours) == samples(theirs)
    assert without_created(generate_latest(ours)) == without_created(generate_latest(theirs))
    with pytest.raises(ValueError):
        mine.labels("run", "2xx").inc(-1)
    with pytest.raises(ValueError):
        mine.labels("run")  # the wrong number of label values, as the library refuses


def test_a_metric_with_no_label_set_yet_is_listed_with_no_series_as_the_librarys() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    LoopCounter("t_generations", "help", ["app"], ours)
    LoopHistogram("t_overhead_seconds", "help", ["route"], ours, buckets=(0.1, 1))
    Counter("t_generations", "help", ["app"], registry=theirs)
    Histogram("t_overhead_seconds", "help", ["route"], buckets=(0.1, 1), registry=theirs)
    assert generate_latest(ours) == generate_latest(theirs)


def test_the_gauge_moves_as_the_librarys() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = LoopGauge("t_in_flight", "help", ours)
    lib = Gauge("t_in_flight", "help", registry=theirs)
    assert generate_latest(ours) == generate_latest(theirs)  # 0 before anything
    for gauge in (mine, lib):
        gauge.inc()
        gauge.inc(3)
        gauge.dec()
    assert generate_latest(ours) == generate_latest(theirs)
    mine.set(7)
    lib.set(7)
    assert generate_latest(ours) == generate_latest(theirs)


def test_a_label_set_keeps_its_cell_and_its_created_time() -> None:
    metric = LoopCounter("t_requests", "help", ["route"], CollectorRegistry())
    cell = metric.labels("run")
    assert metric.labels("run") is cell
    created = [s.value for s in metric.collect()[0].samples if s.name.endswith("_created")]
    assert created == [cell.created]


def test_created_series_are_left_out_when_the_library_leaves_out_its_own() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = LoopCounter("t_requests", "help", ["route"], ours)
    histogram = LoopHistogram("t_seconds", "help", ["route"], ours, buckets=(0.1, 1))
    lib_counter = Counter("t_requests", "help", ["route"], registry=theirs)
    lib_histogram = Histogram("t_seconds", "help", ["route"], buckets=(0.1, 1), registry=theirs)
    for metric in (counter, lib_counter):
        metric.labels("run").inc()
    for metric in (histogram, lib_histogram):
        metric.labels("run").observe(0.5)
    disable_created_metrics()  # what PROMETHEUS_DISABLE_CREATED_SERIES=true does at import
    try:
        assert b"_created" not in generate_latest(ours)
        assert generate_latest(ours) == generate_latest(theirs)
    finally:
        enable_created_metrics()
    shown = generate_latest(ours)
    assert b't_requests_created{route="run"}' in shown
    assert b't_seconds_created{route="run"}' in shown
