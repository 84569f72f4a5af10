"""Batched serving: ``Runtime`` turns single requests from many clients into full batches, one device thread per engine.

Scoring is batched per request (shape buckets, count and token / pixel budgets), generation per
denoising step (continuous batching), each engine kind on its own device thread under a watchdog.
See :mod:`fastgen.runtime.runtime`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastgen.core.lazy import lazy_getattr

_LAZY = {
    "Runtime": "fastgen.runtime.runtime",
    "RuntimeConfig": "fastgen.runtime.config",
    "GenerateRequest": "fastgen.runtime.requests",
    "ScoreRequest": "fastgen.runtime.requests",
    "EmbedRequest": "fastgen.runtime.requests",
    "DetectRequest": "fastgen.runtime.requests",
    "RequestFuture": "fastgen.runtime.requests",
    "RequestStatus": "fastgen.runtime.requests",
    "RequestError": "fastgen.runtime.requests",
    "OverloadedError": "fastgen.runtime.requests",
    "DeadlineExceededError": "fastgen.runtime.requests",
    "ShutdownError": "fastgen.runtime.requests",
    "OutOfMemoryError": "fastgen.runtime.requests",
    "EngineError": "fastgen.runtime.requests",
    "EngineTimeoutError": "fastgen.runtime.requests",
    "RequestScheduler": "fastgen.runtime.request_scheduler",
    "LatencyProfile": "fastgen.runtime.batch_tuning",
    "TuningChoice": "fastgen.runtime.batch_tuning",
}

__all__ = list(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from fastgen.runtime.batch_tuning import LatencyProfile, TuningChoice
    from fastgen.runtime.config import RuntimeConfig
    from fastgen.runtime.request_scheduler import RequestScheduler
    from fastgen.runtime.requests import (
        DeadlineExceededError,
        DetectRequest,
        EmbedRequest,
        EngineError,
        EngineTimeoutError,
        GenerateRequest,
        OutOfMemoryError,
        OverloadedError,
        RequestError,
        RequestFuture,
        RequestStatus,
        ScoreRequest,
        ShutdownError,
    )
    from fastgen.runtime.runtime import Runtime
