"""fastgen attention at diffusion transformers' shapes: the Triton kernel under the interpreter (on the CPU).

SD3 / SD3.5 (head dim 64) and FLUX (head dim 128) attend jointly over image and text tokens: self-attention
over ``image + text`` tokens, 24 heads in the released models, no mask (FLUX: an optional key-padding mask
over the text part, which comes first). Small, odd token counts here: a 48x80 px image is 3x5 = 15 patches,
text is 77 (CLIP) or 113 tokens. Oracle as in ``test_attention.py``: ``attention_reference`` in fp32; the
kernel's max error must be at most twice that of PyTorch SDPA at the kernel's precision (plus a tiny epsilon),
written into a NaN-poisoned buffer. bf16 is not run: the interpreter has no bf16 arithmetic (see
``test_attention_tma.py``); the bf16 launches are compiled by ``test_compile_gate_dit.py``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fastgen.ops.attention import attention, attention_reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
EPS = {torch.float16: 1e-4, torch.float32: 1e-5}
IMAGE = 15  # 48x80 px: 6x10 latents, 2x2 patches

# (label, batch, text tokens, image tokens, heads, head_dim, dtype, padded text)
CASES = [
    ("sd35-clip77", 1, 77, IMAGE, 24, 64, torch.float16, False),
    ("sd35-t5-113", 2, 113, IMAGE, 3, 64, torch.float32, False),
    ("sd35-attn2-image-only", 2, 0, IMAGE, 3, 64, torch.float16, False),  # dual attention: image tokens alone
    ("flux-77", 1, 77, IMAGE, 24, 128, torch.float16, False),
    ("flux-113-padded", 2, 113, IMAGE, 3, 128, torch.float16, True),
    ("flux-113-fp32", 1, 113, IMAGE, 2, 128, torch.float32, False),
]


@pytest.mark.parametrize("label,batch,text,image,heads,head_dim,dtype,padded", CASES, ids=[c[0] for c in CASES])
def test_kernel_at_dit_shapes(label, batch, text, image, heads, head_dim, dtype, padded):
    from fastgen.kernels.attention import attention_fwd

    seq = text + image
    g = torch.Generator().manual_seed(len(label))
    q, k, v = (torch.randn(batch, seq, heads, head_dim, generator=g) for _ in range(3))  # (batch, seq, heads, hd)
    mask = None
    if padded:  # text first (FLUX's order); the last batch row has 40 padding text tokens
        mask = torch.ones(batch, seq, dtype=torch.bool)
        mask[-1, text - 40:text] = False
    ref = attention_reference(q, k, v, mask=mask)
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    assert attention_fwd(qd, kd, vd, mask=mask, out=out) is out
    assert not torch.isnan(out).any(), "kernel left elements of the output unwritten"
    base = attention(qd, kd, vd, mask=mask, backend="sdpa")
    err_k = (out.float() - ref).abs().max().item()
    err_t = (base.float() - ref).abs().max().item()
    assert err_k <= 2 * err_t + EPS[dtype], f"kernel err {err_k:.3g} vs torch {dtype} err {err_t:.3g}"
