"""TensorRT backend: not in this release.

The word ``tensorrt`` is accepted everywhere a backend is named so that configs and scripts written
today keep working; building or loading such an engine fails with this one-line message until the
TensorRT issue lands.
"""

from __future__ import annotations

from fastgen.errors import UnsupportedError

MESSAGE = ("backend 'tensorrt' is not available in this fastgen release (it arrives with the TensorRT "
           "backend issue); use --backend onnxruntime (with --execution-provider tensorrt on a GPU "
           "machine with onnxruntime-gpu) or --backend torch")


def check_available() -> None:
    raise UnsupportedError(MESSAGE)


def load_tensorrt_engine(*args, **kwargs):
    raise UnsupportedError(MESSAGE)
