"""Quantization in plain PyTorch: the formats, the argument checks and the references of the quant kernels.

Every quant op has its plain PyTorch reference here, next to its Triton kernel (the CPU fallback and the
test oracle; this module never imports triton): :func:`quantize_per_token_reference` for
:mod:`fastgen.kernels.quantize_per_token`, :func:`int8_gemm_reference` and :func:`fp8_gemm_reference`
for :mod:`fastgen.kernels.gemm_int8` and :mod:`fastgen.kernels.gemm_fp8`, :func:`weight_only_gemm_reference` for
:mod:`fastgen.kernels.gemm_weight_only`, and the weight formats those kernels read
(:func:`quantize_weight`, :func:`dequantize_weight`, :func:`pack_int4`). ``fastgen.ops.quant`` dispatches
between them and re-exports them. Bad arguments raise :class:`InvalidArgumentError` naming the argument.

Conventions (symmetric quantization, ``x ~= q * scale``, amax over the row / channel / group):

- int8: ``scale = amax / 127``, ``q = clamp(round_half_even(x / scale), -127, 127)``.
- fp8 (``torch.float8_e4m3fn``): ``scale = amax / 448``, ``q = fp8_rne(clamp(x / scale, -448, 448))``.
- int4: ``scale = amax / 7`` per group, ``q = clamp(round_half_even(w / scale), -8, 7)`` (so in
  [-7, 7]; -8 is never produced but unpacks correctly), packed two per byte into uint8 ``(N, K // 2)``
  with the even k in the low nibble, as two's complement nibbles.
- ``x / scale`` is a true fp32 division (as in ONNX QuantizeLinear), not a multiply by a reciprocal.
- An all-zero row (or group) has ``amax == 0``; its scale is 1.0 (not 0, so ``x / scale`` stays
  finite) and its codes are all 0.
- Non-finite values are never hidden: an activation row holding a NaN or an infinity gets scale NaN
  (and codes 0), so the GEMM's output row is NaN (an int8 code has no NaN: clamping would turn the
  row into finite garbage); :func:`quantize_weight` refuses a weight holding one. Finite rows are
  unaffected, bit for bit.
- Every fp32 division (``amax / qmax``, ``x / scale``, ``x / smooth``) is IEEE round-to-nearest in the
  kernel too (``div_rn``), so the Triton quantizer is bit-exact against the reference.

GEMMs (``out = act(acc * w_scale[None, :] * x_scale[:, None] + bias)``, epilogue in fp32 in that order):

- ``int8_gemm``: int8 x int8 with an exact int32 accumulator (K <= 131072 so it cannot overflow);
  the reference computes it exactly in float64. ``fp8_gemm``: e4m3 x e4m3, fp32 accumulation.
- ``weight_only_gemm``: x (fp16/bf16/fp32) times int8 or packed-int4 weights dequantized in registers.
- x / xq may have leading batch dims ``(..., K)`` (flattened to ``M``; the scale then has shape
  ``(...)``); the output is ``(..., N)``. Weights are ``(N, K)`` (nn.Linear layout).
- ``activation``: ``"gelu"`` (exact, erf), ``"gelu_tanh"``, ``"silu"`` or None.
"""

from __future__ import annotations

from typing import Literal

import torch

from fastgen.errors import InvalidArgumentError, UnsupportedError

__all__ = ["ACTIVATIONS", "FLOAT_DTYPES", "GROUP_SIZES", "INT8_GEMM_MAX_K", "OUT_DTYPES", "QMAX", "apply_activation",
           "check_quantize_args", "check_scaled_gemm_args", "check_weight_only_args", "dequantize_weight",
           "flatten_rows", "fp8_dtype", "fp8_gemm_reference", "int8_gemm_reference", "pack_int4",
           "quantize_per_token_reference", "quantize_weight", "unpack_int4", "weight_only_gemm_reference"]

ACTIVATIONS = ("gelu", "gelu_tanh", "silu")
GROUP_SIZES = (32, 64, 128)
QMAX = {"int8": 127.0, "fp8": 448.0, "int4": 7.0}
# 128 * 128 * 131072 = 2**31: the int32 accumulator cannot overflow up to this K.
INT8_GEMM_MAX_K = 131072
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FP8 = getattr(torch, "float8_e4m3fn", None)


# ----------------------------------------------------------------------------------------- checks
def _check_tensor(name: str, t: object, dtypes: tuple, dims: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(name, type(t).__name__, "a torch.Tensor")
    if t.dtype not in dtypes:
        raise InvalidArgumentError(f"{name}.dtype", t.dtype, ", ".join(str(d) for d in dtypes))
    if dims is not None and t.dim() != dims:
        raise InvalidArgumentError(f"{name}.shape", tuple(t.shape), f"a {dims}-d tensor")
    return t


def _check_same_device(ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise InvalidArgumentError(f"{name}.device", t.device, f"the input's device {ref.device}")


def _check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise InvalidArgumentError(name, value, allowed)


def _check_bias(bias: torch.Tensor | None, n: int, ref: torch.Tensor) -> None:
    if bias is None:
        return
    _check_tensor("bias", bias, FLOAT_DTYPES)
    if tuple(bias.shape) != (n,):
        raise InvalidArgumentError("bias.shape", tuple(bias.shape), f"({n},)")
    _check_same_device(ref, bias=bias)


def fp8_dtype() -> torch.dtype:
    """``torch.float8_e4m3fn``, or :class:`UnsupportedError` on a torch without it (< 2.1)."""
    if _FP8 is None:
        raise UnsupportedError("fp8 quantization needs torch.float8_e4m3fn (torch >= 2.1)")
    return _FP8


def flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (M, K); a view when the leading dims allow it (a copy otherwise); 2-d as is."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


# ------------------------------------------------------------------------------ shared epilogue
def apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """The GEMM epilogue activation in PyTorch (fp32 in, fp32 out)."""
    if activation is None:
        return y
    if activation == "gelu":
        return torch.nn.functional.gelu(y)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(y, approximate="tanh")
    return torch.nn.functional.silu(y)


def _epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
              activation: str | None, out_dtype: torch.dtype) -> torch.Tensor:
    # acc (M, N) fp32; same operation order as the kernels: ((acc * ws) * xs) + bias.
    y = acc * w_scale.float()[None, :] * x_scale.float()[:, None]
    if bias is not None:
        y = y + bias.float()[None, :]
    return apply_activation(y, activation).to(out_dtype)


# -------------------------------------------------------------------------- per-token quantize
def check_quantize_args(x: torch.Tensor, dtype: str, smooth: torch.Tensor | None) -> None:
    """Raise :class:`InvalidArgumentError` naming the first bad argument of :func:`quantize_per_token_reference`."""
    _check_tensor("x", x, FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise InvalidArgumentError("x.shape", tuple(x.shape), "(..., K) with K >= 1")
    _check_choice("dtype", dtype, ("int8", "fp8"))
    if dtype == "fp8":
        fp8_dtype()
    if smooth is not None:
        _check_tensor("smooth", smooth, (torch.float32,))
        if tuple(smooth.shape) != (x.shape[-1],):
            raise InvalidArgumentError("smooth.shape", tuple(smooth.shape), f"({x.shape[-1]},) (x's last dim)")
        _check_same_device(x, smooth=smooth)


def _round_clamp(v: torch.Tensor, dtype: str) -> torch.Tensor:
    """Codes from fp32 ``v = x / scale``: int8/int4 (round half to even, clamp) or e4m3 (saturate, RNE)."""
    if dtype == "fp8":
        return v.clamp(-448.0, 448.0).to(fp8_dtype())
    lo, hi = (-8.0, 7.0) if dtype == "int4" else (-127.0, 127.0)
    return torch.round(v).clamp(lo, hi).to(torch.int8)


def _scale_from_amax(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """``amax / qmax``, 1 for an all-zero row/group, NaN for one holding a NaN or an infinity."""
    # Tensor / tensor: on CUDA torch computes ``tensor / float`` as ``tensor * (1 / float)``, which is
    # not the IEEE division the kernel does.
    scale = amax / torch.full_like(amax, qmax)
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))
    # torch's amax propagates NaN; a NaN (or infinite) amax would otherwise get scale 1 (or inf).
    return torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))


def quantize_per_token_reference(x: torch.Tensor, *, dtype: Literal["int8", "fp8"] = "int8",
                                 smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch per-token quantization; see :func:`quantize_per_token`."""
    check_quantize_args(x, dtype, smooth)
    xf = x.float()
    if smooth is not None:
        xf = xf / smooth
    scale = _scale_from_amax(xf.abs().amax(dim=-1), QMAX[dtype])  # (...,)
    # A non-finite row's codes: 0 (a NaN cast to int8 is undefined); its NaN scale carries the NaN.
    v = torch.where(torch.isnan(scale)[..., None], torch.zeros((), dtype=xf.dtype, device=xf.device),
                    xf / scale[..., None])
    return _round_clamp(v, dtype), scale


# ----------------------------------------------------------------------------- weights
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 ``(N, K)`` codes in [-8, 7] (K even) -> uint8 ``(N, K // 2)``, even k in the low nibble."""
    if q.shape[-1] % 2:
        raise InvalidArgumentError("q.shape[-1]", q.shape[-1], "an even number (two int4 per byte)")
    nib = q.to(torch.int16) & 0xF  # two's complement nibbles
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, K // 2)`` -> int8 ``(N, K)`` in [-8, 7] (inverse of :func:`pack_int4`)."""
    _check_tensor("packed", packed, (torch.uint8,))
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    both = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return ((both ^ 8) - 8).to(torch.int8)  # sign-extend the nibble


def _check_weight_format(dtype: str, group_size: int | None, k: int) -> None:
    _check_choice("dtype", dtype, ("int8", "fp8", "int4"))
    if group_size is not None:
        _check_choice("group_size", group_size, GROUP_SIZES if dtype != "fp8" else (None,))
        if k % group_size:
            raise InvalidArgumentError("group_size", group_size, f"a divisor of K={k} among {GROUP_SIZES}")
    elif dtype == "int4":
        raise InvalidArgumentError("group_size", None, GROUP_SIZES, reason="int4 needs a group size")


def quantize_weight(w: torch.Tensor, *, dtype: Literal["int8", "fp8", "int4"],
                    group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of a weight ``(N, K)`` (nn.Linear layout), any float dtype and device.

    ``group_size`` None: one scale per output channel, ``(N,)``; 32/64/128 (dividing K): one per
    group of K, ``(N, K // group_size)`` (int8 and int4; int4 requires it; fp8 is per channel only).
    Returns ``(wq, scale)``: int8 ``(N, K)``; fp8 e4m3 ``(N, K)``; int4 packed uint8 ``(N, K // 2)``.
    Scales are fp32; an all-zero channel/group gets scale 1.0.
    """
    _check_tensor("w", w, FLOAT_DTYPES + (torch.float64,), dims=2)
    n, k = w.shape
    _check_weight_format(dtype, group_size, k)
    if dtype == "fp8":
        fp8_dtype()
    wf = w.float()
    g = k if group_size is None else group_size
    wg = wf.reshape(n, k // g, g)
    amax = wg.abs().amax(dim=-1)  # (N, K // g); NaN / inf where the weight holds one
    if amax.device.type != "meta" and not bool(torch.isfinite(amax).all()):
        bad = int((~torch.isfinite(wf)).sum())
        raise InvalidArgumentError("w", f"a {tuple(w.shape)} weight with {bad} non-finite value(s)",
                                   reason="NaN and inf cannot be quantized (an int8 code has none: they would "
                                          "become finite garbage)")
    scale = _scale_from_amax(amax, QMAX[dtype])  # (N, K // g)
    q = _round_clamp(wg / scale[..., None], dtype).reshape(n, k)
    if dtype == "int4":
        q = pack_int4(q)
    return q, (scale[:, 0].contiguous() if group_size is None else scale)


def dequantize_weight(wq: torch.Tensor, scale: torch.Tensor, *, dtype: Literal["int8", "fp8", "int4"],
                      group_size: int | None = None) -> torch.Tensor:
    """fp32 ``(N, K)`` from :func:`quantize_weight`'s output: ``q * scale`` per channel or group."""
    _check_choice("dtype", dtype, ("int8", "fp8", "int4"))
    allowed = {"int8": (torch.int8,), "int4": (torch.uint8,), "fp8": (_FP8,)}[dtype]
    _check_tensor("wq", wq, allowed, dims=2)
    q = unpack_int4(wq) if dtype == "int4" else wq
    n, k = q.shape
    _check_weight_format(dtype, group_size, k)
    _check_tensor("scale", scale, (torch.float32,))
    g = k if group_size is None else group_size
    want = (n,) if group_size is None else (n, k // g)
    if tuple(scale.shape) != want:
        raise InvalidArgumentError("scale.shape", tuple(scale.shape), str(want))
    _check_same_device(wq, scale=scale)
    return (q.float().reshape(n, k // g, g) * scale.reshape(n, k // g, 1)).reshape(n, k)


# ------------------------------------------------------------------------------ W8A8 / FP8 GEMMs
def check_scaled_gemm_args(name: str, xq, x_scale, wq, w_scale, bias, activation, out_dtype,
                           qdtype: torch.dtype) -> tuple[int, int, int]:
    """Check the arguments of the int8 / fp8 GEMM ``name``; returns ``(M, N, K)`` (M = all rows of xq)."""
    _check_tensor("xq", xq, (qdtype,))
    if xq.dim() < 1:
        raise InvalidArgumentError("xq.shape", tuple(xq.shape), "(..., K)")
    _check_tensor("wq", wq, (qdtype,), dims=2)
    k = xq.shape[-1]
    n = wq.shape[0]
    if wq.shape[1] != k:
        raise InvalidArgumentError("wq.shape", tuple(wq.shape), f"(N, K={k}) (K = xq's last dim)")
    _check_tensor("x_scale", x_scale, (torch.float32,))
    if tuple(x_scale.shape) != tuple(xq.shape[:-1]):
        raise InvalidArgumentError("x_scale.shape", tuple(x_scale.shape), f"{tuple(xq.shape[:-1])} (xq's rows)")
    _check_tensor("w_scale", w_scale, (torch.float32,))
    if tuple(w_scale.shape) != (n,):
        raise InvalidArgumentError("w_scale.shape", tuple(w_scale.shape), f"({n},) (per output channel)")
    _check_same_device(xq, x_scale=x_scale, wq=wq, w_scale=w_scale)
    _check_bias(bias, n, xq)
    _check_choice("activation", activation, (*ACTIVATIONS, None))
    _check_choice("out_dtype", out_dtype, OUT_DTYPES)
    if name == "int8_gemm" and k > INT8_GEMM_MAX_K:
        raise InvalidArgumentError("xq.shape[-1]", k, f"K <= {INT8_GEMM_MAX_K} (int32 accumulator)")
    m = xq.numel() // max(k, 1)
    return m, n, k


def int8_gemm_reference(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, *,
                        bias: torch.Tensor | None = None, activation: str | None = None,
                        out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """PyTorch W8A8 GEMM; the int32 accumulator is computed exactly (in float64: |acc| < 2**53)."""
    check_scaled_gemm_args("int8_gemm", xq, x_scale, wq, w_scale, bias, activation, out_dtype, torch.int8)
    x2 = flatten_rows(xq)
    acc = (x2.to(torch.float64) @ wq.to(torch.float64).T).to(torch.float32)  # int32 -> fp32 rounding (RNE)
    out = _epilogue(acc, x_scale.reshape(-1), w_scale, bias, activation, out_dtype)
    return out.reshape(*xq.shape[:-1], wq.shape[0])


def fp8_gemm_reference(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, *,
                       bias: torch.Tensor | None = None, activation: str | None = None,
                       out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """PyTorch fp8 GEMM: e4m3 values upcast to fp32 (exact), fp32 matmul, the shared epilogue."""
    fp8 = fp8_dtype()
    check_scaled_gemm_args("fp8_gemm", xq, x_scale, wq, w_scale, bias, activation, out_dtype, fp8)
    acc = flatten_rows(xq).float() @ wq.float().T
    out = _epilogue(acc, x_scale.reshape(-1), w_scale, bias, activation, out_dtype)
    return out.reshape(*xq.shape[:-1], wq.shape[0])


# -------------------------------------------------------------------------- weight-only GEMM
def check_weight_only_args(x, wq, w_scale, bits, group_size, bias) -> tuple[int, int]:
    """Check the arguments of the weight-only GEMM; returns ``(N, K)``."""
    _check_tensor("x", x, FLOAT_DTYPES)
    if x.dim() < 1:
        raise InvalidArgumentError("x.shape", tuple(x.shape), "(..., K)")
    _check_choice("bits", bits, (8, 4))
    k = x.shape[-1]
    _check_tensor("wq", wq, (torch.int8,) if bits == 8 else (torch.uint8,), dims=2)
    n = wq.shape[0]
    kw = wq.shape[1] * (2 if bits == 4 else 1)
    if kw != k:
        want = f"(N, {k // 2}) (K // 2, two int4 per byte)" if bits == 4 else f"(N, {k})"
        raise InvalidArgumentError("wq.shape", tuple(wq.shape), f"{want} for x's K={k}")
    _check_weight_format("int4" if bits == 4 else "int8", group_size, k)
    _check_tensor("w_scale", w_scale, (torch.float32,))
    want = (n,) if group_size is None else (n, k // group_size)
    if tuple(w_scale.shape) != want:
        raise InvalidArgumentError("w_scale.shape", tuple(w_scale.shape), str(want))
    _check_same_device(x, wq=wq, w_scale=w_scale)
    _check_bias(bias, n, x)
    return n, k


def weight_only_gemm_reference(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, *, bits: int,
                               group_size: int | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch weight-only GEMM in fp32: ``x @ dequantize_weight(wq).T + bias``, cast to x's dtype."""
    n, k = check_weight_only_args(x, wq, w_scale, bits, group_size, bias)
    w = dequantize_weight(wq, w_scale, dtype="int4" if bits == 4 else "int8", group_size=group_size)
    y = flatten_rows(x).float() @ w.T
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
