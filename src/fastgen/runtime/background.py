"""The worker's threads other than the lanes (the supervisor: watchdog and calls; the preparation
thread), and how a shutdown waits for all of them.

A mixin of :class:`~fastgen.runtime.worker.Worker` (its state and lock are the worker's), kept apart
because each loop is a self-contained rule set: the supervisor gives up on an engine call that takes
longer than ``RuntimeConfig.call_timeout_s`` (its requests and its engine's queued ones fail with
:class:`~fastgen.runtime.requests.EngineTimeoutError`, and the lane refuses new ones until the call
returns) and runs :meth:`Worker.call` while every lane waits between two batches; the preparation
thread prepares staged requests in batches (tokenizing texts, decoding images) and queues them.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastgen.runtime.backoff import MemoryBackoff
from fastgen.runtime.request_scheduler import Decision, Job, RequestScheduler
from fastgen.runtime.requests import EngineError, EngineTimeoutError, RequestStatus, ShutdownError

logger = logging.getLogger(__name__)

EXITING_S = 5.0  # joining a thread whose loop has returned (a cap that is never reached)
SETTLE_S = 0.1  # past a shutdown's timeout: the most a thread that is only finishing is waited for

@dataclass(eq=False)
class Lane:
    """One executor's thread and what it is doing (all fields under the worker's lock)."""

    kind: str
    executor: Any
    wake: threading.Condition
    thread: threading.Thread | None = None
    sleeping_until: float = -math.inf  # scheduler clock; -inf: busy
    decision: Decision | None = None  # the run in progress
    started: float | None = None  # time.monotonic() when it began
    stalled: EngineTimeoutError | None = None  # the watchdog gave up on the run in progress
    ended: bool = False
    memory: dict[Hashable, MemoryBackoff] = field(default_factory=dict)  # bucket -> back-off after an OOM
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=32))  # seconds of its recent runs


class BackgroundThreads:
    """The supervisor and preparation loops of :class:`~fastgen.runtime.worker.Worker` (a mixin)."""

    if TYPE_CHECKING:
        scheduler: RequestScheduler
        executors: dict[str, Any]
        call_timeout_s: float | None
        cond: threading.Condition
        _prep_wake: threading.Condition
        _super_wake: threading.Condition
        _lanes: dict[str, Lane]
        _inflight: dict[int, Job]
        _staged: dict[int, Job]
        _preparing: dict[int, Job]
        _prep_idle: bool
        _prep_done: bool
        _super_until: float
        _calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]]
        _pause: bool
        _in_call: bool
        _closing: bool
        _abort: bool
        _stop: bool
        _crashed: BaseException | None
        _prep_thread: threading.Thread | None
        _settle_until: float | None

        def _crash(self, exc: BaseException, where: str) -> None: ...
        def _take_locked(self, jobs: list[Job]) -> list[Job]: ...
        def _fail(self, jobs: list[Job], error: BaseException) -> None: ...
        def _wake_all_locked(self) -> None: ...
        def _record(self, job: Job, status: RequestStatus, now: float) -> None: ...

    # --- stopping -------------------------------------------------------------------------------

    def _wait_stopped(self, until: float | None, *, settle: bool = False) -> bool:
        """Wait until every lane and the preparation thread has ended (a stalled lane and the calling
        thread excepted), at most until ``until`` (monotonic); with ``settle``, then also for those
        that are merely finishing (:meth:`_settling`). Joins those that ended. Whether all did in time."""
        me = threading.current_thread()
        prep = self._prep_thread if self._prep_thread is not me else None

        def stopped() -> bool:
            lanes = all(lane.ended or lane.stalled is not None or lane.thread is me or not lane.thread.is_alive()  # type: ignore[union-attr]
                        for lane in self._lanes.values())
            return lanes and (prep is None or not prep.is_alive() or self._prep_done)

        with self.cond:
            while not stopped():
                left = None if until is None else until - time.monotonic()
                if left is not None and left <= 0:
                    break
                self.cond.wait(left)
            done = stopped()
            if settle and not done:
                while (wait := self._settling(me, prep)) is not None:
                    self.cond.wait(wait)
        # Join the threads whose loops have returned (only their last lines are left to run); not the
        # ones still inside an engine call, nor stalled ones: they end when the call returns.
        ended = [lane.thread for lane in self._lanes.values() if lane.ended]
        if prep is not None and self._prep_done:
            ended.append(prep)
        for thread in ended:
            if thread is not me:
                thread.join(EXITING_S)  # type: ignore[union-attr]
        return done

    def _settling(self, me: threading.Thread, prep: threading.Thread | None) -> float | None:
        """Time is up (lock held): how long to wait for the threads that are only finishing, or None.

        A lane between two runs has nothing left to run and ends at once; a run in progress that has
        not yet taken twice as long as any of its lane's recent runs, plus ``SETTLE_S``, is finishing
        (on a loaded machine a thread may wait that long to be scheduled); the preparation thread gets
        ``SETTLE_S``. A call that has run longer is hung: it is never waited for."""
        now = time.monotonic()
        if self._settle_until is None:
            self._settle_until = now + SETTLE_S
        limit = self._settle_until
        due = -math.inf
        for lane in self._lanes.values():
            if lane.ended or lane.stalled is not None or lane.thread is me or not lane.thread.is_alive():  # type: ignore[union-attr]
                continue
            if lane.started is None:
                due = limit  # between runs
            else:
                due = max(due, min(lane.started + 2 * max(lane.recent, default=0.0) + SETTLE_S, limit))
        if prep is not None and prep.is_alive() and not self._prep_done:
            due = limit
        return due - now if due > now else None

    # --- the supervisor: watchdog and calls ------------------------------------------------------

    def _supervise(self) -> None:
        try:
            self._supervise_loop()
        except BaseException as exc:  # a bug: the watchdog is gone, so stop the runtime loudly
            self._crash(exc, "supervisor")

    def _supervise_loop(self) -> None:
        lanes = list(self._lanes.values())
        while True:
            stalled: list[tuple[list[Job], EngineTimeoutError]] = []
            call = None
            with self.cond:
                while True:
                    now = time.monotonic()
                    wake = math.inf
                    if self.call_timeout_s is not None:
                        for lane in lanes:
                            if lane.started is not None and lane.stalled is None:
                                due = lane.started + self.call_timeout_s
                                if due <= now:
                                    stalled.append(self._stall_locked(lane, now))
                                else:
                                    wake = min(wake, due)
                    if stalled:
                        break
                    if self._calls:
                        self._pause = True
                        if all(lane.decision is None or lane.stalled is not None or lane.ended for lane in lanes):
                            call = self._calls.popleft()
                            break
                    elif self._pause:
                        self._pause = False
                        for lane in lanes:
                            lane.wake.notify()
                    if self._stop or ((self._closing or self._crashed is not None) and all(lane.ended for lane in lanes)):
                        return  # (a runtime dropped without shutdown, or crashed: nobody will stop it)
                    self._super_until = wake
                    self._super_wake.wait(None if wake == math.inf else wake - now)
                    self._super_until = -math.inf
            for jobs, error in stalled:
                self._fail(jobs, error)
            if call is not None:
                fn, future = call
                if future.set_running_or_notify_cancel():
                    self._in_call = True
                    try:
                        future.set_result(fn())
                    except BaseException as exc:
                        future.set_exception(exc)
                    finally:
                        self._in_call = False

    def _stall_locked(self, lane: Lane, now: float) -> tuple[list[Job], EngineTimeoutError]:
        """The watchdog gives up on ``lane``'s run (lock held): its requests, and those queued for its
        engine, fail; the lane refuses new ones until the call returns."""
        error = EngineTimeoutError(lane.kind, now - lane.started, self.call_timeout_s)  # type: ignore[operator,arg-type]
        lane.stalled = error
        logger.error("%s", error)
        kinds = (lane.kind,)
        jobs = [*lane.decision.jobs, *self.scheduler.drain_queued(kinds=kinds),  # type: ignore[union-attr]
                *self.scheduler.drain_active(kinds=kinds)]
        self.cond.notify_all()  # a close waiting for this lane stops waiting
        return self._take_locked(jobs), error

    # --- preparation thread -------------------------------------------------------------------

    def _prep_main(self) -> None:
        try:
            self._prep_loop()
        except BaseException as exc:  # a bug: fail what it holds, and stop the runtime taking more
            with self.cond:
                self.scheduler.end_outside(len(self._staged) + len(self._preparing))
                self._staged.clear()
                self._preparing.clear()
            self._crash(exc, "preparation thread")
        finally:
            with self.cond:
                self._prep_done = True
                self.cond.notify_all()
                self._wake_all_locked()

    def _prep_loop(self) -> None:
        """Prepare staged jobs in batches (a text batch is tokenized in one call that releases the
        GIL, where one call per submission in the clients' threads would hold it; images are
        decoded here, off the clients' threads), then queue them.

        Everything staged while a batch is prepared forms the next batch: the busier the runtime,
        the larger the batches, and an idle runtime prepares each request as soon as it arrives.
        """
        while True:
            with self.cond:
                while not self._staged and not (self._closing or self._abort or self._crashed is not None):
                    self._prep_idle = True
                    self._prep_wake.wait()
                    self._prep_idle = False
                if not self._staged or self._crashed is not None:  # closing, and nothing more can be staged
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
                except BaseException as exc:  # KeyboardInterrupt, SystemExit...: this batch only, loudly
                    logger.error("preparing %s requests raised %s: they fail, the runtime keeps serving", kind,
                                 type(exc).__name__, exc_info=exc)
                    error = EngineError(f"preparing the {kind} requests raised {type(exc).__name__}")
                    error.__cause__ = exc
                    values = [error] * len(group)
                for job, value in zip(group, values):
                    prepared[job.id] = value
            failed: list[tuple[Job, BaseException]] = []
            with self.cond:
                sched = self.scheduler
                now = sched.clock()
                for job in jobs:
                    value = prepared[job.id]
                    lane = self._lanes[job.kind]
                    if job.payload.future.cancelled():
                        status = RequestStatus.CANCELLED
                    elif self._abort or lane.stalled is not None or isinstance(value, BaseException):
                        status = RequestStatus.FAILED
                    else:
                        job.bucket, job.rows, job.cost, job.payload.data = value
                        count = getattr(self.executors[job.kind], "token_count", None)  # optional
                        if count is not None:
                            job.payload.future.tokens = count(value[3])
                        if sched.submit(job, counted=True) < lane.sleeping_until:
                            lane.wake.notify()
                        continue
                    if self._inflight.pop(job.id, None) is None:
                        continue
                    job.status = status
                    self._record(job, status, now)
                    if status is RequestStatus.FAILED:  # (a cancelled future is resolved already)
                        if isinstance(value, BaseException):
                            error = value
                        elif lane.stalled is not None:
                            error = EngineTimeoutError(lane.kind, time.monotonic() - (lane.started or 0.0),
                                                       lane.stalled.timeout_s)
                        else:
                            error = ShutdownError("the runtime was shut down before the request finished")
                        failed.append((job, error))
                sched.end_outside(len(jobs))  # now queued or dropped (last: a crash above leaves them counted)
                self._preparing = {}
                if self._closing:  # lanes waiting for the staged requests to drain
                    for lane in self._lanes.values():
                        lane.wake.notify()
            for job, error in failed:
                job.payload.future._finish(RequestStatus.FAILED, error=error)


__all__ = ["EXITING_S", "SETTLE_S", "BackgroundThreads", "Lane"]
