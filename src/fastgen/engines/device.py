"""Device selection and the device fingerprint that enters engine cache keys."""

from __future__ import annotations

import platform
from typing import Any

import torch

from fastgen.errors import InvalidArgumentError, UnsupportedError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; ``cuda`` (or ``cuda:N``) needs a GPU.

    Only ``auto`` and ``cuda`` query CUDA, and only through ``torch.cuda.is_available()``, which does
    not create a CUDA context.
    """
    if isinstance(device, torch.device):
        kind, text = device.type, str(device)
    elif isinstance(device, str):
        text = device.strip().lower()
        kind = text.split(":", 1)[0]
    else:
        raise InvalidArgumentError("device", device, DEVICES)
    if kind not in DEVICES or (kind != "cuda" and ":" in text):
        raise InvalidArgumentError("device", device, DEVICES)
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedError("device 'cuda': this PyTorch build sees no CUDA GPU "
                                   f"(torch {torch.__version__}); use --device cpu")
        try:
            return torch.device(text)
        except RuntimeError as exc:
            raise InvalidArgumentError("device", device, "cpu, cuda or cuda:N") from exc
    return torch.device("cpu")


def device_fingerprint(device: str | torch.device) -> dict[str, Any]:
    """What about the device changes a built engine: CPU architecture, or GPU model and compute capability.

    TensorRT engines are specific to the GPU's compute capability (and are only portable across
    identical GPUs), so the GPU name enters the cache key as well.
    """
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {"kind": "cuda", "name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}"}
    if dev.type == "cpu":
        return {"kind": "cpu", "arch": platform.machine()}
    raise UnsupportedError(f"device {dev.type!r}: fastgen engines run on cpu or cuda")
