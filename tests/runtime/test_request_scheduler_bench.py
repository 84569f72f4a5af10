"""pytest-benchmark: one scheduling decision with 1,000 requests queued (goal: at most 100 us each).

The queue holds a realistic mix (texts in eight length buckets, images, generations at two sizes
with running active sets larger than a step, whose requests are chosen earliest deadline first,
some deadlines, several priorities) and is refilled to 1,000 before each timed decision; every decision forms a batch or a step at once (no waiting), the most expensive
case, and text groups may pad across buckets (a merge cost is set). The figures are reported by
pytest-benchmark (median in its table; p50 and p99 in microseconds in ``extra_info``, shown by
``--benchmark-json``), not asserted: timing assertions are flaky on shared CPUs.
"""

from __future__ import annotations

import random

from fastgen.runtime.config import RuntimeConfig
from fastgen.runtime.request_scheduler import GENERATE, Job, RequestScheduler
from fastgen.runtime.requests import RequestStatus

QUEUED = 1000


def test_schedule_decision_with_1000_queued(benchmark):
    rng = random.Random(0)
    clock_t = [0.0]
    sched = RequestScheduler(RuntimeConfig(max_queue=2 * QUEUED, max_batch_size=32, max_wait_ms=0, max_step_rows=16),
                      clock=lambda: clock_t[0])
    sched.set_merge_cost("text", 64.0)
    for bucket, per_row in (((64, 64), 0.001), ((128, 128), 0.004)):  # measured steps: deadlines and step sizes
        for rows in (2, 4, 8, 16) * 2:
            sched.observe_step((GENERATE, bucket), rows, rows // 2, 0.002 + per_row * rows)
    ids = iter(range(10**9))

    def new_job() -> Job:
        r = rng.random()
        if r < 0.6:
            edge = rng.choice((8, 16, 16, 16, 24, 32, 48, 64, 128))
            kind, bucket, rows, cost = "text", edge, 1, float(edge)
        elif r < 0.8:
            kind, bucket, rows, cost = "image", (64, 64), 1, 4096.0
        else:
            kind, bucket, rows, cost = GENERATE, rng.choice(((64, 64), (128, 128))), 2, 2.0
        deadline = clock_t[0] + 5.0 if rng.random() < 0.3 else None
        return Job(next(ids), kind, bucket, priority=rng.randrange(3), rows=rows, cost=cost, deadline=deadline)

    decisions = []

    ran: list[Job] = []

    def setup():
        clock_t[0] += 0.001
        for j in ran:  # generations that stepped end now and then, so joins keep happening
            if j.status is RequestStatus.RUNNING and rng.random() < 0.2:
                sched.finish(j, RequestStatus.SUCCEEDED)
        ran.clear()
        while sched.queued < QUEUED:
            sched.submit(new_job())

    def decide():
        decisions.append(d := sched.schedule())
        if d.kind == GENERATE:
            ran.extend(d.jobs)

    setup()
    benchmark.pedantic(decide, setup=setup, rounds=1500, iterations=1, warmup_rounds=50)
    timings = benchmark.stats.stats.sorted_data
    for q in (50, 99):
        benchmark.extra_info[f"p{q}_us"] = timings[min(len(timings) - 1, len(timings) * q // 100)] * 1e6
    for d in decisions:  # what was timed is real work: every decision ran a batch or a step
        if d.kind != GENERATE:
            for j in d.jobs:
                sched.finish(j, RequestStatus.SUCCEEDED)
    assert all(d.jobs for d in decisions)
    assert {d.kind for d in decisions} == {"text", "image", GENERATE}
