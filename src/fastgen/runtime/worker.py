"""The device side: one thread per engine (executor kind), a supervisor, a preparation thread.

Each kind ("generate", each scorer's name) has its own *lane*, a thread that asks the request scheduler
what to run for that kind, runs it and reports back, so an engine call that hangs holds up its own
engine only (several scorers' lanes share the device as threads do: none waits for another's batch). Clients submit from any thread (or asyncio loop) under one lock, which the lanes take
only to schedule and to record outcomes, never while a batch runs; futures are resolved outside it.
The lanes are the only ones that change the scheduler once it runs, always under that lock and
through the scheduler's methods (:meth:`RequestScheduler.schedule` for their own kind): the
executors return what a run measured (:class:`~fastgen.runtime.execution.Outcomes`) instead of
calling back, and the runtime changes limits through :meth:`Worker.set_limits` /
:meth:`Worker.set_merge_cost`.

The supervisor (the thread named ``name``) is the watchdog: a run that takes longer than
``RuntimeConfig.call_timeout_s`` fails its requests and its engine's queued ones with
:class:`EngineTimeoutError`, and the lane refuses new ones until the call returns. It also runs
:meth:`Worker.call` (auto-tuning) while every lane waits between two batches.

Every request is resolved exactly once: whoever takes it out of ``_inflight`` (under the lock) resolves
its future and records its metrics. Failures are isolated by the executors
(:func:`fastgen.runtime.execution.isolate`); a ``BaseException`` from an engine fails its batch only.
:meth:`Worker.close` keeps to its timeout: threads still inside an engine call are daemons, left to
end when it returns. A worker never closed is aborted at interpreter exit.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from fastgen.errors import InvalidArgumentError
from fastgen.runtime.background import EXITING_S, BackgroundThreads, Lane
from fastgen.runtime.backoff import MemoryBackoff
from fastgen.runtime.execution import Outcome, Outcomes
from fastgen.runtime.metrics import bucket_label
from fastgen.runtime.request_scheduler import GENERATE, Decision, Job, Limits, RequestScheduler
from fastgen.runtime.requests import (
    DeadlineExceededError,
    EngineError,
    EngineTimeoutError,
    RequestFuture,
    RequestStatus,
    ShutdownError,
)

logger = logging.getLogger(__name__)

_AT_EXIT_S = 1.0  # interpreter exit: how long every unclosed worker together waits for calls in progress
_LIVE: weakref.WeakSet[Worker] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Abort every worker still running at interpreter exit: its requests fail with ShutdownError
    (nobody would wait for them), and no thread is left waiting for work."""
    deadline = time.monotonic() + _AT_EXIT_S
    for worker in list(_LIVE):
        try:
            worker.close(drain=False, timeout=max(deadline - time.monotonic(), 0.0))
        except Exception:  # pragma: no cover - best effort at exit
            logger.exception("closing a runtime at exit failed")


@dataclass(eq=False)
class Ticket:
    """What the runtime keeps of one request: its future, the executor's data and its deadline."""

    future: RequestFuture
    data: Any
    deadline_s: float | None = None


class Worker(BackgroundThreads):
    """The device threads over a :class:`RequestScheduler` and one executor per kind.

    An executor is ``run(decision) -> Outcomes`` (an :class:`Outcome` per job of ``decision.jobs``;
    for generation only those that ended at this step; a plain list of them when the run has nothing
    to report), plus ``drop(jobs)`` for requests that left without finishing; with ``defers``, also
    ``prepare_many(items)`` (run on the preparation thread). ``metrics``: a
    :class:`~fastgen.runtime.metrics.Metrics`.
    """

    def __init__(self, scheduler: RequestScheduler, executors: Mapping[str, Any], metrics: Any, *,
                 name: str = "fastgen-runtime") -> None:
        self.scheduler = scheduler
        self.executors = dict(executors)
        self.metrics = metrics
        self.call_timeout_s: float | None = getattr(scheduler.config, "call_timeout_s", None)
        lock = threading.Lock()
        self.cond = threading.Condition(lock)  # notified when a thread ends or a lane stalls (close waits on it)
        self._prep_wake = threading.Condition(lock)
        self._super_wake = threading.Condition(lock)
        self._lanes = {kind: Lane(kind, ex, threading.Condition(lock)) for kind, ex in self.executors.items()}
        for lane in self._lanes.values():
            lane.thread = threading.Thread(target=self._lane_main, args=(lane,), name=f"{name}-{lane.kind}",
                                           daemon=True)
        self._inflight: dict[int, Job] = {}
        self._staged: dict[int, Job] = {}  # accepted, waiting for the preparation thread
        self._preparing: dict[int, Job] = {}  # being prepared now (outside the lock)
        self._prep_idle = False
        self._prep_done = False
        self._prep_thread: threading.Thread | None = None
        if any(getattr(ex, "defers", False) for ex in self.executors.values()):
            self._prep_thread = threading.Thread(target=self._prep_main, name=f"{name}-prep", daemon=True)
        self._supervisor = threading.Thread(target=self._supervise, name=name, daemon=True)
        self._super_until = -math.inf  # when the supervisor wakes next (-inf: it is awake)
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._pause = False  # lanes wait between batches while a call runs
        self._in_call = False  # the supervisor runs a call now
        self._settle_until: float | None = None
        self._closing = False
        self._abort = False
        self._stop = False
        self._crashed: BaseException | None = None

    # --- client side (any thread) --------------------------------------------------------------

    def start(self) -> None:
        _LIVE.add(self)
        for lane in self._lanes.values():
            lane.thread.start()  # type: ignore[union-attr]
        if self._prep_thread is not None:
            self._prep_thread.start()
        self._supervisor.start()

    @property
    def alive(self) -> bool:
        return self._supervisor.is_alive() or any(lane.thread.is_alive() for lane in self._lanes.values())  # type: ignore[union-attr]

    def _admit_locked(self, job: Job) -> Lane:
        if self._closing or self._crashed is not None:
            raise ShutdownError("the runtime is shut down: no new requests" if self._crashed is None else
                                f"the runtime's device loop stopped: {self._crashed}")
        lane = self._lanes.get(job.kind)
        if lane is None:
            raise InvalidArgumentError("request kind", job.kind, list(self._lanes))
        if lane.stalled is not None:  # a fresh error each time (a raised instance keeps its traceback)
            raise EngineTimeoutError(lane.kind, time.monotonic() - (lane.started or 0.0), lane.stalled.timeout_s)
        return lane

    def submit(self, job: Job) -> None:
        """Queue a job (raises OverloadedError / ShutdownError / EngineTimeoutError, and then it was not accepted)."""
        with self.cond:
            lane = self._admit_locked(job)
            ready_at = self.scheduler.submit(job)
            self._inflight[job.id] = job
            # Wake the lane only if it sleeps past the time this request may be ready: waking it for
            # every request of a filling batch costs a thread switch (and the GIL) per request.
            if ready_at < lane.sleeping_until:
                lane.wake.notify()

    def stage(self, job: Job) -> None:
        """Accept a job whose executor prepares requests in batches (``defers``): it is queued once the
        preparation thread has prepared it (raises as :meth:`submit` does, and then it was not accepted)."""
        with self.cond:
            self._admit_locked(job)
            self.scheduler.begin_outside()
            self._staged[job.id] = job
            self._inflight[job.id] = job
            if self._prep_idle:
                self._prep_wake.notify()

    def cancel(self, job: Job) -> None:
        """A future was cancelled: take its job out of the queue, or flag it to leave at its next step."""
        with self.cond:
            if self._staged.pop(job.id, None) is not None:  # not prepared yet: gone at once
                self.scheduler.end_outside()
                self._inflight.pop(job.id, None)
                job.status = RequestStatus.CANCELLED
                self._record(job, RequestStatus.CANCELLED, self.scheduler.clock())
                self._wake_all_locked()  # a closing lane may be waiting for the staged to drain
                return
            if job.id in self._preparing:  # the preparation thread drops it when done
                return
            was_queued = job.status is RequestStatus.QUEUED
            if self.scheduler.cancel(job) and was_queued and self._inflight.pop(job.id, None) is not None:
                self._record(job, RequestStatus.CANCELLED, self.scheduler.clock())
            lane = self._lanes.get(job.kind)
            if lane is not None:
                lane.wake.notify()

    def set_limits(self, kind: str, bucket: Hashable | None = None, **limits: Any) -> Limits:
        """:meth:`RequestScheduler.set_limits` under the lock (from any thread); it replaces any
        out-of-memory back-off of those queues."""
        with self.cond:
            lane = self._lanes.get(kind)
            if lane is not None:
                for key in [k for k in lane.memory if bucket is None or k == bucket]:
                    del lane.memory[key]
            return self.scheduler.set_limits(kind, bucket, **limits)

    def set_merge_cost(self, kind: str, cost: float) -> None:
        """:meth:`RequestScheduler.set_merge_cost` under the lock (from any thread)."""
        with self.cond:
            self.scheduler.set_merge_cost(kind, cost)

    def queue_state(self) -> tuple[dict[str, int], int]:
        """(queued requests per kind, running generations), read under the lock."""
        with self.cond:
            return self.scheduler.queue_depths(), len(self.scheduler.active())

    def stalled(self, kind: str) -> bool:
        """Whether ``kind``'s engine is stuck in a call the watchdog gave up on."""
        with self.cond:
            lane = self._lanes.get(kind)
            return lane is not None and lane.stalled is not None

    def inflight(self) -> int:
        with self.cond:
            return len(self._inflight)

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn()`` on the supervisor thread while every lane waits between two batches (auto-tuning
        measures there)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            if self._closing or self._crashed is not None or not self._supervisor.is_alive():
                raise ShutdownError("the runtime is shut down")
            self._calls.append((fn, future))
            self._super_wake.notify()
        return future

    # --- shutting down ----------------------------------------------------------------------------

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; finish (``drain``) or fail every accepted one, then join the threads.

        ``timeout``: seconds in all. Draining takes up to three quarters of it; then whatever has not
        finished fails with ShutdownError, and the runs in progress get the rest to return. A thread
        still inside an engine call when the time is up is left to end when the call returns (its
        requests have failed already); one only finishing a short run (it has not yet taken twice
        as long as its recent ones) gets at most ``SETTLE_S`` (0.1 s) more, a hung call none. None:
        wait as long as it takes (a hung call: until the watchdog gives up on it). Idempotent;
        callable from any thread, a callback's included.
        """
        start = time.monotonic()
        deadline = None if timeout is None else start + max(float(timeout), 0.0)
        with self.cond:
            self._settle_until = None
            self._closing = True
            self.scheduler.request_flush()
            aborted = [] if drain else self._abort_locked()
            calls = list(self._calls)
            self._calls.clear()
            self._wake_all_locked()
        self._fail(aborted, ShutdownError("the runtime was shut down before the request finished"))
        for _, fut in calls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(ShutdownError("the runtime is shut down"))
        if drain and deadline is not None and not self._wait_stopped(start + 0.75 * (deadline - start)):
            with self.cond:
                aborted = self._abort_locked()
                self._wake_all_locked()
            self._fail(aborted, ShutdownError("the runtime was shut down before the request finished"))
        self._wait_stopped(deadline, settle=True)
        self._fail_all(ShutdownError("the runtime was shut down before the request finished"))
        with self.cond:
            self._stop = True
            self._super_wake.notify()
        if self._supervisor.is_alive() and self._supervisor is not threading.current_thread():
            # Between calls it returns at once; inside a call (auto-tuning) it is waited for as any run.
            self._supervisor.join(EXITING_S if not self._in_call else
                                  None if deadline is None else max(deadline - time.monotonic(), 0.0))
        _LIVE.discard(self)

    def close_nowait(self) -> None:
        """Stop taking requests and let the threads finish what was accepted and end, without waiting
        (a runtime dropped without shutdown)."""
        with self.cond:
            self._closing = True
            self.scheduler.request_flush()
            self._wake_all_locked()

    def _wake_all_locked(self) -> None:
        for lane in self._lanes.values():
            lane.wake.notify()
        self._prep_wake.notify()
        self._super_wake.notify()
        self.cond.notify_all()

    def _abort_locked(self) -> list[Job]:
        """Take every queued, staged and running-generation request out (lock held); the caller fails
        them once the lock is released. Scoring batches on the device finish."""
        self._abort = True
        jobs = self.scheduler.drain_queued() + self.scheduler.drain_active() + list(self._staged.values())
        self.scheduler.end_outside(len(self._staged))
        self._staged.clear()
        return self._take_locked(jobs)

    def _take_locked(self, jobs: list[Job]) -> list[Job]:
        """The jobs of ``jobs`` still in flight, now taken out and recorded as failed (lock held)."""
        now = self.scheduler.clock()
        owned = []
        for job in jobs:
            if self._inflight.pop(job.id, None) is not None:
                self._record(job, RequestStatus.FAILED, now)
                owned.append(job)
        return owned

    @staticmethod
    def _fail(jobs: list[Job], error: BaseException) -> None:
        for job in jobs:
            job.payload.future._finish(RequestStatus.FAILED, error=error)

    def _fail_all(self, error: BaseException) -> None:
        """Fail whatever is still in flight: nothing is left pending."""
        with self.cond:
            jobs = self._take_locked(list(self._inflight.values()))
        self._fail(jobs, error)

    def _crash(self, exc: BaseException, where: str) -> None:
        """A bug in one of the worker's own loops: fail everything and refuse new requests."""
        logger.exception("the runtime's %s crashed", where)
        with self.cond:
            if self._crashed is None:
                self._crashed = exc
            self._wake_all_locked()
        self._fail_all(ShutdownError(f"the runtime's device loop crashed: {type(exc).__name__}: {exc}"))

    # --- lanes: one thread per executor ------------------------------------------------------

    def _lane_main(self, lane: Lane) -> None:
        try:
            self._lane_loop(lane)
            stopped = getattr(lane.executor, "stopped", None)
            if stopped is not None:  # e.g. the generator's engines back to its own adapters, on this thread
                stopped()
        except BaseException as exc:  # a bug in the loop itself: nothing may hang on it
            self._crash(exc, f"{lane.kind} device loop")
        finally:
            with self.cond:
                lane.ended = True
                self.cond.notify_all()
                self._super_wake.notify()

    def _lane_loop(self, lane: Lane) -> None:
        sched, metrics, kinds = self.scheduler, self.metrics, (lane.kind,)
        while True:
            with self.cond:
                while True:
                    if self._crashed is not None:
                        return
                    if self._pause:  # a call runs on the supervisor: wait between batches
                        lane.wake.wait()
                        continue
                    t0 = time.perf_counter()
                    decision = sched.schedule(kinds=kinds)
                    metrics.decision(time.perf_counter() - t0)
                    if decision.has_work:
                        break
                    if self._closing and sched.pending(lane.kind) == 0 and sched.outside == 0:
                        return
                    lane.sleeping_until = math.inf if decision.wait is None else sched.clock() + decision.wait
                    lane.wake.wait(decision.wait)
                    lane.sleeping_until = -math.inf
                for job in decision.jobs:
                    job.payload.future.mark_running()
                if decision.jobs:
                    lane.decision, lane.started = decision, time.monotonic()
                    if self.call_timeout_s is not None and lane.started + self.call_timeout_s < self._super_until:
                        self._super_wake.notify()
            self._dropped(lane, decision)
            if decision.jobs:
                self._execute(lane, decision)

    def _execute(self, lane: Lane, decision: Decision) -> None:
        kind = lane.kind
        start = time.perf_counter()
        try:
            result = lane.executor.run(decision)
        except Exception as exc:  # executors isolate failures themselves; this is a last resort
            logger.exception("%s executor failed", kind)
            result = [Outcome(job, RequestStatus.FAILED, exc) for job in decision.jobs]
        except BaseException as exc:  # KeyboardInterrupt, SystemExit... from an engine: this batch only
            logger.error("the %s engine raised %s: its batch fails, the runtime keeps serving", kind,
                         type(exc).__name__, exc_info=exc)
            detail = " ".join(str(exc).split())
            err = EngineError(f"the {kind} engine call raised {type(exc).__name__}{': ' + detail if detail else ''}"
                              "; its batch failed")
            err.__cause__ = exc
            result = [Outcome(job, RequestStatus.FAILED, err) for job in decision.jobs]
        seconds = time.perf_counter() - start
        if not isinstance(result, Outcomes):
            result = Outcomes(list(result))
        take_swaps = getattr(lane.executor, "take_swaps", None)
        swaps = take_swaps() if take_swaps is not None else ()  # LoRA adapter swaps of this run
        if swaps:
            self.metrics.adapter_swaps(swaps)
        done: list[Outcome] = []
        with self.cond:
            stalled, lane.stalled = lane.stalled, None
            lane.decision = lane.started = None
            lane.recent.append(seconds)
            if stalled is not None:
                logger.warning("the %s engine call returned after all (%.1f s); %s requests are accepted again",
                               kind, seconds, kind)
            if self._pause or stalled is not None:
                self._super_wake.notify()
            sched = self.scheduler
            now = sched.clock()
            bucket = decision.queue[1]  # type: ignore[index]
            if decision.kind == GENERATE:
                sched.step_ended(now)
            if stalled is None:  # a stalled run's time and memory say nothing about the next one
                if decision.kind == GENERATE:
                    self.metrics.step(bucket, len(decision.jobs), sum(j.rows for j in decision.jobs), seconds)
                else:
                    self.metrics.batch(kind, bucket, len(decision.jobs), seconds)
                self._learn(lane, decision, result)
                if swaps:
                    sched.observe_swap(sum(t for _, t in swaps))
            for out in result.ended:
                if self._inflight.pop(out.job.id, None) is None:
                    continue  # resolved already (the watchdog or a shutdown failed it)
                status = RequestStatus.CANCELLED if out.job.payload.future.cancelled() else out.status
                sched.finish(out.job, status, now)
                self._record(out.job, status, now)
                done.append(out)
        drop = getattr(lane.executor, "drop", None)
        if stalled is not None and drop is not None:
            drop(list(decision.jobs))  # the watchdog took them out of the active set: release their inputs
        for out in done:
            if out.status is RequestStatus.SUCCEEDED:
                out.job.payload.future._finish(out.status, result=out.value)
            else:
                out.job.payload.future._finish(out.status, error=out.value)

    def _learn(self, lane: Lane, decision: Decision, result: Outcomes) -> None:
        """Apply what a run measured to the scheduler (lock held)."""
        sched = self.scheduler
        kind, bucket = decision.queue  # type: ignore[misc]
        if result.step is not None:
            sched.observe_step(decision.queue, *result.step)  # type: ignore[arg-type]
        if result.memory:
            self._adapt(lane, bucket, result.memory)
        elif result.max_batch is not None and sched.lower_max_batch(kind, bucket, result.max_batch):
            logger.warning("out of device memory: %s bucket %s now takes at most %d per batch", kind,
                           bucket_label(bucket), result.max_batch)
        if result.merge_cost is not None:
            logger.debug("%s batches: one engine call is worth %.0f padded tokens", kind, result.merge_cost)
            sched.set_merge_cost(kind, result.merge_cost)

    def _adapt(self, lane: Lane, bucket: Hashable, memory: list[tuple[int, bool]]) -> None:
        """The out-of-memory back-off of one queue (:class:`MemoryBackoff`), from a run's device calls."""
        backoff = lane.memory.get(bucket)
        if backoff is None:
            if all(fit for _, fit in memory):
                return  # the usual case: nothing ran out of memory, nothing to remember
            ceiling = self.scheduler.limits(lane.kind, bucket).max_batch
            backoff = lane.memory[bucket] = MemoryBackoff(ceiling, self.scheduler.config.oom_probe_after)
        before = backoff.limit
        for size, fit in memory:
            backoff.observe(size, fit)
        backoff.maybe_probe()
        if backoff.limit != before:
            self.scheduler.set_limits(lane.kind, bucket, max_batch=backoff.limit)
            if backoff.limit < before:
                logger.warning("out of device memory: %s bucket %s now takes at most %d per batch", lane.kind,
                               bucket_label(bucket), backoff.limit)
            else:
                logger.info("%s bucket %s: trying %d per batch again", lane.kind, bucket_label(bucket), backoff.limit)
        if backoff.recovered:
            del lane.memory[bucket]

    def _dropped(self, lane: Lane, decision: Decision) -> None:
        """Resolve requests that left without finishing: expired (deadline) and cancelled (running)."""
        if not (decision.expired or decision.cancelled):
            return
        gone = [*decision.expired, *decision.cancelled]
        with self.cond:
            now = self.scheduler.clock()
            owned = {job.id for job in gone if self._inflight.pop(job.id, None) is not None}
            for job in gone:
                if job.id in owned:
                    self._record(job, job.status, now)
        for job in decision.expired:
            if job.id in owned:
                phase = "queued" if job.started is None else "running"
                job.payload.future._finish(RequestStatus.EXPIRED, error=DeadlineExceededError(
                    job.id, job.payload.deadline_s or 0.0, phase))
        for job in decision.cancelled:
            if job.id in owned:
                job.payload.future._finish(RequestStatus.CANCELLED, error=concurrent.futures.CancelledError())
        started = [job for job in gone if job.started is not None]
        drop = getattr(lane.executor, "drop", None)
        if started and drop is not None:
            drop(started)

    def _record(self, job: Job, status: RequestStatus, now: float) -> None:
        waited = (job.started if job.started is not None else now) - job.arrival  # type: ignore[operator]
        self.metrics.request(job.kind, status.value, waited, now - job.arrival)  # type: ignore[operator]


__all__ = ["Lane", "Ticket", "Worker"]
