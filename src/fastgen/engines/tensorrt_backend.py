"""TensorRT backend: registered, but not in this release.

The word ``tensorrt`` is accepted everywhere a backend is named so that configs and scripts written
today keep working; building or loading such an engine fails with this one-line message until the
TensorRT issue lands (it fills in this module's spec: artifacts, loading, version, availability).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

from fastgen.engines.registry import BackendSpec, register_backend
from fastgen.errors import UnsupportedError

MESSAGE = ("backend 'tensorrt' is not available in this fastgen release (it arrives with the TensorRT "
           "backend issue); use --backend onnxruntime (with --execution-provider tensorrt on a GPU "
           "machine with onnxruntime-gpu) or --backend torch")


def check_available() -> None:
    """Raise the backend's one-line UnsupportedError (it is never available in this release)."""
    raise UnsupportedError(MESSAGE)


def load_tensorrt_engine(*args: Any, **kwargs: Any) -> NoReturn:
    """Open a TensorRT engine directory: not in this release."""
    raise UnsupportedError(MESSAGE)


def _write_artifacts(staging: Path, plan: Any) -> NoReturn:
    raise UnsupportedError(MESSAGE)


def _version() -> str:
    return "unavailable"


SPEC = register_backend(BackendSpec(
    name="tensorrt", precisions=("fp32", "fp16", "bf16"), write_artifacts=_write_artifacts,
    load=load_tensorrt_engine, version=_version, consumes_onnx=True, unavailable=lambda: MESSAGE))


__all__ = ["MESSAGE", "SPEC", "check_available", "load_tensorrt_engine"]
