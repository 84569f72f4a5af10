"""Quantized attention (SageAttention style), the ``triton-int8`` backend of :func:`fastgen.ops.attention`.

The PyTorch reference (the CPU fallback and the test oracle) and its pieces live next to the kernel, in
:mod:`fastgen.kernels.attention_int8_reference`, which documents the algorithm; they are re-exported
here under their ``fastgen.ops.attention_int8`` names. Nothing here imports triton.
"""

from __future__ import annotations

from fastgen.kernels.attention_int8_reference import (
    DTYPES,
    FP8_MAX,
    LOG2E,
    PV_MODES,
    attention_int8_reference,
    check_blocks,
    default_blocks,
    fp8_v_scales,
    k_mean,
    quantize_blocks,
    resolve_pv,
)

__all__ = ["DTYPES", "FP8_MAX", "LOG2E", "PV_MODES", "attention_int8_reference", "check_blocks",
           "default_blocks", "fp8_v_scales", "k_mean", "quantize_blocks", "resolve_pv"]
