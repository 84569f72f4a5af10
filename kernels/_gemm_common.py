"""Pieces shared by the quantized GEMM kernels: tile order, epilogue activation, launch helpers.

Activation codes (constexpr ints, cheaper to specialise on than strings): 0 none, 1 ``gelu`` (exact,
``tl.math.erf``, present in Triton 3.0+ and supported by the interpreter), 2 ``gelu_tanh`` (tanh
through exp, since ``tanh`` is only in libdevice, which the interpreter lacks), 3 ``silu``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastgen.errors import InvalidArgumentError

ACTIVATION_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
_TL_OUT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, GROUP_M row tiles at a time so their W tiles stay in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % size_m)
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def activation(y, ACTIVATION: tl.constexpr):
    """The epilogue activation on an fp32 tile."""
    if ACTIVATION == 1:  # gelu (erf)
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == 2:  # gelu_tanh; tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|) <= 1: no overflow
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        y = 0.5 * y * (1.0 + tl.where(u < 0.0, -t, t))
    elif ACTIVATION == 3:  # silu = y * sigmoid(y); sigmoid from e = exp(-|y|) <= 1: no overflow
        e = tl.exp(-tl.abs(y))
        y = y * tl.where(y < 0.0, e, 1.0) / (1.0 + e)
    return y


@triton.jit
def scaled_epilogue(acc, XS, WS, BIAS, OUT, M, N, stride_om, stride_on, pid_m, pid_n,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ACTIVATION: tl.constexpr):
    """out = act(acc * ws[None, :] * xs[:, None] + bias), masked store; acc is an fp32 (BLOCK_M, BLOCK_N) tile.

    The weight scale first: ONNX Runtime's MatMulIntegerToFloat (the exported W8A8 graph) dequantizes
    the accumulator by the per-column scale in its GEMM, and the per-token scale follows; the same
    order keeps the exported graph bit-exact against these kernels and their reference."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    xs = tl.load(XS + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
    ws = tl.load(WS + offs_n, mask=n_ok, other=0.0)  # (BLOCK_N,)
    y = acc * ws[None, :] * xs[:, None]
    if HAS_BIAS:
        y = y + tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = activation(y, ACTIVATION)
    out_ptrs = OUT + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, y.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def check_scaled_gemm_launch(xq, x_scale, wq, w_scale, bias, activation, out_dtype, qdtype) -> tuple[int, int, int]:
    """Shape/dtype checks shared by the int8 and fp8 launchers (2-d operands)."""
    for name, t, dt in (("xq", xq, qdtype), ("wq", wq, qdtype)):
        if t.dtype != dt or t.dim() != 2:
            raise InvalidArgumentError(name, (t.dtype, tuple(t.shape)), f"a 2-d {dt} tensor")
    m, k = xq.shape
    n = wq.shape[0]
    if wq.shape[1] != k:
        raise InvalidArgumentError("wq.shape", tuple(wq.shape), f"(N, K={k})")
    if x_scale.dtype != torch.float32 or tuple(x_scale.shape) != (m,):
        raise InvalidArgumentError("x_scale", (x_scale.dtype, tuple(x_scale.shape)), f"float32 ({m},)")
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (n,):
        raise InvalidArgumentError("w_scale", (w_scale.dtype, tuple(w_scale.shape)), f"float32 ({n},)")
    if bias is not None and tuple(bias.shape) != (n,):
        raise InvalidArgumentError("bias.shape", tuple(bias.shape), f"({n},)")
    if activation not in ACTIVATION_CODES:
        raise InvalidArgumentError("activation", activation, tuple(ACTIVATION_CODES))
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise InvalidArgumentError("out_dtype", out_dtype, "float16, bfloat16, float32")
    check_launch_device("xq", xq)
    return m, n, k


def launch_scaled_gemm(kernel, default_config, configs, xq, x_scale, wq, w_scale, bias, activation, out_dtype,
                       block_m, block_n, block_k, autotune, extra_meta=None) -> torch.Tensor:
    """Allocate the output and launch a scaled GEMM kernel (int8 or fp8 share the signature).

    ``extra_meta``: kernel-specific constexprs (also part of the autotune key).
    """
    m, n, k = xq.shape[0], wq.shape[0], xq.shape[1]
    for name, blk in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        check_block(name, blk)
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out  # (K == 0 needs nothing special: the K loop is empty and acc stays 0)
    bias_arg = bias if bias is not None else x_scale  # never read without HAS_BIAS
    args = (xq, wq, x_scale.contiguous(), w_scale.contiguous(), bias_arg.contiguous(), out, m, n, k,
            *xq.stride(), *wq.stride(), *out.stride())
    extra_meta = dict(extra_meta or {})
    meta = {"HAS_BIAS": bias is not None, "ACTIVATION": ACTIVATION_CODES[activation], **extra_meta}

    def launch(cfg: dict[str, int]) -> None:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        kernel[grid](*args, **meta, **cfg)

    key = config_key(m=m_bucket(m), n=n, k=k, out=out_dtype, bias=bias is not None, act=activation, **extra_meta)
    cfg = configs.choose(key, xq.device, launch, default_config(m, n, k, xq.device),
                         autotune and block_m is None and block_n is None and block_k is None)
    for name, blk in (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_K", block_k)):
        if blk is not None:
            cfg[name] = blk
    launch(cfg)
    return out


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_launch_device(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise InvalidArgumentError(f"{name}.device", t.device, "cuda (or cpu with TRITON_INTERPRET=1)")


def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device; (0, 0) under the interpreter."""
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def config_key(**parts) -> str:
    """Key of a kernel's config table (:mod:`fastgen.kernels.tuning`): ``m1024-n640-k320-out=float16...``."""
    return "-".join(f"{k}{str(v).removeprefix('torch.')}" for k, v in parts.items())


def m_bucket(m: int) -> int:
    """Autotune key for M: the next power of two (shapes in one bucket share a config)."""
    return triton.next_power_of_2(max(m, 1))


def check_block(name: str, value: int | None, minimum: int = 16) -> None:
    if value is not None and (value < minimum or value & (value - 1)):
        raise InvalidArgumentError(name, value, f"a power of two >= {minimum}")
