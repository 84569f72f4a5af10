"""Where a kernel runs: a CUDA device, or the CPU under Triton's interpreter (``TRITON_INTERPRET=1``).

This module imports torch but never triton, so the dispatchers in ``fastgen.ops`` can ask whether a
kernel could run without paying for the triton import.
"""

from __future__ import annotations

import os

import torch

from fastgen.errors import InvalidArgumentError

__all__ = ["capability", "check_launch_device", "interpreting"]


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``); read on every call.

    Triton itself reads the variable when ``@triton.jit`` decorates a kernel, so set it before the
    kernel modules are imported (``tests/kernels/conftest.py`` does).
    """
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_launch_device(name: str, t: torch.Tensor) -> None:
    """Raise :class:`InvalidArgumentError` unless ``t`` is on CUDA (or on the CPU under the interpreter)."""
    if t.device.type != "cuda" and not interpreting():
        raise InvalidArgumentError(f"{name}.device", t.device, "cuda (or cpu with TRITON_INTERPRET=1)")


def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device; (0, 0) for any other device (the interpreter)."""
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)
