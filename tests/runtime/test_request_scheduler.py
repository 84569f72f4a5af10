"""The pure-Python scheduler on a fake clock: priorities with aging, buckets, budgets, waits, deadlines,
cancellation, backpressure, step-level admission and interleaving. No device, no torch."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from fastgen.errors import InvalidArgumentError
from fastgen.runtime.config import RuntimeConfig
from fastgen.runtime.request_scheduler import GENERATE, Job, RequestScheduler
from fastgen.runtime.requests import OverloadedError, RequestStatus


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


_ids = iter(range(1, 10**9))


def job(kind="text", bucket=16, *, priority=0, rows=1, cost=None, deadline=None, arrival=None) -> Job:
    return Job(next(_ids), kind, bucket, priority=priority, rows=rows, cost=float(cost if cost is not None else bucket
                                                                                  if isinstance(bucket, int) else 1),
               deadline=deadline, arrival=arrival)


def make(**cfg) -> tuple[RequestScheduler, Clock]:
    """A scheduler on a fake clock; batches wait their whole ``max_wait_ms`` (``batch_wait="fixed"``)
    unless ``cfg`` says otherwise: these tests are about what happens within and after the wait."""
    clock = Clock()
    return RequestScheduler(RuntimeConfig(**{"batch_wait": "fixed", **cfg}), clock=clock), clock


def test_scheduler_imports_no_torch():
    code = ("import sys, fastgen.runtime.request_scheduler, fastgen.runtime.batch_tuning, fastgen.runtime.metrics, "
            "fastgen.runtime.config; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- request-level batching --------------------------------------------------------------------------

def test_waits_for_a_full_batch_or_max_wait():
    s, clock = make(max_batch_size=4, max_wait_ms=10)
    jobs = [job() for _ in range(3)]
    for j in jobs:
        s.submit(j)
    d = s.schedule()
    assert not d.jobs and d.wait == pytest.approx(0.010)  # not full: wait for the oldest's max_wait
    clock.t += 0.004
    assert s.schedule().wait == pytest.approx(0.006)
    s.submit(extra := job())
    d = s.schedule()  # full now: runs at once, in arrival order
    assert d.jobs == [*jobs, extra] and all(j.status is RequestStatus.RUNNING for j in d.jobs)
    assert all(j.started == clock.t for j in d.jobs) and s.queued == 0
    s.submit(late := job())
    clock.t += 0.010
    assert s.schedule().jobs == [late]  # alone, after its max_wait


def test_adaptive_wait_runs_a_lone_request_at_once_and_waits_when_others_are_due():
    s, clock = make(max_batch_size=16, max_wait_ms=10, batch_wait="adaptive")
    assert RuntimeConfig().batch_wait == "adaptive"  # the default
    first = job()
    assert s.submit(first) == clock.t  # nothing known of the arrival rate: no wait
    assert s.schedule().jobs == [first]
    for _ in range(8):  # a request every 50 ms: none is due within a 10 ms wait
        clock.t += 0.050
        assert s.submit(j := job()) == clock.t and s.schedule().jobs == [j]
    for _ in range(8):  # one every ms: ten are due within the wait, which is spent again
        clock.t += 0.001
        s.submit(job())
    d = s.schedule()
    assert not d.jobs and d.wait == pytest.approx(0.010 - 0.007)
    clock.t += 0.003
    assert len(s.schedule().jobs) == 8
    clock.t += 0.002
    s.submit(waiting := job())
    d = s.schedule()
    assert not d.jobs and d.wait == pytest.approx(0.010)
    clock.t += 1.0  # the stream stops; the next lone request after a pause does not wait either
    assert s.schedule().jobs == [waiting]
    s.submit(lone := job())
    assert s.schedule().jobs == [lone]


def test_adaptive_wait_counts_the_items_of_one_request_as_one_arrival():
    s, clock = make(max_batch_size=32, max_wait_ms=10, batch_wait="adaptive")
    for _ in range(3):  # a request of 16 texts every second: no other request is due within the wait
        clock.t += 1.0
        items = [job() for _ in range(16)]
        for j in items:
            s.submit(j)
            clock.t += 0.00001  # submitted one after the other, microseconds apart
        assert s.schedule().jobs == items


def test_adaptive_wait_applies_to_nested_text_groups_and_image_kinds():
    s, clock = make(max_batch_size=8, max_wait_ms=10, batch_wait="adaptive")
    s.set_merge_cost("text", 1000)
    for kind, bucket in (("text", 64), ("image", (224, 224))):
        for _ in range(3):  # 1 s apart
            clock.t += 1.0
            assert s.submit(j := job(kind, bucket)) == clock.t
            assert s.schedule().jobs == [j]
    s2, clock2 = make(max_batch_size=8, max_wait_ms=10)  # fixed: every batch waits
    s2.submit(job("image", (224, 224)))
    assert s2.schedule().wait == pytest.approx(0.010)


def test_batch_wait_is_checked():
    with pytest.raises(InvalidArgumentError, match="batch.wait.*adaptive.*fixed"):
        RuntimeConfig(batch_wait="sometimes")


def test_token_budget_and_count_limit():
    s, clock = make(max_batch_size=8, max_batch_tokens=100, max_wait_ms=0)
    small = [job(bucket=32) for _ in range(5)]  # 32 tokens each: three fit in 100
    for j in small:
        s.submit(j)
    assert s.schedule().jobs == small[:3]
    assert s.schedule().jobs == small[3:]
    s.submit(big := job(bucket=512, cost=512))  # over budget alone: runs alone
    s.submit(follower := job(bucket=512, cost=512))
    assert s.schedule().jobs == [big]
    assert s.schedule().jobs == [follower]
    s2, _ = make(max_batch_size=2, max_wait_ms=0)
    many = [job() for _ in range(5)]
    for j in many:
        s2.submit(j)
    assert [len(s2.schedule().jobs) for _ in range(3)] == [2, 2, 1]


def test_buckets_batch_separately_and_fill_triggers():
    s, clock = make(max_batch_size=2, max_wait_ms=50)
    a, b, c = job(bucket=16), job(bucket=64, cost=64), job(bucket=16)
    for j in (a, b, c):
        s.submit(j)
    d = s.schedule()  # bucket 16 is full (2): runs; bucket 64 waits
    assert d.queue == ("text", 16) and d.jobs == [a, c]
    d = s.schedule()
    assert not d.jobs and d.wait == pytest.approx(0.050)
    clock.t += 0.050
    assert s.schedule().jobs == [b]


def test_text_buckets_stay_apart_unless_padding_costs_less_than_a_call():
    # No merge cost set (the runtime's until it has measured one): every bucket waits for its own batch.
    s, clock = make(max_batch_size=4, max_wait_ms=10)
    s.submit(long := job(bucket=64, cost=64))
    short = [job(bucket=16) for _ in range(3)]
    for j in short:
        s.submit(j)
    assert not s.schedule().jobs  # 1 + 3 would fill a batch, but only padded up: both wait
    clock.t += 0.010
    assert [s.schedule().jobs, s.schedule().jobs] == [[long], short]
    # 3 x 48 padded tokens are worth less than a call: one full batch at once, at the longer edge.
    s, clock = make(max_batch_size=4, max_wait_ms=10)
    s.set_merge_cost("text", 150)
    s.submit(long := job(bucket=64, cost=64))
    for j in (short := [job(bucket=16) for _ in range(3)]):
        s.submit(j)
    d = s.schedule()
    assert d.queue == ("text", 64) and d.jobs == [long, *short] and s.queued == 0
    # Worth more than a call (144 > 100): apart; two shorter texts (96) would have joined.
    s, clock = make(max_batch_size=4, max_wait_ms=10)
    s.set_merge_cost("text", 100)
    s.submit(long := job(bucket=64, cost=64))
    for j in (short := [job(bucket=16) for _ in range(3)]):
        s.submit(j)
    clock.t += 0.010
    assert [s.schedule().jobs, s.schedule().jobs] == [[long], short]
    s.submit(long := job(bucket=64, cost=64))
    for j in (short := [job(bucket=16) for _ in range(2)]):
        s.submit(j)
    clock.t += 0.010
    assert s.schedule().jobs == [long, *short]


def test_a_text_group_runs_when_any_of_its_buckets_is_ready_and_takes_smaller_queues_whole():
    s, clock = make(max_batch_size=8, max_wait_ms=10, max_batch_tokens=200)
    s.set_merge_cost("text", 1000)
    s.submit(short := job(bucket=16))
    clock.t += 0.006
    s.submit(long := job(bucket=64, cost=64))
    d = s.schedule()
    assert not d.jobs and d.wait == pytest.approx(0.004)  # the group waits for its oldest, the short one
    clock.t += 0.004
    d = s.schedule()  # the short text's wait is over: it runs with the long one, padded to 64
    assert d.queue == ("text", 64) and d.jobs == [long, short]
    # Three short texts padded to 64 would break the 200-token budget: none joins (a part would not
    # save their call), and shorter buckets never take longer texts.
    s.submit(long := job(bucket=64, cost=64))
    for j in (short := [job(bucket=16) for _ in range(3)]):
        s.submit(j)
    clock.t += 0.010
    assert sorted([s.schedule().jobs, s.schedule().jobs], key=len) == [[long], short]
    # A smaller bucket that fills its own batch keeps it (no padding up).
    s3, clock3 = make(max_batch_size=4, max_wait_ms=10)
    s3.set_merge_cost("text", 1000)
    s3.submit(lone := job(bucket=64, cost=64))
    full = [job(bucket=16) for _ in range(4)]
    for j in full:
        s3.submit(j)
    assert [s3.schedule().jobs, s3.schedule().jobs] == [full, []]
    clock3.t += 0.010
    assert s3.schedule().jobs == [lone]
    with pytest.raises(InvalidArgumentError):
        s3.set_merge_cost("text", -1)


def test_a_submission_that_fills_a_group_is_ready_at_once():
    s, clock = make(max_batch_size=2, max_wait_ms=50)
    s.set_merge_cost("text", 1000)
    assert s.submit(job(bucket=64, cost=64)) == pytest.approx(clock.t + 0.050)
    assert s.submit(job(bucket=16)) == clock.t  # 64 + 16 fill a batch of two: the loop must wake now
    assert len(s.schedule().jobs) == 2


def test_flush_runs_partial_batches_without_waiting():
    s, clock = make(max_batch_size=8, max_wait_ms=1000)
    s.submit(a := job())
    assert not s.schedule().jobs
    s.request_flush()
    assert s.schedule().jobs == [a]


# --- priorities and aging -------------------------------------------------------------------------------

def test_priority_order_then_arrival():
    s, clock = make(max_batch_size=1, max_wait_ms=0, priority_aging_s=10.0)
    low = job(priority=0)
    s.submit(low)
    clock.t += 0.001
    high = job(priority=2)
    s.submit(high)
    clock.t += 0.001
    mid = job(priority=1)
    s.submit(mid)
    assert [s.schedule().jobs[0] for _ in range(3)] == [high, mid, low]


def test_aging_lets_an_old_request_overtake_newer_higher_priority_ones():
    s, clock = make(max_batch_size=1, max_wait_ms=0, priority_aging_s=1.0)
    old = job(priority=0)
    s.submit(old)
    clock.t += 2.5  # waited 2.5 s: worth 2.5 priority levels
    newer = job(priority=2)
    s.submit(newer)
    assert s.schedule().jobs == [old]
    assert s.schedule().jobs == [newer]


def test_no_starvation_under_a_stream_of_high_priority_requests():
    """A low-priority request behind an endless stream of priority-5 requests (one new one per
    batch) still runs, once it has waited about 5 * priority_aging_s."""
    s, clock = make(max_batch_size=1, max_wait_ms=0, priority_aging_s=0.1)
    victim = job(priority=0)
    s.submit(victim)
    s.submit(job(priority=5))
    ran_at = None
    for i in range(200):
        clock.t += 0.01  # each batch takes 10 ms; a new urgent request arrives per batch
        s.submit(job(priority=5))
        d = s.schedule()
        if victim in d.jobs:
            ran_at = i
            break
    assert ran_at is not None and 40 <= ran_at <= 60  # 0.5 s of waiting / 10 ms per batch


# --- deadlines -------------------------------------------------------------------------------------------

def test_expired_queued_request_fails_fast_and_never_runs():
    s, clock = make(max_batch_size=4, max_wait_ms=100)
    doomed = job(deadline=clock.t + 0.020)
    s.submit(doomed)
    s.submit(ok := job())
    d = s.schedule()
    assert not d.jobs and d.wait == pytest.approx(0.020)  # woken by the deadline, before the batch wait
    clock.t += 0.020
    d = s.schedule()
    assert d.expired == [doomed] and doomed.status is RequestStatus.EXPIRED and doomed.started is None
    assert s.queued == 1
    clock.t += 0.1
    assert s.schedule().jobs == [ok]


def test_running_generation_expires_at_its_next_step():
    s, clock = make(max_step_rows=8)
    g = job(GENERATE, (64, 64), rows=2, deadline=clock.t + 1.0)
    s.submit(g)
    assert s.schedule().joined == [g]
    clock.t += 1.5
    d = s.schedule()
    assert d.expired == [g] and g.status is RequestStatus.EXPIRED and not d.jobs and not s.active()


# --- cancellation ---------------------------------------------------------------------------------------

def test_cancel_queued_and_running():
    s, clock = make(max_batch_size=8, max_wait_ms=0)
    a, b = job(), job()
    s.submit(a)
    s.submit(b)
    assert s.cancel(a) and a.status is RequestStatus.CANCELLED and s.queued == 1
    assert s.schedule().jobs == [b]
    assert not s.cancel(a)  # already ended
    g1, g2 = job(GENERATE, (64, 64), rows=2), job(GENERATE, (64, 64), rows=2)
    s.submit(g1)
    s.submit(g2)
    assert s.schedule().jobs == [g1, g2]
    assert s.cancel(g1) and g1.status is RequestStatus.RUNNING  # flagged; leaves at the step boundary
    d = s.schedule()
    assert d.cancelled == [g1] and d.jobs == [g2] and g1.status is RequestStatus.CANCELLED


# --- backpressure ---------------------------------------------------------------------------------------

def test_bounded_queue_rejects_with_a_retry_after_estimate():
    s, clock = make(max_queue=3, max_batch_size=1, max_wait_ms=0)
    for _ in range(3):
        s.submit(job())
    with pytest.raises(OverloadedError) as err:
        s.submit(extra := job())
    assert err.value.retry_after_s == 1.0 and "max_queue 3" in str(err.value) and "\n" not in str(err.value)
    assert extra.status is RequestStatus.QUEUED and s.queued == 3  # not accepted
    for _ in range(3):  # three completions 10 ms apart: 100 per second
        d = s.schedule()
        clock.t += 0.01
        s.finish(d.jobs[0], RequestStatus.SUCCEEDED)
    for _ in range(3):
        s.submit(job())
    with pytest.raises(OverloadedError) as err:
        s.submit(job())
    assert err.value.retry_after_s == pytest.approx(3 / 100)


def test_requests_outside_the_queues_count_against_max_queue_and_only_its_methods_change_them():
    s, clock = make(max_queue=2, max_batch_size=1, max_wait_ms=0)
    s.begin_outside()
    s.submit(job())
    with pytest.raises(OverloadedError):
        s.begin_outside()  # one being prepared + one queued: full
    with pytest.raises(AttributeError):
        s.outside = 0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        s.flush = True  # type: ignore[misc]
    with pytest.raises(InvalidArgumentError, match="n"):
        s.end_outside(2)  # only one is outside
    s.end_outside()
    assert s.outside == 0
    s.submit(job(), counted=True)  # the prepared one, never refused
    assert s.queued == 2


def test_lower_max_batch_only_ever_lowers():
    s, clock = make(max_batch_size=8)
    assert s.lower_max_batch("text", 16, 4) and s.limits("text", 16).max_batch == 4
    assert not s.lower_max_batch("text", 16, 6) and s.limits("text", 16).max_batch == 4
    assert s.limits("text", 32).max_batch == 8  # other buckets keep theirs


# --- generation -----------------------------------------------------------------------------------------

def test_step_level_joins_at_step_boundaries_within_the_row_budget():
    s, clock = make(max_step_rows=6, max_active_rows=6)
    a, b, c = (job(GENERATE, (64, 64), rows=2) for _ in range(3))
    for j in (a, b):
        s.submit(j)
    d = s.schedule()
    assert d.joined == [a, b] and d.jobs == [a, b]
    s.submit(c)
    d = s.schedule()  # the next step: c joins the running batch
    assert d.joined == [c] and d.jobs == [a, b, c]
    s.submit(e := job(GENERATE, (64, 64), rows=2))
    d = s.schedule()  # full (6 rows): e waits
    assert not d.joined and d.jobs == [a, b, c]
    s.finish(a, RequestStatus.SUCCEEDED)
    d = s.schedule()  # a left: e takes its rows
    assert d.joined == [e] and d.jobs == [b, c, e]


def test_head_of_line_is_never_skipped():
    s, clock = make(max_step_rows=4, max_active_rows=4)
    s.submit(a := job(GENERATE, (64, 64), rows=2))
    s.schedule()
    big, small = job(GENERATE, (64, 64), rows=4), job(GENERATE, (64, 64), rows=1)
    s.submit(big)
    s.submit(small)
    d = s.schedule()  # big does not fit next to a; small would, but must not overtake big
    assert not d.joined and d.jobs == [a]
    s.finish(a, RequestStatus.SUCCEEDED)
    d = s.schedule()
    assert d.joined == [big]


def gen_job(work: float, *, rows: int = 2, bucket=(64, 64), arrival=None) -> Job:
    j = job(GENERATE, bucket, rows=rows, arrival=arrival)
    j.work = float(work)
    return j


def measure_steps(s: RequestScheduler, bucket=(64, 64), *, fixed: float, per_row: float) -> None:
    """Report steps of 2 to 16 rows (one request per 2 rows) costing ``fixed + per_row * rows``."""
    for rows in (2, 4, 8, 16) * 2:
        s.observe_step((GENERATE, bucket), rows, rows // 2, fixed + per_row * rows)


def test_a_step_runs_the_most_urgent_of_its_active_set():
    s, clock = make(max_step_rows=4, max_active_rows=8)
    jobs = [gen_job(10, arrival=100.0 + i) for i in range(4)]
    for j in reversed(jobs):
        s.submit(j)
    d = s.schedule()  # all four join (8 rows admitted), the two oldest run (not measured: first come first served)
    assert set(d.joined) == set(jobs) and d.jobs == jobs[:2]
    s.finish(jobs[0], RequestStatus.SUCCEEDED)
    assert s.schedule().jobs == jobs[1:3]


def test_short_requests_overtake_long_ones_that_arrived_shortly_before():
    s, clock = make(max_step_rows=2, slowdown_target=10)
    measure_steps(s, fixed=0.0, per_row=0.005)  # a request's step alone: 10 ms
    assert s._queues[(GENERATE, (64, 64))].step_s == pytest.approx(0.010)
    long, short = gen_job(50, arrival=100.0), gen_job(4, arrival=100.5)
    late = gen_job(4, arrival=106.0)  # deadlines: long 100 + 10*0.51 = 105.1, short 101.0, late 106.5
    for j in (long, short, late):
        s.submit(j)
    assert s.schedule().jobs == [short]
    s.finish(short, RequestStatus.SUCCEEDED)
    assert s.schedule().jobs == [long]  # the late short one does not overtake a long one that waited enough


def test_first_come_first_served_when_slowdown_target_is_zero():
    s, clock = make(max_step_rows=2, slowdown_target=0)
    measure_steps(s, fixed=0.0, per_row=0.005)
    long, short = gen_job(50, arrival=100.0), gen_job(4, arrival=100.5)
    s.submit(short)
    s.submit(long)
    assert s.schedule().jobs == [long]


def test_efficient_step_size_is_fitted_to_the_measured_step_cost():
    s, clock = make(max_step_rows=32)
    measure_steps(s, fixed=0.0, per_row=0.005)  # cost grows with every row (a CPU): one request per step
    q = s._queues[(GENERATE, (64, 64))]
    assert q.eff_rows == 2
    measure_steps(s, (128, 128), fixed=0.050, per_row=0.001)  # a fixed cost per call (a GPU): big steps
    assert s._queues[(GENERATE, (128, 128))].eff_rows == 450
    for i in range(6):
        s.submit(gen_job(10, arrival=100.0 + i))
    d = s.schedule()
    assert len(d.joined) == 6 and len(d.jobs) == 1  # 64x64 steps one request at a time


def test_the_bucket_of_the_most_urgent_request_steps_next():
    s, clock = make(max_step_rows=8, slowdown_target=10)
    measure_steps(s, (64, 64), fixed=0.0, per_row=0.005)
    measure_steps(s, (128, 128), fixed=0.0, per_row=0.020)
    big = gen_job(50, bucket=(128, 128), arrival=100.0)  # deadline 100 + 10 * 51 * 0.04 = 120.4
    small = gen_job(4, bucket=(64, 64), arrival=101.0)  # 101 + 10 * 5 * 0.01 = 101.5
    s.submit(big)
    s.submit(small)
    first = s.schedule()
    assert first.queue == (GENERATE, (64, 64)) and first.jobs == [small]
    s.finish(small, RequestStatus.SUCCEEDED)
    assert s.schedule().jobs == [big]


def test_scoring_that_arrived_during_a_step_runs_before_the_next_one():
    s, clock = make(max_step_rows=8, slowdown_target=10, max_wait_ms=0)
    measure_steps(s, (64, 64), fixed=0.0, per_row=0.005)
    measure_steps(s, (128, 128), fixed=0.0, per_row=0.020)
    s.submit(small := gen_job(4, arrival=100.0))
    assert s.schedule().jobs == [small]  # a step starts at 100.0 ...
    # ... meanwhile a text arrives, and a long request that could join the other bucket (its
    # deadline is later than the running one's, so that bucket does not step next)
    s.submit(big := gen_job(50, bucket=(128, 128), arrival=100.0))
    clock.t = 100.05
    s.submit(text := job())
    clock.t = 100.1
    s.step_ended(100.1)
    d = s.schedule()
    assert d.kind == "text" and d.jobs == [text]
    d = s.schedule()
    assert d.queue == (GENERATE, (64, 64)) and big.status is RequestStatus.QUEUED


def test_oversized_request_runs_alone():
    s, clock = make(max_step_rows=2)
    s.submit(huge := job(GENERATE, (64, 64), rows=8))
    assert s.schedule().jobs == [huge]


def test_request_level_mode_forms_a_new_batch_only_when_the_last_finished():
    s, clock = make(max_step_rows=8, generation_batching="request")
    a, b = job(GENERATE, (64, 64), rows=2), job(GENERATE, (64, 64), rows=2)
    s.submit(a)
    assert s.schedule().joined == [a]
    s.submit(b)
    d = s.schedule()
    assert not d.joined and d.jobs == [a]
    s.finish(a, RequestStatus.SUCCEEDED)
    assert s.schedule().joined == [b]


def test_shape_buckets_never_share_a_step():
    s, clock = make(max_step_rows=8)
    small, large = job(GENERATE, (64, 64), rows=2), job(GENERATE, (128, 128), rows=2)
    s.submit(small)
    s.submit(large)
    first, second = s.schedule(), s.schedule()
    assert {first.queue[1], second.queue[1]} == {(64, 64), (128, 128)}
    assert first.jobs != second.jobs and len(first.jobs) == len(second.jobs) == 1


def test_generation_steps_and_scoring_batches_interleave():
    """With a running generation and a steady scoring stream, neither kind starves: decisions alternate."""
    s, clock = make(max_step_rows=8, max_batch_size=1, max_wait_ms=0)
    s.submit(g := job(GENERATE, (64, 64), rows=2))
    kinds = []
    for _ in range(10):
        s.submit(job())
        clock.t += 0.005
        d = s.schedule()
        kinds.append(d.kind)
        if d.kind != GENERATE:
            s.finish(d.jobs[0], RequestStatus.SUCCEEDED)
    assert kinds.count(GENERATE) >= 4 and kinds.count("text") >= 4 and g.status is RequestStatus.RUNNING


def test_pixel_budget_for_steps():
    s, clock = make(max_step_rows=16, max_step_pixels=3 * 64 * 64)
    jobs = [job(GENERATE, (64, 64), rows=1, cost=64 * 64) for _ in range(5)]
    for j in jobs:
        s.submit(j)
    assert s.schedule().jobs == jobs[:3]


# --- limits, determinism, shutdown helpers ----------------------------------------------------------------

def test_limits_per_bucket_override_the_kind_and_are_validated():
    s, clock = make(max_batch_size=8, max_wait_ms=0)
    s.set_limits("text", 16, max_batch=2)
    assert s.limits("text", 16).max_batch == 2 and s.limits("text", 32).max_batch == 8
    for _ in range(3):
        s.submit(job())
    assert len(s.schedule().jobs) == 2
    with pytest.raises(InvalidArgumentError):
        s.set_limits("text", 16, max_batch=0)
    assert s.limits(GENERATE).max_cost == math.inf


def test_same_inputs_same_decisions():
    def run() -> list:
        s, clock = make(max_batch_size=3, max_wait_ms=5, max_step_rows=4)
        out = []
        for i in range(40):
            kind = (GENERATE, "text", "image")[i % 3]
            bucket = (64, 64) if kind == GENERATE else (16 if kind == "text" else (64, 64))
            s.submit(Job(i, kind, bucket, priority=i % 4, rows=2 if kind == GENERATE else 1, cost=1.0))
            clock.t += 0.002
            d = s.schedule()
            out.append((d.kind, [j.id for j in d.jobs], [j.id for j in d.joined], d.wait))
            for j in d.jobs:
                if kind != GENERATE or i % 5 == 0:
                    s.finish(j, RequestStatus.SUCCEEDED)
        return out

    assert run() == run()


def test_drain_takes_everything_out():
    s, clock = make(max_step_rows=2)
    s.submit(g := job(GENERATE, (64, 64), rows=2))
    s.schedule()
    s.submit(q1 := job(GENERATE, (64, 64), rows=2))
    s.submit(q2 := job())
    assert s.pending() == 3
    assert set(s.drain_queued()) == {q1, q2} and s.drain_active() == [g]
    assert s.pending() == 0 and s.queued == 0 and not s.schedule().has_work


def test_config_validation_is_one_line():
    for kwargs, needle in [({"max_queue": 0}, "max-queue"), ({"max_wait_ms": -1}, "max-wait-ms"),
                           ({"text_buckets": (32, 16)}, "text-buckets"), ({"generation_batching": "x"}, "step"),
                           ({"priority_aging_s": 0}, "priority-aging-s")]:
        with pytest.raises(InvalidArgumentError) as err:
            RuntimeConfig(**kwargs)
        assert needle in str(err.value) and "\n" not in str(err.value)
    assert RuntimeConfig.from_dict(RuntimeConfig(text_buckets=(8, 64)).to_dict()).text_buckets == (8, 64)
