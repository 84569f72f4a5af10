"""Quantized layers as ONNX QuantizeLinear/DequantizeLinear graphs (TorchScript exporter).

While ``torch.onnx.export`` (``dynamo=False``, what ``fastgen.export`` uses by default) traces a
quantized module, each quantized layer becomes one ``torch.autograd.Function`` whose ``symbolic``
writes the graph below; its eager ``forward`` computes the real quantized result, so the rest of the
trace sees the right values. Weights are written as int8 (fp8) initializers already in the layout
the graph reads (``(K, N)``), so nothing needs constant folding.

- ``Int8WeightOnlyConfig``: ``DequantizeLinear(W int8 (K, N), scale (N,), axis=1) -> MatMul``: the
  standard weight-only QDQ form (TensorRT weight-only GEMMs; ONNX Runtime fuses it into
  MatMulNBits, whose default ``accuracy_level`` 4 quantizes the activations too; set the session
  entry ``session.qdq_matmulnbits_accuracy_level`` to ``"1"`` for the exact fp32 math).
- ``Int4WeightOnlyConfig``: int4 codes stored as int8, grouped so one per-axis DequantizeLinear
  applies the per-group scales (opset 13+; the packed INT4 type needs opset 21).
- ``Int8DynamicConfig``: the exact per-token math (``ReduceMax(|x|)/127``, a per-row
  QuantizeLinear) and ONNX Runtime's ``com.microsoft.MatMulIntegerToFloat`` on uint8 activations
  and weights (both with zero point 128: see ``_int8_dynamic`` for why not int8 weights): an int8
  GEMM on ONNX Runtime's CPU provider, bit-exact against the PyTorch module. The graph needs ONNX
  Runtime (a contrib op), like any per-token dynamic graph: TensorRT takes ``Int8StaticConfig``. A per-token
  QuantizeLinear/DequantizeLinear pair is avoided on purpose: ONNX Runtime 1.2x fuses it into
  MatMulIntegerToFloat and then fails at run time (per-row zero points are unsupported there).
- ``Int8StaticConfig``: ``QuantizeLinear/DequantizeLinear(x, calibrated scale, int8 zero point 0)``
  and a DequantizeLinear'd int8 weight before MatMul: pure QDQ, what a strongly typed TensorRT
  network consumes, and what ONNX Runtime fuses into QuantizeLinear + MatMulIntegerToFloat (int8).
- ``Fp8DynamicConfig`` (opset >= 19): a DequantizeLinear'd float8e4m3fn weight before MatMul; the
  per-token activation rounding is a saturating Cast to float8e4m3fn and back, because ONNX Runtime
  1.2x-1.3x fuses a float8 QuantizeLinear/DequantizeLinear pair in front of MatMul into
  MatMulIntegerToFloat, which only takes int8, and then refuses the graph. ORT's CPU provider has
  no fp8 GEMM: the graph is for parity and for runtimes with fp8 support.

What ONNX Runtime (CPU) executes in int8, checked on its optimized graph (``ort_optimized_ops``):
W8A8 dynamic -> MatMulIntegerToFloat for every layer; static -> QuantizeLinear + MatMulIntegerToFloat,
except (a) a layer with a 2-D input and a bias (``time_emb_proj``, a pooler): ORT folds MatMul + Add
into Gemm before its QDQ fusions, so that one runs as DequantizeLinear + fp32 Gemm; and (b) layers
that share an input and a scale (q/k/v without SmoothQuant) after onnxslim's common-subexpression
elimination merged their QuantizeLinear nodes: ORT converts int8 QDQ to its u8 kernels only for a
QuantizeLinear with one consumer, so export quantized graphs with ``cleanup="none"`` or without
onnxslim's ``subexpression_elimination``. Per-token scales are why TensorRT cannot take the dynamic
graphs (no MatMulInteger; its explicit quantization wants constant scales): use ``Int8StaticConfig``.

Only the TorchScript exporter writes these graphs; the dynamo exporter traces the eager reference
math (correct values, float64 MatMul, no int8 kernels).

Non-tensor arguments of ``Function.apply`` may only be numbers and strings under the tracer, so the
layer travels as a key into a weak registry.
"""

from __future__ import annotations

import weakref

import torch

from fastgen.errors import UnsupportedError

_LAYERS: weakref.WeakValueDictionary[int, torch.nn.Module] = weakref.WeakValueDictionary()

_ONNX_UINT8 = 2
_ONNX_FLOAT = 1
_ONNX_FLOAT8E4M3FN = 17


def _const(g, value) -> object:
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(value, dtype=torch.float32)
    return g.op("Constant", value_t=value.detach().cpu().contiguous())


def _reduce_amax(g, x, axis: int, keepdims: int) -> object:
    """ReduceMax(|x|) over one axis; opset 18 moved ``axes`` from an attribute to an input."""
    ax = g.op("Abs", x)
    if g.opset >= 18:
        return g.op("ReduceMax", ax, _const(g, torch.tensor([axis], dtype=torch.int64)), keepdims_i=keepdims)
    return g.op("ReduceMax", ax, axes_i=[axis], keepdims_i=keepdims)


def _scale_from_amax(g, amax, qmax: float) -> object:
    # scale = amax / qmax, 1 where amax == 0 (the ops' convention: an all-zero row has scale 1).
    scale = g.op("Div", amax, _const(g, qmax))
    return g.op("Where", g.op("Greater", amax, _const(g, 0.0)), scale, _const(g, 1.0))


def _keep_non_finite(g, y, x) -> object:
    """``y`` (..., N) plus 0 where its row of ``x`` (..., K) is finite, NaN where it holds a NaN or an inf.

    QuantizeLinear saturates NaN to a finite code and ReduceMax may skip it, so without this a
    poisoned token would come out as plausible numbers; PyTorch's layers give NaN (fastgen's contract,
    docs/reliability.md). ``0 * x`` is 0 or NaN, summed per row; ``y + 0`` is bit-identical to ``y``.
    """
    zeros = g.op("Mul", x, _const(g, 0.0))
    if g.opset >= 13:
        poison = g.op("ReduceSum", zeros, _const(g, torch.tensor([-1], dtype=torch.int64)), keepdims_i=1)
    else:
        poison = g.op("ReduceSum", zeros, axes_i=[-1], keepdims_i=1)
    return g.op("Add", y, poison)


def _smoothed(g, x, layer) -> object:
    return x if layer.smooth is None else g.op("Div", x, _const(g, layer.smooth.float()))


def _with_bias(g, y, bias) -> object:
    return y if bias is None or _is_none(bias) else g.op("Add", y, bias)


def _is_none(value) -> bool:
    return value is None or (hasattr(value, "node") and value.node().mustBeNone())


def _dq_weight(g, layer) -> object:
    """DequantizeLinear of the weight, giving fp32 ``(K, N)`` for MatMul."""
    from fastgen.ops.quant import unpack_int4

    cfg = layer.config
    scale = layer.weight_scale.float()
    if cfg.weight_dtype == "int4":
        n, k, gs = layer.out_features, layer.in_features, cfg.group_size
        codes = unpack_int4(layer.qweight.cpu())  # (N, K) int8 in [-8, 7]
        # rows (group kg, channel n) of g codes, one scale each: (K/g * N, g) with scale (K/g * N,)
        grouped = codes.reshape(n, k // gs, gs).permute(1, 0, 2).reshape(k // gs * n, gs)
        flat_scale = scale.cpu().t().reshape(-1)  # (K/g * N,): [kg * N + n] = scale[n, kg]
        wd = g.op("DequantizeLinear", _const(g, grouped), _const(g, flat_scale), _zero_points(g, grouped.shape[0]),
                  axis_i=0)  # (K/g*N, g)
        wd = g.op("Reshape", wd, _const(g, torch.tensor([k // gs, n, gs], dtype=torch.int64)))
        wd = g.op("Transpose", wd, perm_i=[0, 2, 1])  # (K/g, g, N)
        return g.op("Reshape", wd, _const(g, torch.tensor([k, n], dtype=torch.int64)))
    wt = layer.qweight.t().contiguous()  # (K, N) int8 or fp8
    if cfg.weight_dtype == "fp8":
        zp = torch.zeros(layer.out_features, dtype=wt.dtype)
        return g.op("DequantizeLinear", _const(g, wt), _const(g, scale), _const(g, zp), axis_i=1)
    return g.op("DequantizeLinear", _const(g, wt), _const(g, scale), _zero_points(g, layer.out_features), axis_i=1)


def _zero_points(g, n: int) -> object:
    """Explicit per-axis int8 zero points (all 0). Without them ONNX Runtime's x64 precision pass
    (``session.x64quantprecision``, which turns U8S8 GEMMs into exact U8U8 ones on CPUs without
    VNNI) shifts the weights to uint8 with a *scalar* zero point, which per-axis DequantizeLinear
    then refuses at run time (onnxruntime 1.32)."""
    return _const(g, torch.zeros(n, dtype=torch.int8))


def _weight_only(g, x, bias, layer) -> object:
    return _with_bias(g, g.op("MatMul", x, _dq_weight(g, layer)), bias)


def _int8_dynamic(g, x, bias, layer) -> object:
    """W8A8 with per-token scales, in as few passes over the activations as ONNX Runtime allows.

    x ``(..., K)`` -> rows ``(M, K)``; per-row scale ``amax / 127`` (the reference's fp32 math);
    QuantizeLinear with that 1-D scale on axis 0 (division, round half to even and the zero-point
    shift in one kernel; |x / scale| <= 127 so its saturation never acts); ORT's
    ``com.microsoft.MatMulIntegerToFloat`` (int GEMM dequantized by the per-column weight scale in its
    epilogue, no int32 tensor written); then the per-token scale and the bias. Operation order as
    ``fastgen.ops.quant``'s epilogue, ``(acc * w_scale) * x_scale + bias``: bit-exact against the
    module. Compared with the plain-ONNX form (Div, Round, Clip, Add, Cast, MatMulInteger, Cast,
    Mul, Mul), this cut ViT-S/16's W8A8 time on a 2-core AVX2 CPU by 21% (1.04x -> 1.27x fp32).

    Both operands are uint8 with zero point 128 (U8U8): ONNX Runtime's U8S8 kernel on x86 CPUs
    without VNNI (AVX2, most AVX-512 parts before Cascade Lake) multiplies with VPMADDUBSW, whose
    int16 pair sums saturate for |codes| near 127 (measured with onnxruntime 1.32: errors of 8e4 in
    the int32 accumulator); S8S8 is exact but 3-4x slower than fp32 there. U8U8 is exact on every x86
    CPU and 1.35-2.1x faster than fp32 MatMul at the UNet's and ViT's shapes (2-core AVX2).
    """
    k, n = layer.in_features, layer.out_features
    xs = _smoothed(g, x, layer)
    scale = _scale_from_amax(g, _reduce_amax(g, xs, -1, 1), 127.0)  # (..., 1)
    lead = g.op("Slice", g.op("Shape", xs), _const(g, torch.tensor([0])), _const(g, torch.tensor([-1])))
    rows = g.op("Reshape", xs, _const(g, torch.tensor([-1, k])))  # (M, K)
    row_scale = g.op("Reshape", scale, _const(g, torch.tensor([-1])))  # (M,)
    row_zp = g.op("Expand", _const(g, torch.tensor([128], dtype=torch.uint8)), g.op("Shape", row_scale))
    xu = g.op("QuantizeLinear", rows, row_scale, row_zp, axis_i=0)  # (M, K) uint8
    wu = (layer.qweight.t().to(torch.int16) + 128).to(torch.uint8).contiguous()  # (K, N) uint8
    zp = _const(g, torch.tensor(128, dtype=torch.uint8))
    y = g.op("com.microsoft::MatMulIntegerToFloat", xu, _const(g, wu), _const(g, torch.tensor(1.0)),
             _const(g, layer.weight_scale.float()), zp, zp)  # (M, N): float(acc) * w_scale
    y = g.op("Mul", y, g.op("Reshape", scale, _const(g, torch.tensor([-1, 1]))))
    y = _with_bias(g, _keep_non_finite(g, y, rows), bias)
    return g.op("Reshape", y, g.op("Concat", lead, _const(g, torch.tensor([n])), axis_i=0))  # (..., N)


def _int8_static(g, x, bias, layer) -> object:
    xs = _smoothed(g, x, layer)
    s = _const(g, layer.input_scale.float().reshape(()))
    zp = _const(g, torch.tensor(0, dtype=torch.int8))
    xd = g.op("DequantizeLinear", g.op("QuantizeLinear", xs, s, zp), s, zp)
    return _with_bias(g, _keep_non_finite(g, g.op("MatMul", xd, _dq_weight(g, layer)), xs), bias)


def _fp8_dynamic(g, x, bias, layer) -> object:
    if g.opset < 19:
        raise UnsupportedError(f"fp8 layers export with ONNX opset >= 19 (float8e4m3fn); this export uses "
                               f"opset {g.opset}: pass ExportConfig(opset=19)")
    # x (..., K): per-token scale (..., 1); the e4m3 rounding as a saturating Cast round trip (see above).
    scale = _scale_from_amax(g, _reduce_amax(g, x, -1, 1), 448.0)
    v = g.op("Clip", g.op("Div", x, scale), _const(g, -448.0), _const(g, 448.0))
    xq = g.op("Cast", g.op("Cast", v, to_i=_ONNX_FLOAT8E4M3FN), to_i=_ONNX_FLOAT)
    y = g.op("Mul", g.op("MatMul", xq, _dq_weight(g, layer)), scale)
    return _with_bias(g, _keep_non_finite(g, y, x), bias)


class _QuantLinearFunction(torch.autograd.Function):
    """One quantized layer as one ONNX subgraph (see the module docstring).

    The layer's tensors are passed explicitly: the tracer cannot see a module's buffers read inside
    ``forward``. ``symbolic`` ignores them and writes the weights as constants in the graph's layout.
    """

    @staticmethod
    def forward(ctx, x, qweight, weight_scale, bias, smooth, input_scale, key: int):
        from fastgen.quant.modules import quant_linear

        return quant_linear(x, _LAYERS[key].config, qweight, weight_scale, bias, smooth, input_scale)

    @staticmethod
    def symbolic(g, x, qweight, weight_scale, bias, smooth, input_scale, key: int):
        layer = _LAYERS[key]
        cfg = layer.config
        if cfg.activation is None:
            return _weight_only(g, x, bias, layer)
        if cfg.activation == "static":
            return _int8_static(g, x, bias, layer)
        if cfg.act_dtype == "fp8":
            return _fp8_dynamic(g, x, bias, layer)
        return _int8_dynamic(g, x, bias, layer)


def export_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The quantized layer's output, recorded by the ONNX tracer as its QDQ subgraph."""
    _LAYERS[id(layer)] = layer
    return _QuantLinearFunction.apply(x, *layer.quant_tensors(), id(layer))


# ------------------------------------------------------------------------ checking ORT's execution
#: ``fastgen.export`` verification bounds a quantized graph meets against its PyTorch module. Each
#: layer's graph matches the module bit for bit (int8 dynamic, int4) or within an ulp, but the
#: float parts of a network differ between ONNX Runtime and PyTorch in the last bits, and an input
#: that lands on the other side of a rounding boundary moves by one quantization step: the errors
#: are discontinuous, so the default 1e-3 max-error bound is too tight for any quantized model.
VERIFY_TOLERANCE = 0.05
VERIFY_MIN_COSINE = 0.999

#: ONNX Runtime CPU kernels that compute in int8 (or packed low-bit) arithmetic.
INT8_KERNELS = ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul",
                "MatMulNBits", "ConvInteger", "QLinearConv", "QGemm")


def exact_session_options(**entries: str):
    """CPU ``SessionOptions`` under which ONNX Runtime computes what the QDQ graph says
    (``fastgen.core.ort.EXACT_QUANT_ENTRIES``), with further session config ``entries``.

    ``session.qdq_matmulnbits_accuracy_level`` 1: the MatMulNBits that weight-only DequantizeLinear ->
    MatMul becomes computes in fp32 (ORT's default, 4, also quantizes the activations to int8).
    """
    from fastgen.core.ort import session_options

    return session_options(exact_quant=True, entries=entries)


def ort_optimized_ops(onnx_path, options=None) -> dict[str, int]:
    """Op types (and counts) of the graph ONNX Runtime's CPU provider actually runs after its
    optimisations (QDQ fusions included): proof of which layers execute as int8."""
    import collections
    import os
    import tempfile

    import onnx

    from fastgen.core.ort import cpu_session

    opts = options or exact_session_options()
    with tempfile.TemporaryDirectory(prefix="fastgen-ortopt-") as tmp:
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        cpu_session(onnx_path, opts)
        graph = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
        return dict(collections.Counter(n.op_type for n in graph.node))
