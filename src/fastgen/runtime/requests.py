"""What a client submits to :class:`fastgen.Runtime`, what it gets back, and how a request can end.

Every accepted request ends in exactly one terminal status, carried by its future:

========== ====================================================================================
succeeded  ``future.result()`` is the result (a ``GenerationResult``, a ``Score``, an embedding
           tensor or a ``Detections``)
failed     ``future.exception()`` is the error of that request alone (a bad input, an engine
           error, :class:`OutOfMemoryError`, :class:`EngineError`, :class:`EngineTimeoutError`
           or :class:`ShutdownError`)
cancelled  ``future.cancel()`` was called (queued: removed; running: freed at the next step)
expired    its deadline passed before it finished: :class:`DeadlineExceededError`
========== ====================================================================================

A submission the runtime cannot accept is refused at once, by raising: :class:`OverloadedError`
(the queue is full; it carries a retry-after estimate) or :class:`ShutdownError` (the runtime is
closing), or :class:`EngineTimeoutError` (the engine it needs is stuck in a call). Nothing here
imports torch.
"""

from __future__ import annotations

import concurrent.futures
import enum
import logging
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastgen.errors import FastgenError, InvalidArgumentError
from fastgen.runtime.progress import SerialDispatch

logger = logging.getLogger(__name__)

ScoreKind = Literal["text", "image"]
#: What a scorer's name may be (see :func:`check_scorer_name`).
SCORER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: Priorities allowed: wide enough for any policy, small enough that ``priority * priority_aging_s``
#: stays a float (an int of 400 digits would raise OverflowError in the scheduler).
MAX_PRIORITY = 10**9


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


class EngineError(RequestError):
    """An engine call of the request's batch failed in a way that is not the request's own: it raised
    a ``BaseException`` that is not an ``Exception`` (``KeyboardInterrupt``, ``SystemExit``), kept
    as ``__cause__``. The runtime keeps serving."""


class EngineTimeoutError(EngineError):
    """An engine call did not return within ``RuntimeConfig.call_timeout_s``: the requests of its batch
    and those queued for that engine fail with it, and new ones are refused at once until the call
    returns (the runtime's other engines keep serving)."""

    def __init__(self, kind: str, seconds: float, timeout_s: float) -> None:
        self.kind, self.seconds, self.timeout_s = kind, float(seconds), float(timeout_s)
        super().__init__(f"the {kind} engine call has not returned after {self.seconds:.1f} s (call_timeout_s "
                         f"{self.timeout_s:g}): its requests failed, and {kind} requests are refused until it returns")


# --- requests -----------------------------------------------------------------------------------------

def _check_common(priority: Any, deadline_s: Any) -> None:
    if (isinstance(priority, bool) or not isinstance(priority, numbers.Integral)
            or not -MAX_PRIORITY <= priority <= MAX_PRIORITY):
        raise InvalidArgumentError("priority", priority, f"integers from {-MAX_PRIORITY} to {MAX_PRIORITY} "
                                   "(higher runs first)")
    if deadline_s is not None and (isinstance(deadline_s, bool) or not isinstance(deadline_s, numbers.Real)
                                   or not deadline_s > 0 or deadline_s == float("inf")):
        raise InvalidArgumentError("deadline_s", deadline_s, "finite numbers > 0 (seconds after submission), or None")


def adapter_pairs(adapters: Any) -> tuple[tuple[str, float], ...] | None:
    """A request's ``adapters`` as ``((name, scale), ...)``, None for None; the forms taken: an
    ``AdapterSelection`` (anything with ``names`` and ``weights``), a dict name -> scale, a name, or a
    list of names (scale 1) and (name, scale) pairs. Bad ones raise a one-line error naming ``adapters``."""
    if adapters is None:
        return None
    allowed = "an AdapterSelection, a dict name -> scale, or a list of names / (name, scale) pairs"
    if isinstance(adapters, str):
        items: list[Any] = [adapters]
    elif hasattr(adapters, "names") and hasattr(adapters, "weights"):
        items = list(zip(adapters.names, adapters.weights, strict=True))
    elif isinstance(adapters, dict):
        items = list(adapters.items())
    elif isinstance(adapters, (list, tuple)):
        items = list(adapters)
    else:
        raise InvalidArgumentError("adapters", type(adapters).__name__, allowed)
    out: list[tuple[str, float]] = []
    for item in items:
        name, scale = (item, 1.0) if isinstance(item, str) else (
            tuple(item) if isinstance(item, (list, tuple)) and len(item) == 2 else (None, None))
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError("adapters", item, allowed)
        if (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                or scale != scale or scale in (float("inf"), float("-inf"))):
            raise InvalidArgumentError("adapters", f"{name}: {scale!r}", "finite numbers as scales")
        if any(n == name for n, _ in out):
            raise InvalidArgumentError("adapters", name, reason="an adapter is named twice")
        out.append((name, float(scale)))
    return tuple(out)


@dataclass(frozen=True)
class GenerateRequest:
    """Generation of one prompt (``config.num_images_per_prompt`` images): text-to-image,
    image-to-image from ``image``, or inpainting of ``image`` through ``mask_image``."""

    prompt: str
    """The prompt (the empty string is allowed)."""
    config: Any = None
    """A :class:`~fastgen.GenerateConfig` (steps, guidance, scheduler, size, seed...); none: the defaults."""
    priority: int = 0
    """Higher runs first; waiting raises it (see ``RuntimeConfig.priority_aging_s``)."""
    deadline_s: float | None = None
    """Seconds after submission by which it must have finished; later, it fails as expired. None:
    the runtime's default."""
    image: Any = field(default=None, compare=False)
    """Image-to-image: the input image (a PIL image, a path to an image file, or a uint8 (H, W, 3)
    array), read at submission; the request runs the last ``config.strength`` of ``config.steps``,
    as ``Generator.generate(image=...)`` does, at ``config``'s size or else the image's (rounded down
    to what the models take). None: text-to-image."""
    mask_image: Any = field(default=None, compare=False)
    """Inpainting of ``image``: a mask of its size (a PIL image, a path to an image file, or a uint8
    array; white: regenerate, black: keep), read at submission, as ``Generator.generate(image=...,
    mask_image=...)`` does (``config.strength``, ``mask_blur``, ``padding_mask_crop``). With a
    regular UNet it shares UNet calls with the text-to-image and image-to-image requests of its
    size; an inpainting UNet (9 input channels) serves inpainting requests only. None: no inpainting."""
    adapters: Any = field(default=None, compare=False)
    """LoRA adapters of the generator's (``Generator.load_lora``) to run with, each at its scale: an
    ``AdapterSelection``, a dict name -> scale, or a list of names (scale 1) and (name, scale) pairs;
    empty: the base weights. None: the generator's active selection when the request is submitted.
    Unknown names are refused at submission. Requests whose selections change the UNet differently
    never share a UNet call (the weights are fused: docs/runtime.md, "Per-request adapters")."""
    control_image: Any = field(default=None, compare=False)
    """ControlNet: the condition image (one net) or a list of one per net of the generator (PIL images,
    paths, uint8 arrays), read at submission; ``config`` sets ``controlnet_conditioning_scale``,
    ``control_guidance_start``/``end`` and ``guess_mode``. It shares UNet calls with every other
    request of its size (each row gets its own request's residuals; rows without any, zeros).
    None: no control (on a generator with ControlNets, the plain UNet's result)."""

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise InvalidArgumentError("prompt", self.prompt, "strings (the empty string is allowed)")
        _check_common(self.priority, self.deadline_s)
        adapter_pairs(self.adapters)


def check_scorer_name(name: Any, argument: str = "scorer") -> None:
    """A scorer's name (what requests say, metrics label, ``--scorer NAME=MODEL`` gives): a letter or
    digit, then letters, digits, ``.``, ``_`` or ``-``, at most 64 in all; ``generate`` is taken."""
    if not isinstance(name, str) or not SCORER_NAME.fullmatch(name) or name == "generate":
        shown = name if isinstance(name, str) else type(name).__name__
        raise InvalidArgumentError(argument, shown, "names of letters, digits, '.', '_' and '-' (1 to 64, "
                                   "starting with a letter or digit; not 'generate')")


@dataclass(frozen=True)
class ScoreRequest:
    """Classification of one text or one image: a classifier's ``Score`` (a detector's: each label's
    best confidence; a two-tower scorer's: its aesthetic head's)."""

    item: Any
    """A text (``str``) or an image (PIL image, uint8 (H, W, C) array, float (C, H, W) tensor, file path)."""
    kind: ScoreKind | None = None
    """``text`` or ``image``; none: text for a ``str`` when the runtime has a text scorer, else image."""
    priority: int = 0
    """Higher runs first; waiting raises it."""
    deadline_s: float | None = None
    """Seconds after submission by which it must have finished; None: the runtime's default."""
    scorer: str | None = None
    """The runtime's scorer to run, by name (``Runtime(scorers={"moderation": ...})``); none: the only
    classifier of the item's kind (several: a one-line error naming them)."""

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in ("text", "image"):
            raise InvalidArgumentError("kind", self.kind, ("text", "image"))
        if self.scorer is not None:
            check_scorer_name(self.scorer)
        _check_common(self.priority, self.deadline_s)


def _fraction(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                              or not 0 <= value <= 1):
        raise InvalidArgumentError(name, value, "numbers from 0 to 1, or None (the detector's own)")


@dataclass(frozen=True)
class EmbedRequest:
    """The embedding of one text or one image by an embedding scorer (an encoder: ``Scorer.embed``).
    Its result is the (dim,) float32 CPU tensor ``Scorer.embed`` gives for the item alone."""

    item: Any
    """A text (``str``) or an image (as :class:`ScoreRequest` takes)."""
    scorer: str | None = None
    """The runtime's scorer, by name; none: the only embedding scorer of the item's kind."""
    kind: ScoreKind | None = None
    """``text`` or ``image``; none: text for a ``str`` when an embedding scorer takes texts, else image."""
    normalize: bool | None = None
    """L2-normalise the embedding; None: as the model says (``Scorer.embed``'s default)."""
    priority: int = 0
    """Higher runs first; waiting raises it."""
    deadline_s: float | None = None
    """Seconds after submission by which it must have finished; None: the runtime's default."""

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in ("text", "image"):
            raise InvalidArgumentError("kind", self.kind, ("text", "image"))
        if self.scorer is not None:
            check_scorer_name(self.scorer)
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise InvalidArgumentError("normalize", self.normalize, ("True", "False", "None"))
        _check_common(self.priority, self.deadline_s)


@dataclass(frozen=True)
class DetectRequest:
    """The objects in one image, by a detector scorer (``Scorer.detect``). Its result is the image's
    ``Detections`` (boxes in the image's own pixels), as ``Scorer.detect`` gives for it alone."""

    item: Any
    """An image (PIL image, uint8 (H, W, C) array, float (C, H, W) tensor, file path)."""
    scorer: str | None = None
    """The runtime's scorer, by name; none: the only detector."""
    conf: float | None = None
    """Confidence threshold (0 to 1); None: ``Scorer.detect``'s default."""
    iou: float | None = None
    """IoU threshold of the non-maximum suppression (0 to 1); None: ``Scorer.detect``'s default."""
    max_det: int | None = None
    """Most boxes kept; None: ``Scorer.detect``'s default."""
    priority: int = 0
    """Higher runs first; waiting raises it."""
    deadline_s: float | None = None
    """Seconds after submission by which it must have finished; None: the runtime's default."""

    kind = "image"  # a detector takes images (read like ScoreRequest's field)

    def __post_init__(self) -> None:
        if self.scorer is not None:
            check_scorer_name(self.scorer)
        _fraction("conf", self.conf)
        _fraction("iou", self.iou)
        if self.max_det is not None and (isinstance(self.max_det, bool) or not isinstance(self.max_det, numbers.Integral)
                                         or self.max_det < 1):
            raise InvalidArgumentError("max_det", self.max_det, "integers >= 1, or None (the detector's own)")
        _check_common(self.priority, self.deadline_s)


#: The request types that go to one of the runtime's scorers (by name, or by the item's kind).
SCORER_REQUESTS: tuple[type, ...] = (ScoreRequest, EmbedRequest, DetectRequest)


# --- futures ------------------------------------------------------------------------------------------

# concurrent.futures.Future's states (constants of its private module, unchanged since Python 3.2).
_PENDING, _RUNNING, _CANCELLED, _NOTIFIED, _FINISHED = (
    "PENDING", "RUNNING", "CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED")


class RequestFuture(concurrent.futures.Future):
    """A ``concurrent.futures.Future`` with the request's id and live status.

    It stays *pending* until the request ends, so ``cancel()`` works while it is queued (removed
    at once) and while it runs (generation is freed at its next step boundary; a scoring batch
    already on the device finishes, and the result is dropped). ``asyncio.wrap_future`` turns it
    into an awaitable whose cancellation cancels the request.

    ``cancel()`` tells ``concurrent.futures.wait`` / ``as_completed`` at once, in any phase (a plain
    Future leaves that to ``set_running_or_notify_cancel``, which an executor calls when it dequeues
    the work: a request cancelled while queued is never dequeued). ``on_cancel(future)`` runs first
    (the runtime takes the request out of its queue). ``callbacks(fn) -> bool``: where the done-callbacks
    of a request the runtime resolves run (its callback threads, never the device's); False, or
    none given: in the resolving thread. Callbacks of a cancel run in the cancelling thread, and one
    added once the future is done runs at once in the caller's, as with any Future.

    ``add_progress_callback(fn)``: ``fn(future, step, steps)`` after each denoising step of a
    generation request (step 1 to ``steps``, its number of denoising steps), on the callback threads.
    A future's progress callbacks and then its done-callbacks run one at a time, in order (a cancel's
    done-callbacks too, after the progress already reported); a cancelled request reports no further
    steps.
    """

    def __init__(self, request_id: int, kind: str, *, callbacks: Callable[[Callable[[], None]], bool] | None = None,
                 on_cancel: Callable[[RequestFuture], Any] | None = None) -> None:
        super().__init__()
        self.request_id = request_id
        self.kind = kind
        self._status = RequestStatus.QUEUED
        self._dispatch = callbacks
        self._on_cancel = on_cancel
        self._progress_callbacks: list[Callable[[RequestFuture, int, int], Any]] = []
        self._serial: SerialDispatch | None = None  # set with the first progress callback
        self._handoffs: list[Callable[[RequestFuture], Any]] = []
        self.tokens: int | None = None
        """A text request's token count as its model reads it (special tokens included, after
        truncation), set when the runtime tokenizes it, before its result; None for images and
        generation. What an API bills as usage, without tokenizing the text again."""

    @property
    def status(self) -> RequestStatus:
        if self.cancelled():
            return RequestStatus.CANCELLED
        return self._status

    def mark_running(self) -> None:
        """The request's batch or step has started (worker side): ``status`` says running. The future
        stays pending (``cancel()`` still works; unlike ``set_running_or_notify_cancel``)."""
        self._status = RequestStatus.RUNNING

    def add_progress_callback(self, fn: Callable[[RequestFuture, int, int], Any]) -> None:
        """Call ``fn(future, step, steps)`` after each denoising step from now on (generation requests
        only; scoring requests never call it). An exception it raises is logged and ignored."""
        if not callable(fn):
            raise InvalidArgumentError("fn", type(fn).__name__, "callables fn(future, step, steps)")
        with self._condition:
            if self._serial is None:  # before the callback is visible: progress() relies on the order
                self._serial = SerialDispatch(self._dispatch)
            self._progress_callbacks.append(fn)

    def add_handoff_callback(self, fn: Callable[[RequestFuture], Any]) -> None:
        """Call ``fn(future)`` in the thread that resolves or cancels the future, as it does, with no
        hop to the callback threads: for a callback that only hands the outcome over and returns, such
        as ``loop.call_soon_threadsafe`` into an asyncio loop (a server saves a thread switch per
        request). It may run on the device's thread, so it must never block. Unlike done-callbacks it
        does not wait for progress callbacks still queued. Already done: it runs at once, here."""
        if not callable(fn):
            raise InvalidArgumentError("fn", type(fn).__name__, "callables fn(future)")
        with self._condition:
            if self._state in (_PENDING, _RUNNING):
                self._handoffs.append(fn)
                return
        self._run_handoff(fn)

    def _run_handoffs(self) -> None:
        with self._condition:  # each runs once: taken under the lock that made the future done
            handoffs, self._handoffs = self._handoffs, []
        for fn in handoffs:
            self._run_handoff(fn)

    def _run_handoff(self, fn: Callable[[RequestFuture], Any]) -> None:
        try:
            fn(self)
        except Exception:  # as done-callbacks: logged, never raised into the runtime
            logger.exception("exception calling a handoff callback of %r", self)

    @property
    def wants_progress(self) -> bool:
        """Whether progress callbacks were added (the runtime reports steps only then)."""
        return bool(self._progress_callbacks)

    def progress(self, step: int, steps: int) -> None:
        """Report that ``step`` of ``steps`` ran (worker side). Queued behind the progress already
        reported, under the future's lock so a resolution racing it queues its done-callbacks after
        it; nothing once the future is done."""
        serial = self._serial
        if serial is None:
            return
        with self._condition:
            if self._state != _PENDING:
                return
            serial.post(lambda: self._run_progress(step, steps), required=False)

    def _run_progress(self, step: int, steps: int) -> None:
        if self.cancelled():  # cancelled meanwhile (maybe by a progress callback): no more steps
            return
        for fn in list(self._progress_callbacks):
            try:
                fn(self, step, steps)
            except Exception:  # as done-callbacks: logged, never raised into the runtime
                logger.exception("exception calling a progress callback of %r", self)

    def cancel(self) -> bool:
        with self._condition:
            if self._state in (_RUNNING, _FINISHED):
                return False
            if self._state in (_CANCELLED, _NOTIFIED):
                return True
            self._state = _NOTIFIED  # cancelled and notified in one step: nothing will dequeue it later
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._run_handoffs()
        if self._on_cancel is not None:
            try:
                self._on_cancel(self)
            except Exception:
                logger.exception("taking cancelled request %d out of the runtime failed", self.request_id)
        if self._serial is not None:  # after the progress callbacks already queued
            self._serial.post(self._run_callbacks)
        else:
            self._run_callbacks()
        return True

    def _finish(self, status: RequestStatus, result: Any = None, error: BaseException | None = None) -> bool:
        """Resolve the future (worker side). False when it had been cancelled (the result is dropped) or
        already resolved (a shutdown or the watchdog failed it first). One atomic step under the
        future's lock, so a cancel racing it either wins or returns False."""
        with self._condition:
            if self._state != _PENDING:
                return False
            self._status = status
            if error is not None:
                self._exception = error
                for waiter in self._waiters:
                    waiter.add_exception(self)
            else:
                self._result = result
                for waiter in self._waiters:
                    waiter.add_result(self)
            self._state = _FINISHED
            self._condition.notify_all()
        self._run_handoffs()
        self._invoke_callbacks()
        return True

    def _invoke_callbacks(self) -> None:
        if not self._done_callbacks:
            return
        if self._serial is not None:  # after the progress callbacks already queued
            self._serial.post(self._run_callbacks)
            return
        dispatch = self._dispatch
        if dispatch is None or not dispatch(self._run_callbacks):
            self._run_callbacks()

    def _run_callbacks(self) -> None:
        for callback in list(self._done_callbacks):
            try:
                callback(self)
            except Exception:  # as concurrent.futures does: logged, never raised into the runtime
                logger.exception("exception calling a done callback of %r", self)

    def __repr__(self) -> str:
        return f"<RequestFuture {self.request_id} {self.kind} {self.status.value}>"


__all__ = ["MAX_PRIORITY", "SCORER_REQUESTS", "DeadlineExceededError", "DetectRequest", "EmbedRequest", "EngineError",
           "EngineTimeoutError", "GenerateRequest",
           "OutOfMemoryError", "OverloadedError", "RequestError", "RequestFuture", "RequestStatus", "ScoreRequest",
           "ShutdownError", "check_scorer_name"]
