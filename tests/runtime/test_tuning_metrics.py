"""Auto-tuning from a latency profile, and the metrics (percentiles, the Prometheus collector). No device."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fastgen.core.stats import percentile
from fastgen.errors import InvalidArgumentError
from fastgen.runtime.batch_tuning import CallCost, LatencyProfile, choose, fit_call_cost, measure
from fastgen.runtime.metrics import Histogram, Metrics, MetricsCollector

# A typical engine: 2 ms per call plus 0.5 ms per item (ms), with a p99 20% above the median.
COST_MS = {b: 2.0 + 0.5 * b for b in (1, 2, 4, 8, 16, 32, 64)}


def profile(cost_ms=COST_MS) -> LatencyProfile:
    p = LatencyProfile()
    for b, ms in cost_ms.items():
        for _ in range(98):
            p.add("text", "32", b, ms / 1e3)
        for _ in range(2):
            p.add("text", "32", b, 1.2 * ms / 1e3)  # two slow runs: the p99 of 100 samples is slow
    return p


def test_choose_maximises_throughput_under_the_p99_target():
    p = profile()
    # 2 * L99(b) <= 50 ms: 2 * 1.2 * (2 + 0.5 b) <= 50 -> b <= 37.6: the largest measured is 32.
    c = choose(p, "text", "32", p99_target_ms=50)
    assert c.feasible and c.batch_size == 32 and c.p99_ms <= 50 + 1e-9
    assert c.throughput_per_s == pytest.approx(32 / 0.018)
    # A tighter target allows smaller batches only: 2 * 1.2 * 6 ms = 14.4 ms for 8, 24 ms for 16.
    tight = choose(p, "text", "32", p99_target_ms=15)
    assert tight.batch_size == 8 and tight.p99_ms <= 15
    # Without an arrival rate the wait is at most one batch latency, within the slack.
    assert 0 < c.max_wait_ms <= 18.0 + 1e-9


def test_with_a_known_arrival_rate_the_smallest_batch_that_keeps_up_wins():
    p = profile()
    # 200 requests/s: batch 1 serves 400/s, so every size keeps up; batch 1 has the lowest latency.
    c = choose(p, "text", "32", p99_target_ms=100, arrival_rate=200)
    assert c.batch_size == 1 and c.max_wait_ms == 0 and c.throughput_per_s == pytest.approx(200)
    # 3000/s: no size keeps up (32 / 18 ms = 1778/s, 64 / 34 ms = 1882/s); the p99 target of 100 ms
    # allows 64 (2 * 1.2 * 34 = 81.6 ms): the highest throughput, waiting at most the 18.4 ms of slack
    # (filling 64 would take 21 ms).
    c = choose(p, "text", "32", p99_target_ms=100, arrival_rate=3000)
    assert c.batch_size == 64 and c.max_wait_ms == pytest.approx(100 - 81.6) and c.p99_ms == pytest.approx(100)


def test_nothing_feasible_falls_back_to_batch_one():
    c = choose(profile(), "text", "32", p99_target_ms=1)
    assert not c.feasible and c.batch_size == 1 and c.max_wait_ms == 0


def test_choose_checks_its_arguments():
    with pytest.raises(InvalidArgumentError):
        choose(profile(), "text", "32", p99_target_ms=0)
    with pytest.raises(InvalidArgumentError, match="nothing measured"):
        choose(profile(), "image", "64x64", p99_target_ms=10)


def test_call_cost_fit_prices_padding_in_calls():
    # 0.5 ms per call plus 5 us per token, with one batch slowed down 20x by a busy machine.
    points = [(tokens, 5e-4 + 5e-6 * tokens) for tokens in (16, 64, 128, 512) for _ in range(5)]
    points.append((128, 20 * (5e-4 + 5e-6 * 128)))
    fixed, per_token = fit_call_cost(points)
    assert fixed == pytest.approx(5e-4, rel=1e-6) and per_token == pytest.approx(5e-6, rel=1e-6)
    assert fit_call_cost([(16, 1e-3)] * 9) is None  # one token count: no slope
    assert fit_call_cost([(16, 1e-3), (20, 2e-3)]) is None  # too narrow a spread to tell
    cost = CallCost(min_samples=4, every=2, cap=4096)
    results = [cost.add(t, 5e-4 + 5e-6 * t) for _ in range(2) for t in (16, 64, 128)]
    assert results[:3] == [None] * 3 and results[4] is None  # not before 4 samples, then every 2nd
    assert results[3] == pytest.approx(100.0) and results[5] == pytest.approx(100.0)  # 0.5 ms / 5 us
    free = CallCost(min_samples=2, cap=4096)
    free.samples.extend([(16, 1e-3), (128, 1e-3)])
    assert free.merge_units() == 4096  # padding costs nothing measurable: always worth it
    pricey = CallCost(min_samples=2)
    pricey.samples.extend([(16, 1e-4), (128, 2e-3)])
    assert pricey.merge_units() == 0.0  # no fixed cost per call: padding never pays


def test_measure_and_profile_round_trip():
    t = [0.0]

    def clock():
        return t[0]

    def run(b):
        t[0] += 0.001 * b

    p = measure(run, [1, 4], engine="e", bucket="b", iters=3, clock=clock)
    assert p.sizes("e", "b") == [1, 4] and p.quantile("e", "b", 4, 50) == pytest.approx(0.004)
    again = LatencyProfile.from_dict(p.to_dict())
    assert again.to_dict() == p.to_dict() and again.keys() == [("e", "b")]


def test_percentiles_match_numpy_nearest_rank():
    rng = np.random.default_rng(0)
    values = sorted(rng.exponential(size=1001).tolist())
    for q in (50, 95, 99):
        assert percentile(values, q) == np.percentile(values, q, method="inverted_cdf")
    assert percentile([], 50) is None


def test_histogram_buckets_are_cumulative():
    h = Histogram((1, 2, 5))
    for v in (0.5, 1, 1.5, 3, 9):
        h.observe(v)
    assert h.buckets() == [("1.0", 2.0), ("2.0", 3.0), ("5.0", 4.0), ("+Inf", 5.0)]
    assert h.sum == 15 and h.count == 5
    s = h.summary()
    assert s["count"] == 5 and s["p50"] == 1.5 and s["mean"] == 3


def scrape(m: Metrics, gauges: dict) -> dict:
    """``m`` and ``gauges`` through a registry of their own, parsed back: {sample name: {labels: value}}."""
    registry = CollectorRegistry()
    registry.register(MetricsCollector(m, lambda: gauges))
    out: dict = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_stats_and_exposition():
    m = Metrics()
    m.request("text", "succeeded", 0.001, 0.004)
    m.request("text", "expired", 0.5, 0.5)
    m.reject("text")
    m.batch("text", 32, 8, 0.002)
    m.step((64, 64), 3, 6, 0.01)
    m.decision(2e-5)
    stats = m.stats({"queued": {"text": 0}})
    assert stats["kinds"]["text"]["requests"] == {"expired": 1, "succeeded": 1}
    assert stats["kinds"]["text"]["latency_ms"]["p99"] == pytest.approx(4.0)
    assert stats["steps"]["64x64"]["rows"]["p50"] == 6 and stats["queued"] == {"text": 0}
    assert stats["schedule_decision_us"]["p50"] == pytest.approx(20)
    got = scrape(m, {"queue_depth": {"text": 3}, "inflight_requests": {"": 2}})
    assert got["fastgen_requests_total"] == {(("kind", "text"), ("status", "expired")): 1,
                                             (("kind", "text"), ("status", "succeeded")): 1}
    assert got["fastgen_rejected_total"] == {(("kind", "text"),): 1}
    assert got["fastgen_queue_depth"] == {(("kind", "text"),): 3} and got["fastgen_inflight_requests"] == {(): 2}
    rows = got["fastgen_step_rows_bucket"]
    assert rows[(("bucket", "64x64"), ("le", "4.0"))] == 0 and rows[(("bucket", "64x64"), ("le", "8.0"))] == 1
    assert rows[(("bucket", "64x64"), ("le", "+Inf"))] == 1 and got["fastgen_step_rows_sum"] == {(("bucket", "64x64"),): 6}
    assert got["fastgen_request_latency_seconds_count"] == {(("kind", "text"),): 1}  # succeeded ones only
    assert got["fastgen_queue_wait_seconds_count"] == {(("kind", "text"),): 2}
    assert got["fastgen_schedule_decision_seconds_count"] == {(): 1}
    assert "fastgen_requests_total_total" not in got
    assert m.profile.keys() == [("text", "32"), ("unet", "64x64")]
    assert not math.isnan(stats["kinds"]["text"]["queue_wait_ms"]["mean"])


def test_collector_names_are_checked_by_its_registry():
    registry = CollectorRegistry()
    registry.register(MetricsCollector(Metrics(), dict))
    with pytest.raises(ValueError, match="Duplicated timeseries"):  # an HTTP app's metric may not shadow one
        Counter("fastgen_requests", "clash", registry=registry)
    Counter("fastgen_http_requests", "fine", registry=registry)
    other = CollectorRegistry()  # another runtime's registry: the same names, no clash
    other.register(MetricsCollector(Metrics(), dict))
