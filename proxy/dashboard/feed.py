"""What the dashboard shows, sampled from the proxy's own metric objects into bounded rings.

Nothing here runs per request, and nothing grows with the number of callers:

* **Sampling.** One asyncio timer (no thread) reads the counters and gauges of
  :class:`~proxy.observe.metrics.Metrics` in place (``collect()`` of each metric object: its
  children are bounded labels: route kinds, status classes, apps, refusal reasons) plus the
  process figures from ``/proc``. Always, every :data:`COARSE_SECONDS` (10 s), into the
  *hour ring* (:data:`COARSE_POINTS` = 361 points: the hour in 360 intervals of 10 s): a
  few hundred microseconds every 10 s, so that "the last hour" is true the moment a page
  opens. Every second, and only while at least one page is connected, into the *live ring*
  (a minute), and a snapshot is sent to every page.
* **Memory.** A sample is its time and one ``array('d')`` of every series' value, indexed by
  :class:`Keys` (append-only, at most :data:`MAX_KEYS` series: the labels are bounded
  already, the cap is a guard). So the rings hold at most 361 + 61 arrays of at most
  1024 doubles (3.4 MB in the worst case; a few dozen series, ~100 KB, in practice).
* **Rates** come from counter differences between two samples divided by the time between
  them; percentiles from the differences of the histograms' buckets (as Prometheus's
  ``histogram_quantile``: linear inside a bucket).
* **Callers near or over their limits** (:class:`NearLimits`): the admission gate reports,
  in O(1), each refusal by a quota or a budget ("over") and each admitted call that left one
  at 80 % or more of its limit ("near", :data:`proxy.admission.gate.NEAR_LIMIT`; the
  limiter returns what is used with the admission, no read of its own); the last
  :data:`NEAR_LIMITS` (caller, limit) pairs are kept, shown by the caller's keyed tag (the
  ``cf-aig-metadata`` hash), and by id only to an admin.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import ProcessCollector
from prometheus_client.registry import Collector

from ..errors import BudgetExceeded, QuotaExceeded, RateLimited
from ..limits import QuotaNear
from ..limits.money import MICROS, as_usd, usd
from ..observe.metrics import BREAKER_STATES, LATENCY_BUCKETS, Metrics
from ..policy.metadata import CallerTags

LIVE_SECONDS = 1.0  # a snapshot to the pages this often, while any is connected
COARSE_SECONDS = 10.0  # the hour ring's resolution
COARSE_POINTS = 361  # the last hour at 10 s: 360 intervals
FINE_POINTS = 61  # the live ring: a minute at 1 s
MAX_KEYS = 1024  # series a sample may hold
NEAR_LIMITS = 50  # (caller, limit) pairs kept of the recent refusals and near-limit calls
MAX_VIEWERS = 16  # pages connected at once (each holds one queue of 2 messages)
RATE_SECONDS = 10.0  # the header's req/s and error % are over the last 10 s
LATENCY_SECONDS = 60.0  # the header's percentiles are over the last minute
HOUR = 3600.0
BOUNDS = (*LATENCY_BUCKETS, math.inf)
STATE_NAMES = {value: name for name, value in BREAKER_STATES.items()}


class Keys:
    """Series name → index in a sample's array: append-only, at most ``limit`` names
    (a name past the limit is dropped and counted)."""

    def __init__(self, limit: int = MAX_KEYS) -> None:
        self.limit = limit
        self.index: dict[str, int] = {}
        self.names: list[str] = []
        self.dropped = 0

    def pack(self, values: dict[str, float]) -> array[float]:
        out = array("d", bytes(8 * len(self.names)))
        for name, value in values.items():
            i = self.index.get(name)
            if i is None:
                if len(self.names) >= self.limit:
                    self.dropped += 1
                    continue
                i = self.index[name] = len(self.names)
                self.names.append(name)
                out.append(0.0)
            out[i] = value
        return out


@dataclass(frozen=True)
class Sample:
    t: float
    values: array[float]


ZERO = Sample(0.0, array("d"))  # the counters at the process's start


def quantile(q: float, cumulative: list[float]) -> float | None:
    """The ``q`` quantile (seconds) of a histogram's cumulative bucket counts over
    :data:`BOUNDS`, as Prometheus's ``histogram_quantile``; None without observations."""
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in zip(BOUNDS, cumulative, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower  # the top bucket has no upper bound: its lower one
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _bucket_index(le: str) -> int | None:
    value = float(le)
    for i, bound in enumerate(BOUNDS):
        if value == bound:
            return i
    return None


def _counter_totals(metric: Any, label: str | None, prefix: str, out: dict[str, float]) -> None:
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                name = prefix + (sample.labels[label] if label else "")
                out[name] = out.get(name, 0.0) + sample.value


def _gauge_sum(metric: Any) -> float:
    return float(sum(s.value for family in metric.collect() for s in family.samples))


def _buckets(metric: Any, prefix: str, out: dict[str, float]) -> None:
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                i = _bucket_index(sample.labels["le"])
                if i is not None:
                    out[f"{prefix}{i}"] = out.get(f"{prefix}{i}", 0.0) + sample.value


def read_metrics(metrics: Metrics, process: Collector | None) -> dict[str, float]:
    """Every series the dashboard keeps, read from the metric objects as ``/metrics`` would
    render them now (same counters, same values)."""
    out: dict[str, float] = {"req": 0.0, "err": 0.0}
    for family in metrics.requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out["req"] += sample.value
                if sample.labels.get("status") in ("4xx", "5xx"):
                    out["err"] += sample.value
    _counter_totals(metrics.refusals, "reason", "ref:", out)
    _counter_totals(metrics.generations, "app", "gen:", out)
    _counter_totals(metrics.billable_units, "app", "units:", out)
    _counter_totals(metrics.spend, "app", "usd:", out)
    _buckets(metrics.duration, "dur:", out)
    _buckets(metrics.upstream_duration, "up:", out)
    _buckets(metrics.overhead, "oh:", out)
    out["g:in_flight"] = _gauge_sum(metrics.in_flight)
    out["g:sockets"] = _gauge_sum(metrics.open_websockets)
    out["g:streams"] = _gauge_sum(metrics.open_streams)
    out["g:breaker"] = _gauge_sum(metrics.breaker_state)
    out["g:breaker_changed"] = _gauge_sum(metrics.breaker_changed)
    out["g:lag"] = _gauge_sum(metrics.loop_lag_last)
    for family in metrics.upstream_connections.collect():
        for sample in family.samples:
            out[f"g:upstream_{sample.labels['state']}"] = sample.value
    if process is not None:
        for family in process.collect():
            for sample in family.samples:
                out[f"p:{sample.name}"] = sample.value
    return out


@dataclass
class NearLimit:
    tag: str
    caller: str
    limit: str  # the quota or budget, as written (``*=3/day``, ``*=$0.03/day``)
    kind: str  # quota | budget
    used: float  # generations, or dollars
    of: float  # the limit: generations, or dollars
    refused: int  # calls refused by it since it entered the set
    at: float  # unix time of the last
    state: str = "near"  # the last report's: near (admitted, >= 80 %) | over (refused)


def limit_name(apps: str, limit: int, period: str, money: bool) -> str:
    """A quota or budget as the table names it, the same whether a refusal or a near report
    names it: ``*=3/day``, ``*=$0.03/day`` (``limit``: generations, or micro-dollars)."""
    return f"{apps}={usd(limit, plain=True) if money else limit}/{period}"


class NearLimits:
    """The callers lately refused by a quota or a budget, or left near one by an admitted
    call: the last ``size`` (caller, limit) pairs, updated in O(1) per report (an ordered
    dict, the oldest dropped)."""

    def __init__(self, tags: CallerTags, size: int = NEAR_LIMITS,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.tags = tags
        self.size = size
        self.clock = clock
        self.entries: OrderedDict[tuple[str, str], NearLimit] = OrderedDict()

    def report(self, caller: str, event: RateLimited | QuotaNear) -> None:
        """``caller`` (its limit key) was refused with ``event`` (a quota's or a budget's
        refusal: "over"; any other refusal is ignored), or admitted with a quota or budget
        left near its limit (a :class:`~proxy.limits.QuotaNear`: "near")."""
        state = "over"
        if isinstance(event, QuotaNear):
            q, state = event.quota, "near"
            limit = limit_name(q.pattern, q.limit, q.period, q.money)
            if q.money:
                kind, used, of = "budget", as_usd(event.used), as_usd(q.limit)
            else:
                kind, used, of = "quota", float(event.used), float(q.limit)
        elif isinstance(event, QuotaExceeded):
            r = event.quota
            count = int(str(r["limit"]))
            limit, kind = limit_name(str(r["apps"]), count, str(r["period"]), False), "quota"
            used = of = float(count)
        elif isinstance(event, BudgetExceeded):
            b = event.budget
            used, of = float(str(b["spent_usd"])), float(str(b["limit_usd"]))
            micros = round(of * MICROS)
            limit, kind = limit_name(str(b["apps"]), micros, str(b["period"]), True), "budget"
        else:
            return
        key = (caller, limit)
        entry = self.entries.get(key)
        if entry is None:
            tag = self.tags.tag(caller) or ""
            entry = self.entries[key] = NearLimit(tag, caller, limit, kind, used, of, 0, 0.0)
        else:
            self.entries.move_to_end(key)
        entry.used, entry.of, entry.at, entry.state = used, of, self.clock(), state
        if state == "over":
            entry.refused += 1
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    refused = report  # the name proxy/app/assemble.py wires to Admission.on_limit

    def rows(self, ids: bool) -> list[dict[str, Any]]:
        """Newest first; ``ids``: with the caller ids (an admin is looking)."""
        out = []
        for e in reversed(self.entries.values()):
            row: dict[str, Any] = {"tag": e.tag, "limit": e.limit, "kind": e.kind,
                                   "state": e.state, "used": e.used, "of": e.of,
                                   "refused": e.refused, "at": e.at}  # fmt: skip
            if ids:
                row["caller"] = e.caller
            out.append(row)
        return out


class Viewer:
    """One connected page: the messages not yet sent (at most 2: a slow page skips)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=2)
        self.series_version = -1

    def put(self, message: str) -> None:
        if self.queue.full():
            self.queue.get_nowait()  # the oldest goes: the newest snapshot has it all
        self.queue.put_nowait(message)


class TooManyViewers(Exception):
    pass


class Feed:
    """The rings, the timer and the snapshots (module docstring)."""

    def __init__(
        self, metrics: Metrics, near: NearLimits, *, show_ids: bool, breaker: bool,
        workers: int, clock: Callable[[], float] = time.time,
        process: Collector | None = None,
    ) -> None:  # fmt: skip
        self.metrics = metrics
        self.near = near
        self.show_ids = show_ids  # the page is behind the admin token: its viewers are admins
        self.breaker = breaker  # FAL_PROXY_FALLBACK=direct: a breaker exists
        self.workers = workers
        self.clock = clock
        self.process = process if process is not None else ProcessCollector(registry=None)
        self.keys = Keys()
        self.coarse: deque[Sample] = deque(maxlen=COARSE_POINTS)
        self.fine: deque[Sample] = deque(maxlen=FINE_POINTS)
        self.version = 0  # of the hour ring (a new point: the pages get the series again)
        self.seq = 0
        self.started = clock()
        self.viewers: set[Viewer] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._series_cache: tuple[int, dict[str, Any]] | None = None

    # -- the timer ------------------------------------------------------------------------

    def start(self) -> None:
        """Take the first sample and arm the timer (on the running loop)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.sample(self.clock(), live=False)
        self._arm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._loop = None

    def _arm(self) -> None:
        if self._loop is None:
            return
        if self._handle is not None:
            self._handle.cancel()
        if self.viewers:
            delay = LIVE_SECONDS
        else:
            last = self.coarse[-1].t if self.coarse else self.clock()
            delay = max(0.05, last + COARSE_SECONDS - self.clock())
        self._handle = self._loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._handle = None
        now = self.clock()
        self.sample(now, live=bool(self.viewers))
        if self.viewers:
            self.broadcast(now)
        self._arm()

    # -- samples ----------------------------------------------------------------------------

    def sample(self, now: float, *, live: bool) -> Sample:
        """Read every series now; into the hour ring when its next point is due, into the
        live ring when ``live``. Returns the sample."""
        packed = Sample(now, self.keys.pack(read_metrics(self.metrics, self.process)))
        if not self.coarse or now - self.coarse[-1].t >= COARSE_SECONDS - 0.5:
            self.coarse.append(packed)
            self.version += 1
        if live:
            self.fine.append(packed)
        return packed

    def value(self, sample: Sample, name: str) -> float:
        i = self.keys.index.get(name)
        return sample.values[i] if i is not None and i < len(sample.values) else 0.0

    def group(self, sample: Sample, prefix: str, base: Sample | None = None) -> dict[str, float]:
        """Every series named ``prefix…``, by the rest of its name (minus ``base``'s)."""
        out = {}
        for name in self.keys.names:
            if name.startswith(prefix):
                value = self.value(sample, name) - (self.value(base, name) if base else 0.0)
                out[name[len(prefix) :]] = _clean(value)
        return out

    def _before(self, t: float, rings: Iterable[deque[Sample]]) -> Sample | None:
        """The newest sample taken at or before ``t`` in the first ring that has one."""
        for ring in rings:
            for sample in reversed(ring):
                if sample.t <= t:
                    return sample
        return None

    def _cumulative(self, sample: Sample, base: Sample, prefix: str) -> list[float]:
        return [self.value(sample, f"{prefix}{i}") - self.value(base, f"{prefix}{i}")
                for i in range(len(BOUNDS))]  # fmt: skip

    # -- snapshots --------------------------------------------------------------------------

    def live(self, now: float, current: Sample) -> dict[str, Any]:
        """The snapshot's figures of now (the header, the totals, the hour, the callers)."""
        value = self.value
        # Rates over the last ~10 s: the newest sample from then or before (the live ring's,
        # else the hour ring's), else the first one (the start).
        ref = self._before(now - RATE_SECONDS, [self.fine, self.coarse]) or (
            self.coarse[0] if self.coarse and self.coarse[0].t < now else None
        )
        rps = error_pct = 0.0
        window = 0.0
        if ref is not None and now > ref.t:
            window = now - ref.t
            requests = value(current, "req") - value(ref, "req")
            rps = requests / window
            errors = value(current, "err") - value(ref, "err")
            error_pct = 100.0 * errors / requests if requests else 0.0
        lat = self._before(now - LATENCY_SECONDS, [self.coarse]) or (
            self.coarse[0] if self.coarse else ZERO
        )
        whole = self._cumulative(current, lat, "dur:")
        upstream = self._cumulative(current, lat, "up:")
        overhead = self._cumulative(current, lat, "oh:")
        hour_base = self._before(now - HOUR, [self.coarse])
        base = hour_base or ZERO
        state = value(current, "g:breaker")
        return {
            "seq": self.seq,
            "t": now,
            "pid": os.getpid(),
            "workers": self.workers,
            "started": self.started,
            "now": {
                "window_s": round(window, 3),
                "rps": _clean(rps),
                "error_pct": _clean(error_pct),
                "latency_window_s": round(now - lat.t, 3) if lat is not ZERO else None,
                "p50_ms": _ms(quantile(0.5, whole)),
                "p99_ms": _ms(quantile(0.99, whole)),
                "upstream_p50_ms": _ms(quantile(0.5, upstream)),
                "upstream_p99_ms": _ms(quantile(0.99, upstream)),
                "overhead_p50_ms": _ms(quantile(0.5, overhead)),
                "overhead_p99_ms": _ms(quantile(0.99, overhead)),
                "in_flight": value(current, "g:in_flight"),
                "streams_open": value(current, "g:streams"),
                "sockets_open": value(current, "g:sockets"),
                "breaker_enabled": self.breaker,
                "breaker_state": STATE_NAMES.get(state, str(state)),
                "breaker_changed_at": value(current, "g:breaker_changed") or None,
                "upstream_in_use": value(current, "g:upstream_in_use"),
                "upstream_idle": value(current, "g:upstream_idle"),
                "rss_bytes": value(current, "p:process_resident_memory_bytes"),
                "open_fds": value(current, "p:process_open_fds"),
                "max_fds": value(current, "p:process_max_fds"),
                "loop_lag_ms": _clean(value(current, "g:lag") * 1000),
            },
            "totals": {
                "requests": value(current, "req"),
                "errors": value(current, "err"),
                "refusals": self.group(current, "ref:"),
                "generations": self.group(current, "gen:"),
                "billable_units": self.group(current, "units:"),
                "spend_usd": self.group(current, "usd:"),
            },
            "hour": {
                # The counters at the start when the hour ring does not reach back an hour.
                "since": hour_base.t if hour_base is not None else self.started,
                "full": hour_base is not None,
                "generations": self.group(current, "gen:", base),
                "billable_units": self.group(current, "units:", base),
                "spend_usd": self.group(current, "usd:", base),
                "refusals": self.group(current, "ref:", base),
            },
            "near_limits": self.near.rows(self.show_ids),
            "ids_shown": self.show_ids,
            # The lines' newest point: from the hour ring's last one to now (a page draws it
            # after the series, so the lines move every second, not every 10).
            "tail": self.point(self.coarse[-1], current, self._reasons())
            if self.coarse and current.t > self.coarse[-1].t
            else None,
        }

    def _reasons(self) -> list[str]:
        return [n[4:] for n in self.keys.names if n.startswith("ref:")]

    def series(self) -> dict[str, Any]:
        """The hour ring as chart lines: a point per 10 s interval (cached per version)."""
        if self._series_cache is not None and self._series_cache[0] == self.version:
            return self._series_cache[1]
        points = list(self.coarse)
        reasons = self._reasons()
        out: dict[str, Any] = {"t": [], "rps": [], "error_pct": [], "p50_ms": [], "p99_ms": [],
                               "upstream_p99_ms": [], "overhead_p50_ms": [],
                               "overhead_p99_ms": [], "generations": [], "streams": [],
                               "sockets": [], "lag_ms": [], "rss_mb": [],
                               "refusals": {r: [] for r in reasons}}  # fmt: skip
        for a, b in itertools.pairwise(points):
            point = self.point(a, b, reasons)
            for name, got in point.items():
                if name == "refusals":
                    for reason in reasons:
                        out["refusals"][reason].append(got[reason])
                else:
                    out[name].append(got)
        self._series_cache = (self.version, out)
        return out

    def point(self, a: Sample, b: Sample, reasons: list[str]) -> dict[str, Any]:
        """One point of the chart lines: the interval from ``a`` to ``b``."""
        value = self.value
        span = b.t - a.t
        requests = value(b, "req") - value(a, "req")
        errors = value(b, "err") - value(a, "err")
        whole = self._cumulative(b, a, "dur:")
        overhead = self._cumulative(b, a, "oh:")
        return {
            "t": round(b.t, 3),
            "rps": _clean(requests / span) if span > 0 else 0.0,
            "error_pct": _clean(100 * errors / requests) if requests else 0.0,
            "p50_ms": _ms(quantile(0.5, whole)),
            "p99_ms": _ms(quantile(0.99, whole)),
            "upstream_p99_ms": _ms(quantile(0.99, self._cumulative(b, a, "up:"))),
            "overhead_p50_ms": _ms(quantile(0.5, overhead)),
            "overhead_p99_ms": _ms(quantile(0.99, overhead)),
            "generations": _clean(sum(self.group(b, "gen:", a).values())),
            "streams": value(b, "g:streams"),
            "sockets": value(b, "g:sockets"),
            "lag_ms": _clean(value(b, "g:lag") * 1000),
            "rss_mb": round(value(b, "p:process_resident_memory_bytes") / 2**20, 1),
            "refusals": {r: _clean(value(b, f"ref:{r}") - value(a, f"ref:{r}")) for r in reasons},
        }

    def message(self, now: float, current: Sample, viewer: Viewer) -> str:
        body: dict[str, Any] = {"live": self.live(now, current)}
        if viewer.series_version != self.version:
            body["series"] = self.series()
            viewer.series_version = self.version
        return json.dumps(body, separators=(",", ":"), allow_nan=False)

    def broadcast(self, now: float) -> None:
        """A snapshot to every page (each message built once per series state)."""
        self.seq += 1
        current = self.fine[-1] if self.fine else self.sample(now, live=True)
        live = json.dumps(self.live(now, current), separators=(",", ":"), allow_nan=False)
        with_series: str | None = None
        for viewer in self.viewers:
            if viewer.series_version != self.version:
                if with_series is None:
                    series = json.dumps(self.series(), separators=(",", ":"), allow_nan=False)
                    with_series = '{"live":' + live + ',"series":' + series + "}"
                viewer.series_version = self.version
                viewer.put(with_series)
            else:
                viewer.put('{"live":' + live + "}")

    # -- pages ------------------------------------------------------------------------------

    def subscribe(self) -> Viewer:
        """A page connected: its first snapshot at once, then one a second. Raises
        :class:`TooManyViewers` past :data:`MAX_VIEWERS`."""
        if len(self.viewers) >= MAX_VIEWERS:
            raise TooManyViewers()
        viewer = Viewer()
        now = self.clock()
        current = self.sample(now, live=True)
        self.seq += 1
        viewer.put(self.message(now, current, viewer))
        first = not self.viewers
        self.viewers.add(viewer)
        if first:
            self._arm()  # from the hour ring's pace to a tick a second
        return viewer

    def unsubscribe(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)
        if not self.viewers:
            self.fine.clear()  # stale by the next page: its rates start afresh
            self._arm()


def _clean(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
