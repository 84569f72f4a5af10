"""fastgen's Triton quantization kernels (interpreted on the CPU) against the PyTorch references.

Promises checked: ``quantize_per_token`` (int8 and fp8) is bit-exact against the reference (codes and
scales); the int8 GEMM's int32 accumulator is exact (unit scales, fp32 output, |acc| < 2**24 so the
fp32 result is the integer itself) and its epilogue matches to fp32 rounding; the fp8 and weight-only
GEMMs are within 2x the error of the same math in PyTorch (plus a tiny epsilon) against an fp64 oracle.
Sizes are odd (M in 1, 77, 113, 257; K and N not multiples of the blocks), inputs non-contiguous
(transposed and sliced views). ``cuda`` tests run the same comparisons in bf16 on a GPU.
"""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch

from fastgen.ops import quant as Q

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
FP8 = torch.float8_e4m3fn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``t`` (2-d) in a non-contiguous layout."""
    if how == "transposed":  # column-major storage
        return t.T.contiguous().T
    if how == "sliced":  # every other column of a wider buffer
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t


def _assert_equal_codes(q: torch.Tensor, ref: torch.Tensor) -> None:
    assert q.dtype == ref.dtype and q.shape == ref.shape and q.is_contiguous()
    if q.dtype == FP8:
        q, ref = q.view(torch.uint8), ref.view(torch.uint8)
    mism = (q != ref).sum().item()
    assert mism == 0, f"{mism} codes differ from the reference"


# ----------------------------------------------------------------------------- quantize_per_token
@pytest.mark.parametrize("m, k, dtype, qdtype, layout", [
    (1, 40, torch.float32, "int8", "contiguous"),
    (77, 100, torch.float16, "int8", "transposed"),
    (113, 40, torch.float32, "fp8", "sliced"),
    (257, 24, torch.float16, "fp8", "contiguous"),
    (77, 40, torch.bfloat16, "int8", "sliced"),
])
def test_quantize_per_token_bit_exact(m, k, dtype, qdtype, layout):
    x = (torch.randn(m, k, generator=_gen(m + k)) * 4).to(dtype)
    x[m // 2] = 0  # all-zero row
    x = _strided(x, layout)
    q, s = Q.quantize_per_token(x, dtype=qdtype, backend="triton")
    rq, rs = Q.quantize_per_token_reference(x, dtype=qdtype)
    _assert_equal_codes(q, rq)
    assert torch.equal(s, rs) and s[m // 2].item() == 1.0


@pytest.mark.parametrize("qdtype", ["int8", "fp8"])
def test_quantize_per_token_smooth_3d_and_two_pass(qdtype):
    from fastgen.kernels.quantize_per_token import quantize_per_token_fwd

    x = torch.randn(2, 40, 37, generator=_gen(5)).transpose(1, 2)  # (2, 37, 40), non-contiguous
    smooth = torch.rand(40, generator=_gen(6)) + 0.25
    rq, rs = Q.quantize_per_token_reference(x, dtype=qdtype, smooth=smooth)
    for block_k in (None, 16):  # 16 < K: the two-read path (amax pass, then codes)
        q, s = quantize_per_token_fwd(x, smooth=smooth, fp8=qdtype == "fp8", block_k=block_k)
        _assert_equal_codes(q, rq)
        assert torch.equal(s, rs)


def test_quantize_per_token_ties_and_fp8_grid():
    # Row 0: amax 127 -> scale 1, codes round half to even. Row 1: amax 448 -> fp8 scale 1 and values on,
    # between and halfway between e4m3 grid points (normals and subnormals, ties included).
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, 127.0, 3.5, -3.5, 100.5, 0.0, 0.0])
    grid = torch.tensor([448.0, 17.0, 18.0, 19.0, -13.5, 0.009765625, 0.0029296875, 2**-10, 2**-9 * 1.5,
                         0.001, 300.0, -240.0])
    for x, qdtype in ((ties, "int8"), (grid, "fp8")):
        q, s = Q.quantize_per_token(x[None], dtype=qdtype, backend="triton")
        rq, rs = Q.quantize_per_token_reference(x[None], dtype=qdtype)
        _assert_equal_codes(q, rq)
        assert s.item() == 1.0 and rs.item() == 1.0
    assert Q.quantize_per_token(ties[None], backend="triton")[0][0, :6].tolist() == [0, 2, 2, 0, -2, 126]


# ------------------------------------------------------------------------------------ int8 GEMM
@pytest.mark.parametrize("m, n, k, layout", [(1, 40, 100, "contiguous"), (77, 100, 40, "transposed"),
                                             (113, 24, 64, "sliced"), (257, 40, 48, "contiguous")])
def test_int8_gemm_accumulator_exact(m, n, k, layout):
    g = _gen(m * n + k)
    xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    xq[0], wq[0] = -128, -128  # the extreme product, K times
    xq, wq = _strided(xq, layout), _strided(wq, "transposed" if layout == "sliced" else "contiguous")
    ones_m, ones_n = torch.ones(m), torch.ones(n)
    out = Q.int8_gemm(xq, ones_m, wq, ones_n, out_dtype=torch.float32, backend="triton")
    exact = (xq.long()[:, None, :] * wq.long()[None, :, :]).sum(-1)  # int64 oracle; |acc| < 2**24 here
    assert torch.equal(out.double(), exact.double())
    assert torch.equal(out, Q.int8_gemm_reference(xq, ones_m, wq, ones_n, out_dtype=torch.float32))


@pytest.mark.parametrize("activation, out_dtype, bias_dtype", [
    (None, torch.float32, torch.float32), ("gelu", torch.float32, torch.float16),
    ("gelu_tanh", torch.float32, None), ("silu", torch.float32, torch.bfloat16),
    ("gelu", torch.float16, torch.float32), (None, torch.bfloat16, torch.float32),
])
def test_int8_gemm_epilogue(activation, out_dtype, bias_dtype):
    g = _gen(11)
    m, n, k = 77, 40, 100
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(m, generator=g) / 127, torch.rand(n, generator=g) / 127
    bias = None if bias_dtype is None else torch.randn(n, generator=g).to(bias_dtype)
    out = Q.int8_gemm(xq, xs, wq, ws, bias=bias, activation=activation, out_dtype=out_dtype, backend="triton")
    ref = Q.int8_gemm_reference(xq, xs, wq, ws, bias=bias, activation=activation, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n)
    if out_dtype == torch.float32:  # same fp32 operations; only erf/exp implementations may differ by ulps
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)
    else:  # at most one ulp of the output format apart (the interpreter's bf16 cast is not exactly RNE)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7 if out_dtype == torch.bfloat16 else 2**-10,
                                   atol=1e-3)


def test_int8_gemm_leading_dims_zero_rows_and_k_zero():
    from fastgen.kernels.gemm_int8 import int8_gemm_fwd

    x = torch.randn(2, 5, 40, generator=_gen(12))
    x[1, 2] = 0
    w = torch.randn(24, 40, generator=_gen(13))
    xq, xs = Q.quantize_per_token(x, backend="triton")
    wq, ws = Q.quantize_weight(w, dtype="int8")
    out = Q.int8_gemm(xq, xs, wq, ws, out_dtype=torch.float32, backend="triton")
    assert out.shape == (2, 5, 24) and (out[1, 2] == 0).all()
    torch.testing.assert_close(out, Q.int8_gemm_reference(xq, xs, wq, ws, out_dtype=torch.float32))
    bias = torch.randn(24)
    empty = int8_gemm_fwd(xq[0, :, :0], xs[0], wq[:, :0], ws, bias=bias, out_dtype=torch.float32)
    assert torch.equal(empty, bias.expand(5, 24))


# ------------------------------------------------------------------------------------- fp8 GEMM
@pytest.mark.parametrize("m, n, k, layout, activation", [(1, 40, 100, "contiguous", None),
                                                         (77, 100, 40, "sliced", "gelu"),
                                                         (113, 24, 64, "transposed", "silu")])
def test_fp8_gemm_within_twice_torch_error(m, n, k, layout, activation):
    g = _gen(m + 3 * n + k)
    x, w, bias = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    xq, xs = Q.quantize_per_token(_strided(x, layout), dtype="fp8", backend="triton")
    wq, ws = Q.quantize_weight(w, dtype="fp8")
    out = Q.fp8_gemm(xq, xs, wq, ws, bias=bias, activation=activation, out_dtype=torch.float32, backend="triton")
    # fp64 oracle of the same quantized operands; "torch" = the fp32 reference (same math, fp32 sums).
    acc = xq.double() @ wq.double().T
    oracle = Q.apply_activation(acc * xs.double()[:, None] * ws.double()[None, :] + bias.double(), activation)
    base = Q.fp8_gemm_reference(xq, xs, wq, ws, bias=bias, activation=activation, out_dtype=torch.float32)
    err_k = (out.double() - oracle).abs().max().item()
    err_t = (base.double() - oracle).abs().max().item()
    assert err_k <= 2 * err_t + 1e-5, f"kernel err {err_k:.3g} vs torch fp32 err {err_t:.3g}"
    out16 = Q.fp8_gemm(xq, xs, wq, ws, bias=bias, activation=activation, backend="triton")
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), base, rtol=2**-7, atol=1e-3)  # one bf16 ulp


def test_scaled_gemm_one_body_both_operand_types():
    """int8 and fp8 run the one scaled-GEMM body of ``_gemm_common`` (the operand type a constexpr) through thin
    per-op entries, each launcher only takes its own operand type, and each keeps its own launch-config table
    (the kernel names tables were keyed by)."""
    from fastgen.errors import InvalidArgumentError
    from fastgen.kernels import _gemm_common, gemm_fp8, gemm_int8

    g = _gen(31)
    x, w = torch.randn(9, 40, generator=g), torch.randn(24, 40, generator=g)
    for qdtype, mod, fwd, other in (("int8", gemm_int8, gemm_int8.int8_gemm_fwd, gemm_fp8.fp8_gemm_fwd),
                                    ("fp8", gemm_fp8, gemm_fp8.fp8_gemm_fwd, gemm_int8.int8_gemm_fwd)):
        xq, xs = Q.quantize_per_token_reference(x, dtype=qdtype)
        wq, ws = Q.quantize_weight(w, dtype=qdtype)
        ref = getattr(Q, f"{qdtype}_gemm_reference")(xq, xs, wq, ws, out_dtype=torch.float32)
        torch.testing.assert_close(fwd(xq, xs, wq, ws, out_dtype=torch.float32), ref)
        with pytest.raises(InvalidArgumentError, match="xq"):
            other(xq, xs, wq, ws)
        assert mod.CONFIGS.kernel == f"gemm_{qdtype}"
        assert mod.AUTOTUNE_CONFIGS is _gemm_common.SCALED_GEMM_AUTOTUNE_CONFIGS
    for entry, fp8 in ((gemm_int8._int8_gemm_kernel, "False"), (gemm_fp8._fp8_gemm_kernel, "True")):
        src = inspect.getsource(entry.fn)  # the entry only calls the shared body, its operand type fixed
        assert "scaled_gemm_body(" in src and f"IS_FP8={fp8}" in src and "tl.dot" not in src
    assert "IS_FP8" not in gemm_int8._int8_gemm_kernel.arg_names + gemm_fp8._fp8_gemm_kernel.arg_names


# ------------------------------------------------------------------------------- weight-only GEMM
@pytest.mark.parametrize("m, n, k, bits, group, dtype, layout", [
    (1, 40, 128, 8, None, torch.float32, "contiguous"),
    (77, 100, 100, 8, None, torch.float16, "sliced"),      # K tail (100 = 3 x 32 + 4)
    (113, 24, 64, 8, 32, torch.float32, "transposed"),
    (257, 40, 128, 4, 32, torch.float16, "contiguous"),
    (77, 24, 256, 4, 128, torch.float32, "sliced"),
    (1, 100, 64, 4, 64, torch.float16, "contiguous"),  # (bf16 tl.dot does not run in the interpreter)
])
def test_weight_only_gemm_within_twice_torch_error(m, n, k, bits, group, dtype, layout):
    g = _gen(m + n + k + bits)
    x, w, bias = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    wq, ws = Q.quantize_weight(w, dtype="int8" if bits == 8 else "int4", group_size=group)
    xd = _strided(x.to(dtype), layout)
    out = Q.weight_only_gemm(xd, wq, ws, bits=bits, group_size=group, bias=bias, backend="triton")
    assert out.dtype == dtype and out.shape == (m, n)
    wd = Q.dequantize_weight(wq, ws, dtype="int8" if bits == 8 else "int4", group_size=group)
    oracle = xd.double() @ wd.double().T + bias.double()
    # Same math in PyTorch at the kernel's precision: weights dequantized to x's dtype, output in x's dtype.
    base = (xd.float() @ wd.to(dtype).float().T + bias).to(dtype) if dtype != torch.float32 else \
        xd @ wd.T + bias
    err_k = (out.double() - oracle).abs().max().item()
    err_t = (base.double() - oracle).abs().max().item()
    eps = 1e-5 if dtype == torch.float32 else 1e-3
    assert err_k <= 2 * err_t + eps, f"kernel err {err_k:.3g} vs torch {dtype} err {err_t:.3g}"


def test_weight_only_leading_dims_and_zero_channel():
    w = torch.randn(24, 64, generator=_gen(21))
    w[5] = 0
    wq, ws = Q.quantize_weight(w, dtype="int4", group_size=32)
    x = torch.randn(3, 7, 64, generator=_gen(22))
    out = Q.weight_only_gemm(x, wq, ws, bits=4, group_size=32, backend="triton")
    ref = Q.weight_only_gemm_reference(x, wq, ws, bits=4, group_size=32)
    assert out.shape == (3, 7, 24) and (out[..., 5] == 0).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------- GPU (bf16)
@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("m", [1, 77, 113, 257, 2048])
def test_cuda_bf16_quantize_and_int8_gemm(m):
    k, n = 1280, 5120 if m == 2048 else 320
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    smooth = torch.rand(k, device="cuda") + 0.5
    xq, xs = Q.quantize_per_token(x, smooth=smooth, backend="triton")
    rq, rs = Q.quantize_per_token_reference(x, smooth=smooth)
    _assert_equal_codes(xq, rq)
    assert torch.equal(xs, rs)
    wq, ws = Q.quantize_weight(w, dtype="int8")
    ones = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
    acc = Q.int8_gemm(xq, ones[0], wq, ones[1], out_dtype=torch.float32, backend="triton")
    acc_ref = Q.int8_gemm_reference(xq, ones[0], wq, ones[1], out_dtype=torch.float32)
    assert torch.equal(acc, acc_ref)  # |acc| < 127 * 127 * 1280 < 2**25: fp32 rounding identical
    for act in (None, "gelu", "silu"):
        out = Q.int8_gemm(xq, xs, wq, ws, bias=bias, activation=act, out_dtype=torch.bfloat16, backend="triton")
        ref = Q.int8_gemm_reference(xq, xs, wq, ws, bias=bias, activation=act, out_dtype=torch.bfloat16)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-2)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("m", [1, 77, 257, 2048])
def test_cuda_fp8_gemm(m):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 e4m3 kernels need compute capability 8.9+")
    k, n = 1280, 640
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    xq, xs = Q.quantize_per_token(x, dtype="fp8", backend="triton")
    rq, rs = Q.quantize_per_token_reference(x, dtype="fp8")
    _assert_equal_codes(xq, rq)
    wq, ws = Q.quantize_weight(w, dtype="fp8")
    oracle = (xq.double() @ wq.double().T) * xs.double()[:, None] * ws.double()[None, :]
    base = Q.fp8_gemm_reference(xq, xs, wq, ws, out_dtype=torch.float32)
    out = Q.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32, backend="triton")
    err_k = (out.double() - oracle).abs().max().item()
    err_t = (base.double() - oracle).abs().max().item()
    assert err_k <= 2 * err_t + 1e-3, f"kernel err {err_k:.3g} vs torch fp32 err {err_t:.3g}"
    out_bf16 = Q.fp8_gemm(xq, xs, wq, ws, activation="gelu", backend="triton")
    ref_bf16 = Q.fp8_gemm_reference(xq, xs, wq, ws, activation="gelu")
    torch.testing.assert_close(out_bf16.float(), ref_bf16.float(), rtol=2**-7, atol=1e-2)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("m, bits, group", [(1, 8, None), (77, 4, 128), (16, 4, 32), (257, 8, 64)])
def test_cuda_bf16_weight_only(m, bits, group):
    k, n = 768, 3072
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    wq, ws = Q.quantize_weight(w, dtype="int8" if bits == 8 else "int4", group_size=group)
    out = Q.weight_only_gemm(x, wq, ws, bits=bits, group_size=group, backend="triton")
    wd = Q.dequantize_weight(wq, ws, dtype="int8" if bits == 8 else "int4", group_size=group)
    oracle = x.double() @ wd.double().T
    base = x @ wd.to(torch.bfloat16).T  # cuBLAS bf16 on the dequantized weights
    err_k = (out.double() - oracle).abs().max().item()
    err_t = (base.double() - oracle).abs().max().item()
    assert out.dtype == torch.bfloat16
    assert err_k <= 2 * err_t + 1e-2, f"kernel err {err_k:.3g} vs torch bf16 err {err_t:.3g}"
