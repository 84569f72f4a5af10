"""The scheduler: queues, shape buckets, priorities with aging, deadlines, budgets and batch formation.

Pure Python (no torch), driven by an injected clock, so it is deterministic and testable without a
device. The device loop (:mod:`fastgen.runtime.worker`) asks :meth:`Scheduler.schedule` what to run
next, runs it, and reports back with :meth:`Scheduler.finish`.

Queues. Each (kind, bucket) has its own queue: ``("text", 32)`` holds texts padded to 32 tokens,
``("image", (224, 224))`` images of one model-input size, ``("generate", (64, 64))`` generations of
one image size. Scoring kinds form one-shot batches; the ``generate`` kind keeps an *active set*
per bucket that requests join and leave at step boundaries (continuous batching), or, in
``request`` mode, that forms anew only once empty (static batching).

Order. A request's *virtual time* is ``arrival - priority * priority_aging_s``: ordering by it is
ordering by ``priority + waited / priority_aging_s`` at every instant, so one heap per queue keeps
priorities with aging in O(log n), and an old request always ends up ahead of newer ones (no
starvation). Across queues, the ready queue with the smallest key runs next; an active generation
set's key is its last step's time (minus its best priority), so steps and scoring batches
interleave instead of either starving the other.

Batches. A scoring queue is ready when its batch is full (``max_batch`` requests or ``max_cost``
tokens / pixels) or its oldest request has waited ``max_wait_s``; requests are taken in virtual-time
order up to both limits (the first always goes, alone if it is over budget). Text length buckets
nest: a text batch that is not full takes shorter texts from smaller buckets that cannot fill a
batch of their own (largest first), padded to its edge, rather than leave both batches partial:
at low load one call of a few more rows costs far less than a second call, and at high load every
bucket fills its own batch and pads nothing extra. Generation admits in
the same order while the active set stays within its row and pixel budget, never skipping the head
(a large request is not starved by smaller ones behind it).

Deadlines. A queued request whose deadline passes is removed and reported (fail fast: it never
runs); a running generation is removed at its next step boundary. Cancellation: a queued request
is removed at once; a running generation is removed at its next step boundary.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from fastgen.errors import InvalidArgumentError
from fastgen.runtime.config import RuntimeConfig
from fastgen.runtime.requests import OverloadedError, RequestStatus

#: The kind whose requests are batched step by step; every other kind is batched request by request.
GENERATE = "generate"
_SCORE_COST_FIELD = {"text": "max_batch_tokens", "image": "max_batch_pixels"}


@dataclass(eq=False)
class Job:
    """The scheduler's view of one request. ``payload`` is the executor's (opaque here)."""

    id: int
    kind: str
    bucket: Hashable
    priority: int = 0
    arrival: float | None = None
    """Submission time on the scheduler's clock (set by :meth:`Scheduler.submit` when None)."""
    deadline: float | None = None
    """Absolute time on the scheduler's clock; None: never expires."""
    rows: int = 1
    """Batch units: generation UNet rows per step (two per guided image); scoring: 1."""
    cost: float = 1.0
    """Budget units: padded tokens (text), pixels (image), rows x pixels (generation)."""
    payload: Any = None
    status: RequestStatus = RequestStatus.QUEUED
    started: float | None = None
    """When it left the queue (its batch or active set took it)."""
    cancel_requested: bool = False
    vtime: float = 0.0
    seq: int = 0

    @property
    def queue(self) -> tuple[str, Hashable]:
        return (self.kind, self.bucket)


@dataclass
class Limits:
    """Batch limits of one queue."""

    max_batch: int
    """Scoring: requests per batch; generation: UNet rows per step."""
    max_cost: float = math.inf
    max_wait_s: float = 0.0


@dataclass
class Decision:
    """What the device loop does next. ``jobs`` empty and ``wait`` set: nothing is ready yet."""

    kind: str | None = None
    queue: tuple[str, Hashable] | None = None
    jobs: list[Job] = field(default_factory=list)
    """A scoring batch, or a generation bucket's whole active set after this step's joins."""
    joined: list[Job] = field(default_factory=list)
    """Generation: the requests that join the active set at this step (need encoding and noise)."""
    expired: list[Job] = field(default_factory=list)
    """Deadline passed: removed (queued ones never ran; running generations left their active set)."""
    cancelled: list[Job] = field(default_factory=list)
    """Running generations whose cancellation was asked for: removed from their active set."""
    wait: float | None = None
    """Nothing to run: seconds until a batch's wait or a deadline runs out (None: until notified)."""

    @property
    def has_work(self) -> bool:
        return bool(self.jobs or self.expired or self.cancelled)


class _Queue:
    __slots__ = ("key", "kind", "bucket", "heap", "fifo", "count", "cost", "active", "active_rows",
                 "active_cost", "last_service", "order")

    def __init__(self, key: tuple[str, Hashable], order: int) -> None:
        self.key, self.kind, self.bucket = key, key[0], key[1]
        self.heap: list[tuple[float, int, Job]] = []  # (vtime, seq, job); dead entries skipped lazily
        self.fifo: deque[Job] = deque()  # arrival order, for the oldest request's wait
        self.count = 0
        self.cost = 0.0
        self.active: list[Job] = []
        self.active_rows = 0
        self.active_cost = 0.0
        self.last_service = -math.inf
        self.order = order

    def head(self) -> Job | None:
        heap = self.heap
        while heap and heap[0][2].status is not RequestStatus.QUEUED:
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def oldest(self) -> Job | None:
        fifo = self.fifo
        while fifo and fifo[0].status is not RequestStatus.QUEUED:
            fifo.popleft()
        return fifo[0] if fifo else None


class Scheduler:
    """Queues and batch formation over an injected ``clock`` (seconds; default ``time.monotonic``)."""

    def __init__(self, config: RuntimeConfig | None = None, *, clock: Callable[[], float] = time.monotonic,
                 nested_kinds: tuple[str, ...] = ("text",)) -> None:
        self.config = config or RuntimeConfig()
        self.clock = clock
        self.nested_kinds = nested_kinds
        """Kinds whose buckets are lengths (ints): a batch may take requests of smaller buckets, padded up."""
        self._queues: dict[tuple[str, Hashable], _Queue] = {}
        self._limits: dict[tuple[str, Hashable | None], Limits] = {}
        self._deadlines: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._cancel_pending: list[Job] = []
        self._completions: deque[float] = deque(maxlen=256)
        self.queued = 0
        """Requests waiting to start (all queues)."""
        self.flush = False
        """Run scoring batches without waiting for them to fill (set while draining at shutdown)."""

    # --- limits ---------------------------------------------------------------------------------

    def default_limits(self, kind: str) -> Limits:
        cfg = self.config
        if kind == GENERATE:
            return Limits(cfg.max_step_rows, cfg.max_step_pixels or math.inf, 0.0)
        cost_field = _SCORE_COST_FIELD.get(kind)
        return Limits(cfg.max_batch_size, getattr(cfg, cost_field) if cost_field else math.inf, cfg.max_wait_ms / 1e3)

    def limits(self, kind: str, bucket: Hashable | None = None) -> Limits:
        """The limits of a queue: its own (auto-tuning), else its kind's, else the config's."""
        found = self._limits.get((kind, bucket)) if bucket is not None else None
        return found or self._limits.get((kind, None)) or self.default_limits(kind)

    def set_limits(self, kind: str, bucket: Hashable | None = None, *, max_batch: int | None = None,
                   max_cost: float | None = None, max_wait_s: float | None = None) -> Limits:
        """Override some limits of one queue (``bucket``) or of a whole kind (``bucket`` None)."""
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
            raise InvalidArgumentError("max_batch", max_batch, "integers >= 1")
        if max_wait_s is not None and not max_wait_s >= 0:
            raise InvalidArgumentError("max_wait_s", max_wait_s, "numbers >= 0")
        base = self.limits(kind, bucket)
        new = Limits(max_batch if max_batch is not None else base.max_batch,
                     max_cost if max_cost is not None else base.max_cost,
                     max_wait_s if max_wait_s is not None else base.max_wait_s)
        self._limits[(kind, bucket)] = new
        return new

    # --- requests in --------------------------------------------------------------------------

    def submit(self, job: Job) -> float:
        """Queue ``job`` (``arrival`` None: now). Full: :class:`OverloadedError`, and the job is not queued.

        Returns the earliest time this submission may make a decision ready: now (a generation, a batch
        that just filled up), the end of its queue's wait, or its deadline. The device loop need not be
        woken for a submission whose time is later than the one it already sleeps until.
        """
        if self.queued >= self.config.max_queue:
            raise OverloadedError(self.queued, self.config.max_queue, self.retry_after())
        if job.arrival is None:
            job.arrival = self.clock()
        job.seq = next(self._seq)
        job.vtime = job.arrival - job.priority * self.config.priority_aging_s
        job.status = RequestStatus.QUEUED
        q = self._queues.get(job.queue)
        if q is None:
            q = self._queues[job.queue] = _Queue(job.queue, len(self._queues))
        heapq.heappush(q.heap, (job.vtime, job.seq, job))
        q.fifo.append(job)
        q.count += 1
        q.cost += job.cost
        self.queued += 1
        if job.deadline is not None:
            heapq.heappush(self._deadlines, (job.deadline, job.seq, job))
        if job.kind == GENERATE or self.flush:
            return job.arrival
        lim = self.limits(q.kind, q.bucket)
        if q.count >= lim.max_batch or q.cost >= lim.max_cost:
            return job.arrival
        ready = q.oldest().arrival + lim.max_wait_s  # type: ignore[union-attr]
        return ready if job.deadline is None else min(ready, job.deadline)

    def _unqueue(self, job: Job, status: RequestStatus) -> None:
        q = self._queues[job.queue]
        q.count -= 1
        q.cost -= job.cost
        self.queued -= 1
        job.status = status  # its heap / fifo entries are dropped lazily

    def cancel(self, job: Job) -> bool:
        """Cancel a request: queued, removed now; running, flagged (generation leaves at its next step)."""
        if job.status is RequestStatus.QUEUED:
            self._unqueue(job, RequestStatus.CANCELLED)
            return True
        if job.status is RequestStatus.RUNNING and not job.cancel_requested:
            job.cancel_requested = True
            if job.kind == GENERATE:
                self._cancel_pending.append(job)
            return True
        return False

    def retry_after(self) -> float:
        """Seconds until the queue has drained at the recent completion rate (1 s when unknown)."""
        done = self._completions
        if len(done) >= 2 and done[-1] > done[0]:
            rate = (len(done) - 1) / (done[-1] - done[0])
            return min(max(self.queued / rate, 1e-3), 300.0)
        return 1.0

    # --- requests out -------------------------------------------------------------------------

    def finish(self, job: Job, status: RequestStatus, now: float | None = None) -> None:
        """A running request ended (any terminal status): it leaves its active set, if it has one."""
        if job.kind == GENERATE and job.status is RequestStatus.RUNNING:
            q = self._queues[job.queue]
            if job in q.active:
                self._leave(q, job)
        job.status = status
        if status is RequestStatus.SUCCEEDED:
            self._completions.append(self.clock() if now is None else now)

    def _leave(self, q: _Queue, job: Job) -> None:
        q.active.remove(job)
        q.active_rows -= job.rows
        q.active_cost -= job.cost

    def active(self, kind: str = GENERATE) -> list[Job]:
        """Running requests of the active sets of ``kind`` (all buckets)."""
        return [j for q in self._queues.values() if q.kind == kind for j in q.active]

    def pending(self) -> int:
        """Requests queued or in an active set."""
        return self.queued + sum(len(q.active) for q in self._queues.values())

    def queue_depths(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for q in self._queues.values():
            out[q.kind] = out.get(q.kind, 0) + q.count
        return out

    def drain_queued(self, status: RequestStatus = RequestStatus.FAILED) -> list[Job]:
        """Remove every queued request (shutdown); returns them."""
        out = []
        for q in self._queues.values():
            while (job := q.head()) is not None:
                self._unqueue(job, status)
                out.append(job)
            q.fifo.clear()
        return out

    def drain_active(self, status: RequestStatus = RequestStatus.FAILED) -> list[Job]:
        """Remove every running generation from its active set (shutdown); returns them."""
        out = []
        for q in self._queues.values():
            out += q.active
            for job in q.active:
                job.status = status
            q.active, q.active_rows, q.active_cost = [], 0, 0.0
        return out

    # --- the decision -------------------------------------------------------------------------

    def schedule(self, now: float | None = None) -> Decision:
        """What to run next: expirations and cancellations to report, and one batch or step (or a wait)."""
        now = self.clock() if now is None else now
        decision = Decision()
        self._expire(now, decision)
        if self._cancel_pending:
            for job in self._cancel_pending:
                if job.status is RequestStatus.RUNNING:
                    q = self._queues[job.queue]
                    if job in q.active:
                        self._leave(q, job)
                        job.status = RequestStatus.CANCELLED
                        decision.cancelled.append(job)
            self._cancel_pending.clear()

        best: tuple[float, float, int] | None = None
        best_q: _Queue | None = None
        wake = math.inf
        static = self.config.generation_batching == "request"
        for q in self._queues.values():
            if q.kind == GENERATE:
                key = math.inf
                if q.active:
                    key = q.last_service - max(j.priority for j in q.active) * self.config.priority_aging_s
                if q.count and (not q.active or not static):
                    head = q.head()
                    if head is not None and (not q.active or self._fits(q, head)):
                        key = min(key, head.vtime)
                if key == math.inf:
                    continue
            else:
                if not q.count:
                    continue
                lim = self.limits(q.kind, q.bucket)
                oldest = q.oldest()
                ready_at = oldest.arrival + lim.max_wait_s  # type: ignore[union-attr]
                count, cost = q.count, q.cost
                if q.kind in self.nested_kinds:  # it can fill up with shorter texts (padded to its edge)
                    for smaller in self._smaller(q):
                        count += smaller.count
                        cost += smaller.count * q.bucket  # type: ignore[operator]
                if not (self.flush or count >= lim.max_batch or cost >= lim.max_cost or now >= ready_at):
                    wake = min(wake, ready_at)
                    continue
                key = q.head().vtime  # type: ignore[union-attr]
            # Ties go to the queue served longest ago (round robin when the clock has not moved).
            if best is None or (key, q.last_service, q.order) < best:
                best, best_q = (key, q.last_service, q.order), q

        if best_q is None:
            if self._deadlines:
                wake = min(wake, self._deadlines[0][0])
            decision.wait = None if wake == math.inf else max(wake - now, 0.0)
            return decision
        decision.kind, decision.queue = (GENERATE if best_q.kind == GENERATE else best_q.kind), best_q.key
        best_q.last_service = now
        if best_q.kind == GENERATE:
            self._admit(best_q, now, decision, static)
            decision.jobs = list(best_q.active)
        else:
            decision.jobs = self._take_batch(best_q, now)
        return decision

    def _expire(self, now: float, decision: Decision) -> None:
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, _, job = heapq.heappop(heap)
            if job.status is RequestStatus.QUEUED:
                self._unqueue(job, RequestStatus.EXPIRED)
                decision.expired.append(job)
            elif job.status is RequestStatus.RUNNING and job.kind == GENERATE:
                q = self._queues[job.queue]
                if job in q.active:
                    self._leave(q, job)
                    job.status = RequestStatus.EXPIRED
                    decision.expired.append(job)
        while heap and heap[0][2].status.terminal:  # keep the next wake-up exact
            heapq.heappop(heap)

    def _fits(self, q: _Queue, job: Job) -> bool:
        lim = self.limits(q.kind, q.bucket)
        return q.active_rows + job.rows <= lim.max_batch and q.active_cost + job.cost <= lim.max_cost

    def _start(self, q: _Queue, job: Job, now: float) -> None:
        """``job`` (the head of its queue ``q``) leaves the queue and runs."""
        heapq.heappop(q.heap)
        q.count -= 1
        q.cost -= job.cost
        self.queued -= 1
        job.status = RequestStatus.RUNNING
        job.started = now

    def _admit(self, q: _Queue, now: float, decision: Decision, static: bool) -> None:
        if static and q.active:
            return
        while (head := q.head()) is not None and (not q.active or self._fits(q, head)):
            self._start(q, head, now)
            q.active.append(head)
            q.active_rows += head.rows
            q.active_cost += head.cost
            decision.joined.append(head)

    def _smaller(self, q: _Queue) -> list[_Queue]:
        """Queues of ``q``'s kind with smaller (length) buckets that cannot fill a batch of their own,
        largest first (the least padding first). A queue that can fill its own batch keeps it: padding
        its texts up would only cost."""
        out = []
        for o in self._queues.values():
            if o.kind == q.kind and o.count and o.bucket < q.bucket:  # type: ignore[operator]
                lim = self.limits(o.kind, o.bucket)
                if o.count < lim.max_batch and o.cost < lim.max_cost:
                    out.append(o)
        return sorted(out, key=lambda o: o.bucket, reverse=True)  # type: ignore[arg-type,return-value]

    def _take_batch(self, q: _Queue, now: float) -> list[Job]:
        """Up to the limits, in virtual-time order; a nested kind's batch that is not full then takes
        shorter requests from smaller buckets (each costs this bucket's edge: it is padded to it)."""
        lim = self.limits(q.kind, q.bucket)
        batch: list[Job] = []
        cost = 0.0
        sources = [q] + (self._smaller(q) if q.kind in self.nested_kinds else [])
        for source in sources:
            while len(batch) < lim.max_batch and (head := source.head()) is not None:
                padded = head.cost if source is q else float(q.bucket)  # type: ignore[arg-type]
                if batch and cost + padded > lim.max_cost:
                    return batch
                self._start(source, head, now)
                batch.append(head)
                cost += padded
        return batch


__all__ = ["GENERATE", "Decision", "Job", "Limits", "Scheduler"]
