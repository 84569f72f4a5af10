"""Auto-tuning: the batch size and wait that maximise throughput under a p99 latency target.

Input: a :class:`LatencyProfile`, measured latencies of one batch (or one generation step) per
(engine, bucket, batch size), from :func:`measure` or recorded by a running runtime.

Model, per batch size ``b`` with median and p99 batch latency ``L50(b)``, ``L99(b)``:

- capacity: ``b / L50(b)`` requests per second when batches run back to back;
- worst-case latency: ``wait + 2 * L99(b)`` (a request waits up to ``wait`` for its batch to fill,
  then for the batch already running, then for its own), which must stay within the target, so
  the wait may be at most ``target - 2 * L99(b)``;
- the wait worth spending is the time the batch takes to fill: ``(b - 1) / arrival_rate`` when the
  arrival rate is known, else one batch latency (a batch fills while the previous one runs).

The choice is the feasible ``b`` of highest throughput (``min(capacity, arrival_rate)``), then
lowest expected latency, then smallest ``b``. Nothing feasible: batch size 1, no wait,
``feasible=False``. Pure Python (no torch).

Padding across text buckets: :class:`CallCost` fits ``latency = fixed + per_unit * units`` to
measured batches (units: padded tokens) and prices padding in calls: ``fixed / per_unit`` padded
tokens cost as much as one more engine call, which is what a text batch may add to take a smaller
bucket's texts along (see :mod:`fastgen.runtime.request_scheduler`).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from fastgen.core.stats import percentile
from fastgen.errors import InvalidArgumentError


class LatencyProfile:
    """Batch latencies in seconds per (engine, bucket, batch size); the most recent ``window`` of each."""

    def __init__(self, window: int = 256) -> None:
        self.window = window
        self._samples: dict[tuple[str, str, int], deque[float]] = {}

    def add(self, engine: str, bucket: str, size: int, seconds: float) -> None:
        key = (str(engine), str(bucket), int(size))
        samples = self._samples.get(key)
        if samples is None:
            samples = self._samples[key] = deque(maxlen=self.window)
        samples.append(float(seconds))

    def keys(self) -> list[tuple[str, str]]:
        """The (engine, bucket) pairs measured."""
        return sorted({(e, b) for e, b, _ in self._samples})

    def sizes(self, engine: str, bucket: str) -> list[int]:
        return sorted(s for e, b, s in self._samples if (e, b) == (engine, bucket))

    def quantile(self, engine: str, bucket: str, size: int, q: float) -> float | None:
        samples = self._samples.get((engine, bucket, size))
        return percentile(samples, q) if samples else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"engine|bucket|size": [seconds, ...]}``."""
        return {f"{e}|{b}|{s}": list(v) for (e, b, s), v in sorted(self._samples.items())}

    @classmethod
    def from_dict(cls, data: dict[str, Any], window: int = 256) -> LatencyProfile:
        profile = cls(window)
        for key, values in data.items():
            engine, bucket, size = key.rsplit("|", 2)
            for v in values:
                profile.add(engine, bucket, int(size), v)
        return profile


@dataclass(frozen=True)
class TuningChoice:
    """The chosen batching of one (engine, bucket) and what the model predicts for it."""

    engine: str
    bucket: str
    batch_size: int
    max_wait_ms: float
    throughput_per_s: float
    """Requests (or rows) per second at this batch size: ``min(capacity, arrival_rate)``."""
    p99_ms: float
    """Predicted worst-case latency: ``wait + 2 * L99(batch_size)``."""
    feasible: bool
    """Whether any batch size meets the target (else the choice is 1 with no wait)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose(profile: LatencyProfile, engine: str, bucket: str, *, p99_target_ms: float,
           arrival_rate: float | None = None) -> TuningChoice:
    """The batch size and wait of highest throughput whose predicted p99 meets ``p99_target_ms``."""
    if not p99_target_ms > 0:
        raise InvalidArgumentError("p99_target_ms", p99_target_ms, "numbers > 0")
    if arrival_rate is not None and not arrival_rate > 0:
        raise InvalidArgumentError("arrival_rate", arrival_rate, "numbers > 0 (requests per second), or None")
    sizes = profile.sizes(engine, bucket)
    if not sizes:
        raise InvalidArgumentError("profile", f"{engine} {bucket}", profile.keys() or "no measurements",
                                   reason="nothing measured for this engine and bucket")
    target = p99_target_ms / 1e3
    options: list[tuple[TuningChoice, float]] = []  # (choice, expected latency)
    for b in sizes:
        l50 = profile.quantile(engine, bucket, b, 50)
        l99 = profile.quantile(engine, bucket, b, 99)
        assert l50 is not None and l99 is not None
        slack = target - 2 * l99
        if slack < 0:
            continue
        fill = (b - 1) / arrival_rate if arrival_rate else l50
        wait = min(slack, fill) if b > 1 else 0.0
        capacity = b / max(l50, 1e-9)
        throughput = min(capacity, arrival_rate) if arrival_rate else capacity
        expected = (min(wait, (b - 1) / (2 * arrival_rate)) if arrival_rate else wait / 2) + l50
        options.append((TuningChoice(engine, bucket, b, wait * 1e3, throughput, (wait + 2 * l99) * 1e3, True),
                        expected))
    if not options:
        l50 = profile.quantile(engine, bucket, sizes[0], 50) or math.inf
        l99 = profile.quantile(engine, bucket, sizes[0], 99) or math.inf
        return TuningChoice(engine, bucket, 1, 0.0, sizes[0] / l50, 2 * l99 * 1e3, False)
    # Throughput within 1% of the best counts as equal: then the lower expected latency, then the smaller batch.
    top = max(c.throughput_per_s for c, _ in options)
    return min(((c, e) for c, e in options if c.throughput_per_s >= 0.99 * top),
               key=lambda ce: (ce[1], ce[0].batch_size))[0]


def fit_call_cost(points: Iterable[tuple[float, float]]) -> tuple[float, float] | None:
    """``(fixed_s, per_unit_s)`` of a least-squares line through ``(units, seconds)`` points, or None
    when the points cannot tell (fewer than two distinct unit counts, or less than a 2x spread).

    Each distinct unit count enters as a low quantile (the 20th percentile) of its samples,
    weighted by how many it has. Noise only ever adds time (another thread holding the GIL when the
    engine call returns, for up to the interpreter's 5 ms switch interval; a busy machine), and it
    hits short calls as much as long ones, so a median would flatten the line towards "padding is
    free"; a low quantile is the cost of the call itself.
    """
    groups: dict[float, list[float]] = {}
    for units, seconds in points:
        groups.setdefault(float(units), []).append(float(seconds))
    if len(groups) < 2 or max(groups) < 2 * min(groups):
        return None
    xs = list(groups)
    ys = [percentile(groups[x], 20) for x in xs]
    ws = [len(groups[x]) for x in xs]
    total = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs)) / total
    my = sum(w * y for w, y in zip(ws, ys)) / total
    var = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
    slope = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys)) / var
    return my - slope * mx, slope


class CallCost:
    """Recent ``(units, seconds)`` of one engine's batches and the padding one call is worth.

    :meth:`add` returns the new :meth:`merge_units` every ``every`` samples once ``min_samples`` are
    in (else None), so a caller refits now and then, not per batch.
    """

    def __init__(self, *, window: int = 256, min_samples: int = 16, every: int = 16, cap: float = math.inf) -> None:
        self.samples: deque[tuple[float, float]] = deque(maxlen=window)
        self.min_samples, self.every, self.cap = min_samples, every, cap
        self._added = 0

    def add(self, units: float, seconds: float) -> float | None:
        self.samples.append((float(units), float(seconds)))
        self._added += 1
        if len(self.samples) < self.min_samples or self._added % self.every:
            return None
        return self.merge_units()

    def merge_units(self) -> float | None:
        """Units of padding that cost one call's fixed cost (``fixed / per_unit``), within [0, cap];
        None when the samples cannot tell yet. Padding that costs nothing measurable: ``cap``."""
        fit = fit_call_cost(self.samples)
        if fit is None:
            return None
        fixed, per_unit = fit
        if fixed <= 0:
            return 0.0
        return self.cap if per_unit <= 0 else min(fixed / per_unit, self.cap)


def measure(run: Callable[[int], Any], sizes: Iterable[int], *, engine: str, bucket: str, iters: int = 5,
            warmup: int = 1, profile: LatencyProfile | None = None,
            clock: Callable[[], float] = time.perf_counter) -> LatencyProfile:
    """Time ``run(batch_size)`` ``iters`` times per size (after ``warmup`` untimed runs) into a profile."""
    profile = profile or LatencyProfile()
    for size in sizes:
        for _ in range(warmup):
            run(size)
        for _ in range(iters):
            start = clock()
            run(size)
            profile.add(engine, bucket, size, clock() - start)
    return profile


__all__ = ["CallCost", "LatencyProfile", "TuningChoice", "choose", "fit_call_cost", "measure"]
