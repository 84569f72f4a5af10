"""``fastgen.Runtime``: a stream of single requests from many clients into full, well-shaped batches.

::

    with fastgen.Runtime(generator=gen, scorers={"moderation": text_clf, "quality": image_clf}) as rt:
        future = rt.submit(fastgen.GenerateRequest("a red car", GenerateConfig(steps=20, seed=1)))
        image = future.result().images[0]
        score = await rt.score("buy now, fifty percent off", scorer="moderation")  # from an asyncio loop

Scoring is batched request by request (dynamic batching in shape buckets under a count and a
token / pixel budget), generation step by step (continuous batching: requests join and leave a
shape bucket's UNet batch at every denoising step). Each engine (the generator's, and each named
scorer's: :mod:`fastgen.runtime.scorer_names`) runs on its own device thread, watched by a
watchdog (:mod:`fastgen.runtime.worker`); the decisions are
:mod:`fastgen.runtime.request_scheduler`'s. Every accepted request ends with a status
(:mod:`fastgen.runtime.requests`); clients' done-callbacks run on the runtime's callback threads
(:mod:`fastgen.runtime.callbacks`), never on a device thread. ``shutdown`` finishes or fails
every request and joins the threads within its timeout; a runtime dropped without it finishes
what it accepted and stops its threads, and one still running at interpreter exit is aborted.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from fastgen.errors import InvalidArgumentError
from fastgen.runtime.batch_tuning import CallCost, LatencyProfile, TuningChoice, choose, measure
from fastgen.runtime.callbacks import CallbackPool
from fastgen.runtime.config import RuntimeConfig
from fastgen.runtime.metrics import Metrics, MetricsCollector, bucket_label
from fastgen.runtime.request_scheduler import GENERATE, Job, RequestScheduler
from fastgen.runtime.requests import (
    SCORER_REQUESTS,
    DetectRequest,
    EmbedRequest,
    GenerateRequest,
    OverloadedError,
    RequestFuture,
    ScoreRequest,
)
from fastgen.runtime.scorer_names import REQUEST_TASKS, lane, modalities, named_scorers, resolve
from fastgen.runtime.worker import Ticket, Worker

logger = logging.getLogger(__name__)


def _gauges(worker: Worker, kinds: Sequence[str]) -> dict[str, dict[str, float]]:
    """The gauges now, name -> {kind: value} (a function of the worker, not of the runtime: the metrics
    registry holds it, and a runtime must stay collectable by reference counting)."""
    depths, active = worker.queue_state()
    return {"queue_depth": {k: float(depths.get(k, 0)) for k in kinds},
            "active_requests": {GENERATE: float(active)} if GENERATE in kinds else {},
            "inflight_requests": {"": float(worker.inflight())}}


def _release(worker: Worker, callbacks: CallbackPool) -> None:
    """A runtime was garbage-collected without ``shutdown``: let its threads finish what it accepted
    and end, without blocking the collecting thread (it holds no reference to the runtime)."""
    worker.close_nowait()
    callbacks.close(timeout=0.0)


class Runtime:
    """Batched serving of a :class:`~fastgen.Generator` and/or any number of :class:`~fastgen.Scorer`
    objects, one device thread per engine (the generator's, and each scorer's).

    ``scorer`` / ``scorers`` (give one of them): a Scorer, a list of them, or a dict name -> Scorer
    (:mod:`fastgen.runtime.scorer_names`); a scorer without a name is named by its kind (``text`` /
    ``image``). Requests pick one by name (``ScoreRequest(item, scorer="moderation")``) or take the
    only one of their item's kind. ``config`` and keyword ``overrides`` (its field names) set
    queueing and batching (:class:`RuntimeConfig`). ``clock``: seconds, monotonic (tests inject
    one). ``start``: start the device threads now (else on :meth:`start`).
    """

    def __init__(self, generator: Any = None, scorer: Any = None, *, scorers: Any = None,
                 config: RuntimeConfig | None = None, clock: Callable[[], float] | None = None, start: bool = True,
                 **overrides: Any) -> None:
        from fastgen.runtime.generation import GenerationExecutor
        from fastgen.runtime.scoring import make_executors

        cfg = config or RuntimeConfig()
        self.config = cfg.replace(**overrides) if overrides else cfg
        if scorer is not None and scorers is not None:
            raise InvalidArgumentError("scorers", "scorer and scorers", reason="give one of them")
        scorers = named_scorers(scorers if scorers is not None else scorer)
        if generator is None and not scorers:
            raise InvalidArgumentError("generator", None, reason="a Runtime needs a Generator and/or a Scorer")
        self.clock = clock or time.monotonic
        lanes: dict[str, Any] = {}  # the scorers' executors by lane (a scorer's name; a two-tower one's texts too)
        for name, s in scorers.items():
            lanes.update(make_executors(name, s, self.config))
        kinds = modalities(lanes)
        texts = tuple(key for key, kind in kinds.items() if kind == "text")
        self.scheduler = RequestScheduler(self.config, clock=self.clock, nested_kinds=texts or ("text",),
                                          modalities=kinds)
        self.metrics = Metrics()
        self.generator = generator
        self.scorers = scorers
        """The scorers by name (``{"text": ...}`` for an unnamed text scorer)."""
        executors: dict[str, Any] = {}
        if generator is not None:
            executors[GENERATE] = GenerationExecutor(generator, clock=self.clock)
            batch = generator.unet.spec.profile.dims.get("batch")
            if batch is not None and batch.max < self.config.max_step_rows:
                logger.warning("steps of up to %d UNet rows run as several calls of at most %d (the UNet engine's "
                               "batch profile): build it with profile batch=1:..:%d for one call per step",
                               self.config.max_step_rows, batch.max, self.config.max_step_rows)
        executors.update(lanes)
        self.executors = executors
        self._worker = Worker(self.scheduler, executors, self.metrics)
        for key, ex in lanes.items():
            if self.config.text_merge_tokens is not None and key in texts:
                self._worker.set_merge_cost(key, self.config.text_merge_tokens)
            cap = ex.max_batch_cap
            if cap is not None and cap < self.config.max_batch_size:
                self._worker.set_limits(key, max_batch=cap)
        self._callbacks = CallbackPool()
        self.metrics_registry = CollectorRegistry()
        """This runtime's Prometheus metrics (its own registry: runtimes in one process never clash)."""
        self.metrics_registry.register(MetricsCollector(self.metrics, functools.partial(_gauges, self._worker,
                                                                                         tuple(executors))))
        self._ids = itertools.count(1)
        self._started = False
        self._finalizer = weakref.finalize(self, _release, self._worker, self._callbacks)
        self._finalizer.atexit = False  # at exit the worker's own hook aborts it (see fastgen.runtime.worker)
        if start:
            self.start()

    def start(self) -> Runtime:
        """Start the device thread (once)."""
        if not self._started:
            self._started = True
            self._worker.start()
        return self

    # --- submitting ------------------------------------------------------------------------------

    def submit(self, request: GenerateRequest | ScoreRequest | EmbedRequest | DetectRequest, *,
               progress: Callable[[RequestFuture, int, int], Any] | None = None) -> RequestFuture:
        """Accept one request and return its future (thread-safe; never blocks on the device). A
        scorer's request (score, embed, detect) goes to the scorer it names, else to the only one of
        its item's kind that does what it asks (:func:`fastgen.runtime.scorer_names.resolve`).

        Checks run in the caller's thread, so a bad request raises here and is never queued; so does a
        generation request's preparation (its scheduler, its prompt). Texts for a fast tokenizer and
        images are only checked here: the runtime's preparation thread tokenizes everything submitted
        meanwhile in one call that releases the GIL (one call per text in the clients' threads would
        hold it for about as long as the engine call of a small classifier takes per text), and decodes
        and resizes images (a large JPEG would block an asyncio caller's event loop), so an image file
        that cannot be read fails the future, with a one-line InvalidArgumentError. A full queue
        raises :class:`OverloadedError` (with ``retry_after_s``), a closed runtime ShutdownError, an
        engine stuck in a call :class:`~fastgen.runtime.requests.EngineTimeoutError`. The future's
        done-callbacks (and a generation's progress callbacks) run on the runtime's callback threads.
        An image-to-image request's image is read here (a file: in the caller's thread), so a bad one
        raises here, as a generator without a VAE encoder does. ``progress``: a progress callback
        (:meth:`RequestFuture.add_progress_callback`) added before the request is queued, so it sees
        every step from the first.
        """
        if isinstance(request, GenerateRequest):
            kind = GENERATE
        elif isinstance(request, SCORER_REQUESTS):
            name, item_kind = resolve(self.scorers, request)
            kind = lane(name, self.scorers[name], item_kind)
        else:
            raise InvalidArgumentError("request", type(request).__name__, ("GenerateRequest", *REQUEST_TASKS))
        executor = self.executors.get(kind)
        if executor is None:
            raise InvalidArgumentError("request", "a generation request", list(self.executors),
                                       reason="this runtime has no generator")
        defers = getattr(executor, "defers", False)
        if defers:  # checked here, prepared in batches by the runtime's preparation thread
            bucket, rows, cost, data = None, 1, 0.0, executor.check(request)
        else:
            bucket, rows, cost, data = executor.prepare(request)
        deadline_s = request.deadline_s if request.deadline_s is not None else self.config.default_deadline_s
        rid = next(self._ids)
        worker = self._worker
        # The cancel hook holds the worker and the job, never the runtime: a runtime nobody references
        # any more is collected (and its threads stopped) even with requests in flight.
        future = RequestFuture(rid, kind, callbacks=self._callbacks.submit, on_cancel=lambda f: worker.cancel(job))
        if progress is not None:
            future.add_progress_callback(progress)
        count = getattr(executor, "token_count", None)  # scoring executors (texts); optional for others
        if count is not None and not defers:
            future.tokens = count(data)
        now = self.clock()
        job = Job(rid, kind, bucket, priority=int(request.priority), arrival=now,
                  deadline=None if deadline_s is None else now + deadline_s, rows=rows, cost=cost,
                  work=executor.work(data) if kind == GENERATE else 0.0, payload=Ticket(future, data, deadline_s))
        try:
            if defers:
                worker.stage(job)
            else:
                worker.submit(job)
        except OverloadedError:
            self.metrics.reject(kind)
            raise
        return future

    async def submit_async(self, request: GenerateRequest | ScoreRequest) -> Any:
        """``await``-able :meth:`submit`: the request's result (a ``GenerationResult`` or a ``Score``),
        without blocking the event loop (files are decoded on the runtime's preparation thread).
        Cancelling the awaiting task cancels the request."""
        return await asyncio.wrap_future(self.submit(request))

    async def generate(self, prompt: str, *, config: Any = None, priority: int = 0, deadline_s: float | None = None,
                       image: Any = None, **overrides: Any) -> Any:
        """``await``-able generation of one prompt: a ``GenerationResult``. ``overrides``: GenerateConfig
        fields (``steps=4, seed=1``); ``image``: image-to-image from it. Cancelling the awaiting task
        cancels the request."""
        from fastgen.pipelines.config import GenerateConfig

        cfg = config if config is not None else GenerateConfig()
        if overrides:
            cfg = cfg.replace(**overrides)
        return await asyncio.wrap_future(self.submit(GenerateRequest(prompt, cfg, priority, deadline_s, image=image)))

    async def score(self, item: Any, *, kind: str | None = None, priority: int = 0,
                    deadline_s: float | None = None, scorer: str | None = None) -> Any:
        """``await``-able scoring of one text or image: a ``Score``. ``scorer``: which, by name."""
        return await asyncio.wrap_future(self.submit(ScoreRequest(item, kind, priority, deadline_s,  # type: ignore[arg-type]
                                                                  scorer=scorer)))

    async def embed(self, item: Any, *, scorer: str | None = None, normalize: bool | None = None,
                    **fields: Any) -> Any:
        """``await``-able embedding of one text or image (an :class:`EmbedRequest`): a (dim,) float32 tensor."""
        return await asyncio.wrap_future(self.submit(EmbedRequest(item, scorer, normalize=normalize, **fields)))

    async def detect(self, image: Any, *, scorer: str | None = None, **fields: Any) -> Any:
        """``await``-able detection in one image (a :class:`DetectRequest`; ``fields``: ``conf``, ``iou``,
        ``max_det``, ``priority``, ``deadline_s``): its ``Detections``."""
        return await asyncio.wrap_future(self.submit(DetectRequest(image, scorer, **fields)))

    # --- observing -------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counts by status, p50 / p95 / p99 latency and queue wait per kind (ms), batch sizes, step
        latency per bucket, scheduling time (us), and the queue depths now."""
        gauges = _gauges(self._worker, tuple(self.executors))
        return self.metrics.stats({"queued": gauges["queue_depth"], "active": gauges["active_requests"],
                                   "inflight": gauges["inflight_requests"][""]})

    def metrics_text(self) -> str:
        """The metrics in the Prometheus text exposition format: ``prometheus_client.generate_latest``
        of :attr:`metrics_registry` (counters ``fastgen_requests_total{kind,status}`` and
        ``fastgen_rejected_total{kind}``, ``fastgen_*_seconds`` and size histograms, gauges)."""
        return generate_latest(self.metrics_registry).decode()

    # --- auto-tuning -----------------------------------------------------------------------------

    def autotune(self, p99_target_ms: float, *, arrival_rate: float | None = None,
                 batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32), iters: int = 3, measure_now: bool = True,
                 generation_steps: int = 20, generation_buckets: Iterable[tuple[int, int]] | None = None,
                 apply: bool = True) -> dict[str, TuningChoice]:
        """Pick each bucket's batch size and wait from a latency profile, for a p99 target.

        ``measure_now``: time synthetic batches of each size on the device thread (between real
        batches) into a fresh profile; else use the profile recorded while serving. Generation is
        tuned per step: its target is ``p99_target_ms / generation_steps`` for one step of UNet rows.
        ``apply``: set the chosen limits on the scheduler, and, unless ``text_merge_tokens`` is
        fixed, the padding a text call is worth (fitted to the profile's text batches). Returns
        ``{"kind:bucket": choice}``.
        """
        if measure_now:
            profile = self._worker.call(lambda: self._measure(batch_sizes, iters, generation_buckets)).result()
        else:
            profile = self.metrics.profile_snapshot()
        choices: dict[str, TuningChoice] = {}
        for engine, label in profile.keys():
            kind = GENERATE if engine == "unet" else engine
            target = p99_target_ms / generation_steps if kind == GENERATE else p99_target_ms
            choice = choose(profile, engine, label, p99_target_ms=target, arrival_rate=arrival_rate)
            choices[f"{kind}:{label}"] = choice
            if apply:
                bucket = self._bucket_of(kind, label)
                if kind == GENERATE:
                    self._worker.set_limits(kind, bucket, max_batch=choice.batch_size)
                else:
                    self._worker.set_limits(kind, bucket, max_batch=choice.batch_size,
                                            max_wait_s=choice.max_wait_ms / 1e3)
        for name, text in self.executors.items():
            if not apply or getattr(text, "call_cost", None) is None:
                continue
            cost = CallCost(cap=float(self.config.max_batch_tokens))
            for engine, label in profile.keys():
                if engine == name and label.isdigit():
                    for size in profile.sizes(engine, label):
                        cost.samples.append((int(label) * size, profile.quantile(engine, label, size, 50)))
            merge = cost.merge_units()
            if merge is not None:
                self._worker.set_merge_cost(name, merge)
        return choices

    def _bucket_of(self, kind: str, label: str) -> Any:
        """A queue's bucket from its metric label: ``64x64`` -> (64, 64), ``32`` -> 32, ``longest``."""
        parts = label.split("x")
        if len(parts) > 1 and all(p.isdigit() for p in parts):
            return tuple(int(x) for x in parts)
        return int(label) if label.isdigit() else label

    def _measure(self, sizes: Sequence[int], iters: int, generation_buckets: Iterable[tuple[int, int]] | None
                 ) -> LatencyProfile:
        profile = LatencyProfile()
        for kind, ex in self.executors.items():
            if self._worker.stalled(kind):  # its engine is stuck in a call: measuring would hang too
                continue
            if kind == GENERATE:
                buckets = list(generation_buckets or [ex.default_bucket])
                for bucket in buckets:
                    measure(lambda rows, b=bucket, ex=ex: ex.synthetic_step(b, rows), sizes, engine="unet",
                            bucket=bucket_label(bucket), iters=iters, profile=profile)
                continue
            cap = self.scheduler.limits(kind).max_batch
            for bucket in ex.buckets:
                measure(lambda n, ex=ex, b=bucket: ex.score(b, ex.synthetic(b, n)), [s for s in sizes if s <= cap],
                        engine=kind, bucket=bucket_label(bucket), iters=iters, profile=profile)
        return profile

    # --- shutting down ---------------------------------------------------------------------------

    def shutdown(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; finish every accepted one (``drain``), or fail the queued and running
        ones now, with ShutdownError (a scoring batch on the device finishes). ``timeout``: seconds in
        all, kept to: draining takes up to three quarters of it, then the rest fails and the calls in
        progress get the remainder to return; a thread still inside an engine call then is left to
        end when it returns. Joins the threads (the callback threads too: the callbacks of the requests
        it failed run first). Idempotent, and callable from a done-callback."""
        start = time.monotonic()
        self._finalizer.detach()
        self._worker.close(drain=drain, timeout=timeout)
        self._callbacks.close(None if timeout is None else max(start + timeout - time.monotonic(), 0.0))

    close = shutdown

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        kinds = ", ".join(self.executors)
        return f"<Runtime {kinds} ({self.config.generation_batching}-level generation)>"


__all__ = ["Runtime"]
