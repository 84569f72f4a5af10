"""The device loop: one thread that asks the request scheduler what to run, runs it, and reports back.

Clients submit from any thread (or asyncio loop) under one condition variable; the loop takes the
lock only to schedule and to record outcomes, never while a batch runs, so submissions and
cancellations never wait for the device. Futures are resolved outside the lock. The worker is the
only one that changes the scheduler once it runs, always under that lock and through the
scheduler's methods: the executors return what a run measured
(:class:`~fastgen.runtime.execution.Outcomes`) instead of calling back, and the runtime changes
limits through the worker's methods (:meth:`Worker.set_limits`, :meth:`Worker.set_merge_cost`).

Failures are isolated by the executors (:func:`fastgen.runtime.execution.isolate`): one bad
request fails alone; a device out-of-memory error also lowers the queue's batch limit.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from fastgen.runtime.execution import Outcome, Outcomes
from fastgen.runtime.metrics import bucket_label
from fastgen.runtime.request_scheduler import GENERATE, Decision, Job, Limits, RequestScheduler
from fastgen.runtime.requests import (
    DeadlineExceededError,
    RequestFuture,
    RequestStatus,
    ShutdownError,
)

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Ticket:
    """What the runtime keeps of one request: its future, the executor's data and its deadline."""

    future: RequestFuture
    data: Any
    deadline_s: float | None = None


# --- the loop --------------------------------------------------------------------------------------------

class Worker:
    """The single device thread over a :class:`RequestScheduler` and one executor per kind.

    An executor is ``run(decision) -> Outcomes`` (an :class:`Outcome` per job of ``decision.jobs``;
    for generation only those that ended at this step; a plain list of them when the run has nothing
    to report), plus ``drop(jobs)`` for requests that left without finishing. ``metrics``: a
    :class:`~fastgen.runtime.metrics.Metrics`.
    """

    def __init__(self, scheduler: RequestScheduler, executors: Mapping[str, Any], metrics: Any, *,
                 name: str = "fastgen-runtime") -> None:
        self.scheduler = scheduler
        self.executors = dict(executors)
        self.metrics = metrics
        lock = threading.Lock()
        self.cond = threading.Condition(lock)
        self._prep_wake = threading.Condition(lock)  # the preparation thread's, under the same lock
        self._inflight: dict[int, Job] = {}
        self._staged: dict[int, Job] = {}  # accepted, waiting for the preparation thread
        self._preparing: dict[int, Job] = {}  # being prepared now (outside the lock)
        self._prep_idle = False
        self._prep_thread: threading.Thread | None = None
        if any(getattr(ex, "defers", False) for ex in self.executors.values()):
            self._prep_thread = threading.Thread(target=self._prep_main, name=f"{name}-prep", daemon=True)
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._closing = False
        self._abort = False
        self._sleeping_until = -math.inf  # when the loop waits: until when (-inf: it is busy)
        self._crashed: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    # --- client side (any thread) --------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        if self._prep_thread is not None:
            self._prep_thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue a job (raises OverloadedError / ShutdownError, and then it was not accepted)."""
        with self.cond:
            if self._closing or self._crashed is not None:
                raise ShutdownError("the runtime is shut down: no new requests" if self._crashed is None else
                                    f"the runtime's device loop stopped: {self._crashed}")
            ready_at = self.scheduler.submit(job)
            self._inflight[job.id] = job
            # Wake the loop only if it sleeps past the time this request may be ready: waking it for
            # every request of a filling batch costs a thread switch (and the GIL) per request.
            if ready_at < self._sleeping_until:
                self.cond.notify()

    def stage(self, job: Job) -> None:
        """Accept a job whose executor prepares requests in batches (``defers``): it is queued once the
        preparation thread has prepared it (raises as :meth:`submit` does, and then it was not accepted)."""
        with self.cond:
            if self._closing or self._crashed is not None:
                raise ShutdownError("the runtime is shut down: no new requests" if self._crashed is None else
                                    f"the runtime's device loop stopped: {self._crashed}")
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
                self.cond.notify()
                return
            if job.id in self._preparing:  # the preparation thread drops it when done
                return
            was_queued = job.status is RequestStatus.QUEUED
            if self.scheduler.cancel(job) and was_queued:
                self._inflight.pop(job.id, None)
                self._record(job, RequestStatus.CANCELLED, self.scheduler.clock())
            self.cond.notify()

    def set_limits(self, kind: str, bucket: Hashable | None = None, **limits: Any) -> Limits:
        """:meth:`RequestScheduler.set_limits` under the loop's lock (from any thread)."""
        with self.cond:
            return self.scheduler.set_limits(kind, bucket, **limits)

    def set_merge_cost(self, kind: str, cost: float) -> None:
        """:meth:`RequestScheduler.set_merge_cost` under the loop's lock (from any thread)."""
        with self.cond:
            self.scheduler.set_merge_cost(kind, cost)

    def queue_state(self) -> tuple[dict[str, int], int]:
        """(queued requests per kind, running generations), read under the loop's lock."""
        with self.cond:
            return self.scheduler.queue_depths(), len(self.scheduler.active())

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn()`` on the device thread between two batches (auto-tuning measures there)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            if not self._thread.is_alive():
                raise ShutdownError("the runtime is shut down")
            self._calls.append((fn, future))
            self.cond.notify()
        return future

    def close(self, *, drain: bool = True, timeout: float | None = None, grace: float = 60.0) -> None:
        """Stop taking requests; finish (``drain``) or fail every accepted one, then join the thread.

        ``timeout``: seconds to drain before the rest fails with ShutdownError (running generations
        at their next step). ``grace``: how long to wait for a batch already on the device after that.
        """
        with self.cond:
            self._closing = True
            self.scheduler.request_flush()
            if not drain:
                self._abort = True
            self.cond.notify()
            self._prep_wake.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                with self.cond:
                    self._abort = True
                    self.cond.notify()
                self._thread.join(grace)
        if self._thread.is_alive():  # a device call that never returns: fail its requests anyway
            logger.error("the runtime's device loop did not stop within %.0f s; failing its requests", grace)
        prep = self._prep_thread
        if prep is not None and prep.is_alive() and prep is not threading.current_thread():
            with self.cond:
                self._abort = True  # the device loop has stopped: nothing staged can run any more
                self._prep_wake.notify()
            prep.join(grace)
        self._fail_all(ShutdownError("the runtime was shut down before the request finished"))
        while self._calls:
            self._calls.popleft()[1].set_exception(ShutdownError("the runtime is shut down"))

    # --- device side ----------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug in the loop itself: nothing may hang on it
            logger.exception("the runtime's device loop crashed")
            with self.cond:
                self._crashed = exc
            self._fail_all(ShutdownError(f"the runtime's device loop crashed: {type(exc).__name__}: {exc}"))

    def _loop(self) -> None:
        sched = self.scheduler
        while True:
            call = None
            aborted: list[Job] = []
            stop = False
            with self.cond:
                while True:
                    if self._abort:
                        aborted += self._abort_locked()
                    if self._calls:
                        call = self._calls.popleft()
                        break
                    t0 = time.perf_counter()
                    decision = sched.schedule()
                    self.metrics.decision(time.perf_counter() - t0)
                    if decision.has_work:
                        break
                    if self._closing and sched.pending() == 0 and sched.outside == 0:
                        stop = True
                        break
                    now = sched.clock()
                    self._sleeping_until = math.inf if decision.wait is None else now + decision.wait
                    self.cond.wait(decision.wait)
                    self._sleeping_until = -math.inf
                if call is None and not stop:
                    for job in decision.jobs:
                        job.payload.future.mark_running()
            error = ShutdownError("the runtime was shut down before the request finished")
            for job in aborted:
                job.payload.future._finish(RequestStatus.FAILED, error=error)
            if stop:
                return
            if call is not None:
                fn, future = call
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:
                        future.set_exception(exc)
                continue
            self._dropped(decision)
            if decision.jobs:
                self._execute(decision)

    # --- preparation thread -------------------------------------------------------------------

    def _prep_main(self) -> None:
        try:
            self._prep_loop()
        except BaseException as exc:  # a bug: fail what it holds, and stop the runtime taking more
            logger.exception("the runtime's preparation thread crashed")
            with self.cond:
                self._crashed = exc
                jobs = [*self._staged.values(), *self._preparing.values()]
                self._staged.clear()
                self._preparing.clear()
                self.scheduler.end_outside(len(jobs))
                for job in jobs:
                    self._inflight.pop(job.id, None)
                    self._record(job, RequestStatus.FAILED, self.scheduler.clock())
                self.cond.notify()
            for job in jobs:
                job.payload.future._finish(RequestStatus.FAILED, error=ShutdownError(
                    f"the runtime's preparation thread crashed: {type(exc).__name__}: {exc}"))

    def _prep_loop(self) -> None:
        """Prepare staged jobs in batches (a text batch is tokenized in one call that releases the
        GIL, where one call per submission in the clients' threads would hold it), then queue them.

        Everything staged while a batch is prepared forms the next batch: the busier the runtime,
        the larger the batches, and an idle runtime prepares each request as soon as it arrives.
        """
        while True:
            with self.cond:
                while not self._staged and not (self._closing or self._abort):
                    self._prep_idle = True
                    self._prep_wake.wait()
                    self._prep_idle = False
                if not self._staged:  # closing, and nothing more can be staged
                    return
                jobs = list(self._staged.values())
                self._staged.clear()
                self._preparing = {j.id: j for j in jobs}
            by_kind: dict[str, list[Job]] = {}
            for job in jobs:
                by_kind.setdefault(job.kind, []).append(job)
            prepared: dict[int, Any] = {}
            for kind, group in by_kind.items():
                try:
                    values = self.executors[kind].prepare_many([j.payload.data for j in group])
                except Exception as exc:  # executors isolate bad items themselves; this is a last resort
                    values = [exc] * len(group)
                for job, value in zip(group, values):
                    prepared[job.id] = value
            failed: list[tuple[Job, BaseException]] = []
            with self.cond:
                sched = self.scheduler
                ready_at = math.inf
                now = sched.clock()
                for job in jobs:
                    value = prepared[job.id]
                    if job.payload.future.cancelled():
                        status = RequestStatus.CANCELLED
                    elif self._abort or isinstance(value, BaseException):
                        status = RequestStatus.FAILED
                    else:
                        job.bucket, job.rows, job.cost, job.payload.data = value
                        ready_at = min(ready_at, sched.submit(job, counted=True))
                        continue
                    self._inflight.pop(job.id, None)
                    job.status = status
                    self._record(job, status, now)
                    if status is RequestStatus.FAILED:  # (a cancelled future is resolved already)
                        failed.append((job, value if isinstance(value, BaseException) else ShutdownError(
                            "the runtime was shut down before the request finished")))
                sched.end_outside(len(jobs))  # now queued or dropped (last: a crash above leaves them counted)
                self._preparing = {}
                if ready_at < self._sleeping_until or self._closing:
                    self.cond.notify()
            for job, error in failed:
                job.payload.future._finish(RequestStatus.FAILED, error=error)

    def _execute(self, decision: Decision) -> None:
        executor = self.executors[decision.kind]  # type: ignore[index]
        start = time.perf_counter()
        try:
            result = executor.run(decision)
        except Exception as exc:  # executors isolate failures themselves; this is a last resort
            logger.exception("%s executor failed", decision.kind)
            result = [Outcome(job, RequestStatus.FAILED, exc) for job in decision.jobs]
        seconds = time.perf_counter() - start
        if not isinstance(result, Outcomes):
            result = Outcomes(list(result))
        outcomes = result.ended
        now = self.scheduler.clock()
        with self.cond:
            kind, bucket = decision.queue  # type: ignore[misc]
            if decision.kind == GENERATE:
                rows = sum(j.rows for j in decision.jobs)
                self.metrics.step(bucket, len(decision.jobs), rows, seconds)
                self.scheduler.step_ended(now)
            else:
                self.metrics.batch(kind, bucket, len(decision.jobs), seconds)
            self._learn(decision, result)
            for out in outcomes:
                status = RequestStatus.CANCELLED if out.job.payload.future.cancelled() else out.status
                self.scheduler.finish(out.job, status, now)
                self._inflight.pop(out.job.id, None)
                self._record(out.job, status, now)
        for out in outcomes:
            if out.status is RequestStatus.SUCCEEDED:
                out.job.payload.future._finish(out.status, result=out.value)
            else:
                out.job.payload.future._finish(out.status, error=out.value)

    def _learn(self, decision: Decision, result: Outcomes) -> None:
        """Apply what a run measured to the scheduler (lock held)."""
        sched = self.scheduler
        kind, bucket = decision.queue  # type: ignore[misc]
        if result.step is not None:
            sched.observe_step(decision.queue, *result.step)  # type: ignore[arg-type]
        if result.max_batch is not None and sched.lower_max_batch(kind, bucket, result.max_batch):
            logger.warning("out of device memory: %s bucket %s now takes at most %d per batch", kind,
                           bucket_label(bucket), result.max_batch)
        if result.merge_cost is not None:
            logger.debug("%s batches: one engine call is worth %.0f padded tokens", kind, result.merge_cost)
            sched.set_merge_cost(kind, result.merge_cost)

    def _dropped(self, decision: Decision) -> None:
        """Resolve requests that left without finishing: expired (deadline) and cancelled (running)."""
        if not (decision.expired or decision.cancelled):
            return
        now = self.scheduler.clock()
        gone = [*decision.expired, *decision.cancelled]
        with self.cond:
            for job in gone:
                self._inflight.pop(job.id, None)
                self._record(job, job.status, now)
        for job in decision.expired:
            phase = "queued" if job.started is None else "running"
            job.payload.future._finish(RequestStatus.EXPIRED, error=DeadlineExceededError(
                job.id, job.payload.deadline_s or 0.0, phase))
        for job in decision.cancelled:
            job.payload.future._finish(RequestStatus.CANCELLED, error=concurrent.futures.CancelledError())
        by_kind: dict[str, list[Job]] = {}
        for job in gone:
            if job.started is not None:
                by_kind.setdefault(job.kind, []).append(job)
        for kind, jobs in by_kind.items():
            drop = getattr(self.executors.get(kind), "drop", None)
            if drop is not None:
                drop(jobs)

    def _abort_locked(self) -> list[Job]:
        """Shutdown without draining (lock held): take every queued and running request out; the
        caller fails them once the lock is released."""
        jobs = self.scheduler.drain_queued() + self.scheduler.drain_active() + list(self._staged.values())
        self.scheduler.end_outside(len(self._staged))
        self._staged.clear()
        self._prep_wake.notify()
        now = self.scheduler.clock()
        for job in jobs:
            self._inflight.pop(job.id, None)
            self._record(job, RequestStatus.FAILED, now)
        return jobs

    def _fail_all(self, error: BaseException) -> None:
        """Fail whatever is still in flight (the loop has stopped): nothing is left pending."""
        with self.cond:
            jobs = list(self._inflight.values())
            self._inflight.clear()
            now = self.scheduler.clock()
            for job in jobs:
                self._record(job, RequestStatus.FAILED, now)
        for job in jobs:
            job.payload.future._finish(RequestStatus.FAILED, error=error)

    def _record(self, job: Job, status: RequestStatus, now: float) -> None:
        waited = (job.started if job.started is not None else now) - job.arrival  # type: ignore[operator]
        self.metrics.request(job.kind, status.value, waited, now - job.arrival)  # type: ignore[operator]

    def inflight(self) -> int:
        with self.cond:
            return len(self._inflight)


__all__ = ["Ticket", "Worker"]
