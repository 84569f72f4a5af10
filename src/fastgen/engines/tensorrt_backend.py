"""The TensorRT backend's registration: availability, devices, refusals, artifacts and loading.

Strongly typed engines built from fastgen's verified ONNX export (:mod:`fastgen.engines.trt_build`),
one optimization profile per shape range (:mod:`fastgen.engines.trt_options`), run on torch's CUDA
stream (:mod:`fastgen.engines.trt_engine`), refitted in place of a rebuild when only the weights
changed (:mod:`fastgen.engines.trt_artifacts`). Without TensorRT (every CPU machine) the backend is
listed but unavailable, with one line saying what to install; importing fastgen never imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastgen.engines import trt_lib
from fastgen.engines.registry import BackendSpec, register_backend
from fastgen.errors import UnsupportedError

if TYPE_CHECKING:  # pragma: no cover
    from fastgen.engines.build import BuildPlan
    from fastgen.engines.config import BuildConfig, ExecutionOptions
    from fastgen.engines.trt_engine import TrtEngine

MESSAGE = trt_lib.INSTALL
NO_GPU = ("backend 'tensorrt' needs a CUDA GPU, and PyTorch sees none here (torch {torch}); use --backend "
          "onnxruntime or torch on this machine")
#: Quantization recipes whose ONNX graphs TensorRT's explicit quantization takes (constant-scale Q/DQ).
#: The dynamic int8 recipes need onnxruntime's MatMulIntegerToFloat and per-token scales.
QUANTIZATIONS = ("int8-weight-only", "int4-weight-only", "int4-weight-only-g64", "w8a8-static",
                 "w8a8-static-smoothquant", "fp8-dynamic")
_QUANT_TYPES = {"Int8WeightOnlyConfig", "Int4WeightOnlyConfig", "Int8StaticConfig", "Fp8DynamicConfig"}


def _unavailable() -> str | None:
    if not trt_lib.installed():
        return MESSAGE
    if not trt_lib.host_memory() and not torch.cuda.is_available():
        return NO_GPU.format(torch=torch.__version__)
    return None


def check_available() -> None:
    """Raise the backend's one-line UnsupportedError when TensorRT or a GPU is missing."""
    message = _unavailable()
    if message is not None:
        raise UnsupportedError(message)


def _resolve_device(device: str | torch.device) -> torch.device:
    from fastgen.engines.device import resolve_device

    if trt_lib.host_memory() and str(device) in ("auto", "cpu"):
        return torch.device("cpu")  # a host-memory stand-in of TensorRT (tests)
    if str(device) == "cpu":
        raise UnsupportedError("backend 'tensorrt' runs on a CUDA device, not cpu (use --device cuda or auto)")
    resolved = resolve_device("cuda" if str(device) == "auto" else device)
    return resolved


def _can_run(device: str) -> bool:
    if trt_lib.host_memory():
        return True
    return device.startswith("cuda") and trt_lib.installed() and torch.cuda.is_available()


def _check(config: BuildConfig, device: torch.device) -> None:
    quant = config.quant_config
    if quant is None:
        return
    if type(quant).__name__ not in _QUANT_TYPES:
        raise UnsupportedError(f"backend 'tensorrt' cannot build quantization {config.quantization!r} (its graph "
                               f"needs onnxruntime's int8 contrib ops); allowed: {', '.join(QUANTIZATIONS)}")
    if type(quant).__name__ == "Fp8DynamicConfig" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise UnsupportedError(f"backend 'tensorrt': fp8-dynamic needs an Ada, Hopper or Blackwell GPU "
                                   f"(compute capability 8.9+), not {major}.{minor}")


def _write_artifacts(staging: Path, plan: BuildPlan) -> dict[str, Any]:
    from fastgen.engines.trt_artifacts import write_artifacts

    return write_artifacts(staging, plan)


def load_tensorrt_engine(directory: Path, manifest: dict[str, Any], *, device: torch.device,
                         execution: ExecutionOptions | None = None) -> TrtEngine:
    """Open a TensorRT engine directory (its manifest verified by ``load_engine``)."""
    check_available()
    from fastgen.engines.trt_artifacts import load

    return load(directory, manifest, device=device, execution=execution)


def _version() -> str:
    return trt_lib.version() if trt_lib.installed() else "unavailable"


SPEC = register_backend(BackendSpec(
    name="tensorrt", precisions=("fp32", "fp16", "bf16"), write_artifacts=_write_artifacts,
    load=load_tensorrt_engine, version=_version, consumes_onnx=True, resolve_device=_resolve_device,
    can_run=_can_run, check=_check, unavailable=_unavailable))


__all__ = ["MESSAGE", "QUANTIZATIONS", "SPEC", "check_available", "load_tensorrt_engine"]
