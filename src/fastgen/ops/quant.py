"""Quantization ops: per-token activation quantization, weight quantization, quantized GEMMs.

Every op has a plain PyTorch reference (the CPU fallback and the test oracle) and a Triton kernel, both
in ``fastgen.kernels``: the references, the weight formats and the argument checks live in
:mod:`fastgen.kernels.quant_reference` (re-exported here; it never imports triton), this module
dispatches (and never imports triton at import time). Ops that run a kernel take
``backend``: ``"triton"``, ``"reference"`` or ``None`` (= triton for CUDA tensors when triton imports
and the GPU can serve the op, else the reference). CPU tensors run the triton backend only under the
Triton interpreter (``TRITON_INTERPRET=1``) and only when it is named explicitly. A named backend that
cannot serve a call raises :class:`UnsupportedError` naming the backend; bad arguments raise
:class:`InvalidArgumentError` naming the argument.

The conventions (symmetric scales, rounding, int4 packing, the fp32 divisions that keep the Triton
quantizer bit-exact) and the GEMMs' semantics (``out = act(acc * w_scale[None, :] * x_scale[:, None] +
bias)``, epilogue in fp32 in that order; x / xq may have leading batch dims ``(..., K)``, the output is
``(..., N)``; weights are ``(N, K)``, nn.Linear layout) are documented with the references, in
:mod:`fastgen.kernels.quant_reference`.

The triton paths are registered as ``torch.ops.fastgen.*`` custom ops (torch >= 2.4) with fake
implementations, so torch.compile / torch.export can trace through them.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.kernels.device import interpreting
from fastgen.kernels.quant_reference import (
    ACTIVATIONS,
    GROUP_SIZES,
    INT8_GEMM_MAX_K,
    QMAX,
    apply_activation,
    check_quantize_args,
    check_scaled_gemm_args,
    check_weight_only_args,
    dequantize_weight,
    flatten_rows,
    fp8_dtype,
    fp8_gemm_reference,
    int8_gemm_reference,
    pack_int4,
    quantize_per_token_reference,
    quantize_weight,
    unpack_int4,
    weight_only_gemm_reference,
)

__all__ = ["ACTIVATIONS", "BACKENDS", "GROUP_SIZES", "INT8_GEMM_MAX_K", "QMAX", "apply_activation",
           "dequantize_weight", "fp8_dtype", "fp8_gemm", "fp8_gemm_reference", "int8_gemm", "int8_gemm_reference",
           "pack_int4", "quantize_per_token", "quantize_per_token_reference", "quantize_weight", "unpack_int4",
           "weight_only_gemm", "weight_only_gemm_reference"]

Backend = Literal["triton", "reference"]
BACKENDS = ("triton", "reference")


# --------------------------------------------------------------------------------------- dispatch
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_violation(device: torch.device, fp8: bool) -> str | None:
    """Why the triton backend cannot serve a call on ``device`` (None if it can)."""
    if not _has_triton():
        return "this installation (triton is not installed)"
    if device.type == "cpu":
        return None if interpreting() else "device 'cpu' (allowed: cuda; cpu only with TRITON_INTERPRET=1)"
    if device.type != "cuda":
        return f"device {device.type!r} (allowed: cuda)"
    if fp8 and torch.version.hip is not None:
        return "fp8 on ROCm (e4m3fn kernels are written for NVIDIA sm_89+)"
    if torch.version.hip is None and torch.cuda.get_device_capability(device) < (8, 0):
        # Launch configs exist for sm80+ only (kernels/configs/<arch>.json, compiled by the CI gate).
        cap = torch.cuda.get_device_capability(device)
        return f"compute capability {cap[0]}.{cap[1]} (allowed: 8.0 and newer)"
    if fp8 and torch.cuda.get_device_capability(device) < (8, 9):
        # Triton's float8e4nv (e4m3fn) exists on sm_89+ only (Ada, Hopper and newer).
        cap = torch.cuda.get_device_capability(device)
        return f"fp8 (e4m3) on compute capability {cap[0]}.{cap[1]} (allowed: 8.9 and newer)"
    return None


def _select(op: str, backend: str | None, device: torch.device, fp8: bool = False) -> str:
    """The backend that runs ``op``: validated when named, chosen when None."""
    if backend is None:
        if device.type == "cuda" and _triton_violation(device, fp8) is None:
            return "triton"
        return "reference"
    if backend not in BACKENDS:
        raise InvalidArgumentError("backend", backend, (*BACKENDS, None))
    if backend == "triton":
        reason = _triton_violation(device, fp8)
        if reason is not None:
            raise UnsupportedError(f"{op} backend 'triton' does not support {reason}")
    return backend


# ------------------------------------------------------------------------------ ops
def quantize_per_token(x: torch.Tensor, *, dtype: Literal["int8", "fp8"] = "int8",
                       smooth: torch.Tensor | None = None,
                       backend: Backend | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row (token) quantization of x ``(..., K)`` (fp16/bf16/fp32, any strides).

    ``smooth``: optional fp32 ``(K,)`` divisor applied first (SmoothQuant: ``x / smooth``).
    Returns ``(xq, scale)``: xq ``(..., K)`` int8 (round half to even, clamp [-127, 127]) or
    float8_e4m3fn (saturated to +-448), contiguous; scale ``(...,)`` fp32 = amax / 127 (or / 448),
    1.0 for an all-zero row. The kernel computes and applies the scales in one launch.
    """
    check_quantize_args(x, dtype, smooth)
    if _select("quantize_per_token", backend, x.device, fp8=dtype == "fp8") == "reference":
        return quantize_per_token_reference(x, dtype=dtype, smooth=smooth)
    if _HAS_CUSTOM_OP:
        return torch.ops.fastgen.quantize_per_token(x, smooth, dtype == "fp8")
    return _triton_quantize(x, smooth, dtype == "fp8")


def int8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, *,
              bias: torch.Tensor | None = None, activation: Literal["gelu", "gelu_tanh", "silu"] | None = None,
              out_dtype: torch.dtype = torch.float16, backend: Backend | None = None) -> torch.Tensor:
    """``act(int32(xq @ wq.T) * w_scale[None, :] * x_scale[:, None] + bias)`` in ``out_dtype``.

    xq ``(..., K)`` int8 with x_scale ``(...)`` fp32 (e.g. from :func:`quantize_per_token`), wq
    ``(N, K)`` int8 with w_scale ``(N,)`` fp32 (:func:`quantize_weight` per channel), bias ``(N,)``
    any float dtype; out_dtype fp16, bf16 or fp32; returns ``(..., N)``.
    """
    m, n, k = check_scaled_gemm_args("int8_gemm", xq, x_scale, wq, w_scale, bias, activation, out_dtype,
                                      torch.int8)
    if _select("int8_gemm", backend, xq.device) == "reference":
        return int8_gemm_reference(xq, x_scale, wq, w_scale, bias=bias, activation=activation, out_dtype=out_dtype)
    x2, s2 = flatten_rows(xq), x_scale.reshape(-1)
    if _HAS_CUSTOM_OP:
        out = torch.ops.fastgen.int8_gemm(x2, s2, wq, w_scale, bias, activation, out_dtype)
    else:
        out = _triton_scaled_gemm(x2, s2, wq, w_scale, bias, activation, out_dtype, False)
    return out.reshape(*xq.shape[:-1], n)


def fp8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, *,
             bias: torch.Tensor | None = None, activation: Literal["gelu", "gelu_tanh", "silu"] | None = None,
             out_dtype: torch.dtype = torch.bfloat16, backend: Backend | None = None) -> torch.Tensor:
    """:func:`int8_gemm` with float8_e4m3fn operands, fp32 accumulation and row-wise scales.

    The triton backend needs compute capability 8.9+ on CUDA (Hopper: fp8 tensor cores).
    """
    fp8 = fp8_dtype()
    m, n, k = check_scaled_gemm_args("fp8_gemm", xq, x_scale, wq, w_scale, bias, activation, out_dtype, fp8)
    if _select("fp8_gemm", backend, xq.device, fp8=True) == "reference":
        return fp8_gemm_reference(xq, x_scale, wq, w_scale, bias=bias, activation=activation, out_dtype=out_dtype)
    x2, s2 = flatten_rows(xq), x_scale.reshape(-1)
    if _HAS_CUSTOM_OP:
        out = torch.ops.fastgen.fp8_gemm(x2, s2, wq, w_scale, bias, activation, out_dtype)
    else:
        out = _triton_scaled_gemm(x2, s2, wq, w_scale, bias, activation, out_dtype, True)
    return out.reshape(*xq.shape[:-1], n)


def weight_only_gemm(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, *, bits: Literal[8, 4],
                     group_size: int | None = None, bias: torch.Tensor | None = None,
                     backend: Backend | None = None) -> torch.Tensor:
    """``x @ dequant(wq).T + bias`` in x's dtype, the weights dequantized in registers.

    x ``(..., K)`` fp16/bf16/fp32; bits 8: wq int8 ``(N, K)``; bits 4: packed uint8 ``(N, K // 2)``
    (group_size required); w_scale ``(N,)`` (per channel) or ``(N, K // group_size)``. Meant for
    small M (text encoders, classifiers at small batch), where the GEMM is bound by weight reads.
    """
    n, k = check_weight_only_args(x, wq, w_scale, bits, group_size, bias)
    if _select("weight_only_gemm", backend, x.device) == "reference":
        return weight_only_gemm_reference(x, wq, w_scale, bits=bits, group_size=group_size, bias=bias)
    x2 = flatten_rows(x)
    if _HAS_CUSTOM_OP:
        out = torch.ops.fastgen.weight_only_gemm(x2, wq, w_scale, bits, group_size, bias)
    else:
        out = _triton_weight_only(x2, wq, w_scale, bits, group_size, bias)
    return out.reshape(*x.shape[:-1], n)


# ------------------------------------------------------------------- triton paths (lazy imports)
def _triton_quantize(x, smooth, fp8):
    from fastgen.kernels.quantize_per_token import quantize_per_token_fwd

    return quantize_per_token_fwd(x, smooth=smooth, fp8=fp8)


def _triton_scaled_gemm(xq, x_scale, wq, w_scale, bias, activation, out_dtype, fp8):
    from fastgen.kernels.gemm_fp8 import fp8_gemm_fwd
    from fastgen.kernels.gemm_int8 import int8_gemm_fwd

    fwd = fp8_gemm_fwd if fp8 else int8_gemm_fwd
    return fwd(xq, x_scale, wq, w_scale, bias=bias, activation=activation, out_dtype=out_dtype)


def _triton_weight_only(x, wq, w_scale, bits, group_size, bias):
    from fastgen.kernels.gemm_weight_only import weight_only_gemm_fwd

    return weight_only_gemm_fwd(x, wq, w_scale, bits=bits, group_size=group_size, bias=bias)


_HAS_CUSTOM_OP = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")
if _HAS_CUSTOM_OP:
    try:
        @torch.library.custom_op("fastgen::quantize_per_token", mutates_args=(),
                                 schema="(Tensor x, Tensor? smooth, bool fp8) -> (Tensor, Tensor)")
        def _quantize_op(x, smooth, fp8):
            return _triton_quantize(x, smooth, fp8)

        @_quantize_op.register_fake
        def _(x, smooth, fp8):
            qd = fp8_dtype() if fp8 else torch.int8
            return x.new_empty(x.shape, dtype=qd), x.new_empty(x.shape[:-1], dtype=torch.float32)

        _GEMM_SCHEMA = ("(Tensor xq, Tensor x_scale, Tensor wq, Tensor w_scale, Tensor? bias, str? activation, "
                        "ScalarType out_dtype) -> Tensor")

        @torch.library.custom_op("fastgen::int8_gemm", mutates_args=(), schema=_GEMM_SCHEMA)
        def _int8_gemm_op(xq, x_scale, wq, w_scale, bias, activation, out_dtype):
            return _triton_scaled_gemm(xq, x_scale, wq, w_scale, bias, activation, out_dtype, False)

        @torch.library.custom_op("fastgen::fp8_gemm", mutates_args=(), schema=_GEMM_SCHEMA)
        def _fp8_gemm_op(xq, x_scale, wq, w_scale, bias, activation, out_dtype):
            return _triton_scaled_gemm(xq, x_scale, wq, w_scale, bias, activation, out_dtype, True)

        def _gemm_fake(xq, x_scale, wq, w_scale, bias, activation, out_dtype):
            return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)

        _int8_gemm_op.register_fake(_gemm_fake)
        _fp8_gemm_op.register_fake(_gemm_fake)

        @torch.library.custom_op(
            "fastgen::weight_only_gemm", mutates_args=(),
            schema="(Tensor x, Tensor wq, Tensor w_scale, int bits, int? group_size, Tensor? bias) -> Tensor")
        def _weight_only_op(x, wq, w_scale, bits, group_size, bias):
            return _triton_weight_only(x, wq, w_scale, bits, group_size, bias)

        @_weight_only_op.register_fake
        def _(x, wq, w_scale, bits, group_size, bias):
            return x.new_empty((x.shape[0], wq.shape[0]))
    except RuntimeError:  # already registered (module imported twice under another name)
        _HAS_CUSTOM_OP = all(hasattr(torch.ops.fastgen, n) for n in
                             ("quantize_per_token", "int8_gemm", "fp8_gemm", "weight_only_gemm"))
