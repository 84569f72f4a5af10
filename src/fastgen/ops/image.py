"""Image conversions around a model: decoder output to uint8 pixels, uint8 pixels to classifier input.

Each op has a PyTorch path, which is the definition (the reference the tests compare against) and
what runs on CUDA or when the extension is missing, and a C++ path (``fastgen._C``) for CPU tensors
that gives bit-identical results in one multi-threaded pass over memory with the GIL released.

``backend``: ``"auto"`` uses the extension for CPU tensors when it is built and not disabled by
``FASTGEN_DISABLE_EXT=1``; ``"ext"`` insists on it (``UnsupportedError`` otherwise); ``"torch"``
always takes the PyTorch path.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from types import ModuleType
from typing import Literal

import numpy as np
import torch

from fastgen.errors import InvalidArgumentError, UnsupportedError, check_choice
from fastgen.ops import _ext

Backend = Literal["auto", "ext", "torch"]
BACKENDS = ("auto", "ext", "torch")

_TO_UINT8_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_OUT_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_MAX_CHANNELS = 4


# --------------------------------------------------------------------------------------------
# PyTorch paths: the reference definitions.

@torch.no_grad()
def _to_uint8_torch(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8, contiguous.

    ``v = x*127.5 + 127.5`` in fp32 (two roundings: a multiply, then an add), NaN -> 0,
    clamp to [0, 255], round half to even. In-place after the first op to save allocations;
    the values are those of the out-of-place expression.
    """
    v = images.to(torch.float32).mul(127.5)  # (N, C, H, W) fp32; 16-bit floats convert exactly
    v.add_(127.5)
    v.nan_to_num_(nan=0.0, posinf=255.0, neginf=0.0)
    v.clamp_(0.0, 255.0)
    v.round_()  # half to even
    return v.to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (N, H, W, C)


@torch.no_grad()
def _normalize_torch(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                     out_dtype: torch.dtype) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) ``((x / 255) - mean[c]) / std[c]`` in fp32, then out_dtype."""
    c = images.shape[3]
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, c, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, c, 1, 1)
    # The permuted copy is made on uint8 (1 byte per element) so every float op below runs on, and
    # returns, a contiguous NCHW tensor.
    x = images.permute(0, 3, 1, 2).contiguous().to(torch.float32)  # (N, C, H, W)
    return x.div_(255).sub_(mean_t).div_(std_t).to(out_dtype)


# --------------------------------------------------------------------------------------------
# The C++ normalisation reads a table computed with the reference itself (exact by construction).

@functools.lru_cache(maxsize=64)
def _normalize_lut(mean: tuple[float, ...], std: tuple[float, ...], out_dtype: torch.dtype) -> np.ndarray:
    """(C, 256) reference output for every uint8 value of every channel, as raw 2- or 4-byte words."""
    c = len(mean)
    ramp = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(1, 1, 256, c)  # (1, 1, 256, C)
    lut = _normalize_torch(ramp, mean, std, out_dtype).reshape(c, 256)
    lut = _raw(lut).numpy().copy()
    lut.setflags(write=False)
    return lut


def _raw(t: torch.Tensor) -> torch.Tensor:
    """Same memory, a dtype numpy understands (bfloat16 has no numpy dtype)."""
    return t.view(torch.int16) if t.element_size() == 2 else t


# --------------------------------------------------------------------------------------------
# Validation and dispatch.

def _check_threads(threads: int | None) -> int:
    if threads is None:
        return torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise InvalidArgumentError("threads", threads, "integers >= 1, or None for torch.get_num_threads()")
    return int(threads)


def _check_images(argument: str, images: object, dtypes: dict[torch.dtype, str], layout: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise InvalidArgumentError(argument, type(images).__name__, f"a torch.Tensor of shape {layout}")
    if images.layout != torch.strided:
        raise InvalidArgumentError(argument, f"tensor with layout {images.layout}", "dense (strided) tensors")
    if images.dim() != 4:
        raise InvalidArgumentError(argument, f"tensor of shape {tuple(images.shape)}",
                                   f"rank-4 tensors of shape {layout}")
    if images.dtype not in dtypes:
        raise InvalidArgumentError(argument, f"tensor of dtype {images.dtype}", dtypes.values())
    return images


def _select(backend: str, device: torch.device) -> ModuleType | None:
    """The extension module when this call should use it, else None (the PyTorch path)."""
    check_choice("backend", backend, BACKENDS)
    if backend == "torch":
        return None
    if device.type != "cpu":
        if backend == "ext":
            raise UnsupportedError(f"backend 'ext' runs on CPU tensors only, not on device {device}; "
                                   "use backend='auto' or 'torch'")
        return None
    module = _ext.load()
    if module is None and backend == "ext":
        raise UnsupportedError(f"backend 'ext' is unavailable: {_ext.unavailable_reason()}")
    return module


def _check_stats(argument: str, values: object, channels: int, *, nonzero: bool) -> tuple[float, ...]:
    allowed = f"{channels} finite{' non-zero' if nonzero else ''} floats, one per channel (last dim of the images)"
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist() if values.dim() <= 1 else values
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise InvalidArgumentError(argument, values, allowed)
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InvalidArgumentError(argument, values, allowed) from None
    if len(out) != channels:
        raise InvalidArgumentError(argument, values, allowed,
                                   reason=f"{len(out)} values for {channels} channels")
    if not all(math.isfinite(v) for v in out) or (nonzero and any(v == 0.0 for v in out)):
        raise InvalidArgumentError(argument, values, allowed)
    return out


# --------------------------------------------------------------------------------------------
# Public ops.

def to_uint8_nhwc(images: torch.Tensor, *, backend: Backend = "auto", threads: int | None = None) -> torch.Tensor:
    """Float images in [-1, 1] to uint8 pixels, channels last.

    ``images``: (N, C, H, W), float32 / float16 / bfloat16, 1 to 4 channels, any strides, any device.
    Returns a contiguous (N, H, W, C) uint8 tensor on the same device:
    ``round_half_even(clamp(x*127.5 + 127.5, 0, 255))`` computed in fp32, NaN -> 0.
    ``threads``: worker threads of the C++ path (default ``torch.get_num_threads()``).
    """
    _check_images("images", images, _TO_UINT8_DTYPES, "(batch, channels, height, width)")
    n, c, h, w = images.shape
    if not 1 <= c <= _MAX_CHANNELS:
        raise InvalidArgumentError("images", f"tensor of shape {tuple(images.shape)}",
                                   f"1 to {_MAX_CHANNELS} channels in dim 1 (NCHW)")
    threads = _check_threads(threads)
    module = _select(backend, images.device)
    if module is None:
        return _to_uint8_torch(images)

    out = torch.empty((n, h, w, c), dtype=torch.uint8)  # (N, H, W, C), filled in place by C++
    if out.numel() == 0:
        return out
    src = _raw(images.detach().resolve_neg())  # 16-bit floats travel as their int16 bits
    module.to_uint8_nhwc(src.numpy(), _TO_UINT8_DTYPES[images.dtype], out.numpy(), threads)
    return out


def normalize_nchw(images_uint8_nhwc: torch.Tensor, mean: Sequence[float], std: Sequence[float], *,
                   out_dtype: torch.dtype = torch.float32, backend: Backend = "auto",
                   threads: int | None = None) -> torch.Tensor:
    """uint8 pixels, channels last, to normalised float channels-first (classifier preprocessing).

    ``images_uint8_nhwc``: (N, H, W, C) uint8, C >= 1, any strides, any device. ``mean``/``std``: C
    floats each (std non-zero). Returns a contiguous (N, C, H, W) tensor of ``out_dtype`` (float32,
    float16 or bfloat16) on the same device: ``((x / 255) - mean[c]) / std[c]`` in fp32, then cast.
    ``threads``: worker threads of the C++ path (default ``torch.get_num_threads()``).
    """
    images = _check_images("images_uint8_nhwc", images_uint8_nhwc, {torch.uint8: "uint8"},
                           "(batch, height, width, channels)")
    n, h, w, c = images.shape
    if c < 1:
        raise InvalidArgumentError("images_uint8_nhwc", f"tensor of shape {tuple(images.shape)}",
                                   "at least 1 channel in dim 3 (NHWC)")
    mean_v = _check_stats("mean", mean, c, nonzero=False)
    std_v = _check_stats("std", std, c, nonzero=True)
    if out_dtype not in _OUT_DTYPES:
        raise InvalidArgumentError("out_dtype", out_dtype, _OUT_DTYPES.values())
    threads = _check_threads(threads)
    module = _select(backend, images.device)
    if module is None:
        return _normalize_torch(images, mean_v, std_v, out_dtype)

    out = torch.empty((n, c, h, w), dtype=out_dtype)  # (N, C, H, W), filled in place by C++
    if out.numel() == 0:
        return out
    lut = _normalize_lut(mean_v, std_v, out_dtype)
    module.normalize_nchw_lut(images.detach().numpy(), lut, _raw(out).numpy(), threads)
    return out
