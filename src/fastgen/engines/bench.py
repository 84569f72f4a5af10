"""Latency benchmark of an engine over batch sizes (what ``fastgen bench`` runs)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastgen.core.stats import percentile
from fastgen.engines.base import Engine
from fastgen.errors import InvalidArgumentError

logger = logging.getLogger(__name__)


@dataclass
class BenchResult:
    """Latency of one engine at one input shape."""

    shape: dict[str, int]
    """Root sizes of every dynamic dim (``batch``, ``height``...) the engine ran at."""
    batch: int
    """Batch size (items per call)."""
    iters: int
    """Timed calls."""
    p50_ms: float
    """Median latency of one call, in milliseconds."""
    p90_ms: float
    """90th percentile latency, in milliseconds."""
    p99_ms: float
    """99th percentile latency, in milliseconds."""
    mean_ms: float
    """Mean latency, in milliseconds."""
    throughput: float
    """Items per second: batch / mean latency."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def batch_symbol(engine: Engine) -> str | None:
    """The dim that batch sizes vary: ``batch``, else the first symbolic dim of the first input."""
    if "batch" in engine.spec.symbols:
        return "batch"
    for t in engine.spec.inputs:
        for entry in t.shape:
            if isinstance(entry, str):
                return entry.partition("/")[0]
    return None


def _check_range(engine: Engine, symbol: str, size: int, strict: bool) -> None:
    rng = engine.spec.profile.dims.get(symbol)
    if rng is None or rng.min <= size <= rng.max:
        return
    if strict:
        raise InvalidArgumentError(symbol, size, f"{rng.min} to {rng.max} (this engine's profile)")
    logger.info("%s=%d is outside the profile's %d..%d; %s engines run it anyway",
                symbol, size, rng.min, rng.max, engine.backend)


def _sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def benchmark(engine: Engine, *, batches: Sequence[int], shape: Mapping[str, int] | None = None,
              warmup: int = 3, iters: int = 20, min_seconds: float = 0.0, seed: int = 0,
              progress: Callable[[BenchResult], None] | None = None, strict: bool | None = None) -> list[BenchResult]:
    """Time ``engine.run`` at each batch size (other dims at ``shape``, else the profile's opt).

    Each call is timed with ``time.perf_counter`` around a device synchronisation, so the figure is
    the latency a caller sees (input validation included). At least ``iters`` calls are timed, and
    more until ``min_seconds`` have passed. ``progress`` receives each result as it is done.

    Every point is checked before the first call: sizes the component cannot take (its ``multiples``,
    derived dims, sizes whose tensors would not fit in memory) are refused, and so, with ``strict``,
    are sizes outside the engine's profile (default: only for engines whose profile is strict, such as
    TensorRT's; ``fastgen bench`` is always strict, since a benchmark outside the range an engine was
    built and tuned for measures nothing it will serve).
    """
    strict = engine.strict_profile if strict is None else bool(strict)
    batches = list(batches)
    if not batches or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in batches):
        raise InvalidArgumentError("batch", batches, reason="one or more integers >= 1")
    if not isinstance(warmup, int) or warmup < 0:
        raise InvalidArgumentError("warmup", warmup, "integers >= 0")
    if not isinstance(iters, int) or iters < 1:
        raise InvalidArgumentError("iters", iters, "integers >= 1")
    if min_seconds < 0:
        raise InvalidArgumentError("min-seconds", min_seconds, "numbers >= 0")
    shape = dict(shape or {})
    symbols = engine.spec.symbols
    for name in shape:
        if name not in symbols:
            raise InvalidArgumentError("shape", name, sorted(symbols) or "none: all dims are static")
    symbol = batch_symbol(engine)
    if symbol is None and batches != [1]:
        raise InvalidArgumentError("batch", batches, "1", reason="this engine has no dynamic batch dim")
    if symbol is not None and symbol in shape:
        raise InvalidArgumentError("shape", symbol, reason="set the batch size with batches, not shape")
    for name, size in shape.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidArgumentError(name, size, "integers >= 1")
        _check_range(engine, name, size, strict)
    points = []
    for b in batches:
        dims = {**engine.spec.profile.shape("opt"), **shape}
        if symbol is not None:
            dims[symbol] = b
            _check_range(engine, symbol, b, strict)
        engine.spec.check_dims(dims)  # multiples and memory, for every point before any runs
        points.append((b, dims))

    results = []
    for b, dims in points:
        inputs = engine.spec.sample_inputs(dims, seed=seed, device=engine.device, float_dtype=engine.float_dtype)
        for _ in range(warmup):
            engine.run(inputs)
        _sync(engine)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < iters or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            engine.run(inputs)
            _sync(engine)
            times.append((time.perf_counter() - t0) * 1e3)
        p50, p90, p99 = (float(percentile(times, q)) for q in (50, 90, 99))  # type: ignore[arg-type]
        mean = float(np.mean(times))
        result = BenchResult(shape=dims, batch=b, iters=len(times), p50_ms=p50, p90_ms=p90, p99_ms=p99,
                             mean_ms=mean, throughput=b / (mean / 1e3) if mean > 0 else float("inf"))
        logger.info("bench %s batch=%d: p50 %.3f ms, p99 %.3f ms, %.1f items/s",
                    engine.spec.component, b, p50, p99, result.throughput)
        results.append(result)
        if progress is not None:
            progress(result)
    return results
