"""Hostile use of the batched runtime (issue 15): cancellation seen by ``concurrent.futures.wait``,
out-of-memory back-off that recovers, done-callbacks off the device threads, a hung engine (watchdog,
shutdown timeouts, runtimes never shut down), image decoding off the caller's thread, and the probes
next to them (late submissions, double and re-entrant shutdown, passed deadlines, cancel racing
completion, huge priorities, BaseException from an engine, thread leaks).

Fake executors and scorers (no model is built): every call that could hang runs under a hard timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import itertools
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastgen.errors import FastgenError, InvalidArgumentError
from fastgen.runtime.config import RuntimeConfig
from fastgen.runtime.execution import Outcome, Outcomes, isolate
from fastgen.runtime.metrics import Metrics
from fastgen.runtime.request_scheduler import GENERATE, Job, RequestScheduler
from fastgen.runtime.requests import (
    DeadlineExceededError,
    RequestError,
    RequestFuture,
    RequestStatus,
    ScoreRequest,
    ShutdownError,
)
from fastgen.runtime.worker import Ticket, Worker

LIMIT = 10.0  # seconds: the most any one wait below may take before the test fails instead of hanging
_ids = itertools.count(1)


def within(seconds: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a daemon thread; fails the test if it has not returned in ``seconds``."""
    fut: cf.Future = cf.Future()

    def target():
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            fut.set_exception(exc)

    threading.Thread(target=target, daemon=True).start()
    try:
        return fut.result(seconds)
    except cf.TimeoutError:
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not return within {seconds} s")


def eventually(predicate, seconds: float = LIMIT) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def ours() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("fastgen")}


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Threads counted before and after: none may outlive the test (shutdown joins them; a thread a
    test hung on purpose is released at its end and given a moment to return)."""
    before = ours()
    yield
    eventually(lambda: not ours() - before)


class Gate:
    """Blocks an executor until opened; ``entered`` tells the test the executor is inside."""

    def __init__(self) -> None:
        self.entered, self.opened = threading.Event(), threading.Event()

    def __call__(self) -> None:
        self.entered.set()
        self.opened.wait(LIMIT * 3)


class FakeScoring:
    """Upper-cases texts; a gate blocks the next batch; 'kbd' / 'exit' raise BaseExceptions."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate: Gate | None = None
        self.hang: Gate | None = None  # blocks every batch while set (a wedged engine)
        self.delay = 0.0  # seconds each batch takes

    def run(self, decision):
        def fn(jobs):
            gate, self.gate = self.gate, None  # the gate blocks one batch, ``hang`` every one
            for g in (gate, self.hang):
                if g is not None:
                    g()
            if self.delay:
                time.sleep(self.delay)
            items = [j.payload.data for j in jobs]
            self.batches.append(items)
            if "kbd" in items or "exit" in items:
                raise KeyboardInterrupt if "kbd" in items else SystemExit(3)
            return [x.upper() for x in items]

        return [Outcome(j, RequestStatus.SUCCEEDED if ok else RequestStatus.FAILED, v)
                for j, ok, v in isolate(fn, decision.jobs)]


class FakeGeneration:
    """Each job's data is its step count; a gate blocks the next step."""

    def __init__(self) -> None:
        self.progress: dict[int, int] = {}
        self.gate: Gate | None = None

    def run(self, decision):
        if self.gate is not None:
            gate, self.gate = self.gate, None
            gate()
        for j in decision.jobs:
            self.progress[j.id] = self.progress.get(j.id, 0) + 1
        return [Outcome(j, RequestStatus.SUCCEEDED, f"image-{j.id}") for j in decision.jobs
                if self.progress[j.id] >= j.payload.data]


class FakeDeferred(FakeScoring):
    """Prepared in batches by the preparation thread, as texts with a fast tokenizer are."""

    defers = True

    def prepare_many(self, items):
        if "prep-kbd" in items:
            raise KeyboardInterrupt
        return [(16, 1, 16.0, x) for x in items]


def start(executors, **cfg) -> Worker:
    (worker := Worker(RequestScheduler(RuntimeConfig(**cfg)), executors, Metrics())).start()
    return worker


def submit(worker: Worker, kind: str, data, *, rows: int = 1, deadline: float | None = None,
           staged: bool = False) -> tuple[RequestFuture, Job]:
    rid = next(_ids)
    fut = RequestFuture(rid, kind)
    job = Job(rid, kind, None if staged else ((64, 64) if kind == GENERATE else 16), arrival=worker.scheduler.clock(),
              rows=rows, deadline=deadline, payload=Ticket(fut, data))
    (worker.stage if staged else worker.submit)(job)
    fut.add_done_callback(lambda f: f.cancelled() and worker.cancel(job))
    return fut, job


def done_now(*futures, timeout: float = 2.0) -> bool:
    """Whether ``concurrent.futures.wait`` (which waits for the executor's notification) sees them done."""
    done, _ = cf.wait(futures, timeout=timeout)
    return len(done) == len(futures)


# --- 1. cancellation notifies concurrent.futures.wait / as_completed ------------------------------------

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


# --- 2. out-of-memory back-off: finer, and it recovers ---------------------------------------------------

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


class OomScorer:
    """A text scorer whose engine is out of memory above ``oom_above`` texts per call."""

    kind = "text"

    def __init__(self, oom_above: int | None) -> None:
        self.oom_above = oom_above
        self.sizes: list[int] = []
        self.engine = SimpleNamespace(spec=SimpleNamespace(inputs=[SimpleNamespace(shape=(64, 16))]))
        self.text_preprocessor = SimpleNamespace(bucket_edges=lambda buckets: (16,), can_pad=True, encoder=None,
                                                 encode=lambda t: {"input_ids": [1] * min(len(t), 16)},
                                                 bucket=lambda n, edges: 16,
                                                 pad=lambda items, n: {"input_ids": torch.zeros(len(items), n)})

    def logits(self, feeds):
        self.sizes.append(n := feeds["input_ids"].shape[0])
        if self.oom_above is not None and n > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.zeros(n)

    scores = staticmethod(lambda logits: [float(x) for x in logits])


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


# --- 3. done-callbacks run on the runtime's callback threads ----------------------------------------

def _text_runtime(**cfg):
    from fastgen.runtime import Runtime

    return Runtime(scorer=OomScorer(None), max_wait_ms=0, **cfg)


def test_a_slow_done_callback_does_not_stall_the_device(caplog):
    release, seen = threading.Event(), []

    def slow(f):
        seen.append(threading.current_thread().name)
        release.wait(LIMIT)

    def bad(f):
        raise RuntimeError("callback bug")

    with _text_runtime(start=False) as rt:
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
    rt = _text_runtime(start=False)
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


# --- 4. a hung engine: watchdog, shutdown timeout, runtimes never shut down -------------------------

def test_a_hung_engine_fails_its_requests_and_the_others_keep_serving():
    from fastgen.runtime.requests import EngineTimeoutError

    text, image = FakeScoring(), FakeScoring()
    hang = text.hang = Gate()
    worker = start({"text": text, "image": image}, max_wait_ms=0, call_timeout_s=0.3)
    stuck, _ = submit(worker, "text", "stuck")
    assert hang.entered.wait(LIMIT)
    assert submit(worker, "image", "img")[0].result(LIMIT) == "IMG"  # another engine is not blocked
    err = stuck.exception(LIMIT)
    assert isinstance(err, EngineTimeoutError) and isinstance(err, FastgenError) and "\n" not in str(err)
    assert "text" in str(err) and "call_timeout_s" in str(err)
    t0 = time.monotonic()
    with pytest.raises(EngineTimeoutError):  # wedged: refused at once
        submit(worker, "text", "next")
    assert time.monotonic() - t0 < 0.5
    assert submit(worker, "image", "img2")[0].result(LIMIT) == "IMG2"
    text.hang = None
    hang.opened.set()  # the call returns after all: the engine serves again
    eventually(lambda: not worker.stalled("text"))
    assert submit(worker, "text", "back")[0].result(LIMIT) == "BACK"
    within(LIMIT, worker.close)


@pytest.mark.parametrize("drain", [False, True])
def test_shutdown_honours_its_timeout_with_a_hung_engine(drain):
    ex = FakeScoring()
    hang = ex.hang = Gate()
    worker = start({"text": ex}, max_wait_ms=0, call_timeout_s=None)
    stuck, _ = submit(worker, "text", "stuck")
    queued, _ = submit(worker, "text", "queued")
    assert hang.entered.wait(LIMIT)
    t0 = time.monotonic()
    within(5.0, worker.close, drain=drain, timeout=0.5)
    assert time.monotonic() - t0 < 1.0  # no hidden grace
    assert isinstance(stuck.exception(0), ShutdownError) and isinstance(queued.exception(0), ShutdownError)
    ex.hang = None
    hang.opened.set()  # let the stuck thread go: it exits on its own (checked by no_leaked_threads)


def test_a_runtime_dropped_without_shutdown_stops_its_threads():
    before = ours()
    rt = _text_runtime()
    fut = rt.submit(ScoreRequest("a"))
    fut.add_done_callback(lambda f: None)
    assert fut.result(LIMIT) == 0.0 and ours() - before
    del rt
    gc.collect()
    eventually(lambda: not ours() - before)


def test_interpreter_exit_without_shutdown_fails_pending_requests_and_exits():
    code = textwrap.dedent("""
        import threading, types
        from fastgen.runtime.config import RuntimeConfig
        from fastgen.runtime.metrics import Metrics
        from fastgen.runtime.request_scheduler import Job, RequestScheduler
        from fastgen.runtime.requests import RequestFuture
        from fastgen.runtime.worker import Ticket, Worker

        hung = types.SimpleNamespace(run=lambda decision: threading.Event().wait())
        worker = Worker(RequestScheduler(RuntimeConfig(max_wait_ms=0)), {"text": hung, "image": hung}, Metrics())
        worker.start()
        for rid, kind in ((1, "text"), (2, "image"), (3, "image")):
            fut = RequestFuture(rid, kind)
            fut.add_done_callback(lambda f: print("ended", f.request_id, type(f.exception()).__name__, flush=True))
            worker.submit(Job(rid, kind, 16, payload=Ticket(fut, "x")))
        print("exiting", flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "exiting" and sorted(lines[1:]) == [f"ended {i} ShutdownError" for i in (1, 2, 3)]


# --- 5. images are decoded off the caller's thread ------------------------------------------------------

class FakeImageScorer:
    """An image scorer whose preprocessor records the threads that decode files."""

    kind = "image"

    def __init__(self) -> None:
        from fastgen.pipelines.classifier_images import images_to_uint8

        self.decoders: list[threading.Thread] = []

        def to_uint8(images, argument="images"):
            if any(isinstance(i, (str, os.PathLike)) for i in images):
                self.decoders.append(threading.current_thread())
            return images_to_uint8(images, (8, 8), argument=argument)

        self.image_preprocessor = SimpleNamespace(size=(8, 8), channels=3, to_uint8=to_uint8,
                                                  feeds=lambda px: {"pixels": px.float()})
        self.engine = SimpleNamespace(spec=SimpleNamespace(inputs=[SimpleNamespace(shape=(64, 3, 8, 8))]))

    logits = staticmethod(lambda feeds: feeds["pixels"].mean(dim=(1, 2, 3)))
    scores = staticmethod(lambda logits: [round(float(x), 3) for x in logits])


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb when huge)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_image_files_are_decoded_off_the_callers_thread_and_bad_files_fail_through_the_future(tmp_path):
    from PIL import Image

    from fastgen.runtime import Runtime

    Image.fromarray(np.full((600, 800, 3), 200, np.uint8)).save(good := tmp_path / "big.jpg", quality=90)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "bomb.png").write_bytes(_png(40000, 40000))
    (tmp_path / "dir.jpg").mkdir()
    bad = ["empty.jpg", "truncated.jpg", "text.png", "bomb.png", "dir.jpg", "missing.jpg"]
    scorer = FakeImageScorer()
    with Runtime(scorer=scorer, max_wait_ms=0) as rt:
        assert rt.submit(ScoreRequest(good)).result(LIMIT) == pytest.approx(200.0, abs=1.0)
        assert scorer.decoders and threading.current_thread() not in scorer.decoders

        async def main():
            loop_thread = threading.current_thread()
            score = await rt.score(str(good))
            again = await rt.submit_async(ScoreRequest(good, priority=3))
            return loop_thread, score, again

        loop_thread, score, again = asyncio.run(main())
        assert score == again == pytest.approx(200.0, abs=1.0) and loop_thread not in scorer.decoders
        futures = [rt.submit(ScoreRequest(tmp_path / name)) for name in bad]  # nothing raises here
        for name, fut in zip(bad, futures):
            err = fut.exception(LIMIT)
            assert isinstance(err, InvalidArgumentError) and name in str(err) and "\n" not in str(err), (name, err)
            assert fut.status is RequestStatus.FAILED
        for item in (np.zeros((4, 4), np.float32), np.zeros((1, 4, 4, 3), np.uint8), {"not": "an image"},
                     torch.zeros(2, 2, 2, 2)):
            with pytest.raises(InvalidArgumentError) as err:  # cheap checks still refuse at submission
                rt.submit(ScoreRequest(item, kind="image"))
            assert "item" in str(err.value) and "\n" not in str(err.value)
        assert rt.stats()["inflight"] == 0


# --- probes: deadlines, priorities, BaseException from an engine ------------------------------------

def test_a_deadline_already_passed_expires_without_running_and_extreme_deadlines():
    ex = FakeScoring()
    worker = start({"text": ex}, max_wait_ms=0)
    fut, _ = submit(worker, "text", "late", deadline=worker.scheduler.clock() - 1.0)
    err = fut.exception(LIMIT)
    assert isinstance(err, DeadlineExceededError) and fut.status is RequestStatus.EXPIRED and ["late"] not in ex.batches
    within(LIMIT, worker.close)
    assert ScoreRequest("x", deadline_s=sys.float_info.max).deadline_s == sys.float_info.max
    for bad in (float("nan"), float("inf"), -1.0, 0, np.float64("nan"), True, "1"):
        with pytest.raises(InvalidArgumentError):
            ScoreRequest("x", deadline_s=bad)


def test_priority_overflow_is_refused_in_one_line():
    for bad in (10**400, -(10**400), 2**63, np.int64(2**62), 1.5, True):
        with pytest.raises(InvalidArgumentError) as err:
            ScoreRequest("x", priority=bad)
        assert "priority" in str(err.value) and "\n" not in str(err.value)
    assert ScoreRequest("x", priority=-(10**9)).priority == -(10**9)
    with _text_runtime() as rt:
        assert rt.submit(ScoreRequest("x", priority=10**9)).result(LIMIT) == 0.0


@pytest.mark.parametrize("poison", ["kbd", "exit", "prep-kbd"])
def test_an_engine_raising_base_exceptions_fails_its_batch_and_the_runtime_keeps_serving(poison, caplog):
    staged = poison.startswith("prep")
    worker = start({"text": FakeDeferred() if staged else FakeScoring()}, max_wait_ms=0)
    fut, _ = submit(worker, "text", poison, staged=staged)
    err = fut.exception(LIMIT)
    assert isinstance(err, RequestError) and isinstance(err, Exception)  # never re-raised as a KeyboardInterrupt
    assert ("SystemExit" if poison == "exit" else "KeyboardInterrupt") in str(err) and "\n" not in str(err)
    assert submit(worker, "text", "after", staged=staged)[0].result(LIMIT) == "AFTER"  # not killed, silently or not
    within(LIMIT, worker.close)
    assert any(r.levelno >= logging.ERROR for r in caplog.records)
