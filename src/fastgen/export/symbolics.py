"""ONNX translations fastgen gives the TorchScript exporter, registered by :func:`register` before a trace.

* ``aten::rms_norm`` (``torch.nn.RMSNorm``, FLUX's q/k norms): torch has none below opset 23.
* ``aten::scaled_dot_product_attention`` with a boolean mask (transformers' SDPA path, every padded text
  encoder and classifier): torch's translation adds ``Where(IsNaN(weights), 0, weights)`` over the
  whole (batch, heads, q, k) weight tensor to give fully masked rows zeros, plus a broadcast ``Where``
  over it: two passes over the largest tensor of the layer, about a quarter of a MiniLM encoder's time on
  onnxruntime. Here the boolean mask becomes an additive one on the mask's own (small) shape, fully
  masked rows attend everywhere instead, and their outputs are multiplied by zero afterwards, on the
  (batch, heads, q, head_dim) output. Same values as PyTorch, fully masked rows included (zeros).
  Other masks, no mask and ``is_causal`` keep torch's own translation.
"""

from __future__ import annotations

import torch

__all__ = ["register"]


def _rms_norm_symbolic(opset: int):
    """``x / sqrt(mean(x**2) + eps) * weight`` over the normalised dims, as a ``Pow -> ReduceMean -> Add ->
    Sqrt`` chain, the form the fp16 conversion keeps in fp32."""
    from torch.onnx import symbolic_helper as sh

    def symbolic(g, x, normalized_shape, weight, eps):
        dims = sh._get_const(normalized_shape, "is", "normalized_shape")
        axes = list(range(-len(dims), 0))
        value = None if eps.node().mustBeNone() else sh._maybe_get_const(eps, "f")
        # torch's default eps is that of the input dtype; exported graphs are traced in float32.
        value = torch.finfo(torch.float32).eps if value is None else float(value)
        square = g.op("Pow", x, g.op("Constant", value_t=torch.tensor(2.0)))
        mean = _reduce(g, "ReduceMean", square, axes, opset)
        rms = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(value))))
        out = g.op("Div", x, rms)
        return out if weight.node().mustBeNone() else g.op("Mul", out, weight)

    return symbolic


def _reduce(g, op: str, x, axes: list[int], opset: int):
    """A keepdims reduction; its axes are an input from opset 18 on, an attribute before."""
    if opset >= 18:
        return g.op(op, x, g.op("Constant", value_t=torch.tensor(axes, dtype=torch.int64)), keepdims_i=1)
    return g.op(op, x, axes_i=axes, keepdims_i=1)


def _absent(value) -> bool:
    """An optional argument the trace left out (None, or a ``prim::Constant`` None)."""
    return value is None or value.node().mustBeNone()


def _sdpa_symbolic(opset: int):
    from torch.onnx import symbolic_helper as sh
    from torch.onnx import symbolic_opset14

    torch_sdpa = symbolic_opset14.scaled_dot_product_attention
    bool_type = sh._type_utils.JitScalarType.BOOL

    def symbolic(g, query, key, value, attn_mask=None, dropout_p=None, is_causal=None, scale=None,
                 enable_gqa=None):
        flags = [sh._maybe_get_const(v, "b") for v in (is_causal, enable_gqa) if not _absent(v)]
        if (_absent(attn_mask) or any(flags)
                or sh._type_utils.JitScalarType.from_value(attn_mask) != bool_type):
            return torch_sdpa(g, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if _absent(scale):  # 1 / sqrt(head_dim), from the shape
            dim = g.op("Gather", g.op("Shape", query), g.op("Constant", value_t=torch.tensor(-1)), axis_i=0)
            dim = g.op("Cast", dim, to_i=sh._type_utils.JitScalarType.FLOAT.onnx_type())
            scale = g.op("Div", g.op("Constant", value_t=torch.tensor(1.0)), g.op("Sqrt", dim))
        # q and k are scaled by sqrt(scale) each before the product, as torch's translation and its CPU
        # math kernel do: the same rounding as theirs.
        root = g.op("Sqrt", scale)
        rank = sh._get_tensor_rank(key)
        perm = list(range(rank))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        scores = g.op("MatMul", g.op("Mul", query, root), g.op("Mul", g.op("Transpose", key, perm_i=perm), root))
        # (..., q, 1): 1.0 where the query row may attend anywhere, 0.0 where its mask row is all False.
        valid = _reduce(g, "ReduceMax", g.op("Cast", attn_mask, to_i=sh._type_utils.JitScalarType.FLOAT.onnx_type()),
                        [-1], opset)
        keep = g.op("Or", attn_mask, g.op("Not", g.op("Cast", valid, to_i=bool_type.onnx_type())))
        additive = g.op("Where", keep, g.op("Constant", value_t=torch.tensor([0.0])),
                        g.op("Constant", value_t=torch.tensor([-float("inf")])))
        weights = g.op("Softmax", g.op("Add", scores, additive), axis_i=-1)
        out = g.op("MatMul", weights, value)  # (..., q, head_dim)
        factor = g.op("CastLike", valid, out) if opset >= 15 else valid
        return g.op("Mul", out, factor)

    return symbolic


def register(opset: int) -> None:
    """Register fastgen's translations for ``opset`` (registering again replaces the same functions)."""
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic(opset), opset)
    if opset >= 14:  # the opset of torch's own translation of SDPA
        torch.onnx.register_custom_op_symbolic("aten::scaled_dot_product_attention", _sdpa_symbolic(opset), opset)
