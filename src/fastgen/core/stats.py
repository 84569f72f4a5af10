"""Small statistics shared by the runtime's metrics and auto-tuning and the engine benchmark (no numpy)."""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (``q`` in [0, 100]) of ``values``; None when there are none.

    Method: sort the n values and take the one of rank ``max(1, ceil(q / 100 * n))`` (1-based), so
    the result is always one of the values, never an interpolation between two (numpy's
    ``method="inverted_cdf"``). A latency reported as p99 was then really seen, and the runtime's
    figures and auto-tuning stay the same whatever the spacing of the samples. Sorting an already
    sorted list is one linear pass, so callers that keep their values sorted pay little.
    """
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


__all__ = ["percentile"]
