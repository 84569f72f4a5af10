"""How :class:`fastgen.Runtime` batches and schedules (a frozen dataclass; nothing here imports torch)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Literal

from fastgen.core.config import ConfigMixin
from fastgen.errors import InvalidArgumentError

GenerationBatching = Literal["step", "request"]
BatchWait = Literal["adaptive", "fixed"]


def _int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise InvalidArgumentError(name.replace("_", "-"), value, f"integers >= {low}")


def _float(name: str, value: Any, low: float, *, strict: bool = False, optional: bool = False) -> None:
    if optional and value is None:
        return
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and value == value
          and value != float("inf") and (value > low if strict else value >= low))
    if not ok:
        allowed = f"finite numbers {'>' if strict else '>='} {low}" + (", or none" if optional else "")
        raise InvalidArgumentError(name.replace("_", "-"), value, allowed)


@dataclass(frozen=True)
class RuntimeConfig(ConfigMixin):
    """Queueing, batching and scheduling settings of a :class:`fastgen.Runtime`."""

    OPTION_NAME = "runtime option"

    max_queue: int = 1024
    """Requests waiting to start, at most (all kinds together); one more is rejected at once with an
    OverloadedError that carries a retry-after estimate."""
    max_batch_size: int = 32
    """Scoring: requests per engine call, at most (also capped by the engine's batch profile)."""
    max_wait_ms: float = 4.0
    """Scoring: how long the oldest request of a bucket may wait for its batch to fill before the
    batch runs anyway (see ``batch_wait``)."""
    batch_wait: BatchWait = "adaptive"
    """Scoring: ``adaptive`` spends ``max_wait_ms`` only while another request of the kind is due
    within it (its last 8 arrivals' rate x the wait >= 1; the items of one request, submitted
    together, count as one arrival); at a lower rate a batch runs at once, so a lone request at low
    load is not held for companions that will not come (a request that arrives while the engine is
    busy still joins the next batch). ``fixed``: always wait up to ``max_wait_ms``."""
    max_batch_tokens: int = 4096
    """Text scoring: padded tokens per engine call (requests x bucket length), at most."""
    max_batch_pixels: int = 1_048_576
    """Image scoring: model-input pixels per engine call (requests x height x width), at most."""
    text_buckets: tuple[int, ...] = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
    """Text scoring length buckets (tokens): a text joins the smallest bucket that holds it and is
    padded to that edge (the last bucket is the scorer's max length). Empty: one bucket, each batch
    padded to its longest text (request-level batching, for comparison). Edges 1.5x apart pad a
    text by at most a third of its bucket (powers of two: up to half); a bucket too small to fill a
    batch of its own rides with the next longer one when padding it costs less than a call (see
    ``text_merge_tokens``)."""
    text_merge_tokens: int | None = None
    """Text scoring: padded tokens worth one engine call. A batch takes all the queued texts of a
    smaller bucket, padded up to its edge, only while that padding costs at most this (it saves
    their own call). None: measured while serving (an engine call's fixed cost over its cost per
    token, fitted to the text batches run so far; until then buckets stay apart); 0: never pad a
    text past its own bucket."""
    max_step_rows: int = 16
    """Generation: UNet rows per denoising call, at most (an image with guidance takes two)."""
    max_step_pixels: int | None = None
    """Generation: UNet rows x height x width per denoising call, at most; none: no pixel budget."""
    max_active_rows: int | None = None
    """Generation (step batching): UNet rows admitted to a shape bucket's active set (text encoded,
    latents held), of which each step runs the most urgent up to ``max_step_rows``; none: four times
    ``max_step_rows``."""
    slowdown_target: float = 5.0
    """Generation (step batching): the order of requests is earliest deadline first, a request's
    deadline being its arrival plus this many times its solo time (its steps times its bucket's
    measured solo step), so short requests overtake long ones that arrived shortly before them, and
    every request's latency stays near a multiple of its own length. Set it below the slowdown a
    service must keep (about half): deadline-first order spends all the slack it is given, so a
    target of 10 lets the longest requests drift to 10 times their solo time as soon as the server
    is busy. 0: first come first served."""
    generation_batching: GenerationBatching = "step"
    """step: requests join and leave a shape bucket's batch at every denoising step (continuous
    batching); request: a new batch forms only when the previous one has finished (static,
    request-level batching, kept for comparison)."""
    priority_aging_s: float = 1.0
    """Seconds of waiting worth one priority level: a request that has waited long enough overtakes
    newer ones of higher priority, so nothing starves."""
    default_deadline_s: float | None = None
    """Deadline of requests that set none (seconds after submission); none: no deadline."""
    call_timeout_s: float | None = 300.0
    """Seconds one run of an engine (a scoring batch, or a generation step with its encoder and
    decoder calls) may take before the watchdog gives up on it: its requests and those queued for
    that engine fail with EngineTimeoutError, and new ones for it are refused at once until the call
    returns (then it serves again); the other engines, each on its own thread, keep serving. Generous
    by default (a first call that compiles counts); none: no watchdog."""
    oom_probe_after: int = 8
    """After the device runs out of memory, a queue's batch limit drops to the largest size that fit
    (or half the size that failed), and is raised again, by bisection towards the size that failed
    (then towards the configured limit), once this many batches at the lower limit have fit; retrying
    the very size that failed waits twice as long each time it fails again."""

    def __post_init__(self) -> None:
        self.validate_literals()
        for name in ("max_queue", "max_batch_size", "max_batch_tokens", "max_batch_pixels", "max_step_rows",
                     "oom_probe_after"):
            _int(name, getattr(self, name), 1)
        if self.max_active_rows is not None:
            _int("max_active_rows", self.max_active_rows, 1)
        _float("slowdown_target", self.slowdown_target, 0.0)
        if self.max_step_pixels is not None:
            _int("max_step_pixels", self.max_step_pixels, 1)
        if self.text_merge_tokens is not None:
            _int("text_merge_tokens", self.text_merge_tokens, 0)
        _float("max_wait_ms", self.max_wait_ms, 0.0)
        _float("priority_aging_s", self.priority_aging_s, 0.0, strict=True)
        _float("default_deadline_s", self.default_deadline_s, 0.0, strict=True, optional=True)
        _float("call_timeout_s", self.call_timeout_s, 0.0, strict=True, optional=True)
        buckets = tuple(self.text_buckets)
        if (any(isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1 for b in buckets)
                or list(buckets) != sorted(set(buckets))):
            raise InvalidArgumentError("text-buckets", list(buckets), "increasing integers >= 1 (token lengths)")
        object.__setattr__(self, "text_buckets", tuple(int(b) for b in buckets))



__all__ = ["RuntimeConfig"]
