"""fastgen attention: the Triton kernel (interpreted on the CPU) and the backend dispatch.

Oracle: ``attention_reference`` in fp32. The kernel's max error against it must be at most twice
that of PyTorch SDPA run at the kernel's precision (plus a tiny epsilon), on odd sequence lengths,
head dims that are not powers of two, cross-attention, key-padding and causal masks, and strided
inputs. The kernel writes into a NaN-poisoned buffer so an element it forgets shows up.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.ops.attention import BACKENDS, attention, attention_reference, select_backend

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
# Tiny on the scale of each dtype's rounding (fp16 ulp at 1.0 is ~1e-3, fp32's ~1e-7).
EPS = {torch.float16: 1e-4, torch.float32: 1e-5}


def _qkv(batch, seq_q, seq_k, heads, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, head_dim, generator=g)
    k = torch.randn(batch, seq_k, heads, head_dim, generator=g)
    v = torch.randn(batch, seq_k, heads, head_dim, generator=g)
    return q, k, v


def _run_kernel(q, k, v, **kw):
    """The kernel writing into a NaN-poisoned output; fails if any element was left unwritten."""
    from fastgen.kernels.attention import attention_fwd

    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    res = attention_fwd(q, k, v, out=out, **kw)
    assert res is out
    assert not torch.isnan(out).any(), "kernel left elements of the output unwritten"
    return out


def _check_against_torch(q, k, v, dtype, **kw):
    """err(kernel) <= 2 * err(SDPA at the same dtype) + eps, both against the fp32 reference."""
    ref = attention_reference(q.float(), k.float(), v.float(), **kw)
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    out = _run_kernel(qd, kd, vd, **kw)
    base = attention(qd, kd, vd, backend="sdpa", **kw)
    err_k = (out.float() - ref).abs().max().item()
    err_t = (base.float() - ref).abs().max().item()
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert err_k <= 2 * err_t + EPS[dtype], f"kernel err {err_k:.3g} vs torch {dtype} err {err_t:.3g}"
    return out, ref


# (batch, seq_q, seq_k, heads, head_dim, dtype, causal, masked): each feature in a few combos.
CASES = [
    (1, 1, 1, 1, 64, torch.float32, False, False),
    (2, 77, 77, 2, 40, torch.float16, False, False),
    (1, 113, 113, 2, 80, torch.float16, True, False),
    (1, 113, 77, 1, 160, torch.float16, False, True),   # cross-attention, 77 keys, padding
    (2, 1, 77, 2, 128, torch.float16, False, False),    # one query
    (1, 77, 113, 2, 64, torch.float32, True, True),     # causal cross-attention + padding
    (1, 113, 77, 1, 40, torch.float32, True, False),    # seq_q > seq_k: first 36 rows see nothing
    (1, 33, 77, 2, 96, torch.float16, False, False),    # 64 + 32 chunks
    (1, 40, 40, 1, 32, torch.float32, False, True),
    (1, 257, 257, 1, 64, torch.float16, True, False),
]


@needs_triton
@pytest.mark.parametrize("batch,seq_q,seq_k,heads,head_dim,dtype,causal,masked", CASES)
def test_kernel_matches_reference(batch, seq_q, seq_k, heads, head_dim, dtype, causal, masked):
    q, k, v = _qkv(batch, seq_q, seq_k, heads, head_dim)
    mask = None
    if masked:
        mask = torch.rand(batch, seq_k, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[:, 0] = True
    _check_against_torch(q, k, v, dtype, mask=mask, causal=causal)


@needs_triton
def test_kernel_fully_masked_rows_are_zero():
    q, k, v = _qkv(2, 9, 77, 2, 80)
    mask = torch.ones(2, 77, dtype=torch.bool)
    mask[1] = False  # batch 1: no key at all
    out, ref = _check_against_torch(q, k, v, torch.float16, mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(ref[1], torch.zeros_like(ref[1]))
    assert out[0].abs().sum() > 0
    # causal with more queries than keys: the first seq_q - seq_k rows see no key
    out = _run_kernel(*_qkv(1, 20, 7, 1, 40), causal=True)
    assert torch.equal(out[:, :13], torch.zeros_like(out[:, :13])) and out[:, 13:].abs().sum() > 0


@needs_triton
def test_kernel_strided_inputs():
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 77, 3, 2, 80, generator=g)  # packed (batch, seq, 3, heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    _check_against_torch(q, k, v, torch.float32, causal=True)
    # fp16 views of the packed tensor: the kernel reads these strides itself (no .contiguous())
    qkv16 = qkv.half()
    q16, k16, v16 = qkv16[:, :, 0], qkv16[:, :, 1], qkv16[:, :, 2]
    out = _run_kernel(q16, k16, v16)
    ref = attention_reference(q16, k16, v16)
    assert (out.float() - ref.float()).abs().max() <= 2e-3
    # transposed (batch, heads, seq, dim) storage, a strided head dim, a strided mask
    qt = torch.randn(1, 2, 45, 40, generator=g).transpose(1, 2)           # (1, 45, 2, 40)
    kt = torch.randn(1, 2, 77, 40, generator=g).transpose(1, 2)
    vw = torch.randn(1, 77, 2, 80, generator=g)[..., ::2]                 # head-dim stride 2
    mask = (torch.rand(1, 154, generator=g) > 0.2)[:, ::2]
    out, _ = _check_against_torch(qt, kt, vw, torch.float32, mask=mask, scale=0.3)
    assert out.is_contiguous()


@needs_triton
def test_kernel_block_override_and_default_output():
    from fastgen.kernels.attention import attention_fwd

    q, k, v = _qkv(1, 50, 61, 1, 48)
    out = attention_fwd(q, k, v, block_m=16, block_n=64)
    assert out.is_contiguous() and out.shape == q.shape
    torch.testing.assert_close(out, attention_reference(q, k, v), atol=1e-5, rtol=1e-5)


@needs_triton
def test_head_dim_chunks():
    from fastgen.kernels.attention import head_dim_chunks

    assert head_dim_chunks(40) == (32, 16)
    assert head_dim_chunks(80) == (64, 16)
    assert head_dim_chunks(96) == (64, 32)
    assert head_dim_chunks(160) == (128, 32)
    for d in (32, 64, 128, 256):
        assert head_dim_chunks(d) == (d, 0)


@needs_triton
def test_kernel_argument_errors():
    from fastgen.kernels.attention import attention_fwd

    q, k, v = _qkv(1, 5, 6, 1, 32)
    with pytest.raises(InvalidArgumentError, match="head_dim"):
        attention_fwd(*_qkv(1, 5, 6, 1, 8))
    with pytest.raises(InvalidArgumentError, match="v"):
        attention_fwd(q, k, v[:, :5])
    with pytest.raises(InvalidArgumentError, match="k.dtype"):
        attention_fwd(q, k.half(), v)
    with pytest.raises(InvalidArgumentError, match="q.dtype"):
        attention_fwd(q.double(), k.double(), v.double())
    with pytest.raises(InvalidArgumentError, match="mask"):
        attention_fwd(q, k, v, mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(InvalidArgumentError, match="out"):
        attention_fwd(q, k, v, out=torch.empty(1, 5, 1, 31))


# ---- dispatch ---------------------------------------------------------------------------------


def test_auto_selection_on_cpu_is_sdpa():
    q, _, _ = _qkv(1, 4, 4, 1, 32)
    assert select_backend(q) == "sdpa"  # triton is never auto-picked for CPU tensors
    assert select_backend(q, causal=True) == "sdpa"


def test_constraints_are_data():
    assert BACKENDS["triton"].head_dim == (16, 256) and "cuda" in BACKENDS["triton"].devices
    assert BACKENDS["triton"].causal and "key_padding" in BACKENDS["triton"].masks
    assert BACKENDS["triton-int8"].head_dim == (1, 256) and BACKENDS["triton-int8"].causal


def test_triton_int8_through_dispatch():
    """backend='triton-int8' runs the int8 kernel (custom op) and is close to fp32; never auto-picked."""
    q, k, v = _qkv(1, 77, 77, 2, 40)
    mask = torch.ones(1, 77, dtype=torch.bool)
    mask[:, 60:] = False
    out = attention(q, k, v, mask=mask, backend="triton-int8")
    ref = attention_reference(q, k, v, mask=mask)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert out.shape == q.shape and cos > 0.999
    assert select_backend(q) != "triton-int8"


def test_constraint_errors_name_backend(monkeypatch):
    q, k, v = _qkv(1, 4, 4, 1, 32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UnsupportedError, match=r"'triton'.*device 'cpu'"):
        attention(q, k, v, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(UnsupportedError, match=r"'triton'.*dtype torch.float64"):
        attention(q.double(), k.double(), v.double(), backend="triton")
    with pytest.raises(UnsupportedError, match=r"'triton'.*head_dim 8"):
        attention(*_qkv(1, 4, 4, 1, 8), backend="triton")
    with pytest.raises(UnsupportedError, match=r"'triton-int8'.*dtype torch.float64"):
        attention(q.double(), k.double(), v.double(), backend="triton-int8")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(UnsupportedError, match=r"'triton-int8'.*device 'cpu'"):
        attention(q, k, v, backend="triton-int8")
    with pytest.raises(InvalidArgumentError, match="backend"):
        attention(q, k, v, backend="flash")


def test_dispatch_argument_errors():
    q, k, v = _qkv(1, 4, 6, 2, 32)
    with pytest.raises(InvalidArgumentError, match="invalid k"):
        attention(q, k[:, :, :1], v)
    with pytest.raises(InvalidArgumentError, match="invalid mask"):
        attention(q, k, v, mask=torch.ones(1, 6))
    with pytest.raises(InvalidArgumentError, match="invalid scale"):
        attention(q, k, v, scale=-1.0)
    with pytest.raises(InvalidArgumentError, match="invalid q"):
        attention(q[0], k, v)


@pytest.mark.parametrize("seq_q,seq_k,causal,masked,dtype", [
    (77, 77, False, False, torch.float32),
    (77, 77, True, False, torch.float32),
    (13, 77, True, True, torch.float32),
    (30, 11, True, False, torch.float32),   # seq_q > seq_k: leading rows are zeros in both
    (33, 77, False, True, torch.float16),
])
def test_sdpa_matches_reference(seq_q, seq_k, causal, masked, dtype):
    q, k, v = (t.to(dtype) for t in _qkv(2, seq_q, seq_k, 2, 40))
    mask = None
    if masked:
        mask = torch.rand(2, seq_k, generator=torch.Generator().manual_seed(2)) > 0.4
        mask[1] = False  # a batch with every key masked
    a = attention(q, k, v, mask=mask, causal=causal, backend="sdpa")
    b = attention(q, k, v, mask=mask, causal=causal, backend="reference")
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    assert not torch.isnan(a).any()
    assert attention(q, k, v, mask=mask, causal=causal).shape == q.shape  # auto


@needs_triton
def test_triton_backend_through_torch_library():
    q, k, v = _qkv(1, 19, 23, 2, 40)
    mask = torch.rand(1, 23, generator=torch.Generator().manual_seed(4)) > 0.3
    ref = attention_reference(q, k, v, mask=mask, causal=True)
    out = attention(q, k, v, mask=mask, causal=True, backend="triton")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if not hasattr(torch.library, "custom_op"):
        pytest.skip("torch < 2.4 has no torch.library.custom_op")
    direct = torch.ops.fastgen.attention(q, k, v, mask, True, None)
    torch.testing.assert_close(direct, ref, atol=1e-5, rtol=1e-5)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake = torch.ops.fastgen.attention(fq, fk, fv, None, False, 0.5)
    assert fake.shape == q.shape and fake.dtype == q.dtype


def test_import_is_cheap():
    code = ("import sys, fastgen.ops.attention; "
            "assert 'triton' not in sys.modules, 'triton imported eagerly'")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_dispatch_declines_a_class_with_no_fitting_config(monkeypatch):
    """On a GPU whose default table has no config for a head dim / dtype (null), the Triton backends
    decline it by name, so ``backend=None`` falls through to SDPA instead of failing at launch."""
    from fastgen.kernels import launch_configs
    from fastgen.ops import attention as dispatch

    q = torch.zeros(1, 4, 1, 256, dtype=torch.float32)
    monkeypatch.setattr(launch_configs, "device_arch", lambda device: "sm89")
    monkeypatch.setattr(launch_configs, "_arch_table",
                        lambda table: {"attention": {"f32-d256": None}, "attention_int8": {}})
    reason = dispatch._no_fitting_config("triton", q)
    assert reason is not None and "head_dim 256" in reason and "sm89" in reason
    assert dispatch._no_fitting_config("triton", q[..., :64].contiguous()) is None  # class not null
    assert dispatch._no_fitting_config("triton-int8", q) is None
    monkeypatch.setattr(launch_configs, "device_arch", lambda device: "sm75")
    assert "sm75" in dispatch._no_fitting_config("triton", q)


def test_tma_path_is_planned_on_hopper_for_contiguous_fp16_only():
    """plan_attention picks the TMA kernel on sm90+ for TMA-able layouts and the pointer kernel
    otherwise (strides not 16-byte multiples, fp32, or an older GPU); nothing is launched."""
    from fastgen.kernels.attention import plan_attention

    q, k, v = (torch.empty(2, 77, 8, 40, dtype=torch.float16) for _ in range(3))
    name = lambda arch, *t, **kw: plan_attention(*t, arch=arch, **kw)[1][0].name  # noqa: E731
    assert name("sm90", q, k, v) == "_attn_fwd_tma_kernel"
    assert name("sm100", q, k, v) == "_attn_fwd_tma_kernel"
    assert name("sm89", q, k, v) == "_attn_fwd_kernel"
    assert name("sm90", q, k, v, tma=False) == "_attn_fwd_kernel"
    assert name("sm90", q.float(), k.float(), v.float()) == "_attn_fwd_kernel"
    odd = torch.empty(2, 77, 8, 36, dtype=torch.float16)[..., :36]  # 72-byte head stride: no TMA
    assert name("sm90", odd, odd, odd) == "_attn_fwd_kernel"
    with pytest.raises(UnsupportedError, match="TMA"):
        plan_attention(odd, odd, odd, arch="sm90", tma=True)
    launch = plan_attention(q, k, v, arch="sm90", tma=False)[1][0]
    assert launch.kwargs["ALIGNED"] and launch.kwargs["HEAD_DIM"] == 40
    strided = torch.empty(2, 77, 8, 41, dtype=torch.float16)[..., :40]
    assert not plan_attention(strided, strided, strided, arch="sm80")[1][0].kwargs["ALIGNED"]
