"""Pieces shared by the tiled quant kernels: tile order, config keys and block checks (scaled GEMMs,
weight-only GEMM, per-token quantizer), and the one scaled GEMM behind :mod:`fastgen.kernels.gemm_int8`
and :mod:`fastgen.kernels.gemm_fp8`.

The scaled GEMM: xq ``(M, K)`` int8 or float8_e4m3fn (any strides) with per-row x_scale ``(M,)`` fp32,
wq ``(N, K)`` of the same type (nn.Linear layout, any strides; K-contiguous is what Hopper's int8 and
fp8 wgmma want for both operands, so this layout needs no transpose) with per-output-channel w_scale
``(N,)`` fp32, bias ``(N,)`` any float dtype; the result is a new contiguous ``(M, N)`` tensor in
out_dtype. Semantics are those of :func:`~fastgen.kernels.quant_reference.int8_gemm_reference` and
:func:`~fastgen.kernels.quant_reference.fp8_gemm_reference`:

    out = act(acc * w_scale[None, :] * x_scale[:, None] + bias),  acc = xq @ wq.T

One jit body, :func:`scaled_gemm_body`, takes the operand type as a constexpr (``IS_FP8``); each op
file's ``@triton.jit`` entry (``_int8_gemm_kernel``, ``_fp8_gemm_kernel``) only calls it with that
type fixed, and each op's launcher delegates to :func:`plan_scaled_gemm` / :func:`launch_scaled_gemm`
with its own kernel and launch-config table. The operand type decides the accumulator:

- int8: ``tl.dot`` with ``out_dtype=tl.int32``, exact (K <= 131072 so it cannot overflow), converted
  to fp32 for the epilogue. The epilogue runs in fp32 in the order written (the GPU may fuse the bias
  add into an FMA, so the output matches the reference to fp32 rounding, not bit for bit).
- fp8: ``tl.dot`` on ``float8e4nv`` operands maps to fp8 tensor cores on sm_89+ (Ada, Hopper); Triton
  has no e4m3fn on older GPUs, so the dispatcher sends those to the reference. Products of two e4m3
  values are exact in fp32, so the kernel differs from the reference only in summation order and in
  the tensor core's accumulation: Hopper's fp8 wgmma adds into an accumulator with fewer than fp32's
  mantissa bits, and Triton's default on sm_90 never promotes it (``max_num_imprecise_acc`` = 2**30,
  "fast accumulation"). By default (``FAST_ACCUM=False``) we pass ``max_num_imprecise_acc=BLOCK_K``:
  the partial sum of each K step is added into a true fp32 accumulator, the same trade as
  ``torch._scaled_mm``'s default ``use_fast_accum=False``. ``FAST_ACCUM=True`` keeps Triton's default
  (faster, less precise at large K).

Tiles: ``BLOCK_M x BLOCK_N`` outputs per program, ``BLOCK_K`` deep steps, programs ordered ``GROUP_M``
row tiles at a time for L2 reuse of W. Rows and columns beyond M / N are wrapped (``% M``) rather than
masked in the K loop, so only the K tail is masked there; the store is masked. int8 and fp8 share the
default tiles and autotune candidates, in separate launch-config tables (``gemm_int8``, ``gemm_fp8``).

Epilogue activation codes (constexpr ints, cheaper to specialise on than strings): 0 none, 1 ``gelu``
(exact, ``tl.math.erf``, present in Triton 3.0+ and supported by the interpreter), 2 ``gelu_tanh``
(tanh through exp, since ``tanh`` is only in libdevice, which the interpreter lacks), 3 ``silu``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.errors import InvalidArgumentError
from fastgen.kernels.device import check_launch_device
from fastgen.kernels.launch import KernelLaunch, arch_capability, compiled_misfit, launch_arch, run_launches
from fastgen.kernels.launch_configs import ConfigTable, arch_default

ACTIVATION_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}


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


def config_key(**parts) -> str:
    """Key of a kernel's config table (:mod:`fastgen.kernels.launch_configs`): ``m1024-n640-k320-out=float16...``."""
    return "-".join(f"{k}{str(v).removeprefix('torch.')}" for k, v in parts.items())


def m_bucket(m: int) -> int:
    """Autotune key for M: the next power of two (shapes in one bucket share a config)."""
    return triton.next_power_of_2(max(m, 1))


def check_block(name: str, value: int | None, minimum: int = 16) -> None:
    if value is not None and (value < minimum or value & (value - 1)):
        raise InvalidArgumentError(name, value, f"a power of two >= {minimum}")


# ----------------------------------------------------------------------------------- scaled GEMM
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


@triton.jit
def scaled_gemm_body(
    # pointers
    X, W, XS, WS, BIAS, OUT,
    # sizes
    M, N, K,
    # strides: x (M, K), w (N, K), out (M, N)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, IS_FP8: tl.constexpr, FAST_ACCUM: tl.constexpr,
):
    """One program of the scaled GEMM, int8 or fp8 e4m3 operands (``IS_FP8``); see the module docstring."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # Out-of-range rows/cols read a valid (wrapped) row instead of being masked; the store drops them.
    rows = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    cols = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    w_ptrs = W + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N)

    if IS_FP8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        if IS_FP8:  # a float zero: an int -> e4m3 cast of the padding does not lower on every target
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            if FAST_ACCUM:
                acc = tl.dot(a, b, acc)
            else:  # promote the tensor core's partial sum into fp32 once per K step (see the docstring)
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        else:
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    scaled_epilogue(acc.to(tl.float32), XS, WS, BIAS, OUT, M, N, stride_om, stride_on, pid_m, pid_n,
                    BLOCK_M, BLOCK_N, HAS_BIAS, ACTIVATION)


def scaled_gemm_default_config(kernel: str, m: int, arch: str) -> dict[str, int]:
    """Default tiles of a scaled GEMM (``kernel``: its table name) on ``arch``: the architecture's default
    table entry for M's class (``"m<=64"`` / ``"m>64"``: small M gets short tiles so more programs run),
    else a heuristic by compute capability. The same for int8 and fp8."""
    if arch == "cpu":
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
    major = arch_capability(arch)[0]
    bm = 64 if m <= 64 else 128
    if major >= 9 or bm == 128:
        # 128x128x128 on 8 warps: Hopper's wgmma tile; on Ampere / Ada the 4-warp 128x128x64 tile spills
        # inside the K loop at large M, this one does not (kernels/configs/sm80.json's figures).
        fallback = {"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8,
                    "num_warps": 8 if bm == 128 else 4, "num_stages": 4 if major >= 9 else 3}
    else:
        fallback = {"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    return arch_default(kernel, arch, "m<=64" if m <= 64 else "m>64", fallback)


# GPU autotuning candidates of both scaled GEMMs (never used under the interpreter or in tests).
SCALED_GEMM_AUTOTUNE_CONFIGS = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": w, "num_stages": s}
    for bm, bn, bk, w, s in ((128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                             (128, 128, 64, 4, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4),
                             (64, 64, 128, 4, 5), (128, 128, 256, 8, 3))
]


def _check_scaled_gemm(xq, x_scale, wq, w_scale, bias, activation, out_dtype, qdtype) -> None:
    """Shape/dtype checks of the scaled-GEMM launchers (2-d operands of type ``qdtype``)."""
    for name, t in (("xq", xq), ("wq", wq)):
        if t.dtype != qdtype or t.dim() != 2:
            raise InvalidArgumentError(name, (t.dtype, tuple(t.shape)), f"a 2-d {qdtype} tensor")
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


def plan_scaled_gemm(kernel, qdtype: torch.dtype, configs: ConfigTable,
                     xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, *,
                     arch: str, bias: torch.Tensor | None, activation: str | None, out_dtype: torch.dtype,
                     block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                     autotune: bool = False, extra_meta: dict[str, bool] | None = None,
                     config: dict[str, int] | None = None) -> tuple[torch.Tensor, list[KernelLaunch]]:
    """Check the arguments, allocate the ``(M, N)`` output and plan a scaled-GEMM launch on ``arch``.

    ``kernel``: an op's ``@triton.jit`` entry (the signature of :func:`scaled_gemm_body` without
    ``IS_FP8`` / ``FAST_ACCUM``); ``qdtype``: the operand type it takes; ``configs``: its launch-config
    table. ``extra_meta``: the op's own constexprs (fp8's ``FAST_ACCUM``), also part of the config key.
    ``block_*``: override the default tiles (powers of two >= 16); ``config``: a whole config instead of
    the tables. ``autotune``: on CUDA, time the table's candidates that fit the GPU once per (M bucket,
    N, K, epilogue) and persist the fastest. No launch when M or N is 0.
    """
    _check_scaled_gemm(xq, x_scale, wq, w_scale, bias, activation, out_dtype, qdtype)
    m, n, k = xq.shape[0], wq.shape[0], xq.shape[1]
    for name, blk in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        check_block(name, blk)
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out, []  # (K == 0 needs nothing special: the K loop is empty and acc stays 0)
    bias_arg = bias if bias is not None else x_scale  # never read without HAS_BIAS
    args = (xq, wq, x_scale.contiguous(), w_scale.contiguous(), bias_arg.contiguous(), out, m, n, k,
            *xq.stride(), *wq.stride(), *out.stride())
    extra_meta = dict(extra_meta or {})
    meta = {"HAS_BIAS": bias is not None, "ACTIVATION": ACTIVATION_CODES[activation], **extra_meta}

    def plan(cfg: dict[str, int]) -> list[KernelLaunch]:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        return [KernelLaunch(kernel, grid, args, {**meta, **cfg}, configs.kernel)]

    if config is not None:
        cfg = dict(config)
    else:
        key = config_key(m=m_bucket(m), n=n, k=k, out=out_dtype, bias=bias is not None, act=activation,
                         **extra_meta)
        cfg = configs.choose(key, arch, lambda c: run_launches(plan(c)),
                             scaled_gemm_default_config(configs.kernel, m, arch),
                             autotune and block_m is None and block_n is None and block_k is None,
                             fits=lambda c: compiled_misfit(plan(c)))
    for name, blk in (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_K", block_k)):
        if blk is not None:
            cfg[name] = blk
    return out, plan(cfg)


def launch_scaled_gemm(kernel, qdtype: torch.dtype, configs: ConfigTable, xq: torch.Tensor,
                       x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, **kwargs) -> torch.Tensor:
    """:func:`plan_scaled_gemm` for the operands' own device, then run it; returns the new ``(M, N)`` tensor."""
    check_launch_device("xq", xq)
    out, launches = plan_scaled_gemm(kernel, qdtype, configs, xq, x_scale, wq, w_scale,
                                     arch=launch_arch(xq.device), **kwargs)
    run_launches(launches)
    return out
