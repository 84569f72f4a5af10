"""``fastgen.export``: one model component to a verified ONNX directory."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastgen.core.fs import atomic_dir, write_json_atomic
from fastgen.core.progress import steps
from fastgen.export.config import ExportConfig
from fastgen.export.onnx_export import DATA_FILE, ONNX_FILE, export_onnx
from fastgen.export.verify import ort_runner, verify
from fastgen.models.component import Component
from fastgen.models.resolve import resolve_component
from fastgen.models.spec import ShapeProfile

logger = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
REPORT_FILE = "export.json"


@dataclass
class ExportResult:
    """What ``export`` wrote and measured."""

    directory: Path
    """Folder holding ``model.onnx`` (+ ``model.onnx.data``), ``spec.json`` and ``export.json``."""
    component: Component
    """The exported component (its spec is the one written to ``spec.json``)."""
    config: ExportConfig
    """The export settings used."""
    stats: dict[str, Any] = field(default_factory=dict)
    """Timings (export, clean-up, verification seconds), node counts, weight bytes."""
    verification: list[dict[str, Any]] = field(default_factory=list)
    """Per verified shape: max abs/rel error and cosine of every output."""

    @property
    def onnx_path(self) -> Path:
        return self.directory / ONNX_FILE

    @property
    def files(self) -> list[str]:
        return [f for f in (ONNX_FILE, DATA_FILE) if (self.directory / f).exists()]

    def to_dict(self) -> dict[str, Any]:
        return {"component": self.component.spec.component, "origin": self.component.origin,
                "config": self.config.to_dict(), "stats": self.stats, "verification": self.verification}


def verify_shapes(config: ExportConfig) -> list[str]:
    return {"none": [], "opt": ["opt"], "profile": ["min", "opt", "max"]}[config.verify]


def effective_config(component: Component, config: ExportConfig) -> ExportConfig:
    """``config`` as it applies to ``component``: adjusted for quantized layers (``fastgen.quant.onnx``).

    - fp8 layers need opset 19 (float8e4m3fn): a default opset becomes 19; an explicit lower one
      fails in the exporter with a message naming it.
    - No onnxslim clean-up: its constant folding turns DequantizeLinear(int8 weight) back into fp32
      weights, and its common-subexpression elimination merges QuantizeLinear nodes that ONNX Runtime
      then no longer fuses into int8 MatMuls.
    - Verification within quantization noise (``VERIFY_TOLERANCE`` / ``VERIFY_MIN_COSINE``, or looser
      bounds the config asks for): a value that crosses a rounding boundary moves a whole step.
    """
    from fastgen.quant.api import quantized_layers

    layers = quantized_layers(component.module)
    if not layers:
        return config
    from fastgen.errors import UnsupportedError
    from fastgen.quant.onnx import VERIFY_MIN_COSINE, VERIFY_TOLERANCE

    if config.exporter != "torchscript":
        raise UnsupportedError(f"exporter {config.exporter!r} cannot write quantized layers as Q/DQ graphs "
                               f"({len(layers)} in {component.spec.component}): use exporter 'torchscript'")
    fp8 = any(layer.config.weight_dtype == "fp8" for layer in layers.values())
    opset = 19 if fp8 and config.opset is None else config.opset
    return dataclasses.replace(config, opset=opset, cleanup="none", tolerance=max(config.tolerance, VERIFY_TOLERANCE),
                               min_cosine=min(config.min_cosine, VERIFY_MIN_COSINE))


def export_into(component: Component, directory: Path, config: ExportConfig, *, progress: bool = False) -> ExportResult:
    """Export into an existing (staging) folder; the caller makes the result visible atomically."""
    config = effective_config(component, config)
    shapes = verify_shapes(config)
    with steps(f"export {component.spec.component}", 2 + len(shapes), progress) as s:
        s.advance(f"tracing with {config.exporter}")
        stats = export_onnx(component, directory, config)
        s.advance("graph written")
        t0 = time.perf_counter()
        report = []
        if shapes:
            run = ort_runner(directory / ONNX_FILE)
            report = verify(component.spec, component, run, shapes=shapes, tolerance=config.tolerance,
                            min_cosine=config.min_cosine, seed=config.seed,
                            on_shape=lambda label: s.advance(f"verifying at {label}"))
        stats["verify_seconds"] = time.perf_counter() - t0
    result = ExportResult(directory, component, config, stats, report)
    write_json_atomic(directory / SPEC_FILE, component.spec.to_dict())
    write_json_atomic(directory / REPORT_FILE, result.to_dict())
    return result


def export(model: Any, out: str | os.PathLike, *, component: str | None = None, config: ExportConfig | None = None,
           profile: ShapeProfile | str | None = None, progress: bool = False) -> ExportResult:
    """Export one component of ``model`` to ONNX in ``out`` and verify it against PyTorch.

    ``model`` is a preset name (``tiny``, ``sd15``, ``sdxl``), a local checkpoint path, an
    ``nn.Module`` or a :class:`Component`. ``out`` receives ``model.onnx`` (plus ``model.onnx.data``
    when the weights exceed 2 GB), ``spec.json`` and ``export.json`` (timings and verification
    figures); it appears only once everything succeeded. Raises ``VerificationError`` when ONNX
    Runtime and PyTorch disagree beyond ``config.tolerance`` / ``config.min_cosine``.
    """
    config = config or ExportConfig()
    comp = resolve_component(model, component, profile)
    t0 = time.perf_counter()
    with atomic_dir(out) as staging, torch.inference_mode(False):
        result = export_into(comp, staging, config, progress=progress)
    result.directory = Path(out).absolute()
    logger.info("exported %s to %s in %.1f s", comp.spec.component, result.directory, time.perf_counter() - t0)
    return result
