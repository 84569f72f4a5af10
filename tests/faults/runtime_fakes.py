"""Shared by the runtime fault tests (``test_runtime_cancellation.py``, ``test_runtime_watchdog.py``):
fake executors and scorers (no model is built), a gate that holds an executor inside a call, and the
helpers that start a worker and submit jobs to it. The thread-leak fixture is in ``conftest.py``.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import threading
import time
from types import SimpleNamespace

import torch

from fastgen.runtime.config import RuntimeConfig
from fastgen.runtime.execution import Outcome, isolate
from fastgen.runtime.metrics import Metrics
from fastgen.runtime.request_scheduler import GENERATE, Job, RequestScheduler
from fastgen.runtime.requests import RequestFuture, RequestStatus
from fastgen.runtime.worker import Ticket, Worker

LIMIT = 10.0  # seconds: the most any one wait may take before the test fails instead of hanging
_ids = itertools.count(1)


def eventually(predicate, seconds: float = LIMIT) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def ours() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("fastgen")}


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


def text_runtime(**cfg):
    """A Runtime serving an ``OomScorer`` that never runs out of memory: every text scores 0.0."""
    from fastgen.runtime import Runtime

    return Runtime(scorer=OomScorer(None), max_wait_ms=0, **cfg)
