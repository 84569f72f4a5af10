"""The device loop with fake executors (no models): failure isolation, out-of-memory splitting,
cancellation in every phase, deadlines, shutdown with requests in flight, crashes, no leaked threads."""

from __future__ import annotations

import concurrent.futures
import itertools
import threading

import pytest
import torch

from fastgen.runtime.config import RuntimeConfig
from fastgen.runtime.execution import Outcome, Outcomes, is_out_of_memory, isolate
from fastgen.runtime.metrics import Metrics
from fastgen.runtime.request_scheduler import GENERATE, Job, RequestScheduler
from fastgen.runtime.requests import (
    DeadlineExceededError,
    OutOfMemoryError,
    RequestFuture,
    RequestStatus,
    ShutdownError,
)
from fastgen.runtime.worker import Ticket, Worker

pytestmark = pytest.mark.usefixtures("no_leaked_threads")
TIMEOUT = 30


class Gate:
    """Blocks an executor until opened; ``entered`` tells the test the executor is inside."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self) -> None:
        self.entered.set()
        assert self.opened.wait(TIMEOUT)


class FakeScoring:
    """Upper-cases texts; 'boom' fails its batch; more than ``oom_above`` items is out of memory."""

    def __init__(self, oom_above: int = 10**9) -> None:
        self.batches: list[list[str]] = []
        self.gate: Gate | None = None
        self.oom_above = oom_above

    def run(self, decision):
        def fn(jobs):
            if self.gate is not None:
                gate, self.gate = self.gate, None
                gate()
            items = [j.payload.data for j in jobs]
            self.batches.append(items)
            if len(items) > self.oom_above:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            if "boom" in items:
                raise ValueError("boom in the batch")
            return [x.upper() for x in items]

        return [Outcome(j, RequestStatus.SUCCEEDED if ok else RequestStatus.FAILED, v)
                for j, ok, v in isolate(fn, decision.jobs)]


class FakeGeneration:
    """Each job's data is its step count; a step advances every active job by one."""

    def __init__(self) -> None:
        self.steps: list[list[int]] = []
        self.dropped: list[int] = []
        self.gate: Gate | None = None
        self.progress: dict[int, int] = {}

    def run(self, decision):
        if self.gate is not None:
            gate, self.gate = self.gate, None
            gate()
        self.steps.append([j.id for j in decision.jobs])
        ended = []
        for j in decision.jobs:
            self.progress[j.id] = self.progress.get(j.id, 0) + 1
            if self.progress[j.id] >= j.payload.data:
                ended.append(Outcome(j, RequestStatus.SUCCEEDED, f"image-{j.id}"))
        return ended

    def drop(self, jobs):
        self.dropped += [j.id for j in jobs]


_ids = itertools.count(1)


def start(executors, **cfg) -> Worker:
    worker = Worker(RequestScheduler(RuntimeConfig(**cfg)), executors, Metrics())
    worker.start()
    return worker


def submit(worker: Worker, kind: str, data, *, rows: int = 1, deadline_s: float | None = None,
           priority: int = 0) -> tuple[RequestFuture, Job]:
    rid = next(_ids)
    fut = RequestFuture(rid, kind)
    now = worker.scheduler.clock()
    job = Job(rid, kind, (64, 64) if kind == GENERATE else 16, priority=priority, arrival=now, rows=rows,
              deadline=None if deadline_s is None else now + deadline_s, payload=Ticket(fut, data, deadline_s))
    worker.submit(job)
    fut.add_done_callback(lambda f: f.cancelled() and worker.cancel(job))
    return fut, job


def close_while_blocked(worker: Worker, gate: Gate, *, drain: bool) -> None:
    """Shut ``worker`` down from another thread while ``gate`` blocks it, then open the gate: the
    shutdown must end (every request with a status) and join the runtime's threads."""
    closer = threading.Thread(target=worker.close, kwargs={"drain": drain})
    closer.start()
    threading.Event().wait(0.02)
    gate.opened.set()
    closer.join(TIMEOUT)
    assert not closer.is_alive() and not worker.alive


# --- isolate --------------------------------------------------------------------------------------------

def test_isolate_fails_only_the_bad_item():
    calls = []

    def fn(items):
        calls.append(list(items))
        if 5 in items:
            raise ValueError("bad 5")
        return [i * 10 for i in items]

    out = isolate(fn, list(range(8)))
    assert [(i, ok) for i, ok, _ in out] == [(i, i != 5) for i in range(8)]
    assert [v for i, ok, v in out if ok] == [i * 10 for i in range(8) if i != 5]
    assert isinstance(out[5][2], ValueError) and len(calls) <= 1 + 2 * 3  # a bisection, not a retry per item


def test_isolate_splits_out_of_memory_and_fails_only_what_cannot_fit():
    groups = []

    def fn(items):
        if len(items) > 2 or 7 in items:  # 7 needs more memory than there is, even alone
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return list(items)

    out = isolate(fn, list(range(8)), on_oom=groups.append)
    assert [ok for _, ok, _ in out] == [i != 7 for i in range(8)]
    err = out[7][2]
    assert isinstance(err, OutOfMemoryError) and isinstance(err.__cause__, torch.OutOfMemoryError)
    assert "out of memory" in str(err) and "\n" not in str(err)
    assert [len(g) for g in groups][:3] == [8, 4, 4] and groups[-1] == [7]


def test_out_of_memory_detection():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory"))
    assert not is_out_of_memory(ValueError("shape mismatch"))


# --- error isolation and out of memory in the loop -------------------------------------------------------

def test_one_bad_request_fails_alone():
    ex = FakeScoring()
    worker = start({"text": ex}, max_batch_size=8, max_wait_ms=50)
    futs = [submit(worker, "text", t)[0] for t in ("a", "b", "boom", "c", "d")]
    assert [f.exception(TIMEOUT) is None for f in futs] == [True, True, False, True, True]
    assert [f.result() for i, f in enumerate(futs) if i != 2] == ["A", "B", "C", "D"]
    assert isinstance(futs[2].exception(), ValueError) and futs[2].status is RequestStatus.FAILED
    assert all(f.status is RequestStatus.SUCCEEDED for i, f in enumerate(futs) if i != 2)
    worker.close()


def test_out_of_memory_batches_are_split():
    ex = FakeScoring(oom_above=2)
    worker = start({"text": ex}, max_batch_size=8, max_wait_ms=50)
    futs = [submit(worker, "text", t)[0] for t in "abcdef"]
    assert [f.result(TIMEOUT) for f in futs] == list("ABCDEF")
    assert max(len(b) for b in ex.batches) > 2  # it did try a larger batch first
    worker.close()


class ReportingScoring(FakeScoring):
    """Reports a lower batch limit and a padding price with its outcomes, as the real executor does."""

    def run(self, decision):
        return Outcomes(super().run(decision), max_batch=3, merge_cost=40.0)


class ReportingGeneration(FakeGeneration):
    """Reports each step's rows, requests and time with its outcomes, as the real executor does."""

    def run(self, decision):
        return Outcomes(super().run(decision), step=(sum(j.rows for j in decision.jobs), len(decision.jobs), 0.5))


def test_what_a_run_measured_is_applied_by_the_worker():
    worker = start({"text": ReportingScoring()}, max_batch_size=8, max_wait_ms=0)
    assert submit(worker, "text", "a")[0].result(TIMEOUT) == "A"
    worker.close()
    assert worker.scheduler.limits("text", 16).max_batch == 3 and worker.scheduler.merge_cost == {"text": 40.0}
    worker = start({GENERATE: ReportingGeneration()})
    fut, job = submit(worker, GENERATE, 2, rows=2)
    assert fut.result(TIMEOUT) == f"image-{job.id}"
    worker.close()
    bucket = worker.scheduler._queues[(GENERATE, (64, 64))]
    assert list(bucket.steps) == [(2, 1, 0.5)] * 2 and bucket.step_s == pytest.approx(0.5)  # two steps observed


def test_runtime_side_changes_go_through_the_worker():
    worker = start({"text": FakeScoring()}, max_batch_size=8)
    assert worker.set_limits("text", 16, max_batch=2).max_batch == 2
    worker.set_merge_cost("text", 12)
    assert worker.queue_state() == ({}, 0)
    worker.close()
    assert worker.scheduler.limits("text", 16).max_batch == 2 and worker.scheduler.merge_cost == {"text": 12.0}


# --- cancellation ---------------------------------------------------------------------------------------

def test_cancel_while_queued_removes_it():
    ex = FakeScoring()
    gate = ex.gate = Gate()
    worker = start({"text": ex}, max_batch_size=1, max_wait_ms=0)
    first, _ = submit(worker, "text", "first")
    assert gate.entered.wait(TIMEOUT)  # the device is busy with the first request
    queued, job = submit(worker, "text", "second")
    assert queued.cancel() and queued.cancelled() and job.status is RequestStatus.CANCELLED
    assert worker.scheduler.queued == 0
    gate.opened.set()
    assert first.result(TIMEOUT) == "FIRST"
    worker.close()
    assert all("second" not in b for b in ex.batches)
    assert worker.metrics.requests[("text", "cancelled")] == 1


def test_cancel_while_running_generation_frees_it_at_the_next_step():
    ex = FakeGeneration()
    gate = ex.gate = Gate()
    worker = start({GENERATE: ex}, max_step_rows=8)
    victim, vjob = submit(worker, GENERATE, 100, rows=2)
    other, _ = submit(worker, GENERATE, 3, rows=2)
    assert gate.entered.wait(TIMEOUT)  # inside the first step
    assert victim.cancel() and vjob.status is RequestStatus.RUNNING  # flagged only
    gate.opened.set()
    assert other.result(TIMEOUT) == f"image-{other.request_id}"
    with pytest.raises(concurrent.futures.CancelledError):
        victim.result(TIMEOUT)
    worker.close()
    assert vjob.status is RequestStatus.CANCELLED and vjob.id in ex.dropped
    assert sum(vjob.id in s for s in ex.steps) <= 2  # it left at the next step boundary


def test_cancel_while_in_a_running_scoring_batch_drops_the_result():
    ex = FakeScoring()
    gate = ex.gate = Gate()
    worker = start({"text": ex}, max_batch_size=4, max_wait_ms=0)
    fut, job = submit(worker, "text", "x")
    assert gate.entered.wait(TIMEOUT)
    assert fut.cancel()
    gate.opened.set()
    worker.close()
    assert fut.cancelled() and job.status is RequestStatus.CANCELLED
    assert worker.metrics.requests[("text", "cancelled")] == 1 and ex.batches == [["x"]]  # ran; result dropped


def test_cancel_after_completion_is_refused():
    worker = start({"text": FakeScoring()}, max_wait_ms=0)
    fut, _ = submit(worker, "text", "x")
    assert fut.result(TIMEOUT) == "X"
    assert not fut.cancel() and fut.status is RequestStatus.SUCCEEDED
    worker.close()


# --- deadlines ------------------------------------------------------------------------------------------

def test_expired_while_queued_fails_fast_and_never_runs():
    ex = FakeScoring()
    gate = ex.gate = Gate()
    worker = start({"text": ex}, max_batch_size=1, max_wait_ms=0)
    blocker, _ = submit(worker, "text", "blocker")
    assert gate.entered.wait(TIMEOUT)
    doomed, _ = submit(worker, "text", "doomed", deadline_s=0.01)
    threading.Event().wait(0.05)
    gate.opened.set()
    err = doomed.exception(TIMEOUT)
    assert isinstance(err, DeadlineExceededError) and err.phase == "queued" and doomed.status is RequestStatus.EXPIRED
    assert "expired while queued" in str(err)
    assert blocker.result(TIMEOUT) == "BLOCKER"
    worker.close()
    assert all("doomed" not in b for b in ex.batches)


def test_running_generation_expires_at_a_step_boundary():
    ex = FakeGeneration()
    gate = ex.gate = Gate()
    worker = start({GENERATE: ex}, max_step_rows=8)
    slow, job = submit(worker, GENERATE, 10**6, rows=2, deadline_s=0.02)
    assert gate.entered.wait(TIMEOUT)
    threading.Event().wait(0.05)
    gate.opened.set()
    err = slow.exception(TIMEOUT)
    assert isinstance(err, DeadlineExceededError) and err.phase == "running"
    worker.close()
    assert job.id in ex.dropped


# --- shutdown -------------------------------------------------------------------------------------------

def test_graceful_shutdown_finishes_everything_in_flight():
    gen, score = FakeGeneration(), FakeScoring()
    worker = start({GENERATE: gen, "text": score}, max_step_rows=4, max_batch_size=4, max_wait_ms=1000)
    futs = [submit(worker, GENERATE, n, rows=2)[0] for n in (5, 9, 2, 7)]
    futs += [submit(worker, "text", t)[0] for t in "xyz"]  # would wait 1 s for a full batch: flushed
    worker.close(drain=True)
    assert not worker.alive
    assert all(f.done() and f.status is RequestStatus.SUCCEEDED for f in futs)
    with pytest.raises(ShutdownError):
        submit(worker, "text", "late")


def test_shutdown_without_draining_fails_every_request_with_a_status():
    gen = FakeGeneration()
    gate = gen.gate = Gate()
    worker = start({GENERATE: gen}, max_step_rows=2)
    running, _ = submit(worker, GENERATE, 50, rows=2)
    assert gate.entered.wait(TIMEOUT)
    queued = [submit(worker, GENERATE, 3, rows=2)[0] for _ in range(3)]
    close_while_blocked(worker, gate, drain=False)
    for f in [running, *queued]:
        assert isinstance(f.exception(0), ShutdownError) and f.status is RequestStatus.FAILED


def test_shutdown_timeout_fails_what_did_not_finish():
    gen = FakeGeneration()
    worker = start({GENERATE: gen}, max_step_rows=2)
    quick, _ = submit(worker, GENERATE, 1, rows=2)
    endless, _ = submit(worker, GENERATE, 10**9, rows=2)
    worker.close(drain=True, timeout=0.05)
    assert quick.status is RequestStatus.SUCCEEDED
    assert isinstance(endless.exception(0), ShutdownError)


def test_a_crashed_loop_fails_everything_and_refuses_new_requests(monkeypatch):
    score = FakeScoring()
    gate = score.gate = Gate()
    worker = start({"text": score}, max_batch_size=1, max_wait_ms=0)
    first, _ = submit(worker, "text", "a")
    assert gate.entered.wait(TIMEOUT)
    second, _ = submit(worker, "text", "b")

    def broken(now=None, kinds=None):
        raise RuntimeError("scheduler bug")

    monkeypatch.setattr(worker.scheduler, "schedule", broken)
    gate.opened.set()
    assert isinstance(second.exception(TIMEOUT), ShutdownError) and "scheduler bug" in str(second.exception())
    assert first.result(TIMEOUT) == "A"
    with pytest.raises(ShutdownError):
        submit(worker, "text", "c")
    worker.close()


def test_calls_run_on_the_device_thread():
    worker = start({"text": FakeScoring()})
    assert worker.call(lambda: threading.current_thread().name).result(TIMEOUT) == "fastgen-runtime"
    worker.close()
    with pytest.raises(ShutdownError):
        worker.call(lambda: None)


# --- requests prepared in batches by the preparation thread -------------------------------------------

class FakeDeferred(FakeScoring):
    """Scores like FakeScoring, but its requests are prepared in batches (``defers``): 'bad' fails there."""

    defers = True

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.prepared: list[list[str]] = []
        self.prep_gate: Gate | None = None

    def prepare_many(self, items):
        if self.prep_gate is not None:
            gate, self.prep_gate = self.prep_gate, None
            gate()
        self.prepared.append(list(items))
        return [ValueError(f"cannot prepare {x!r}") if x == "bad" else (16, 1, 16.0, x) for x in items]


def stage(worker: Worker, data) -> tuple[RequestFuture, Job]:
    rid = next(_ids)
    fut = RequestFuture(rid, "text")
    job = Job(rid, "text", None, arrival=worker.scheduler.clock(), payload=Ticket(fut, data))
    worker.stage(job)
    fut.add_done_callback(lambda f: f.cancelled() and worker.cancel(job))
    return fut, job


def test_staged_requests_are_prepared_in_batches_and_a_bad_one_fails_alone():
    ex = FakeDeferred()
    gate = ex.prep_gate = Gate()
    worker = start({"text": ex}, max_batch_size=64, max_wait_ms=1)
    first, _ = stage(worker, "a")
    assert gate.entered.wait(TIMEOUT)  # the preparation thread is busy: the rest is staged meanwhile
    futs = [stage(worker, x)[0] for x in ["b", "bad", "c", "d"]]
    gate.opened.set()
    assert first.result(TIMEOUT) == "A"
    assert [f.result(TIMEOUT) for f in (futs[0], futs[2], futs[3])] == ["B", "C", "D"]
    assert isinstance(futs[1].exception(TIMEOUT), ValueError) and futs[1].status is RequestStatus.FAILED
    assert ex.prepared == [["a"], ["b", "bad", "c", "d"]]  # one call for everything staged meanwhile
    worker.close()
    assert worker.scheduler.outside == 0 and worker.inflight() == 0


def test_cancel_while_staged_or_being_prepared():
    ex = FakeDeferred()
    gate = ex.prep_gate = Gate()
    worker = start({"text": ex}, max_batch_size=64, max_wait_ms=1)
    preparing, _ = stage(worker, "being-prepared")
    assert gate.entered.wait(TIMEOUT)
    staged, job = stage(worker, "staged")
    assert staged.cancel() and job.status is RequestStatus.CANCELLED  # removed at once
    assert preparing.cancel()  # dropped once its preparation ends
    kept, _ = stage(worker, "kept")
    gate.opened.set()
    assert kept.result(TIMEOUT) == "KEPT"
    worker.close()
    assert all(b == ["kept"] for b in ex.batches)
    assert ["staged"] not in ex.prepared
    assert worker.metrics.requests[("text", "cancelled")] == 2
    assert worker.scheduler.outside == 0 and worker.inflight() == 0


def test_staged_requests_count_against_the_queue_limit():
    ex = FakeDeferred()
    gate = ex.prep_gate = Gate()
    worker = start({"text": ex}, max_queue=2, max_batch_size=64, max_wait_ms=1)
    futs = [stage(worker, "a")[0]]
    assert gate.entered.wait(TIMEOUT)
    futs.append(stage(worker, "b")[0])
    from fastgen.runtime.requests import OverloadedError

    with pytest.raises(OverloadedError):
        stage(worker, "c")
    gate.opened.set()
    assert [f.result(TIMEOUT) for f in futs] == ["A", "B"]
    worker.close()


@pytest.mark.parametrize("drain", [True, False])
def test_shutdown_with_staged_requests_ends_every_one(drain):
    ex = FakeDeferred()
    gate = ex.prep_gate = Gate()
    worker = start({"text": ex}, max_batch_size=64, max_wait_ms=1000)
    futs = [stage(worker, "a")[0]]
    assert gate.entered.wait(TIMEOUT)
    futs += [stage(worker, x)[0] for x in "bcd"]
    close_while_blocked(worker, gate, drain=drain)
    if drain:
        assert [f.result(0) for f in futs] == ["A", "B", "C", "D"]
    else:
        assert all(isinstance(f.exception(0), ShutdownError) for f in futs)
    assert worker.scheduler.outside == 0 and worker.inflight() == 0
