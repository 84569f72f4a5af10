"""The TMA attention kernel (``fastgen.kernels.attention_tma``) under Triton's interpreter.

Triton's interpreter runs host ``TensorDescriptor`` arguments and descriptor loads / stores (it turns
them into masked pointer accesses with TMA's zero fill and dropped out-of-bounds stores), so the kernel's
arithmetic, its tile coordinates and its boundary handling are checked here against
``attention_reference`` like the pointer kernel is: error <= 2 x SDPA's at the same dtype + eps, output
written into a NaN-poisoned buffer. The interpreter has no bf16 arithmetic (the pointer kernel is wrong
there too), so bf16 is only planned, not run. What only a GPU shows (wgmma / tcgen05, warp
specialisation, shared memory) is checked by compiling the planned launch ahead of time.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.kernels.attention_reference import attention_reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

EPS = 1e-4  # fp16 ulp at 1.0 is ~1e-3


def _qkv(batch, seq_q, seq_k, heads, head_dim, seed=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, head_dim, generator=g)
    k = torch.randn(batch, seq_k, heads, head_dim, generator=g)
    v = torch.randn(batch, seq_k, heads, head_dim, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _run(q, k, v, *, mask=None, causal=False, scale=None, out=None, cfg=None):
    from fastgen.kernels.attention_tma import default_tma_config, plan_attention_tma

    if out is None:
        out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    launches = plan_attention_tma(q, k, v, out, mask=mask, causal=causal, sm_scale=scale,
                                  cfg=cfg or default_tma_config(q.shape[-1], "cpu"), arch="cpu")
    assert len(launches) == 1
    for launch in launches:
        launch.run()
    return out


def _check(q, k, v, **kw):
    """err(kernel) <= 2 * err(SDPA in fp16) + eps, both against the fp32 reference; nothing left unwritten."""
    out = _run(q, k, v, **kw)
    assert not torch.isnan(out).any(), "kernel left elements of the output unwritten"
    ref_kw = {"mask": kw.get("mask"), "causal": kw.get("causal", False), "scale": kw.get("scale")}
    ref = attention_reference(q.float(), k.float(), v.float(), **ref_kw)
    base = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=ref_kw["scale"],
        attn_mask=_sdpa_mask(q, k, ref_kw["mask"], ref_kw["causal"])).transpose(1, 2)
    base = torch.nan_to_num(base, nan=0.0)  # SDPA gives NaN for rows with no visible key; the contract is 0
    err_k = (out.float() - ref).abs().max().item()
    err_t = (base.float() - ref).abs().max().item()
    assert err_k <= 2 * err_t + EPS, f"kernel err {err_k:.3g} vs torch fp16 err {err_t:.3g}"
    return out, ref


def _sdpa_mask(q, k, mask, causal):
    sq, sk = q.shape[1], k.shape[1]
    vis = torch.ones(q.shape[0], 1, sq, sk, dtype=torch.bool)
    if mask is not None:
        vis &= mask[:, None, None, :]
    if causal:
        vis &= torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    return vis


# (batch, seq_q, seq_k, heads, head_dim, causal, masked)
CASES = [
    (2, 77, 77, 2, 40, False, False),     # 32 + 16 chunks, columns 40..47 zero-filled by TMA
    (1, 113, 113, 2, 80, True, False),    # 64 + 16, causal, odd length
    (2, 77, 113, 2, 64, True, True),      # causal cross-attention + padding, batch boundary
    (1, 113, 77, 1, 40, True, False),     # seq_q > seq_k: the first 36 rows see nothing
    (2, 1, 77, 2, 64, False, True),       # one query
    (1, 1, 1, 1, 64, False, False),       # one query, one key
    (1, 33, 40, 1, 160, False, True),     # 128 + 32
    (2, 17, 23, 1, 256, True, False),     # one 256 chunk
    (1, 33, 77, 2, 96, False, False),     # 64 + 32
]


@pytest.mark.parametrize("batch,seq_q,seq_k,heads,head_dim,causal,masked", CASES)
def test_tma_kernel_matches_reference(batch, seq_q, seq_k, heads, head_dim, causal, masked):
    q, k, v = _qkv(batch, seq_q, seq_k, heads, head_dim)
    mask = None
    if masked:
        mask = torch.rand(batch, seq_k, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[:, 0] = True
    _check(q, k, v, mask=mask, causal=causal)


def test_tma_kernel_empty_rows_are_zero():
    q, k, v = _qkv(2, 9, 77, 2, 80)
    mask = torch.ones(2, 77, dtype=torch.bool)
    mask[1] = False  # batch 1: no key at all
    out, _ = _check(q, k, v, mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].abs().sum() > 0
    out = _run(*_qkv(1, 20, 7, 1, 40), causal=True)  # rows 0..12 see no key
    assert torch.equal(out[:, :13], torch.zeros_like(out[:, :13])) and out[:, 13:].abs().sum() > 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the poisoned batch / head itself computes NaNs
def test_tma_tiles_stay_inside_their_batch_and_head():
    """Out-of-bounds zero fill is per (batch, head): poison the neighbours the tails would touch."""
    q, k, v = _qkv(2, 45, 45, 2, 40)  # 45 = 32 + 13: partial q and k/v tiles; 40 = 32 + 16
    k[1] = float("inf")  # the batch after batch 0's seq tail
    v[1] = float("nan")
    k[:, :, 1] = float("nan")  # the head after head 0's head-dim tail (columns 40..47 of head 0)
    v[:, :, 1] = float("inf")
    out = _run(q, k, v)
    ref = attention_reference(q[:1, :, :1].float(), k[:1, :, :1].float(), v[:1, :, :1].float())
    assert torch.isfinite(out[0, :, 0]).all()
    assert (out[0, :, 0].float() - ref[0, :, 0]).abs().max() < 2e-3


def test_tma_strided_views_and_output_view():
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 77, 3, 2, 80, generator=g).half()  # packed (batch, seq, 3, heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    _check(q, k, v, causal=True)
    # (batch, heads, seq, dim) storage seen as (batch, seq, heads, dim), scale override
    qt = torch.randn(1, 2, 45, 64, generator=g).half().transpose(1, 2)
    kt = torch.randn(1, 2, 77, 64, generator=g).half().transpose(1, 2)
    vt = torch.randn(1, 2, 77, 64, generator=g).half().transpose(1, 2)
    _check(qt, kt, vt, scale=0.3)
    # the output is a view whose head-dim tail columns belong to someone else: TMA must not write them
    q, k, v = _qkv(1, 45, 45, 2, 40)
    big = torch.full((1, 45, 2, 48), float("nan"), dtype=torch.float16)
    out = _run(q, k, v, out=big[..., :40])
    assert torch.isnan(big[..., 40:]).all()
    ref = attention_reference(q.float(), k.float(), v.float())
    assert (out.float() - ref).abs().max() < 2e-3


def test_tma_size_one_dims_with_odd_strides():
    """A size-1 dimension's stride is never used: an unaligned one is accepted (and replaced)."""
    from fastgen.kernels.attention_tma import tma_layout_ok

    q, k, v = _qkv(1, 1, 30, 2, 64)
    q = torch.as_strided(q.clone(), (1, 1, 2, 64), (3, 3, 64, 1))
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    assert tma_layout_ok(q, k, v, out) is None
    _check(q, k, v)


def test_tma_warp_specialize_flag_and_block_sizes():
    q, k, v = _qkv(1, 50, 61, 2, 48)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "WARP_SPECIALIZE": 1}
    _check(q, k, v, causal=True, cfg=cfg)


def test_tma_layout_rejections():
    from fastgen.kernels.attention_tma import plan_attention_tma, tma_layout_ok

    q, k, v = _qkv(1, 8, 8, 2, 64)
    out = torch.empty_like(q)
    assert tma_layout_ok(q, k, v, out) is None
    assert tma_layout_ok(q.bfloat16(), k.bfloat16(), v.bfloat16(), out.bfloat16()) is None
    assert "float16/bfloat16" in tma_layout_ok(q.float(), k.float(), v.float(), out.float())
    strided = torch.empty(1, 8, 2, 128, dtype=torch.float16)[..., ::2]  # head-dim stride 2
    assert "stride" in tma_layout_ok(q, k, strided, out)
    q36, k36, v36 = _qkv(1, 8, 8, 2, 36)  # seq/head strides of 72 bytes
    assert "multiple of 16" in tma_layout_ok(q36, k36, v36, torch.empty_like(q36))
    shifted = torch.empty(q.numel() + 1, dtype=torch.float16)[1:].view(q.shape)  # 2-byte offset
    assert "aligned" in tma_layout_ok(shifted, k, v, out)
    q8, k8, v8 = _qkv(1, 8, 8, 2, 8)
    assert "head_dim" in tma_layout_ok(q8, k8, v8, torch.empty_like(q8))
    with pytest.raises(UnsupportedError, match="multiple of 16"):
        plan_attention_tma(q36, k36, v36, torch.empty_like(q36), mask=None, causal=False, sm_scale=0.1,
                           cfg={"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}, arch="sm90")
    with pytest.raises(UnsupportedError, match="sm_90"):
        plan_attention_tma(q, k, v, out, mask=None, causal=False, sm_scale=0.1,
                           cfg={"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}, arch="sm80")
    with pytest.raises(InvalidArgumentError, match="out"):
        plan_attention_tma(q, k, v, out[:, :4], mask=None, causal=False, sm_scale=0.1,
                           cfg={"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}, arch="sm90")


def test_tma_plan_for_gpu_targets_launches_nothing():
    from fastgen.kernels.attention_tma import WARP_SPECIALIZE_OK, default_tma_config, plan_attention_tma

    q, k, v = _qkv(2, 300, 77, 3, 80, dtype=torch.bfloat16)
    mask = torch.ones(2, 77, dtype=torch.bool)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    for arch in ("sm90", "sm100"):
        cfg = default_tma_config(80, arch)
        (launch,) = plan_attention_tma(q, k, v, out, mask=mask, causal=True, sm_scale=0.1, cfg=cfg, arch=arch)
        assert launch.name == "_attn_fwd_tma_kernel" and launch.table == "attention_tma"
        assert launch.grid == (-(-300 // cfg["BLOCK_M"]), 6)
        assert launch.kwargs["D0"] == 64 and launch.kwargs["D1"] == 16 and launch.kwargs["HAS_D1"]
        assert launch.kwargs["WARP_SPECIALIZE"] == (cfg["WARP_SPECIALIZE"] if WARP_SPECIALIZE_OK else 0)
        assert launch.config["BLOCK_N"] == cfg["BLOCK_N"]
        desc_q0, desc_q1 = launch.args[0], launch.args[1]
        assert desc_q0.block_shape == [1, cfg["BLOCK_M"], 1, 64] and desc_q1.block_shape == [1, cfg["BLOCK_M"], 1, 16]
    assert torch.isnan(out).all()


def test_default_tma_config():
    from fastgen.kernels.attention_tma import default_tma_config

    for arch in ("cpu", "sm90", "sm100", "sm103", "sm120"):
        for d in (16, 40, 64, 80, 96, 128, 160, 256):
            cfg = default_tma_config(d, arch)
            assert {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "WARP_SPECIALIZE"} <= set(cfg)
            assert cfg["BLOCK_M"] <= 256 and cfg["BLOCK_N"] <= 256
    assert default_tma_config(64, "sm90")["WARP_SPECIALIZE"] == 0
    assert default_tma_config(64, "sm100")["WARP_SPECIALIZE"] == 1
