"""Hostile use of the batched runtime (issue 15), part 1: cancellation seen by
``concurrent.futures.wait`` and ``as_completed`` in every phase, cancel racing completion,
out-of-memory back-off that bisects to the size that fits and recovers (scoring and generation),
done-callbacks run off the device threads (slow, failing, re-entrant shutdown, added late).

Fake executors and scorers (``runtime_fakes.py``, no model is built): every call that could hang runs
under a hard timeout (``hangs.within``), and no thread may outlive a test (``no_leaked_threads``).
Hung engines, decoding and the other probes are in ``test_runtime_watchdog.py``.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time

import pytest
from hangs import within
from runtime_fakes import (
    LIMIT,
    FakeDeferred,
    FakeGeneration,
    FakeScoring,
    Gate,
    OomScorer,
    done_now,
    eventually,
    start,
    submit,
    text_runtime,
)

from fastgen.runtime.execution import Outcomes
from fastgen.runtime.request_scheduler import GENERATE
from fastgen.runtime.requests import RequestStatus, ScoreRequest, ShutdownError

pytestmark = pytest.mark.usefixtures("no_leaked_threads")


# --- 1. cancellation notifies concurrent.futures.wait / as_completed -------------------------------

@pytest.mark.parametrize("phase", ["queued", "staged", "running-scoring", "running-generation"])
def test_wait_and_as_completed_see_a_cancelled_request_at_once(phase):
    if phase == "running-generation":
        ex = FakeGeneration()
        gate = ex.gate = Gate()
        worker = start({GENERATE: ex}, max_step_rows=8)
        fut, job = submit(worker, GENERATE, 10**6, rows=2)
        assert gate.entered.wait(LIMIT)
    else:
        ex = FakeDeferred() if phase == "staged" else FakeScoring()
        gate = ex.gate = Gate()
        worker = start({"text": ex}, max_batch_size=1, max_wait_ms=0)
        blocker, _ = submit(worker, "text", "blocker", staged=phase == "staged")
        assert gate.entered.wait(LIMIT)  # the device is busy: what follows stays queued
        fut, job = (blocker, None) if phase == "running-scoring" else submit(worker, "text", "x",
                                                                            staged=phase == "staged")
    other = cf.Future()
    assert fut.cancel() and fut.cancelled() and fut.status is RequestStatus.CANCELLED
    assert done_now(fut)  # before the device comes back
    assert next(cf.as_completed([other, fut], timeout=2.0)) is fut
    done, pending = cf.wait([other, fut], timeout=2.0, return_when=cf.FIRST_COMPLETED)
    assert done == {fut} and pending == {other}
    with pytest.raises(cf.CancelledError):
        fut.result(0)
    gate.opened.set()
    within(LIMIT, worker.close, drain=False)
    assert not fut.cancel() or fut.cancelled()  # cancelling twice: still cancelled, nothing raised


def test_wait_sees_requests_failed_by_shutdown_and_cancel_after_completion_is_a_no_op(caplog):
    ex = FakeScoring()
    gate = ex.gate = Gate()
    worker = start({"text": ex}, max_batch_size=1, max_wait_ms=0)
    done_fut, _ = submit(worker, "text", "done")
    gate.opened.set()
    assert done_fut.result(LIMIT) == "DONE"
    assert not done_fut.cancel() and done_fut.status is RequestStatus.SUCCEEDED and done_now(done_fut)
    ex.gate = gate = Gate()
    running, _ = submit(worker, "text", "running")
    assert gate.entered.wait(LIMIT)
    queued = [submit(worker, "text", f"q{i}")[0] for i in range(3)]
    closer = threading.Thread(target=worker.close, kwargs={"drain": False}, daemon=True)
    closer.start()
    assert done_now(*queued)  # failed by shutdown, while the device is still busy
    assert all(isinstance(f.exception(0), ShutdownError) for f in queued)
    gate.opened.set()
    closer.join(LIMIT)
    assert not closer.is_alive() and done_now(running)
    assert not [r for r in caplog.records if r.levelno >= logging.CRITICAL]  # no "Future in unexpected state"


def test_cancel_racing_completion_ends_each_request_once():
    ex = FakeScoring()
    ex.delay = 1e-4
    worker = start({"text": ex}, max_batch_size=4, max_wait_ms=0)
    phases = []

    def race():
        futures = []
        for i in range(1000):
            fut, job = submit(worker, "text", "r")
            if i % 4:
                if i % 3:  # at once, after yielding the GIL, or 0.1 ms later: queued, running or done
                    time.sleep((i % 3 - 1) * 1e-4)
                phases.append(job.status)
                fut.cancel()
            futures.append(fut)
        return futures

    futures = within(LIMIT * 3, race)
    assert RequestStatus.QUEUED in phases and RequestStatus.RUNNING in phases  # (a cancel hit each phase)
    done, not_done = cf.wait(futures, timeout=LIMIT)
    assert not not_done
    assert all(f.cancelled() or f.result(0) == "R" for f in futures)
    within(LIMIT, worker.close)
    counts = worker.metrics.requests
    assert counts.get(("text", "cancelled"), 0) + counts.get(("text", "succeeded"), 0) == 1000
    assert counts.get(("text", "cancelled"), 0) == sum(f.cancelled() for f in futures)
    assert worker.inflight() == 0 and worker.scheduler.queued == 0


# --- 2. out-of-memory back-off: finer, and it recovers ---------------------------------------------

def test_backoff_bisects_to_the_size_that_fits_and_probes_back_up():
    from fastgen.runtime.backoff import MemoryBackoff

    b = MemoryBackoff(12, probe_after=2)
    fits = 4  # the device holds 4
    tried = []
    for _ in range(40):
        size = b.limit
        tried.append(size)
        b.observe(size, size <= fits)
        b.observe(size, size <= fits)  # (two batches per round)
        b.maybe_probe()
    assert tried[:3] == [12, 6, 3] and 4 in tried and b.limit in (4, 5)
    fives = [i for i, size in enumerate(tried) if size == 5]
    gaps = [b - a for a, b in zip(fives, fives[1:])]
    assert gaps == sorted(gaps) and gaps[-1] >= 8  # probing the failing size again backs off exponentially
    fits = 12  # the pressure is gone: the limit climbs back to the configured one
    for _ in range(200):
        b.observe(b.limit, True)
        b.maybe_probe()
    assert b.limit == 12


def _waves(rt, scorer, n: int, waves: int) -> list[int]:
    limits = []
    for _ in range(waves):
        futures = [rt.submit(ScoreRequest(f"text {i}")) for i in range(n)]
        assert all(f.result(LIMIT) == 0.0 for f in futures)  # every request survives the back-off
        limits.append(rt.scheduler.limits("text", 16).max_batch)
    return limits


def test_out_of_memory_limit_is_found_exactly_and_recovers_after_a_transient_error():
    from fastgen.runtime import Runtime

    scorer = OomScorer(oom_above=10)
    with Runtime(scorer=scorer, max_batch_size=12, max_wait_ms=50, oom_probe_after=2) as rt:
        limits = _waves(rt, scorer, 12, 14)
    assert min(limits) >= 6 and 10 in limits and 10 in scorer.sizes  # 12 -> 6 -> 9 -> 10, never 3 or 1
    assert sum(s > 10 for s in scorer.sizes) <= 5  # a few probes, not one failure per batch
    scorer = OomScorer(oom_above=4)
    with Runtime(scorer=scorer, max_batch_size=8, max_wait_ms=50, oom_probe_after=2) as rt:
        assert _waves(rt, scorer, 8, 1)[0] < 8
        scorer.oom_above = None  # the other tenant freed its memory
        limits = _waves(rt, scorer, 8, 12)
    assert limits[-1] == 8 and 8 in scorer.sizes[-3:]


class OomGeneration(FakeGeneration):
    """Reports its steps' UNet rows as the real executor does: out of memory above ``fits`` rows."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.fits, self.rows = fits, []

    def run(self, decision):
        rows = sum(j.rows for j in decision.jobs)
        self.rows.append(rows)
        if rows > self.fits:  # (the real executor retries in halves; here the step is simply not taken)
            return Outcomes([], memory=[(rows, False)])
        return Outcomes(super().run(decision), memory=[(rows, True)])


def test_generation_row_limit_backs_off_and_recovers():
    ex = OomGeneration(fits=6)
    worker = start({GENERATE: ex}, max_step_rows=16, max_active_rows=16, oom_probe_after=2)
    futures = [submit(worker, GENERATE, 30, rows=2)[0] for _ in range(8)]  # 16 rows want to step together
    assert all(f.result(LIMIT).startswith("image-") for f in futures)
    assert ex.rows[:3] == [16, 8, 4] and 6 in ex.rows and min(ex.rows[1:]) >= 4  # 16 -> 8 -> 4 -> 6 (-> 8)
    assert ex.rows.count(8) <= 4  # the size that failed is retried rarely (rows come in twos: 7 is no size)
    ex.fits = 16  # the memory came back
    futures = [submit(worker, GENERATE, 60, rows=2)[0] for _ in range(8)]
    assert all(f.result(LIMIT).startswith("image-") for f in futures)
    within(LIMIT, worker.close)
    assert 16 in ex.rows[-10:] and worker.scheduler.limits(GENERATE, (64, 64)).max_batch == 16


# --- 3. done-callbacks run on the runtime's callback threads ---------------------------------------

def test_a_slow_done_callback_does_not_stall_the_device(caplog):
    release, seen = threading.Event(), []

    def slow(f):
        seen.append(threading.current_thread().name)
        release.wait(LIMIT)

    def bad(f):
        raise RuntimeError("callback bug")

    with text_runtime(start=False) as rt:
        first = rt.submit(ScoreRequest("a"))
        first.add_done_callback(slow)
        first.add_done_callback(bad)
        first.add_done_callback(lambda f: seen.append("third"))
        rt.start()
        assert first.result(LIMIT) == 0.0
        assert rt.submit(ScoreRequest("b")).result(LIMIT) == 0.0  # served while the callback blocks
        release.set()
        late = []
        first.add_done_callback(lambda f: late.append(threading.current_thread()))
        assert late == [threading.current_thread()]  # added after completion: at once, in this thread
        eventually(lambda: len(seen) >= 2)
        assert rt.submit(ScoreRequest("c")).result(LIMIT) == 0.0
    assert seen[0].startswith("fastgen-callbacks") and seen[1] == "third"  # in order, off the device
    assert any("callback bug" in r.getMessage() or (r.exc_info and "callback bug" in str(r.exc_info[1]))
               for r in caplog.records)


def test_shutdown_from_a_done_callback_and_twice_and_submit_after_it():
    rt = text_runtime(start=False)
    returned = threading.Event()

    def shut(f):
        rt.shutdown()
        returned.set()

    fut = rt.submit(ScoreRequest("a"))
    fut.add_done_callback(shut)
    rt.start()
    assert returned.wait(LIMIT)  # no deadlock joining its own thread
    within(LIMIT, rt.shutdown)
    both = [threading.Thread(target=rt.shutdown, daemon=True) for _ in range(2)]  # concurrently
    for t in both:
        t.start()
    for t in both:
        t.join(LIMIT)
    assert not any(t.is_alive() for t in both)
    with pytest.raises(ShutdownError) as err:
        rt.submit(ScoreRequest("late"))
    assert "\n" not in str(err.value)
