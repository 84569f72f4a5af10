"""Tensor ops with a plain PyTorch reference path and fast paths.

Host-side image conversions use the optional C++ extension (``fastgen._C``): ``available()`` says
whether it will be used; ``FASTGEN_DISABLE_EXT=1`` turns it off. ``attention`` dispatches to the
Triton kernel, PyTorch SDPA or the reference (loaded on first use: it registers a torch.library op).
"""

from __future__ import annotations

from fastgen.core.lazy import lazy_getattr
from fastgen.ops._ext import available
from fastgen.ops.image import normalize_nchw, to_uint8_nhwc

_LAZY = {"attention": "fastgen.ops.attention", "attention_reference": "fastgen.ops.attention",
         "OptimizeReport": "fastgen.ops.optimize"}
__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = ["OptimizeReport", "attention", "attention_reference", "available", "normalize_nchw", "to_uint8_nhwc"]
