"""Per-layer quantization sensitivity: the module's output SQNR when one layer alone is quantized.

SQNR (signal-to-quantization-noise ratio) in dB: ``10 log10(sum(ref**2) / sum((ref - out)**2))``;
each +6 dB halves the error's RMS. A layer whose SQNR is far below the others is the one to keep in
floating point (see ``DEFAULT_SKIP`` and benchmarks/bench_quant.py, which measured it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastgen.core.progress import steps
from fastgen.errors import InvalidArgumentError
from fastgen.quant.calibration import AMAX_ATTR, calibration_layers
from fastgen.quant.config import QuantConfig, check_config
from fastgen.quant.modules import QuantConv1x1, quantized_module_for

logger = logging.getLogger(__name__)


def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """SQNR of ``actual`` against ``reference`` in dB (inf when equal, -inf when ``actual`` is not finite)."""
    ref = reference.detach().double().flatten()
    act = actual.detach().double().flatten().to(ref.device)
    if ref.shape != act.shape:
        raise InvalidArgumentError("actual.shape", tuple(actual.shape), f"{tuple(reference.shape)} (the reference's)")
    if not bool(torch.isfinite(act).all()):
        return -math.inf
    noise = float(((ref - act) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def output_tensor(out: Any) -> torch.Tensor:
    """Every float tensor in a module's output (tensor, tuple, dict, ModelOutput), flattened into one fp32 vector."""
    found: list[torch.Tensor] = []

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                found.append(value.detach().float().flatten())
        elif isinstance(value, Mapping):
            for v in value.values():
                walk(v)
        elif isinstance(value, (tuple, list)):
            for v in value:
                walk(v)

    walk(out)
    if not found:
        raise InvalidArgumentError("module output", type(out).__name__, reason="holds no float tensor")
    return torch.cat(found)


def run_module(module: nn.Module, inputs: Any) -> torch.Tensor:
    """``module(*inputs)`` (tuple/list), ``module(**inputs)`` (dict) or ``module(inputs)``, as one fp32 vector."""
    with torch.inference_mode():
        if isinstance(inputs, Mapping):
            out = module(**inputs)
        elif isinstance(inputs, (tuple, list)):
            out = module(*inputs)
        else:
            out = module(inputs)
    return output_tensor(out)


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's sensitivity to quantization."""

    name: str
    """Qualified name inside the measured module."""
    kind: str
    """``linear`` or ``conv1x1``."""
    shape: tuple[int, int]
    """(out_features, in_features)."""
    sqnr_db: float
    """SQNR (dB) of the module's output with only this layer quantized (higher is better)."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape),
                "sqnr_db": None if math.isinf(self.sqnr_db) else round(self.sqnr_db, 3)}


def _set(module: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, attr, layer)


def sensitivity(module: nn.Module, inputs: Any, config: QuantConfig | dict, *,
                filter_fn: Callable[[nn.Module, str], bool] | None = None, layers: Iterable[str] | None = None,
                progress: bool = False) -> list[LayerSensitivity]:
    """Quantize each eligible layer alone, run ``module`` on ``inputs``, and rank layers by output SQNR.

    ``inputs``: a tuple (positional), a dict (keyword) or one tensor. Every ``nn.Linear`` / 1x1
    ``nn.Conv2d`` is measured, including those the skip list would keep in float (that is what
    the list is decided from); ``filter_fn(layer, name)`` or ``layers`` (names) restrict the set.
    SmoothQuant / static configs need ``fastgen.calibrate`` first. The module is restored after each
    layer (also on error). Returns the layers sorted from most to least sensitive (lowest SQNR first).
    """
    config = check_config(config)
    wanted = None if layers is None else set(layers)
    candidates = [(n, m) for n, m in calibration_layers(module, filter_fn) if wanted is None or n in wanted]
    if wanted is not None and len(candidates) != len(wanted):
        missing = sorted(wanted - {n for n, _ in candidates})
        raise InvalidArgumentError("layers", missing[0], reason="not an nn.Linear or 1x1 nn.Conv2d of the module")
    if not candidates:
        raise InvalidArgumentError("filter_fn", None, reason="no nn.Linear or 1x1 nn.Conv2d layer matched")
    if config.group_size is not None:
        candidates = [(n, m) for n, m in candidates if _in_features(m) % config.group_size == 0]
    if config.needs_calibration:
        missing = [n for n, m in candidates if m.__dict__.get(AMAX_ATTR) is None]
        if missing:
            raise InvalidArgumentError("config", config.describe(), reason=f"needs activation statistics, none for "
                                       f"{missing[0]!r}: run fastgen.calibrate(module, forward_loop) first")
    reference = run_module(module, inputs)
    results = []
    with steps("sensitivity", len(candidates), progress) as s:
        for name, layer in candidates:
            s.advance(name)
            cls = quantized_module_for(layer)
            quantized = cls.from_float(layer, config, act_amax=layer.__dict__.get(AMAX_ATTR))
            _set(module, name, quantized)
            try:
                value = sqnr_db(reference, run_module(module, inputs))
            finally:
                _set(module, name, layer)
            kind = "conv1x1" if cls is QuantConv1x1 else "linear"
            results.append(LayerSensitivity(name, kind, (quantized.out_features, quantized.in_features), value))
    results.sort(key=lambda r: r.sqnr_db)
    if results:
        logger.info("sensitivity %s: worst %s %.1f dB, best %s %.1f dB", config.describe(), results[0].name,
                    results[0].sqnr_db, results[-1].name, results[-1].sqnr_db)
    return results


def _in_features(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
