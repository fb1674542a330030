"""Counters, histograms and a gauge moved on every request, without prometheus-client's locks.

prometheus-client makes every value thread-safe: a ``Counter.inc`` is three Python calls and a
lock, a ``Histogram.observe`` five calls, a lock per value and a Python loop over the buckets.
The proxy moves these metrics only from its event loop's thread, and a small request moved
nine of them: about 60 of its Python calls (``bench/calls.py``). Here a value is a plain float
on a cell kept per label set, a histogram finds its bucket with :func:`bisect.bisect_left`,
and nothing is locked. prometheus-client still does the rest: each metric is a collector in
the app's registry, and :meth:`collect` gives the same families, samples, order and names
(``_total``, ``_bucket``, ``_count``, ``_sum``, ``_created``) as the library's own metric
of that kind would (``tests/unit/observe/test_loop_metrics.py`` compares the two).

Only the event loop moves them. ``/metrics`` on ``FAL_PROXY_METRICS_PORT`` may read them from a
thread: it reads a copy of the cells (``dict.copy`` holds the GIL) and each value once, so a
scrape sees each value as it was at some moment, as with the library's locks.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client import metrics as library
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import INF, floatToGoString


class CounterCell:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class HistogramCell:
    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative: one add per observation
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # The first bound >= amount, as the library's ``amount <= bound`` loop finds it.
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


Cell = TypeVar("Cell", CounterCell, HistogramCell)


class _Labelled(Generic[Cell]):
    """One metric's cells by label values, registered as a collector in ``registry``."""

    typ = ""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._cells: dict[tuple[str, ...], Cell] = {}
        if registry is not None:
            registry.register(self)

    def _new_cell(self) -> Cell:
        raise NotImplementedError

    def labels(self, *values: str) -> Cell:
        """The cell of one label set (made on first use, kept), as the library's ``labels``."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, given {values}")
        cell = self._cells.get(values)
        if cell is None:
            cell = self._cells[values] = self._new_cell()
        return cell

    def collect(self) -> list[Metric]:
        family = Metric(self.name, self.documentation, self.typ)
        for values, cell in self._cells.copy().items():  # a scrape from a thread: a copy
            self._samples(family, dict(zip(self.labelnames, values, strict=True)), cell)
        return [family]

    def _samples(self, family: Metric, labels: dict[str, str], cell: Cell) -> None:
        raise NotImplementedError


def _with_created() -> bool:
    """Whether ``_created`` series are shown, as the library decides for its own metrics
    (``PROMETHEUS_DISABLE_CREATED_SERIES``, ``disable_created_metrics()``): read where the
    library keeps it, at each scrape; shown if a release moves it."""
    return bool(getattr(library, "_use_created", True))


class LoopCounter(_Labelled[CounterCell]):
    """prometheus-client's ``Counter``, moved only from the event loop."""

    typ = "counter"

    def _new_cell(self) -> CounterCell:
        return CounterCell()

    def _samples(self, family: Metric, labels: dict[str, str], cell: CounterCell) -> None:
        family.add_sample(self.name + "_total", labels, cell.value)
        if _with_created():
            family.add_sample(self.name + "_created", labels, cell.created)


class LoopHistogram(_Labelled[HistogramCell]):
    """prometheus-client's ``Histogram``, moved only from the event loop."""

    typ = "histogram"

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None, *, buckets: Sequence[float],
    ) -> None:  # fmt: skip
        bounds = tuple(float(b) for b in buckets)
        self.bounds = bounds if bounds[-1] == INF else (*bounds, INF)
        self._le = [floatToGoString(b) for b in self.bounds]  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry)

    def _new_cell(self) -> HistogramCell:
        return HistogramCell(self.bounds)

    def _samples(self, family: Metric, labels: dict[str, str], cell: HistogramCell) -> None:
        total = 0.0
        for le, count in zip(self._le, list(cell.counts), strict=True):
            total += count
            family.add_sample(self.name + "_bucket", {**labels, "le": le}, total)
        family.add_sample(self.name + "_count", labels, total)
        family.add_sample(self.name + "_sum", labels, cell.sum)
        if _with_created():
            family.add_sample(self.name + "_created", labels, cell.created)


class LoopGauge:
    """prometheus-client's ``Gauge`` without labels, moved only from the event loop."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0.0
        registry.register(self)

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)

    def collect(self) -> list[Metric]:
        family = Metric(self.name, self.documentation, "gauge")
        family.add_sample(self.name, {}, self.value)
        return [family]
