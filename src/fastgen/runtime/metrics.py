"""Runtime metrics: queue wait, end-to-end latency, batch sizes, step latency, scheduling time, LoRA swaps.

Each series is a :class:`Histogram`: cumulative bucket counts, sum and count for Prometheus, and a
window of the most recent samples for the p50 / p95 / p99 that ``runtime.stats()`` reports. Batch
timings also feed a :class:`~fastgen.runtime.batch_tuning.LatencyProfile` per (engine, bucket,
batch size) for auto-tuning. Thread-safe (one lock); nothing here imports torch.

Prometheus: :class:`MetricsCollector` is a ``prometheus_client`` collector that turns the series
into metric families (read under the lock, at scrape time, so recording stays a dict update) plus
the runtime's gauges; each runtime registers one in its own ``CollectorRegistry``
(``runtime.metrics_registry``), never in the process-wide default one, so several runtimes in one
process (and an HTTP app's own metrics) do not clash.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from fastgen.core.stats import percentile
from fastgen.runtime.batch_tuning import LatencyProfile

#: Seconds: 100 us to 2 min, roughly x2.5 apart.
LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0)
DECISION_BUCKETS = (1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 1e-2)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    """Fixed buckets for exposition plus a bounded window of recent samples for percentiles."""

    def __init__(self, buckets: Iterable[float], window: int = 8192) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0
        self.recent: deque[float] = deque(maxlen=window)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1
        self.recent.append(value)

    def summary(self, scale: float = 1.0) -> dict[str, float | int | None]:
        """count, mean and p50 / p95 / p99 of the recent window, times ``scale`` (1e3: seconds to ms)."""
        values = sorted(self.recent)
        out: dict[str, float | int | None] = {"count": self.count,
                                              "mean": (self.sum / self.count * scale) if self.count else None}
        for q in (50, 95, 99):
            p = percentile(values, q)
            out[f"p{q}"] = None if p is None else p * scale
        return out

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs, ``+Inf`` last, as a histogram family takes them."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts):
            running += count
            out.append((floatToGoString(bound), float(running)))
        return out


def bucket_label(bucket: Hashable) -> str:
    """``(64, 64)`` -> ``64x64``, ``32`` -> ``32``: a bucket as a metric label. A generation bucket's
    adapters (``(64, 64, adapters)``) are left out: one series per selection would be unbounded."""
    if isinstance(bucket, tuple):
        return "x".join(str(b) for b in bucket if isinstance(b, (int, float)))
    return str(bucket)


class Metrics:
    """Every series of one runtime."""

    def __init__(self, window: int = 8192) -> None:
        self._lock = threading.Lock()
        self._window = window
        self.requests: dict[tuple[str, str], int] = {}  # (kind, status) -> count
        self.rejected: dict[str, int] = {}
        self.latency: dict[str, Histogram] = {}
        self.queue_wait: dict[str, Histogram] = {}
        self.batch_size: dict[str, Histogram] = {}
        self.batch_latency: dict[str, Histogram] = {}
        self.step_latency: dict[str, Histogram] = {}
        self.step_rows: dict[str, Histogram] = {}
        self.swap_latency: dict[str, Histogram] = {}  # component -> LoRA adapter swaps (count and seconds)
        self.decisions = Histogram(DECISION_BUCKETS, window)
        self.profile = LatencyProfile()

    def _hist(self, table: dict[str, Histogram], key: str, buckets: Iterable[float]) -> Histogram:
        h = table.get(key)
        if h is None:
            h = table[key] = Histogram(buckets, self._window)
        return h

    # --- recording ------------------------------------------------------------------------------

    def request(self, kind: str, status: str, queue_wait_s: float, latency_s: float) -> None:
        """One request ended (any status): its wait before starting and its time since submission."""
        with self._lock:
            self.requests[(kind, status)] = self.requests.get((kind, status), 0) + 1
            self._hist(self.queue_wait, kind, LATENCY_BUCKETS).observe(max(queue_wait_s, 0.0))
            if status == "succeeded":
                self._hist(self.latency, kind, LATENCY_BUCKETS).observe(max(latency_s, 0.0))

    def reject(self, kind: str) -> None:
        with self._lock:
            self.rejected[kind] = self.rejected.get(kind, 0) + 1

    def batch(self, kind: str, bucket: Hashable, size: int, seconds: float, *, engine: str | None = None) -> None:
        """One scoring batch ran."""
        with self._lock:
            self._hist(self.batch_size, kind, SIZE_BUCKETS).observe(size)
            self._hist(self.batch_latency, kind, LATENCY_BUCKETS).observe(seconds)
            self.profile.add(engine or kind, bucket_label(bucket), size, seconds)

    def step(self, bucket: Hashable, requests: int, rows: int, seconds: float, *, engine: str = "unet") -> None:
        """One generation step ran (joins' text encoding and leavers' decoding included)."""
        with self._lock:
            label = bucket_label(bucket)
            self._hist(self.batch_size, "generate", SIZE_BUCKETS).observe(requests)
            self._hist(self.step_rows, label, SIZE_BUCKETS).observe(rows)
            self._hist(self.step_latency, label, LATENCY_BUCKETS).observe(seconds)
            self.profile.add(engine, label, rows, seconds)

    def adapter_swaps(self, swaps: Iterable[tuple[str, float]]) -> None:
        """LoRA adapter swaps a run made: (component, seconds) each."""
        with self._lock:
            for component, seconds in swaps:
                self._hist(self.swap_latency, component, LATENCY_BUCKETS).observe(seconds)

    def profile_snapshot(self) -> LatencyProfile:
        """A copy of the latency profile recorded so far (safe to read while the runtime serves)."""
        with self._lock:
            return LatencyProfile.from_dict(self.profile.to_dict(), self.profile.window)

    def decision(self, seconds: float) -> None:
        with self._lock:
            self.decisions.observe(seconds)

    # --- reading --------------------------------------------------------------------------------

    def stats(self, gauges: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A JSON-able summary; latencies in milliseconds, scheduling decisions in microseconds."""
        with self._lock:
            kinds = sorted({k for k, _ in self.requests} | set(self.latency) | set(self.rejected))
            per_kind = {}
            for kind in kinds:
                per_kind[kind] = {
                    "requests": {s: n for (k, s), n in sorted(self.requests.items()) if k == kind},
                    "rejected": self.rejected.get(kind, 0),
                    "latency_ms": self.latency[kind].summary(1e3) if kind in self.latency else None,
                    "queue_wait_ms": self.queue_wait[kind].summary(1e3) if kind in self.queue_wait else None,
                    "batch_size": self.batch_size[kind].summary() if kind in self.batch_size else None,
                    "batch_latency_ms": (self.batch_latency[kind].summary(1e3) if kind in self.batch_latency
                                         else None),
                }
            return {
                "kinds": per_kind,
                "steps": {b: {"latency_ms": h.summary(1e3), "rows": self.step_rows[b].summary()}
                          for b, h in sorted(self.step_latency.items())},
                "schedule_decision_us": self.decisions.summary(1e6),
                "adapter_swaps": {c: {**h.summary(1e3), "total_ms": h.sum * 1e3}
                                  for c, h in sorted(self.swap_latency.items())},
                **dict(gauges or {}),
            }

    def families(self, prefix: str = "fastgen") -> list[Metric]:
        """The counters and histograms as ``prometheus_client`` metric families (a snapshot)."""
        requests = CounterMetricFamily(f"{prefix}_requests_total", "Requests that ended, by kind and final status.",
                                       labels=["kind", "status"])  # the family is "..._requests": "_total" is added
        rejected = CounterMetricFamily(f"{prefix}_rejected_total", "Submissions refused because the queue was full.",
                                       labels=["kind"])
        out: list[Metric] = [requests, rejected]
        with self._lock:
            for (kind, status), n in sorted(self.requests.items()):
                requests.add_metric([kind, status], n)
            for kind, n in sorted(self.rejected.items()):
                rejected.add_metric([kind], n)
            for table, metric, help_text, label in _HISTOGRAMS:
                family = HistogramMetricFamily(f"{prefix}_{metric}", help_text, labels=[label])
                for key, hist in sorted(getattr(self, table).items()):
                    family.add_metric([key], hist.buckets(), hist.sum)
                out.append(family)
            family = HistogramMetricFamily(f"{prefix}_schedule_decision_seconds", "Time of one scheduling decision.")
            family.add_metric([], self.decisions.buckets(), self.decisions.sum)
            out.append(family)
        return out


# (Metrics attribute, series name, help, label): the histograms with one label.
_HISTOGRAMS = (
    ("latency", "request_latency_seconds", "Submission to result of succeeded requests.", "kind"),
    ("queue_wait", "queue_wait_seconds", "Submission to start (or to leaving the queue).", "kind"),
    ("batch_size", "batch_size", "Requests per scoring batch or generation step.", "kind"),
    ("batch_latency", "batch_latency_seconds", "Wall time of one scoring batch.", "kind"),
    ("step_latency", "step_latency_seconds", "Wall time of one generation step.", "bucket"),
    ("step_rows", "step_rows", "UNet rows per generation step.", "bucket"),
    ("swap_latency", "adapter_swap_seconds", "LoRA adapter swaps (fused weights) per component; _count: swaps.",
     "component"),
)

#: The runtime's gauges: name -> help. Their values come as name -> {kind: value} ("" : no label).
GAUGES = {
    "queue_depth": "Requests waiting to start, by kind.",
    "active_requests": "Generation requests in an active set (stepping), by kind.",
    "inflight_requests": "Requests accepted and not yet ended.",
}


class MetricsCollector(Collector):
    """A ``prometheus_client`` collector of one runtime: ``metrics``' families and the gauges that
    ``gauges()`` reads (name -> {kind: value}; the kind "" gives a series without a label)."""

    def __init__(self, metrics: Metrics, gauges: Callable[[], Mapping[str, Mapping[str, float]]],
                 prefix: str = "fastgen") -> None:
        self.metrics = metrics
        self.gauges = gauges
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics.families(self.prefix)
        for name, values in self.gauges().items():
            kinds = sorted(values)
            labels = ["kind"] if any(kinds) else []
            family = GaugeMetricFamily(f"{self.prefix}_{name}", GAUGES.get(name, name.replace("_", " ") + "."),
                                       labels=labels)
            for kind in kinds:
                family.add_metric([kind] if labels else [], values[kind])
            yield family

    def describe(self) -> Iterator[Metric]:
        """The families without samples: what a registry checks names against (no lock, no gauge read)."""
        yield from Metrics().families(self.prefix)
        for name, help_text in GAUGES.items():
            yield GaugeMetricFamily(f"{self.prefix}_{name}", help_text)


__all__ = ["GAUGES", "Histogram", "Metrics", "MetricsCollector", "bucket_label"]
