"""Runtime metrics: queue wait, end-to-end latency, batch sizes, step latency, scheduling time.

Each series is a :class:`Histogram`: cumulative bucket counts, sum and count for the Prometheus
text exposition format (``runtime.metrics_text()``), and a window of the most recent samples for
the p50 / p95 / p99 that ``runtime.stats()`` reports. Batch timings also feed a
:class:`~fastgen.runtime.batch_tuning.LatencyProfile` per (engine, bucket, batch size) for auto-tuning.
Thread-safe (one lock); nothing here imports torch.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

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

    def exposition(self, name: str, labels: Mapping[str, str]) -> list[str]:
        lines, running = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts):
            running += count
            le = "+Inf" if bound == math.inf else _number(bound)
            lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {running}")
        lines.append(f"{name}_sum{_labels(labels)} {_number(self.sum)}")
        lines.append(f"{name}_count{_labels(labels)} {self.count}")
        return lines


def _number(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def bucket_label(bucket: Hashable) -> str:
    """``(64, 64)`` -> ``64x64``, ``32`` -> ``32``: a bucket as a metric label."""
    if isinstance(bucket, tuple):
        return "x".join(str(b) for b in bucket)
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
                **dict(gauges or {}),
            }

    def prometheus(self, gauges: Mapping[str, Mapping[str, float]] | None = None, prefix: str = "fastgen") -> str:
        """The Prometheus text exposition format (version 0.0.4). ``gauges``: name -> {kind: value}."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> str:
            full = f"{prefix}_{name}"
            out.append(f"# HELP {full} {help_text}")
            out.append(f"# TYPE {full} {kind}")
            return full

        with self._lock:
            name = family("requests_total", "counter", "Requests that ended, by kind and final status.")
            for (kind, status), n in sorted(self.requests.items()):
                out.append(f"{name}{_labels({'kind': kind, 'status': status})} {n}")
            name = family("rejected_total", "counter", "Submissions refused because the queue was full.")
            for kind, n in sorted(self.rejected.items()):
                out.append(f"{name}{_labels({'kind': kind})} {n}")
            for table, metric, help_text, label in (
                    (self.latency, "request_latency_seconds", "Submission to result of succeeded requests.", "kind"),
                    (self.queue_wait, "queue_wait_seconds", "Submission to start (or to leaving the queue).", "kind"),
                    (self.batch_size, "batch_size", "Requests per scoring batch or generation step.", "kind"),
                    (self.batch_latency, "batch_latency_seconds", "Wall time of one scoring batch.", "kind"),
                    (self.step_latency, "step_latency_seconds", "Wall time of one generation step.", "bucket"),
                    (self.step_rows, "step_rows", "UNet rows per generation step.", "bucket")):
                name = family(metric, "histogram", help_text)
                for key, hist in sorted(table.items()):
                    out += hist.exposition(name, {label: key})
            name = family("schedule_decision_seconds", "histogram", "Time of one scheduling decision.")
            out += self.decisions.exposition(name, {})
        for gauge, values in (gauges or {}).items():
            name = family(gauge, "gauge", gauge.replace("_", " ").capitalize() + ".")
            for kind, value in sorted(values.items()):
                out.append(f"{name}{_labels({'kind': kind} if kind else {})} {_number(value)}")
        return "\n".join(out) + "\n"


__all__ = ["Histogram", "Metrics", "bucket_label"]
