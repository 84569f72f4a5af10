"""The request scheduler: queues, shape buckets, priorities with aging, deadlines, budgets and batch formation.

Pure Python (no torch), driven by an injected clock, so it is deterministic and testable without a
device. Each device loop (:mod:`fastgen.runtime.worker`, one per kind) asks
:meth:`RequestScheduler.schedule` what to run next for its kind, runs it, and reports back with
:meth:`RequestScheduler.finish` (and what the run measured: :meth:`~RequestScheduler.observe_step`,
:meth:`~RequestScheduler.set_merge_cost`, :meth:`~RequestScheduler.set_limits`). Its state changes
only through its methods; the device loops call them under their shared lock. (Diffusers' noise schedulers are another thing: see
:mod:`fastgen.pipelines.sampling`.)

Queues. Each (kind, bucket) has its own queue: ``("text", 32)`` holds texts padded to 32 tokens,
``("image", (224, 224))`` images of one model-input size, ``("generate", (64, 64))`` generations of
one image size. A runtime's scoring kinds are its scorers' names (``("moderation", 32)``), each
batching texts or images (``modalities``). Scoring kinds form one-shot batches; the ``generate`` kind keeps an *active set*
per bucket that requests join and leave at step boundaries (continuous batching), or, in
``request`` mode, that forms anew only once empty (static batching, first come first served).

Order. A request's *virtual time* is ``arrival - priority * priority_aging_s``: ordering by it is
ordering by ``priority + waited / priority_aging_s`` at every instant, so one heap per queue keeps
priorities with aging in O(log n), and an old request always ends up ahead of newer ones (no
starvation). Across queues, the ready queue with the smallest key runs next; generation's key is
its last step's time (minus its best running priority), so steps and scoring batches interleave
instead of either starving the other when one thread decides for all kinds. The runtime decides for
each kind on its own thread (``schedule(kinds=...)``: one engine's hung call never holds up another's
requests), so there each kind's queues compete only with each other.

Generation order (step batching). A request's virtual time is its *deadline* (earliest deadline
first), and each step runs the most urgent requests of the most urgent bucket: that policy (bucket
and row choice, active-set admission, step-time fitting) is :mod:`fastgen.runtime.step_policy`,
a mixin of this class. This module holds the queues, limits, submission, cancellation and
deadlines, scoring batch formation (text groups), and :meth:`RequestScheduler.schedule`, which
weighs generation against scoring.

Batches. A scoring queue is ready when its batch is full (``max_batch`` requests or ``max_cost``
tokens / pixels) or its oldest request has waited ``max_wait_s`` (``batch_wait="adaptive"``: waited at
all only while its kind's last arrivals say another is due within that time); requests are taken in virtual-time
order up to both limits (the first always goes, alone if it is over budget). Text length buckets
nest: a text batch may take every queued text of a smaller bucket, padded to its edge, when the
padding this adds is worth less than the engine call it saves. That price is
:meth:`RequestScheduler.set_merge_cost` (padded tokens worth one call: an engine call's fixed cost over
its cost per token, which the runtime measures while serving): on an engine whose calls cost
little more than their tokens (onnxruntime on a CPU) buckets stay apart, since padding 16-token
texts to 128 costs 8x their tokens; where the fixed cost of a call dominates (eager PyTorch, a
GPU) one call of a few more padded rows beats two. Texts are grouped from the longest bucket down:
each smaller queue joins the nearest longer one that takes it, whole (a part would not save its
call), and only if it cannot fill a batch of its own; the group runs as soon as any of its queues
is ready. Generation admits in
the same order while the active set stays within its row and pixel budget, never skipping the head
(a large request is not starved by smaller ones behind it; see :mod:`fastgen.runtime.step_policy`).

Cost of a decision. Limits are cached per queue, the queues of each kind are kept in bucket order
and the text groups are formed in one pass over them, so a decision costs O(queues + batch size
+ expired and cancelled entries), whatever the number queued (1,000 queued: tens of microseconds,
see ``tests/runtime/test_request_scheduler_bench.py``).

Adapters. Generation buckets may be ``(height, width, adapters)``: no step mixes two UNet weights,
and switching is kept rare (:mod:`fastgen.runtime.step_policy`, "Adapters"). A shape's limits hold
for its adapter buckets.

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
from collections.abc import Callable, Collection, Hashable, Mapping

from fastgen.errors import InvalidArgumentError
from fastgen.runtime.config import RuntimeConfig
from fastgen.runtime.queues import GENERATE, ArrivalGaps, BestCandidate, BucketQueue, Decision, Job, Limits
from fastgen.runtime.requests import OverloadedError, RequestStatus
from fastgen.runtime.step_policy import UNKNOWN_WEIGHTS, StepPolicy, weights_of

_SCORE_COST_FIELD = {"text": "max_batch_tokens", "image": "max_batch_pixels"}


class RequestScheduler(StepPolicy):
    """Queues and batch formation over an injected ``clock`` (seconds; default ``time.monotonic``).

    Generation's step policy (:meth:`observe_step`, :meth:`step_ended`, admission to and leaving
    an active set, the choice of bucket and rows) is inherited from
    :class:`~fastgen.runtime.step_policy.StepPolicy`; the state it works on is set up here."""

    def __init__(self, config: RuntimeConfig | None = None, *, clock: Callable[[], float] = time.monotonic,
                 nested_kinds: tuple[str, ...] = ("text",), modalities: Mapping[str, str] | None = None) -> None:
        self.config = config or RuntimeConfig()
        self.clock = clock
        self.nested_kinds = nested_kinds
        """Kinds whose buckets are lengths (ints): a batch may take requests of smaller buckets, padded up."""
        self.modalities = {"text": "text", "image": "image", **(modalities or {})}
        """Queue kind (a scorer's name) -> ``text`` / ``image``: which budget caps its batches (tokens / pixels)."""
        self._queues: dict[tuple[str, Hashable], BucketQueue] = {}
        self._generate: list[BucketQueue] = []
        self._plain: list[BucketQueue] = []  # scoring queues of kinds that do not nest
        self._nested: dict[str, list[BucketQueue]] = {}  # kind -> its queues, longest bucket first
        self._limits: dict[tuple[str, Hashable | None], Limits] = {}
        self._defaults: dict[str, Limits] = {}
        self.merge_cost: dict[str, float] = {}
        self._arrivals: dict[str, ArrivalGaps] = {}
        self._gap: dict[str, float] = {}  # scoring kind -> mean gap of its recent arrivals (adaptive batch wait)
        """Nested kinds: padding (cost units: tokens) worth one engine call; absent: 0, never pad across buckets."""
        self._deadlines: dict[str, list[tuple[float, int, Job]]] = {}  # per kind: each kind's thread expires its own
        self._seq = itertools.count()
        self._cancel_pending: list[Job] = []
        self._best = BestCandidate()
        self._completions: deque[float] = deque(maxlen=256)
        self._gen_last = -math.inf  # when the last generation step was decided, then when it ended (step_ended)
        self.queued = 0
        """Requests waiting to start (all queues)."""
        self._outside = 0
        self._flush = False
        self._weights_now: Hashable = UNKNOWN_WEIGHTS  # the UNet weights (adapters) of the last generation step
        self.swap_s = 0.0
        """Seconds one switch of adapters takes (a moving average of :meth:`observe_swap`); 0: none seen."""

    @property
    def outside(self) -> int:
        """Requests accepted but not queued yet (being prepared): they count against ``max_queue``
        (see :meth:`begin_outside`)."""
        return self._outside

    @property
    def flush(self) -> bool:
        """Whether scoring batches run without waiting to fill (:meth:`request_flush`, when draining)."""
        return self._flush

    def request_flush(self) -> None:
        """From now on run scoring batches as soon as they have a request, without waiting for them to
        fill (the runtime is draining at shutdown: nothing more is coming)."""
        self._flush = True

    # --- limits ---------------------------------------------------------------------------------

    def default_limits(self, kind: str) -> Limits:
        found = self._defaults.get(kind)
        if found is None:
            cfg = self.config
            if kind == GENERATE:
                found = Limits(cfg.max_step_rows, cfg.max_step_pixels or math.inf, 0.0)
            else:
                cost_field = _SCORE_COST_FIELD.get(self.modalities.get(kind, kind))
                found = Limits(cfg.max_batch_size, getattr(cfg, cost_field) if cost_field else math.inf,
                               cfg.max_wait_ms / 1e3)
            self._defaults[kind] = found
        return found

    def limits(self, kind: str, bucket: Hashable | None = None) -> Limits:
        """The limits of a queue: its own (auto-tuning), else its kind's, else the config's."""
        found = self._limits.get((kind, bucket)) if bucket is not None else None
        if found is None and weights_of(bucket) is not None:  # an adapter bucket: its shape's limits
            found = self._limits.get((kind, bucket[:2]))  # type: ignore[index]
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
        for q in self._queues.values():
            if q.kind == kind:
                q.lim = self.limits(kind, q.bucket)
        return new

    def lower_max_batch(self, kind: str, bucket: Hashable, max_batch: int) -> bool:
        """Cap one queue's batch (generation: step rows) at ``max_batch`` after the device ran out of
        memory above it; a limit already as low stays. Returns whether the limit changed."""
        if max_batch >= self.limits(kind, bucket).max_batch:
            return False
        self.set_limits(kind, bucket, max_batch=max_batch)
        return True

    def set_merge_cost(self, kind: str, cost: float) -> None:
        """Padding (in ``kind``'s cost units: padded tokens for texts) worth one engine call: a batch
        takes a smaller bucket's texts only while padding them up to its edge costs at most this."""
        if not cost >= 0:
            raise InvalidArgumentError("merge cost", cost, "numbers >= 0")
        self.merge_cost[kind] = float(cost)

    # --- requests in --------------------------------------------------------------------------

    def _new_queue(self, key: tuple[str, Hashable]) -> BucketQueue:
        q = self._queues[key] = BucketQueue(key, len(self._queues), self.limits(key[0], key[1]))
        if q.kind == GENERATE:
            self._generate.append(q)
        elif q.kind in self.nested_kinds:
            same = self._nested.setdefault(q.kind, [])
            same.append(q)
            same.sort(key=lambda o: o.bucket, reverse=True)  # type: ignore[arg-type,return-value]
        else:
            self._plain.append(q)
        return q

    def begin_outside(self) -> None:
        """Count one request accepted before it can be queued (``outside``); full: :class:`OverloadedError`.
        Each ends with :meth:`end_outside`, then is queued with ``submit(job, counted=True)`` or dropped."""
        if self.queued + self._outside >= self.config.max_queue:
            raise OverloadedError(self.queued + self._outside, self.config.max_queue, self.retry_after())
        self._outside += 1

    def end_outside(self, n: int = 1) -> None:
        """``n`` requests counted by :meth:`begin_outside` are prepared (to be queued) or dropped."""
        if not 0 <= n <= self._outside:
            raise InvalidArgumentError("n", n, f"0 to {self._outside} (the requests outside the queues)")
        self._outside -= n

    def submit(self, job: Job, *, counted: bool = False) -> float:
        """Queue ``job`` (``arrival`` None: now). Full: :class:`OverloadedError`, and the job is not queued
        (``counted``: it was admitted by :meth:`begin_outside`, and is never refused).

        Returns the earliest time this submission may make a decision ready: now (a generation, a batch
        that may just have filled up), the end of its queue's wait, or its deadline. The device loop need
        not be woken for a submission whose time is later than the one it already sleeps until.
        """
        if not counted and self.queued + self._outside >= self.config.max_queue:
            raise OverloadedError(self.queued + self._outside, self.config.max_queue, self.retry_after())
        if job.arrival is None:
            job.arrival = self.clock()
        job.seq = next(self._seq)
        if job.kind != GENERATE and self.config.batch_wait == "adaptive":
            self._gap[job.kind] = self._arrivals.setdefault(job.kind, ArrivalGaps()).add(job.arrival)
        if job.kind == GENERATE and self.config.generation_batching == "step" and self.config.slowdown_target:
            job.vtime = self._urgency(job)
        else:
            job.vtime = job.arrival - job.priority * self.config.priority_aging_s
        job.status = RequestStatus.QUEUED
        q = self._queues.get(job.queue) or self._new_queue(job.queue)
        heapq.heappush(q.heap, (job.vtime, job.seq, job))
        q.fifo.append(job)
        q.count += 1
        q.cost += job.cost
        self.queued += 1
        if job.deadline is not None:
            heapq.heappush(self._deadlines.setdefault(job.kind, []), (job.deadline, job.seq, job))
        if job.kind == GENERATE or self._flush:
            return job.arrival
        lim = q.lim
        count = q.count
        if job.kind in self.nested_kinds:  # a group of buckets may have filled up: count them all
            count = sum(o.count for o in self._nested[job.kind])
        if count >= lim.max_batch or q.cost >= lim.max_cost:
            return job.arrival
        ready = q.oldest().arrival + self._wait(q)  # type: ignore[union-attr]
        return ready if job.deadline is None else min(ready, job.deadline)

    def _wait(self, q: BucketQueue) -> float:
        """Seconds ``q``'s oldest request may wait for its batch to fill: its ``max_wait_s``, or none where
        its kind's recent arrivals say no other request is due within it (``RuntimeConfig.batch_wait``)."""
        wait = q.lim.max_wait_s
        return wait if wait >= self._gap.get(q.kind, 0.0) else 0.0

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

    def active(self, kind: str = GENERATE) -> list[Job]:
        """Running requests of the active sets of ``kind`` (all buckets)."""
        return [j for q in self._queues.values() if q.kind == kind for j in q.active]

    def pending(self, kind: str | None = None) -> int:
        """Requests queued or in an active set (of ``kind`` only, if given)."""
        if kind is None:
            return self.queued + sum(len(q.active) for q in self._generate)
        return sum(q.count + len(q.active) for q in self._queues.values() if q.kind == kind)

    def queue_depths(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for q in self._queues.values():
            out[q.kind] = out.get(q.kind, 0) + q.count
        return out

    def drain_queued(self, status: RequestStatus = RequestStatus.FAILED, kinds: Collection[str] | None = None
                     ) -> list[Job]:
        """Remove every queued request (of ``kinds`` only, if given: an engine that stopped); returns them."""
        out = []
        for q in self._queues.values():
            if kinds is not None and q.kind not in kinds:
                continue
            while (job := q.head()) is not None:
                self._unqueue(job, status)
                out.append(job)
            q.fifo.clear()
        return out

    def drain_active(self, status: RequestStatus = RequestStatus.FAILED, kinds: Collection[str] | None = None
                     ) -> list[Job]:
        """Remove every running generation from its active set (shutdown); returns them."""
        out: list[Job] = []
        if kinds is not None and GENERATE not in kinds:
            return out
        for q in self._generate:
            out += q.active
            for job in q.active:
                job.status = status
            q.active, q.active_rows, q.active_cost, q.active_priority, q.active_vmin = [], 0, 0.0, 0, math.inf
        return out

    # --- the decision -------------------------------------------------------------------------

    def schedule(self, now: float | None = None, kinds: Collection[str] | None = None) -> Decision:
        """What to run next: expirations and cancellations to report, and one batch or step (or a wait).

        ``kinds``: decide for those kinds only (each engine's thread decides for its own, and never
        touches another's requests while that one's batch runs); None: all of them."""
        now = self.clock() if now is None else now
        decision = Decision()
        heads = math.inf  # the earliest deadline of the kinds decided for
        for kind, heap in self._deadlines.items():
            if heap and (kinds is None or kind in kinds):
                if heap[0][0] <= now:
                    self._expire(heap, now, decision)
                if heap and heap[0][0] < heads:
                    heads = heap[0][0]
        if self._cancel_pending and (kinds is None or GENERATE in kinds):
            self._take_cancelled(decision)

        # Nothing below allocates per queue (no tuples, no lists unless a text group forms): a
        # decision that allocates less is less often the one that triggers Python's garbage collector,
        # whose pauses (0.1 to 2 ms) would otherwise be most of the slowest decisions.
        best = self._best
        best.queue, best.members = None, ()
        wake = math.inf
        aging = self.config.priority_aging_s
        static = self.config.generation_batching == "request"
        if self._generate and (kinds is None or GENERATE in kinds):
            self._generation(aging, static)
        flush = self._flush
        for q in self._plain:
            if not q.count or (kinds is not None and q.kind not in kinds):
                continue
            lim = q.lim
            ready_at = q.oldest().arrival + self._wait(q)  # type: ignore[union-attr]
            if flush or q.count >= lim.max_batch or q.cost >= lim.max_cost or now >= ready_at:
                best.offer(q.head().vtime, q, ())  # type: ignore[union-attr]
            elif ready_at < wake:
                wake = ready_at
        for kind, queues in self._nested.items():
            if kinds is None or kind in kinds:
                wake = self._groups(queues, self.merge_cost.get(kind, 0.0), now, wake)

        best_q, members = best.queue, best.members
        best.queue, best.members = None, ()
        if best_q is None:
            wake = min(wake, heads)
            decision.wait = None if wake == math.inf else max(wake - now, 0.0)
            return decision
        decision.kind, decision.queue = best_q.kind, best_q.key
        best_q.last_service = now
        if best_q.kind == GENERATE:
            self._gen_last = now
            self._weights_now = weights_of(best_q.bucket)
            self._admit(best_q, now, decision, static)
            decision.jobs = list(best_q.active) if static else self._running(best_q)
            decision.max_rows = best_q.lim.max_batch
        else:
            decision.jobs = self._take_batch(best_q, members, now)
        return decision

    def _groups(self, queues: list[BucketQueue], merge_cost: float, now: float, wake: float) -> float:
        """Form the text groups of one nested kind from its queues (longest bucket first), offer each
        ready one to ``self._best``, and return ``wake`` lowered to the first not-ready group's time.

        A group is a leader and the smaller queues it takes; it is ready when full, when flushing,
        or when any member's oldest request has waited its ``max_wait_s``."""
        best = self._best
        leader: BucketQueue | None = None
        members: list[BucketQueue] | tuple = ()
        count, cost, key, ready_at = 0, 0.0, math.inf, math.inf
        for q in (*queues, None):  # None: the end, which closes the last group
            if q is not None:
                if not q.count:
                    continue
                lim = q.lim
                q_ready = q.oldest().arrival + self._wait(q)  # type: ignore[union-attr]
                q_key = q.head().vtime  # type: ignore[union-attr]
                if leader is not None:
                    edge = leader.bucket
                    padded = q.count * edge  # type: ignore[operator]
                    llim = leader.lim
                    if (padded - q.cost <= merge_cost and q.count < lim.max_batch and q.cost < lim.max_cost
                            and count + q.count <= llim.max_batch and cost + padded <= llim.max_cost):
                        if members:
                            members.append(q)  # type: ignore[union-attr]
                        else:
                            members = [q]
                        count += q.count
                        cost += padded
                        key, ready_at = min(key, q_key), min(ready_at, q_ready)
                        continue
            if leader is not None:  # close the group of ``leader``
                llim = leader.lim
                if self._flush or now >= ready_at or count >= llim.max_batch or cost >= llim.max_cost:
                    best.offer(key, leader, members)
                elif ready_at < wake:
                    wake = ready_at
            if q is None:
                return wake
            leader, members, count, cost, key, ready_at = q, (), q.count, q.cost, q_key, q_ready
        return wake

    def _expire(self, heap: list[tuple[float, int, Job]], now: float, decision: Decision) -> None:
        expired: list[Job] = []
        while heap and heap[0][0] <= now:
            _, _, job = heapq.heappop(heap)
            if job.status is RequestStatus.QUEUED:
                self._unqueue(job, RequestStatus.EXPIRED)
                expired.append(job)
            elif job.status is RequestStatus.RUNNING and job.kind == GENERATE:
                q = self._queues[job.queue]
                if job in q.active:
                    self._leave(q, job)
                    job.status = RequestStatus.EXPIRED
                    expired.append(job)
        while heap and heap[0][2].status.terminal:  # keep the next wake-up exact
            heapq.heappop(heap)
        if expired:
            decision.expired = [*decision.expired, *expired] if decision.expired else expired

    def _take_cancelled(self, decision: Decision) -> None:
        cancelled: list[Job] = []
        for job in self._cancel_pending:
            if job.status is RequestStatus.RUNNING:
                q = self._queues[job.queue]
                if job in q.active:
                    self._leave(q, job)
                    job.status = RequestStatus.CANCELLED
                    cancelled.append(job)
        self._cancel_pending.clear()
        if cancelled:
            decision.cancelled = cancelled

    def _take_batch(self, q: BucketQueue, members: list[BucketQueue], now: float) -> list[Job]:
        """``q``'s requests up to its limits, in virtual-time order, then every request of the smaller
        queues of its group (they were chosen to fit whole, padded to ``q``'s edge)."""
        lim = q.lim
        max_batch, max_cost = lim.max_batch, lim.max_cost
        batch: list[Job] = []
        cost = 0.0
        running = RequestStatus.RUNNING
        queued = RequestStatus.QUEUED
        pop = heapq.heappop
        # head() and the bookkeeping are inlined: taking a full batch is most of a decision's cost.
        for source in (q, *members):
            heap = source.heap
            taken = 0
            while heap and len(batch) < max_batch:
                job = heap[0][2]
                if job.status is not queued:  # cancelled or expired: dropped lazily
                    pop(heap)
                    continue
                if source is q and batch and cost + job.cost > max_cost:
                    break
                pop(heap)
                source.cost -= job.cost
                cost += job.cost
                job.status = running
                job.started = now
                batch.append(job)
                taken += 1
            source.count -= taken
            self.queued -= taken
            source.last_service = now
        return batch


__all__ = ["GENERATE", "Decision", "Job", "Limits", "RequestScheduler"]
