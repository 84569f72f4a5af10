"""What a client submits to :class:`fastgen.Runtime`, what it gets back, and how a request can end.

Every accepted request ends in exactly one terminal status, carried by its future:

========== ====================================================================================
succeeded  ``future.result()`` is the result (a ``GenerationResult`` or a ``Score``)
failed     ``future.exception()`` is the error of that request alone (a bad input, an engine
           error, :class:`OutOfMemoryError`, or :class:`ShutdownError`)
cancelled  ``future.cancel()`` was called (queued: removed; running: freed at the next step)
expired    its deadline passed before it finished: :class:`DeadlineExceededError`
========== ====================================================================================

A submission the runtime cannot accept is refused at once, by raising: :class:`OverloadedError`
(the queue is full; it carries a retry-after estimate) or :class:`ShutdownError` (the runtime is
closing). Nothing here imports torch.
"""

from __future__ import annotations

import concurrent.futures
import enum
import numbers
from dataclasses import dataclass
from typing import Any, Literal

from fastgen.errors import FastgenError, InvalidArgumentError

ScoreKind = Literal["text", "image"]


class RequestStatus(str, enum.Enum):
    """Where a request is; the last four are terminal."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self not in (RequestStatus.QUEUED, RequestStatus.RUNNING)


# --- errors -------------------------------------------------------------------------------------------

class RequestError(FastgenError):
    """A request that did not succeed; ``status`` says how it ended."""

    status: RequestStatus = RequestStatus.FAILED


class OverloadedError(RequestError):
    """The runtime's queue is full: the request was not accepted. Retry after ``retry_after_s`` seconds."""

    def __init__(self, queued: int, limit: int, retry_after_s: float) -> None:
        self.queued, self.limit, self.retry_after_s = queued, limit, float(retry_after_s)
        super().__init__(f"runtime overloaded: {queued} requests queued (max_queue {limit}); "
                         f"retry after {self.retry_after_s:.3f} s")


class DeadlineExceededError(RequestError):
    """The request's deadline passed before it finished; it was dropped without (further) running."""

    status = RequestStatus.EXPIRED

    def __init__(self, request_id: int, deadline_s: float, phase: str) -> None:
        self.request_id, self.deadline_s, self.phase = request_id, deadline_s, phase
        super().__init__(f"request {request_id} expired while {phase}: its deadline of {deadline_s:.3f} s "
                         "after submission passed")


class ShutdownError(RequestError):
    """The runtime was closed before the request could finish (or it was submitted after that)."""


class OutOfMemoryError(RequestError):
    """The device ran out of memory on this request even when it ran alone."""


# --- requests -----------------------------------------------------------------------------------------

def _check_common(priority: Any, deadline_s: Any) -> None:
    if isinstance(priority, bool) or not isinstance(priority, numbers.Integral):
        raise InvalidArgumentError("priority", priority, "integers (higher runs first)")
    if deadline_s is not None and (isinstance(deadline_s, bool) or not isinstance(deadline_s, numbers.Real)
                                   or not deadline_s > 0 or deadline_s == float("inf")):
        raise InvalidArgumentError("deadline_s", deadline_s, "finite numbers > 0 (seconds after submission), or None")


@dataclass(frozen=True)
class GenerateRequest:
    """Text-to-image generation of one prompt (``config.num_images_per_prompt`` images)."""

    prompt: str
    """The prompt (the empty string is allowed)."""
    config: Any = None
    """A :class:`~fastgen.GenerateConfig` (steps, guidance, scheduler, size, seed...); none: the defaults."""
    priority: int = 0
    """Higher runs first; waiting raises it (see ``RuntimeConfig.priority_aging_s``)."""
    deadline_s: float | None = None
    """Seconds after submission by which it must have finished; later, it fails as expired. None:
    the runtime's default."""

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise InvalidArgumentError("prompt", self.prompt, "strings (the empty string is allowed)")
        _check_common(self.priority, self.deadline_s)


@dataclass(frozen=True)
class ScoreRequest:
    """Classification of one text or one image."""

    item: Any
    """A text (``str``) or an image (PIL image, uint8 (H, W, C) array, float (C, H, W) tensor, file path)."""
    kind: ScoreKind | None = None
    """``text`` or ``image``; none: text for a ``str`` when the runtime has a text scorer, else image."""
    priority: int = 0
    """Higher runs first; waiting raises it."""
    deadline_s: float | None = None
    """Seconds after submission by which it must have finished; None: the runtime's default."""

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in ("text", "image"):
            raise InvalidArgumentError("kind", self.kind, ("text", "image"))
        _check_common(self.priority, self.deadline_s)


# --- futures ------------------------------------------------------------------------------------------

class RequestFuture(concurrent.futures.Future):
    """A ``concurrent.futures.Future`` with the request's id and live status.

    It stays *pending* until the request ends, so ``cancel()`` works while it is queued (removed
    at once) and while it runs (generation is freed at its next step boundary; a scoring batch
    already on the device finishes, and the result is dropped). ``asyncio.wrap_future`` turns it
    into an awaitable whose cancellation cancels the request.
    """

    def __init__(self, request_id: int, kind: str) -> None:
        super().__init__()
        self.request_id = request_id
        self.kind = kind
        self._status = RequestStatus.QUEUED

    @property
    def status(self) -> RequestStatus:
        if self.cancelled():
            return RequestStatus.CANCELLED
        return self._status

    def mark_running(self) -> None:
        """The request's batch or step has started (worker side): ``status`` says running. The future
        stays pending (``cancel()`` still works; unlike ``set_running_or_notify_cancel``)."""
        self._status = RequestStatus.RUNNING

    def _finish(self, status: RequestStatus, result: Any = None, error: BaseException | None = None) -> bool:
        """Resolve the future (worker side). False when it had been cancelled (the result is dropped) or
        already resolved (a shutdown that stopped waiting for the device loop failed it first)."""
        try:
            if not self.set_running_or_notify_cancel():
                return False
        except RuntimeError:  # already running or finished: another thread resolves it
            return False
        self._status = status
        if error is not None:
            self.set_exception(error)
        else:
            self.set_result(result)
        return True

    def __repr__(self) -> str:
        return f"<RequestFuture {self.request_id} {self.kind} {self.status.value}>"


__all__ = ["DeadlineExceededError", "GenerateRequest", "OutOfMemoryError", "OverloadedError", "RequestError",
           "RequestFuture", "RequestStatus", "ScoreRequest", "ShutdownError"]
