"""fastgen's SDPA translation: the same values as PyTorch (fully masked rows included), no NaN guard."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from fastgen.export import symbolics


class Attention(torch.nn.Module):
    def __init__(self, scale: float | None = None, causal: bool = False) -> None:
        super().__init__()
        self.scale, self.causal = scale, causal

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, is_causal=self.causal)


def _export(module: torch.nn.Module, args: tuple, opset: int) -> bytes:
    symbolics.register(opset)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, opset_version=opset, dynamo=False,
                          input_names=["q", "k", "v", "mask"][:len(args)])
    return buf.getvalue()


def _run(model: bytes, args: tuple) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0]


@pytest.mark.parametrize("opset", [14, 17, 18])
@pytest.mark.parametrize("mask_shape", [(2, 1, 5, 7), (2, 3, 5, 7), (2, 1, 1, 7), (5, 7)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_bool_mask_matches_torch(opset, mask_shape, scale):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 8, generator=gen)
    k, v = torch.randn(2, 3, 7, 8, generator=gen), torch.randn(2, 3, 7, 8, generator=gen)
    mask = torch.rand(mask_shape, generator=gen) > 0.4
    mask[..., 0, :] = False  # a query row that may attend nowhere: PyTorch gives zeros
    args = (q, k, v, mask)
    model = _export(Attention(scale), args, opset)
    ops = {n.op_type for n in onnx.load_from_string(model).graph.node}
    assert "IsNaN" not in ops
    expected = Attention(scale)(*args)
    assert not torch.isnan(expected).any()
    np.testing.assert_allclose(_run(model, args), expected.numpy(), rtol=0, atol=1e-6)


def test_non_contiguous_inputs_and_odd_sizes():
    # (batch, heads, seq, head_dim) views of (batch, seq, heads, head_dim) tensors, as transformers passes them
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 77, 2, 16, generator=gen).transpose(1, 2)
    k = torch.randn(1, 113, 2, 16, generator=gen).transpose(1, 2)
    v = torch.randn(1, 113, 2, 16, generator=gen).transpose(1, 2)
    mask = torch.ones(1, 1, 77, 113, dtype=torch.bool)
    mask[..., 100:] = False
    args = (q, k, v, mask)
    np.testing.assert_allclose(_run(_export(Attention(), args, 17), args), Attention()(*args).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ["none", "float", "causal"])
def test_other_masks_keep_torch_translation(case):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(3))
    args: tuple = (q, k, v)
    if case == "float":
        args += (torch.randn(1, 1, 6, 6, generator=gen),)
    module = Attention(causal=case == "causal")
    np.testing.assert_allclose(_run(_export(module, args, 17), args), module(*args).numpy(), rtol=0, atol=1e-6)
