"""Generation step policy of :class:`~fastgen.runtime.request_scheduler.RequestScheduler`: which
bucket steps next, which of its requests the step runs, who joins or leaves an active set, and the
per-bucket step times all of this is priced with.

Kept apart from the scheduler's queues and scoring batches because it is one self-contained rule
set (continuous batching of the ``generate`` kind) that changes on its own, for other reasons than
queueing and text grouping. :class:`StepPolicy` is a mixin rather than a separate object: its methods
run inside every decision, and as methods of the scheduler itself they read its state directly,
with no extra call or attribute hop (a mixin's methods are found through the type's method cache at
the same cost as the class's own).

Generation order (step batching). A request's virtual time is its *deadline*: arrival plus
``slowdown_target`` times its solo time (its steps times its bucket's solo step, fitted to the
measured steps), minus priority times aging: earliest deadline first. Every step is a choice of
requests: the bucket holding the most urgent request steps, and the step runs that bucket's most
urgent requests up to ``max_step_rows`` and its efficient size (the fewest rows within 10% of the
engine's best cost per row); the rest of its active set (up to ``max_active_rows``) waits, text
encoded, at a step boundary. A paused request costs nothing, so short requests overtake long ones
that arrived shortly before them, which request-level batching cannot do. With request batching
(``generation_batching="request"``) an active set forms anew only once empty, within one step's
limits, and buckets take turns (the one served longest ago first).

Admission never skips the head of a bucket's queue: a large request is not starved by smaller
ones behind it. Pure Python (no torch), like the scheduler.

Adapters (per-request LoRA). A generation bucket ``(height, width, adapters)`` holds requests whose
adapters give the UNet the same weights (:func:`weights_of`; ``(height, width)``: the base weights).
Weights are fused into the engine, so two such buckets never share a step, and stepping one after
the other costs a swap (measured: :meth:`~fastgen.runtime.request_scheduler.RequestScheduler.observe_swap`).
So the adapters on the UNet now are preferred: with step batching a bucket of other adapters steps
only when its most urgent request is due more than ``switch_hold_s`` (twice the measured swap: there
and back) before the most urgent one of the adapters in place (ties stay); with request batching,
other adapters' batches start only once every batch running on the adapters in place has finished.
Neither starves anyone: deadlines (virtual times) are fixed at submission while newer requests get
later ones, so the adapters in place run out of more urgent requests within ``switch_hold_s`` plus
their own work, and every request batch is finite.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING

from fastgen.runtime.batch_tuning import fit_call_cost
from fastgen.runtime.queues import BestCandidate, BucketQueue, Decision, Job
from fastgen.runtime.requests import RequestStatus

if TYPE_CHECKING:
    from fastgen.runtime.config import RuntimeConfig

_POOL = 4  # step batching: a bucket's active set holds up to this many steps' rows (max_active_rows unset)
UNKNOWN_WEIGHTS = object()  # what the UNet holds before the first generation step: no switch is charged


def _by_vtime(job: Job) -> float:
    return job.vtime


def _pixels(bucket: Hashable) -> float:
    """Pixels of a generation bucket ``(height, width[, adapters])``; 1 for anything else."""
    if isinstance(bucket, tuple) and len(bucket) >= 2 and all(isinstance(x, (int, float)) for x in bucket[:2]):
        return float(bucket[0] * bucket[1])
    return 1.0


def weights_of(bucket: Hashable) -> Hashable:
    """The UNet weights a generation bucket's steps run with: its third item (the adapters), None
    for ``(height, width)`` (the base weights) and for a DiT text-length bucket ``(height, width,
    ("text_tokens", n))``, whose weights are the base ones too."""
    item = bucket[2] if isinstance(bucket, tuple) and len(bucket) > 2 else None
    return None if isinstance(item, tuple) and item[:1] == ("text_tokens",) else item


class StepPolicy:
    """The generation half of :class:`~fastgen.runtime.request_scheduler.RequestScheduler` (a mixin).

    It owns no state: the queues, the active sets on them and the step timings live on the
    scheduler (set up by its ``__init__``), declared here for type checkers only."""

    if TYPE_CHECKING:
        config: RuntimeConfig
        queued: int
        swap_s: float
        _weights_now: Hashable
        _queues: dict[tuple[str, Hashable], BucketQueue]
        _generate: list[BucketQueue]
        _best: BestCandidate
        _gen_last: float

        def _new_queue(self, key: tuple[str, Hashable]) -> BucketQueue: ...

    # --- choosing the step: which bucket, which of its requests --------------------------------

    def _generation(self, aging: float, static: bool) -> None:
        """Offer the generation bucket to step next, if any can, to ``self._best``.

        Generation competes with scoring as one kind: its key is the time of its last step (minus
        the best running priority), or the arrival of a request that can start now if earlier, so
        scoring batches that arrived during a step run before the next one. Between shape buckets:
        with step batching, the bucket of the most urgent request (smallest ``vtime``, running or
        able to join: earliest deadline first); with request batching, the one served longest ago.
        Either way the UNet's adapters in place are preferred (the module docstring, "Adapters").
        """
        chosen: BucketQueue | None = None
        chosen_head: Job | None = None
        chosen_key = math.inf
        chosen_switch = False
        now_weights = self._weights_now
        known = now_weights is not UNKNOWN_WEIGHTS
        busy = static and known and any(q.active and weights_of(q.bucket) == now_weights for q in self._generate)
        for q in self._generate:
            head = q.head() if q.count else None
            if head is not None and q.active and (static or not self._fits(q, head, static)):
                head = None  # cannot join at this step
            if head is None and not q.active:
                continue
            if static:
                q_key = q.last_service
            else:
                q_key = q.active_vmin
                if head is not None and head.vtime < q_key:
                    q_key = head.vtime
            switch = known and weights_of(q.bucket) != now_weights  # stepping it swaps the UNet's adapters
            if switch:
                if busy:
                    continue  # request batching: the batches on the adapters in place finish first
                q_key += self.switch_hold_s
            # Ties: the bucket needing no swap, then the one served longest ago.
            if chosen is None or q_key < chosen_key or (q_key == chosen_key and (
                    (switch, q.last_service) < (chosen_switch, chosen.last_service))):
                chosen, chosen_head, chosen_key, chosen_switch = q, head, q_key, switch
        if chosen is None:
            return
        # Against scoring, only what this step would run counts: a request that can join another
        # bucket does not make this one's step more urgent than the scoring batches waiting.
        key = self._gen_last - chosen.active_priority * aging if chosen.active else math.inf
        if chosen_head is not None:
            key = min(key, chosen_head.arrival - chosen_head.priority * aging)  # type: ignore[operator]
        self._best.offer(key, chosen, ())

    def _urgency(self, job: Job) -> float:
        """Generation with step batching: a request's deadline for earliest-deadline-first order, its
        arrival plus ``slowdown_target`` times its solo time (``work`` steps of its bucket's solo
        step, once measured), so a 4-step request overtakes a 50-step one that arrived a little earlier
        but not one that has waited ``slowdown_target`` times its own length. Minus priority times aging."""
        q = self._queues.get(job.queue)
        step_s = q.step_s if q is not None else None
        if step_s is None:  # not measured yet: one more from pixels, else first come first served
            step_s = self._scaled_step(job.bucket)
        solo = (job.work + 1.0) * step_s if step_s else 0.0
        return job.arrival + self.config.slowdown_target * solo - job.priority * self.config.priority_aging_s  # type: ignore[operator]

    def _scaled_step(self, bucket: Hashable) -> float | None:
        for other in self._generate:
            if other.step_s is not None:
                return other.step_s * _pixels(bucket) / _pixels(other.bucket)
        return None

    def _caps(self, q: BucketQueue, static: bool) -> tuple[int, float]:
        """The rows and cost ``q``'s active set may hold: one step's limits with request batching;
        with step batching ``max_active_rows`` (default ``_POOL`` steps' rows), and the step's cost
        budget times the same factor."""
        lim = q.lim
        if static:
            return lim.max_batch, lim.max_cost
        rows = self.config.max_active_rows or _POOL * lim.max_batch
        return rows, lim.max_cost * max(rows / lim.max_batch, 1.0)

    def _fits(self, q: BucketQueue, job: Job, static: bool) -> bool:
        rows, cost = self._caps(q, static)
        return q.active_rows + job.rows <= rows and q.active_cost + job.cost <= cost

    def _running(self, q: BucketQueue) -> list[Job]:
        """Step batching: the requests of ``q``'s active set that this step runs, the most urgent first,
        up to the step's row and cost limits and its efficient size (``eff_rows``: on an engine whose
        cost grows with every row, as on a CPU, a smaller step serves the urgent requests sooner at the
        same rate per row; where a call's fixed cost dominates, as on a GPU, it is the row limit)."""
        lim = q.lim
        rows_cap = lim.max_batch if q.eff_rows is None else min(lim.max_batch, q.eff_rows)
        active = q.active
        if q.active_rows <= rows_cap and q.active_cost <= lim.max_cost:
            return list(active)
        out: list[Job] = []
        rows, cost = 0, 0.0
        for job in sorted(active, key=_by_vtime):
            if out and (rows + job.rows > rows_cap or cost + job.cost > lim.max_cost):
                continue  # a smaller one behind may still fit
            out.append(job)
            rows += job.rows
            cost += job.cost
        return out

    # --- what the steps measured -----------------------------------------------------------------

    @property
    def switch_hold_s(self) -> float:
        """How much more urgent (seconds of deadline) a bucket of other adapters must be to step before
        the adapters on the UNet now: the swap there and back."""
        return 2.0 * self.swap_s

    def observe_swap(self, seconds: float) -> None:
        """A generation run swapped adapters for ``seconds`` (UNet and text encoders together)."""
        if seconds >= 0:
            self.swap_s = seconds if self.swap_s == 0 else 0.8 * self.swap_s + 0.2 * seconds

    def step_ended(self, now: float) -> None:
        """A generation step has finished (the device loop says so): scoring requests that arrived
        while it ran go before the next step (until then, its decision time stands in)."""
        self._gen_last = now

    def observe_step(self, key: tuple[str, Hashable], rows: int, requests: int, seconds: float) -> None:
        """A step of generation queue ``key`` ran ``rows`` UNet rows of ``requests`` requests in
        ``seconds``: refit that bucket's solo step time (``fixed + per_row * rows per request``,
        from the recent steps, every 8; the median per-request time until rows vary enough)."""
        if rows < 1 or requests < 1:
            return
        q = self._queues.get(key) or self._new_queue(key)
        if q.steps is None:
            q.steps = deque(maxlen=64)
        q.steps.append((rows, requests, seconds))
        q.observed += 1
        n = len(q.steps)
        if q.observed % 8 and q.step_s is not None:
            return
        per_request = sum(r for r, _, _ in q.steps) / sum(j for _, j, _ in q.steps)
        fit = fit_call_cost([(r, t) for r, _, t in q.steps]) if n >= 8 else None
        if fit is not None and fit[1] > 0:
            fixed = max(fit[0], 0.0)
            q.step_s = fixed + fit[1] * per_request
            # rows * per_row / (fixed + rows * per_row) >= 90%: rows >= 9 * fixed / per_row
            q.eff_rows = max(math.ceil(per_request - 1e-9), math.ceil(9.0 * fixed / fit[1] - 1e-9))
        elif q.step_s is None:
            q.step_s = sorted(t * j / r for r, j, t in q.steps)[n // 2] * per_request

    # --- the active set: joining at a step boundary, leaving -----------------------------------

    def _admit(self, q: BucketQueue, now: float, decision: Decision, static: bool) -> None:
        """Move ``q``'s queued requests into its active set, in virtual-time order, while they fit
        its capacity (:meth:`_caps`); with request batching only into an empty set. Each joins
        ``decision.joined`` (to be encoded before the step)."""
        if static and q.active:
            return
        heap, active = q.heap, q.active
        queued = RequestStatus.QUEUED
        cap_rows, cap_cost = self._caps(q, static)
        while heap:
            head = heap[0][2]
            if head.status is not queued:  # cancelled or expired: dropped lazily
                heapq.heappop(heap)
                continue
            if active and (q.active_rows + head.rows > cap_rows or q.active_cost + head.cost > cap_cost):
                return  # the head does not fit: nothing behind it may overtake it
            heapq.heappop(heap)
            q.count -= 1
            q.cost -= head.cost
            self.queued -= 1
            head.status = RequestStatus.RUNNING
            head.started = now
            q.active_priority = head.priority if not active else max(q.active_priority, head.priority)
            q.active_vmin = head.vtime if not active else min(q.active_vmin, head.vtime)
            active.append(head)
            q.active_rows += head.rows
            q.active_cost += head.cost
            if decision.joined:
                decision.joined.append(head)  # type: ignore[attr-defined]
            else:
                decision.joined = [head]

    def _leave(self, q: BucketQueue, job: Job) -> None:
        """``job`` leaves ``q``'s active set (finished, expired or cancelled). The kept extremes are
        recomputed only when ``job`` held one, so most leaves cost no pass over the set."""
        q.active.remove(job)
        q.active_rows -= job.rows
        q.active_cost -= job.cost
        if job.priority >= q.active_priority:
            q.active_priority = max((j.priority for j in q.active), default=0)
        if job.vtime <= q.active_vmin:
            q.active_vmin = min((j.vtime for j in q.active), default=math.inf)


__all__ = ["StepPolicy"]
