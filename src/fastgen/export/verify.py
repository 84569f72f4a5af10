"""Check an exported graph against the PyTorch component in ONNX Runtime, on fresh random inputs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastgen.core.onnx_files import check_external_data
from fastgen.core.ort import cpu_session
from fastgen.errors import VerificationError
from fastgen.models.spec import ExportSpec

logger = logging.getLogger(__name__)


def compare(reference: torch.Tensor, actual: torch.Tensor) -> dict[str, float]:
    """max abs error, max abs error relative to the largest reference magnitude, and cosine."""
    ref = reference.detach().double().flatten()
    act = actual.detach().double().flatten()
    if ref.shape != act.shape:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "cosine": 0.0}
    if ref.numel() == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "cosine": 1.0}
    finite = bool(torch.isfinite(act).all()) and bool(torch.isfinite(ref).all())
    err = (ref - act).abs()
    max_abs = float(err.max()) if finite else float("inf")
    scale = float(ref.abs().max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    norms = float(ref.norm() * act.norm())
    if not finite:
        cosine = 0.0
    elif norms == 0:
        cosine = 1.0 if max_abs == 0 else 0.0
    else:
        cosine = float(torch.dot(ref, act) / norms)
    return {"max_abs": max_abs, "max_rel": max_rel, "cosine": cosine}


def ort_runner(onnx_path: Path, threads: int = 0) -> Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A plain CPU ONNX Runtime session as a callable from named tensors to named tensors.

    Quantized graphs compute the math they state (``fastgen.core.ort.EXACT_QUANT_ENTRIES``).
    """
    check_external_data(onnx_path)  # before onnxruntime reads a user's external data files
    session = cpu_session(onnx_path, intra_op_threads=threads)
    names = [o.name for o in session.get_outputs()]

    def run(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feeds = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in inputs.items()}
        return {n: torch.from_numpy(o) for n, o in zip(names, session.run(names, feeds))}

    return run


Runner = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]


def verify(spec: ExportSpec, reference: Runner, run: Runner, *,
           shapes: list[str | Mapping[str, int]], tolerance: float, min_cosine: float, seed: int = 0,
           float_dtype: torch.dtype | None = None, label: str = "onnxruntime",
           on_shape: Callable[[str], Any] | None = None) -> list[dict[str, Any]]:
    """Run ``run`` and ``reference`` (the fp32 PyTorch component) on the same random inputs.

    ``float_dtype`` casts the float inputs given to ``run`` (a fp16 engine). Raises
    :class:`VerificationError` naming the output, the shape and the failing figure.
    """
    report = []
    for i, shape in enumerate(shapes):
        dims = spec.shape_at(shape)
        label_shape = ",".join(f"{k}={v}" for k, v in dims.items()) or "static"
        if on_shape is not None:
            on_shape(shape if isinstance(shape, str) else label_shape)
        inputs = spec.sample_inputs(dims, seed=seed + i)
        expected = reference(inputs)
        feeds = {k: (v.to(float_dtype) if float_dtype is not None and v.is_floating_point() else v)
                 for k, v in inputs.items()}
        actual = run(feeds)
        outputs = {}
        for name, ref in expected.items():
            stats = compare(ref, actual[name])
            outputs[name] = stats
            if stats["max_rel"] > tolerance or stats["cosine"] < min_cosine:
                raise VerificationError(
                    f"{label} differs from PyTorch on {spec.component} output {name!r} at {label_shape}: "
                    f"max abs error {stats['max_abs']:.3g} (relative {stats['max_rel']:.3g}, "
                    f"tolerance {tolerance:g}), cosine {stats['cosine']:.6f} (minimum {min_cosine:g})")
        logger.info("verified %s at %s: %s", spec.component, label_shape,
                    ", ".join(f"{n} rel={s['max_rel']:.2e} cos={s['cosine']:.6f}" for n, s in outputs.items()))
        report.append({"shape": dims, "outputs": outputs})
    return report
