"""fastgen int8 attention: the Triton kernel (interpreted on the CPU) against its PyTorch simulation.

Two oracles:

- ``attention_int8_reference`` (the simulation) performs the kernel's quantization and blockwise
  online softmax in fp32 PyTorch, with the same blocks. The int8 values and scales are bit-identical
  (checked directly), int8 score matmuls are exact in fp32, and fp16/e4m3 products are exact in fp32,
  so the two differ only by fp32 summation order and exp2's last bit. Tolerance: one unit in the last
  place of the output dtype at the output's magnitude (the final cast can round either way; the
  interpreter casts to bf16 by truncation), plus ``1e-4 * max|v|`` for the rare P element whose fp16 /
  e4m3 rounding flips on that last fp32 bit.
- fp32 ``attention_reference``: quantization error is judged by cosine similarity (SageAttention's
  metric) >= 0.999 over the whole output, for the kernel and the simulation.

Outputs are NaN-poisoned first so an element the kernel forgets to write shows up.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from fastgen.errors import InvalidArgumentError
from fastgen.ops.attention import attention_reference
from fastgen.ops.attention_int8 import (
    attention_int8_reference,
    fp8_v_scales,
    k_mean,
    quantize_blocks,
    resolve_pv,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
COS_MIN = 0.999
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -20}
BLK = {"block_m": 32, "block_n": 32}  # the kernel's blocks under the interpreter


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def _qkv(batch, seq_q, seq_k, heads, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, head_dim, generator=g)
    k = torch.randn(batch, seq_k, heads, head_dim, generator=g)
    v = torch.randn(batch, seq_k, heads, head_dim, generator=g)
    return q, k, v


def _run_kernel(q, k, v, **kw):
    """The kernel writing into a NaN-poisoned output; fails if any element was left unwritten."""
    from fastgen.kernels.attention_int8 import attention_int8_fwd

    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    res = attention_int8_fwd(q, k, v, out=out, **kw)
    assert res is out
    assert not torch.isnan(out).any(), "kernel left elements of the output unwritten"
    return out


def _assert_tight(out, sim, v):
    """|kernel - simulation| <= 1 ulp of the output at its magnitude + 1e-4 * max|v| (module docstring)."""
    mag = max(sim.float().abs().max().item(), 1e-3)
    tol = ULP[out.dtype] * mag + 1e-4 * v.float().abs().max().item()
    err = (out.float() - sim.float()).abs().max().item()
    assert err <= tol, f"kernel vs simulation max err {err:.3g} > {tol:.3g}"


def _check(q, k, v, dtype, pv="fp16", **kw):
    """Kernel vs simulation (tight) and both vs fp32 (cosine); returns (kernel, fp32 reference)."""
    ref = attention_reference(q.float(), k.float(), v.float(), **kw)
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    out = _run_kernel(qd, kd, vd, pv=pv, **kw)
    sim = attention_int8_reference(qd, kd, vd, pv=pv, **BLK, **kw)
    assert out.dtype == dtype and out.shape == q.shape and sim.dtype == dtype
    _assert_tight(out, sim, vd)
    assert cosine(sim, ref) >= COS_MIN, f"simulation cosine {cosine(sim, ref):.6f}"
    assert cosine(out, ref) >= COS_MIN, f"kernel cosine {cosine(out, ref):.6f}"
    return out, ref


# ---- quantization -------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_int8_is_bit_identical_to_reference(dtype):
    from fastgen.kernels.attention_int8 import quantize_int8

    g = torch.Generator().manual_seed(5)
    packed = (torch.randn(2, 77, 3, 2, 80, generator=g) * 3 + 1).to(dtype)
    k = packed[:, :, 1]  # strided view of a fused qkv tensor
    k[0, :, 1] = 0  # an all-zero (batch, head): scale 0, values 0
    shift = k_mean(k)
    k8, ks = quantize_int8(k, 32, shift=shift, mult=0.7, width=96)
    r8, rs = quantize_blocks(k, 32, shift=shift, mult=0.7)
    assert k8.shape == (2, 2, 96, 96) and ks.shape == (2, 2, 3)
    assert torch.equal(k8[:, :, :77, :80], r8) and torch.equal(ks, rs)
    assert not k8[:, :, 77:].any() and not k8[..., 80:].any(), "padding must be zeros"
    assert not ks[0, 1].any()
    # the int8 codes use the range: the block maximum maps to +-127
    top = torch.stack([r8[:, :, i:i + 32].abs().amax(dim=(-1, -2)) for i in (0, 32, 64)], -1)
    assert torch.equal(top, torch.where(rs > 0, 127, 0).to(torch.int8))
    deq = r8.float() * rs.repeat_interleave(32, -1)[..., :77, None] / 0.7
    want = (k.float() - shift[:, None]).transpose(1, 2)
    assert (deq - want).abs().max() <= rs.max() / 0.7 / 2 * 1.0001  # half a step


@needs_triton
def test_e4m3_rounding_matches_torch_on_grid_and_ties():
    """The V fp8 pass rounds exactly like torch (nearest, ties to even), subnormals included."""
    from fastgen.kernels.attention_int8 import quantize_v_fp8

    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].unique()  # 0 .. 448
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties
    near = torch.cat([mids * (1 + 2 ** -20), mids * (1 - 2 ** -20)])
    vals = torch.cat([grid, mids, near])
    vals = torch.cat([vals, -vals])  # (n,)
    v = vals[None, :, None, None].expand(1, -1, 1, 2).contiguous()  # (1, n, 1, 2); amax 448 per channel
    v_inv = torch.ones(1, 1, 2)
    v8 = quantize_v_fp8(v, v_inv, 32, 16)  # (1, 1, 16, seq_pad)
    got = v8[0, 0, :2, : vals.numel()].float()
    want = vals.to(torch.float8_e4m3fn).float()
    assert torch.equal(got[0], want) and torch.equal(got[1], want)
    assert not v8[0, 0, 2:].float().any()


@needs_triton
def test_head_dim_chunks_respect_dot_minimums():
    from fastgen.kernels.attention_int8 import int8_head_dim_chunks

    assert int8_head_dim_chunks(40) == ((32, 32), (32, 16))
    assert int8_head_dim_chunks(64) == ((64, 0), (64, 0))
    assert int8_head_dim_chunks(80) == ((64, 32), (64, 16))
    assert int8_head_dim_chunks(160) == ((128, 32), (128, 32))
    assert int8_head_dim_chunks(4) == ((32, 0), (16, 0))
    for d in range(1, 257):
        (q0, q1), (v0, v1) = int8_head_dim_chunks(d)
        assert q0 >= 32 and (q1 == 0 or q1 >= 32) and q0 + q1 >= d  # int8 dot: K >= 32
        assert v0 >= 16 and (v1 == 0 or v1 >= 16) and v0 + v1 >= d  # P.V: N >= 16


def test_smoothing_recovers_keys_with_a_channel_offset():
    """Keys with a large shared offset (as in real models): smoothing keeps int8 scores accurate."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 64, 2, 64, generator=g)
    k = torch.randn(1, 64, 2, 64, generator=g) * 0.5 + 8 * torch.randn(1, 1, 2, 64, generator=g)
    v = torch.randn(1, 64, 2, 64, generator=g)
    shift = k_mean(k)

    def score_sqnr_db(shift_):
        """SQNR of the scores' softmax-relevant part: each row minus its mean (a per-row constant)."""
        q8, qs = quantize_blocks(q, 64)
        k8, ks = quantize_blocks(k, 64, shift=shift_)
        exact = torch.einsum("bqhd,bkhd->bhqk", q, k)
        approx = (q8.float() * qs[..., None]) @ (k8.float() * ks[..., None]).transpose(-1, -2)  # one block
        exact, approx = (s - s.mean(dim=-1, keepdim=True) for s in (exact, approx))
        return 10 * torch.log10(exact.pow(2).sum() / (exact - approx).pow(2).sum()).item()

    assert score_sqnr_db(shift) > score_sqnr_db(None) + 10
    ref = attention_reference(q, k, v)
    assert cosine(attention_int8_reference(q.half(), k.half(), v.half(), block_m=64, block_n=64), ref) >= COS_MIN


# ---- the kernel ---------------------------------------------------------------------------------

# (batch, seq_q, seq_k, heads, head_dim, dtype, causal, masked, pv): each feature in a few combos.
CASES = [
    (1, 1, 1, 1, 64, torch.float16, False, False, "fp16"),
    (2, 77, 77, 1, 40, torch.float16, False, False, "fp16"),
    (1, 113, 113, 2, 80, torch.float16, True, False, "fp16"),
    (1, 113, 77, 1, 160, torch.float16, False, True, "fp16"),    # cross-attention, 77 keys, padding
    (1, 1, 77, 2, 128, torch.float16, False, False, "fp16"),     # one query
    (1, 77, 113, 1, 64, torch.float32, True, True, "fp16"),      # causal cross-attention + padding
    (1, 113, 77, 1, 40, torch.bfloat16, True, False, "fp16"),    # seq_q > seq_k: leading rows see nothing
    (1, 257, 257, 1, 64, torch.float16, True, False, "fp16"),
    (1, 257, 77, 1, 40, torch.float16, False, False, "fp8"),
    (1, 77, 77, 2, 80, torch.bfloat16, False, True, "fp8"),
    (1, 113, 113, 1, 160, torch.float16, True, False, "fp8"),
    (2, 1, 77, 1, 128, torch.float32, False, False, "fp8"),
    (1, 33, 40, 1, 96, torch.float16, False, False, "fp16"),     # 64 + 32 chunks
    (1, 20, 20, 1, 8, torch.float16, False, False, "fp8"),       # tiny head dim: int8 tile padded to 32
]


@needs_triton
@pytest.mark.parametrize("batch,seq_q,seq_k,heads,head_dim,dtype,causal,masked,pv", CASES)
def test_kernel_matches_simulation_and_fp32(batch, seq_q, seq_k, heads, head_dim, dtype, causal, masked, pv):
    q, k, v = _qkv(batch, seq_q, seq_k, heads, head_dim)
    mask = None
    if masked:
        mask = torch.rand(batch, seq_k, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[:, 0] = True
    _check(q, k, v, dtype, pv=pv, mask=mask, causal=causal)


@needs_triton
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
def test_kernel_empty_rows_are_zero(pv):
    q, k, v = _qkv(2, 9, 77, 2, 80)
    mask = torch.ones(2, 77, dtype=torch.bool)
    mask[1] = False  # batch 1: no key at all
    out, ref = _check(q, k, v, torch.float16, pv=pv, mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].abs().sum() > 0
    # causal with more queries than keys: the first seq_q - seq_k rows see no key
    out = _run_kernel(*_qkv(1, 40, 7, 1, 40), causal=True, pv=pv)
    assert torch.equal(out[:, :33], torch.zeros_like(out[:, :33])) and out[:, 33:].abs().sum() > 0


@needs_triton
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
def test_kernel_strided_inputs(pv):
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 77, 3, 2, 40, generator=g).half()  # packed (batch, seq, 3, heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    _check(q, k, v, torch.float16, pv=pv, causal=True)
    # transposed (batch, heads, seq, dim) storage, a strided head dim, a strided mask, a strided output
    qt = torch.randn(1, 2, 45, 40, generator=g).transpose(1, 2)           # (1, 45, 2, 40)
    kt = torch.randn(1, 2, 77, 40, generator=g).transpose(1, 2)
    vw = torch.randn(1, 77, 2, 80, generator=g)[..., ::2]                 # head-dim stride 2
    mask = (torch.rand(1, 154, generator=g) > 0.2)[:, ::2]
    _check(qt, kt, vw, torch.float32, pv=pv, mask=mask, scale=0.3)
    from fastgen.kernels.attention_int8 import attention_int8_fwd

    out = torch.full((1, 2, 45, 40), float("nan")).transpose(1, 2)  # non-contiguous output buffer
    attention_int8_fwd(qt, kt, vw, out=out, mask=mask, scale=0.3, pv=pv)
    sim = attention_int8_reference(qt, kt, vw, mask=mask, scale=0.3, pv=pv, **BLK)
    _assert_tight(out, sim, vw)


@needs_triton
def test_kernel_block_override_and_default_output():
    from fastgen.kernels.attention_int8 import attention_int8_fwd

    q, k, v = (t.half() for t in _qkv(1, 50, 61, 1, 48))
    out = attention_int8_fwd(q, k, v, block_m=16, block_n=64, pv="fp16")
    assert out.is_contiguous() and out.shape == q.shape and out.dtype == torch.float16
    _assert_tight(out, attention_int8_reference(q, k, v, block_m=16, block_n=64), v)
    # pv=None on a CPU tensor is fp16
    torch.testing.assert_close(attention_int8_fwd(q, k, v, block_m=16, block_n=64), out, atol=0, rtol=0)


@needs_triton
def test_kernel_argument_errors():
    from fastgen.kernels.attention_int8 import attention_int8_fwd

    q, k, v = (t.half() for t in _qkv(1, 5, 6, 1, 32))
    with pytest.raises(InvalidArgumentError, match="head_dim"):
        attention_int8_fwd(*(t.half() for t in _qkv(1, 5, 6, 1, 264)))
    with pytest.raises(InvalidArgumentError, match="v"):
        attention_int8_fwd(q, k, v[:, :5])
    with pytest.raises(InvalidArgumentError, match="q.dtype"):
        attention_int8_fwd(q.double(), k.double(), v.double())
    with pytest.raises(InvalidArgumentError, match="mask"):
        attention_int8_fwd(q, k, v, mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(InvalidArgumentError, match="out"):
        attention_int8_fwd(q, k, v, out=torch.empty(1, 5, 1, 32))
    with pytest.raises(InvalidArgumentError, match="pv"):
        attention_int8_fwd(q, k, v, pv="int8")
    with pytest.raises(InvalidArgumentError, match="block_n"):
        attention_int8_fwd(q, k, v, block_n=16)
    with pytest.raises(InvalidArgumentError, match="block_m"):
        attention_int8_fwd(q, k, v, block_m=48)


def test_reference_argument_errors_and_defaults():
    q, k, v = (t.half() for t in _qkv(1, 5, 6, 1, 32))
    with pytest.raises(InvalidArgumentError, match="q.dtype"):
        attention_int8_reference(q.double(), k.double(), v.double())
    with pytest.raises(InvalidArgumentError, match="pv"):
        attention_int8_reference(q, k, v, pv="fp4")
    with pytest.raises(InvalidArgumentError, match="block_n"):
        attention_int8_reference(q, k, v, block_n=24)
    assert resolve_pv(None, torch.device("cpu")) == "fp16"
    out = attention_int8_reference(q, k, v)  # default blocks (128, 64)
    assert out.dtype == torch.float16 and cosine(out, attention_reference(q.float(), k.float(), v.float())) > COS_MIN
    v_inv, o_mult = fp8_v_scales(torch.zeros(1, 3, 1, 4))
    assert not v_inv.any() and not o_mult.any()


def test_reference_imports_no_triton():
    code = ("import sys, torch; from fastgen.ops.attention_int8 import attention_int8_reference as f; "
            "q = torch.randn(1, 9, 1, 40).half(); f(q, q, q, pv='fp8'); "
            "assert 'triton' not in sys.modules, 'triton imported'")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ---- GPU ----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
@pytest.mark.parametrize("head_dim", [40, 64, 80, 128, 160])
def test_cuda_kernel_matches_simulation(pv, head_dim):
    from fastgen.kernels.attention_int8 import _default_config, attention_int8_fwd
    from fastgen.kernels.launch import launch_arch

    if pv == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 P.V needs compute capability >= 8.9")
    q, k, v = (t.cuda().half() for t in _qkv(2, 1031, 77 if head_dim == 80 else 1031, 4, head_dim))
    mask = torch.rand(2, k.shape[1], device="cuda") > 0.2
    for causal in (False, True):
        ref = attention_reference(q.float(), k.float(), v.float(), mask=mask, causal=causal)
        out = attention_int8_fwd(q, k, v, mask=mask, causal=causal, pv=pv)
        cfg = _default_config(head_dim, pv, launch_arch(q.device))
        sim = attention_int8_reference(q, k, v, mask=mask, causal=causal, pv=pv,
                                       block_m=cfg["BLOCK_M"], block_n=cfg["BLOCK_N"])
        assert cosine(out, ref) >= COS_MIN and cosine(sim, ref) >= COS_MIN
        # GPU exp2 is approximate (ex2.approx), so P's roundings flip more often than on the CPU.
        assert (out.float() - sim.float()).abs().max().item() <= 1e-2
    # the quantization pass is bit-identical to the reference on the GPU too (no fma contraction there)
    from fastgen.kernels.attention_int8 import quantize_int8

    k8, ks = quantize_int8(k, 64, shift=k_mean(k), mult=0.3)
    r8, rs = quantize_blocks(k, 64, shift=k_mean(k), mult=0.3)
    assert torch.equal(k8[:, :, :k.shape[1], :head_dim], r8) and torch.equal(ks, rs)
    tuned = attention_int8_fwd(q, k, v, mask=mask, pv=pv, autotune=True)
    assert cosine(tuned, attention_reference(q.float(), k.float(), v.float(), mask=mask)) >= COS_MIN
    assert resolve_pv(None, q.device) == ("fp8" if torch.cuda.get_device_capability() >= (8, 9) else "fp16")
