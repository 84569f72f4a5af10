"""Calling engines from pipelines: batches split to what an engine's profile accepts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def run_chunked(engine: Any, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run ``engine`` on inputs batched along dim 0, in chunks of at most its profile's max batch.

    An engine built for up to N rows (a TensorRT profile, a memory budget) is never given more;
    float outputs come back as float32, whatever the engine's precision. A callable without a
    ``spec`` (e.g. an adapter around a torch module) gets every row in one call.
    """
    rows = next(iter(inputs.values())).shape[0]
    spec = getattr(engine, "spec", None)
    batch = spec.profile.dims.get("batch") if spec is not None else None
    step = batch.max if batch is not None else rows
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, rows, max(step, 1)):
        parts.append(engine({k: v[start:start + step] for k, v in inputs.items()}))
    out = {}
    for name in parts[0]:
        value = parts[0][name] if len(parts) == 1 else torch.cat([p[name] for p in parts])
        out[name] = value.float() if value.is_floating_point() else value
    return out


__all__ = ["run_chunked"]
