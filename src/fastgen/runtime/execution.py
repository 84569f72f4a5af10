"""What the executors share with the device loop: the outcomes of a run, and failure isolation.

A batch that raises is split in two and each half retried, down to single requests, so one bad
request fails alone and the others still run (:func:`isolate`); a device out-of-memory error is
handled the same way (split and retry), and a request that does not fit even alone fails with
:class:`~fastgen.runtime.requests.OutOfMemoryError`. Executors report what a run measured (the
sizes that fit in device memory and those that did not, a step's time, the price of padding) in
their :class:`Outcomes`, and the worker applies it to the request scheduler (the batch limit after
running out of memory: :mod:`fastgen.runtime.backoff`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastgen.runtime.queues import Job
from fastgen.runtime.requests import OutOfMemoryError, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """How one request of a batch or step ended (``value``: its result, or its exception)."""

    job: Job
    status: RequestStatus
    value: Any = None


@dataclass
class Outcomes:
    """What an executor's run of one decision returns: the requests that ended, and what the run
    measured for the request scheduler, which the worker applies under its lock (an executor never
    calls back into the runtime, so nothing takes the lock twice)."""

    ended: list[Outcome] = field(default_factory=list)
    """One per request that ended (a scoring batch: all of them; a generation step: those that ended)."""
    max_batch: int | None = None
    """A hard cap: the decision's queue takes at most this many requests per batch (generation: UNet
    rows per step) from now on (executors that report ``memory`` leave it to the back-off instead)."""
    memory: list[tuple[int, bool]] = field(default_factory=list)
    """The device calls of this run, in order: ``(size, fit)``, size in requests (generation: UNet rows),
    fit False when it ran out of memory. The worker lowers the queue's batch limit from these and
    raises it again once batches fit (:class:`~fastgen.runtime.backoff.MemoryBackoff`)."""
    merge_cost: float | None = None
    """Texts: padded tokens worth one engine call, refitted to the batches timed so far."""
    step: tuple[int, int, float] | None = None
    """Generation: ``(rows, requests, seconds)`` of a whole step's UNet calls (the scheduler shares the
    device between shape buckets by what their steps cost)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """A device (or host) allocation failure: PyTorch's OutOfMemoryError, MemoryError, or an
    onnxruntime / CUDA allocator message."""
    import torch

    kinds: tuple[type, ...] = (MemoryError,)
    for owner in (torch, getattr(torch, "cuda", None)):
        kind = getattr(owner, "OutOfMemoryError", None)
        if isinstance(kind, type):
            kinds += (kind,)
    if isinstance(exc, kinds):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "failed to allocate" in text


def free_device_memory() -> None:
    """Return cached blocks after an out-of-memory error (CUDA only, and only when already in use)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def isolate(fn: Callable[[list[Any]], Sequence[Any]], items: list[Any], *, what: str = "batch",
            on_oom: Callable[[list[Any]], None] | None = None) -> list[tuple[Any, bool, Any]]:
    """Run ``fn(items)`` (one value per item); if it raises, split the items in two and retry each half.

    Returns ``(item, ok, value or exception)`` per item, in order. A single item that still fails
    gets its own exception (an out-of-memory error becomes :class:`OutOfMemoryError`).
    ``on_oom(group)`` is told each group of items that ran out of memory.
    """
    try:
        values = fn(items)
        return [(item, True, value) for item, value in zip(items, values)]
    except Exception as exc:
        oom = is_out_of_memory(exc)
        if oom:
            free_device_memory()
            if on_oom is not None:
                on_oom(items)
        if len(items) == 1:
            if oom:
                err: BaseException = OutOfMemoryError(f"out of memory on a {what} of one request: {exc}".split("\n")[0])
                err.__cause__ = exc
            else:
                err = exc
            return [(items[0], False, err)]
        logger.warning("%s of %d failed (%s: %s); retrying it in halves", what, len(items), type(exc).__name__,
                       str(exc).split("\n")[0][:200])
        mid = len(items) // 2
        return (isolate(fn, items[:mid], what=what, on_oom=on_oom)
                + isolate(fn, items[mid:], what=what, on_oom=on_oom))


__all__ = ["Outcome", "Outcomes", "free_device_memory", "is_out_of_memory", "isolate"]
