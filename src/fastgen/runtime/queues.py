"""The scheduler's data: jobs (its view of a request), limits, decisions, and one queue per (kind, bucket).

Pure Python (no torch); :mod:`fastgen.runtime.request_scheduler` holds the logic.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastgen.runtime.requests import RequestStatus

#: The kind whose requests are batched step by step; every other kind is batched request by request.
GENERATE = "generate"


@dataclass(eq=False)
class Job:
    """The scheduler's view of one request. ``payload`` is the executor's (opaque here)."""

    id: int
    kind: str
    bucket: Hashable
    priority: int = 0
    arrival: float | None = None
    """Submission time on the scheduler's clock (set by :meth:`RequestScheduler.submit` when None)."""
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
    work: float = 0.0
    """Generation: denoising steps (its urgency grows with it: see ``RuntimeConfig.slowdown_target``)."""
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


@dataclass(slots=True)
class Decision:
    """What the device loop does next. ``jobs`` empty and ``wait`` set: nothing is ready yet.

    The lists other than ``jobs`` are a shared empty tuple unless something is in them (fewer
    allocations per decision: see :meth:`RequestScheduler.schedule`); read them, never append to them.
    """

    kind: str | None = None
    queue: tuple[str, Hashable] | None = None
    jobs: list[Job] = field(default_factory=list)
    """A scoring batch, or a generation bucket's whole active set after this step's joins."""
    joined: Sequence[Job] = ()
    """Generation: the requests that join the active set at this step (need encoding and noise)."""
    expired: Sequence[Job] = ()
    """Deadline passed: removed (queued ones never ran; running generations left their active set)."""
    cancelled: Sequence[Job] = ()
    """Running generations whose cancellation was asked for: removed from their active set."""
    wait: float | None = None
    """Nothing to run: seconds until a batch's wait or a deadline runs out (None: until notified)."""
    max_rows: int | None = None
    """Generation: the queue's step limit in UNet rows when the step was decided (an active set formed
    under a higher limit, before the device ran out of memory, runs in chunks of at most this)."""

    @property
    def has_work(self) -> bool:
        return bool(self.jobs or self.expired or self.cancelled)


class BucketQueue:
    __slots__ = ("key", "kind", "bucket", "heap", "fifo", "count", "cost", "active", "active_rows",
                 "active_cost", "active_priority", "active_vmin", "last_service", "order", "lim", "step_s",
                 "eff_rows", "steps", "observed")

    def __init__(self, key: tuple[str, Hashable], order: int, lim: Limits) -> None:
        self.key, self.kind, self.bucket = key, key[0], key[1]
        self.heap: list[tuple[float, int, Job]] = []  # (vtime, seq, job); dead entries skipped lazily
        self.fifo: deque[Job] = deque()  # arrival order, for the oldest request's wait
        self.count = 0
        self.cost = 0.0
        self.active: list[Job] = []
        self.active_rows = 0
        self.active_cost = 0.0
        self.active_priority = 0  # the best priority of the active set (kept, not recomputed per decision)
        self.active_vmin = math.inf  # the smallest virtual time (most urgent deadline) of the active set, kept
        self.last_service = -math.inf
        self.order = order
        self.lim = lim  # cached: limits() walks two dicts, and every decision reads every queue's
        # Generation: ``step_s``, one request's step alone in this bucket (seconds), and ``eff_rows``,
        # the fewest rows per step that use the engine within 10% of its best rate per row, fitted to
        # ``steps``, the recent (rows, requests, seconds) of this bucket's steps (RequestScheduler.observe_step).
        self.step_s: float | None = None
        self.eff_rows: int | None = None
        self.observed = 0
        self.steps: deque[tuple[int, int, float]] | None = None

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


class ArrivalGaps:
    """The mean gap between the last ``n`` arrivals of one kind (seconds; inf until two): the rate
    behind ``RuntimeConfig.batch_wait = "adaptive"``. Arrivals within ``same_s`` of the previous one
    count as one: the items of one request (a /v1/score of 16 texts) are submitted together, and
    would otherwise read as a burst that makes the next batch wait for more. Arrivals may be
    reported out of order (the preparation thread queues a batch of them at once): the span is the
    newest minus the oldest."""

    __slots__ = ("times", "gap", "same_s", "last")

    def __init__(self, n: int = 8, same_s: float = 1e-4) -> None:
        self.times: deque[float] = deque(maxlen=n)
        self.gap = math.inf
        self.same_s = same_s
        self.last = -math.inf

    def add(self, arrival: float) -> float:
        times = self.times
        same, self.last = abs(arrival - self.last) < self.same_s, arrival  # a chain of them: one request's items
        if same:
            return self.gap
        times.append(arrival)
        if len(times) >= 2:
            self.gap = (max(times) - min(times)) / (len(times) - 1)
        return self.gap


class BestCandidate:
    """The best candidate of one decision: the smallest (key, last service, creation order). Ties
    go to the queue served longest ago (round robin when the clock has not moved)."""

    __slots__ = ("key", "last", "order", "queue", "members")

    def __init__(self) -> None:
        self.key, self.last, self.order = math.inf, math.inf, 0
        self.queue: BucketQueue | None = None
        self.members: list[BucketQueue] | tuple = ()

    def offer(self, key: float, q: BucketQueue, members: list[BucketQueue] | tuple) -> None:
        if self.queue is not None and (key > self.key or (key == self.key and (
                q.last_service > self.last or (q.last_service == self.last and q.order >= self.order)))):
            return
        self.key, self.last, self.order, self.queue, self.members = key, q.last_service, q.order, q, members


__all__ = ["GENERATE", "ArrivalGaps", "BestCandidate", "BucketQueue", "Decision", "Job", "Limits"]
