"""Q/DQ ONNX export: per-layer parity in ONNX Runtime, the graph's int8 form, and whole components."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fastgen
from fastgen.errors import FastgenError, UnsupportedError
from fastgen.export import ExportConfig, export
from fastgen.quant import (
    Fp8DynamicConfig,
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    Int8WeightOnlyConfig,
    calibrate,
    quantize_,
    sqnr_db,
)
from fastgen.quant.onnx import VERIFY_MIN_COSINE, VERIFY_TOLERANCE, exact_session_options, ort_optimized_ops


class Net(nn.Module):
    """A linear layer on tokens and a strided 1x1 conv on a feature map (diffusers' and ResNet's uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 96)
        self.shortcut = nn.Conv2d(32, 64, 1, stride=2, bias=False)

    def forward(self, tokens: torch.Tensor, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(tokens), self.shortcut(fmap)


def _inputs(seed: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 13, 64, generator=g) * 2, torch.randn(batch, 32, 9, 7, generator=g)


def _export(model: nn.Module, path, opset: int = 17) -> None:
    with torch.no_grad():
        torch.onnx.export(model, _inputs(0), str(path), dynamo=False, opset_version=opset,
                          input_names=["tokens", "fmap"], output_names=["y", "z"],
                          dynamic_axes={"tokens": {0: "b", 1: "s"}, "fmap": {0: "b", 2: "h", 3: "w"}})


# config, opset, exact (bit-identical to PyTorch), kernel ORT must run
CASES = [
    (Int8WeightOnlyConfig(), 17, False, "MatMulNBits"),
    (Int4WeightOnlyConfig(group_size=32), 17, False, None),
    (Int8DynamicConfig(), 17, True, "MatMulIntegerToFloat"),
    (Int8DynamicConfig(smoothquant=True), 18, True, "MatMulIntegerToFloat"),
    (Int8StaticConfig(), 17, False, "MatMulIntegerToFloat"),
    (Int8StaticConfig(smoothquant=True), 17, False, "MatMulIntegerToFloat"),
    (Fp8DynamicConfig(), 19, False, None),
]


@pytest.mark.parametrize(("config", "opset", "exact", "kernel"), CASES, ids=[c[0].describe() for c in CASES])
def test_layer_export_matches_pytorch_in_onnxruntime(tmp_path, config, opset, exact, kernel):
    torch.manual_seed(0)
    model = Net().eval()
    calibrate(model, [_inputs(1), _inputs(2)])
    quantize_(model, config, skip=())
    path = tmp_path / "q.onnx"
    _export(model, path, opset)

    session = ort.InferenceSession(str(path), exact_session_options(), providers=["CPUExecutionProvider"])
    tokens, fmap = _inputs(3, batch=3)  # other sizes than traced
    fmap = fmap[..., :5]  # odd width, non-contiguous view
    outs = session.run(None, {"tokens": tokens.numpy(), "fmap": np.ascontiguousarray(fmap.numpy())})
    with torch.no_grad():
        refs = model(tokens, fmap)
    for ref, out in zip(refs, outs):
        out = torch.from_numpy(out)
        assert out.shape == ref.shape
        if exact:
            assert torch.equal(out, ref.contiguous())
        else:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))

    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    consts = {onnx.TensorProto.DataType.Name(n.attribute[0].t.data_type)
              for n in graph.node if n.op_type == "Constant" and n.attribute[0].t.dims}
    consts |= {onnx.TensorProto.DataType.Name(i.data_type) for i in graph.initializer}
    if config.activation == "dynamic" and config.act_dtype == "int8":
        # U8U8: exact on every x86 CPU (U8S8 saturates without VNNI), see fastgen.quant.onnx
        assert "MatMulIntegerToFloat" in ops and "UINT8" in consts
    elif config.activation == "static":
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "INT8" in consts
    elif config.weight_dtype == "fp8":
        assert "DequantizeLinear" in ops and "FLOAT8E4M3FN" in consts
    else:
        assert "DequantizeLinear" in ops and "INT8" in consts and "MatMul" in ops
    if kernel is not None:  # what ONNX Runtime's CPU provider really executes
        assert ort_optimized_ops(path).get(kernel, 0) == 2


@pytest.mark.parametrize(("config", "opset"), [(c[0], c[1]) for c in CASES if c[0].activation is not None],
                         ids=[c[0].describe() for c in CASES if c[0].activation is not None])
def test_a_non_finite_token_stays_nan_in_onnxruntime_and_other_tokens_are_untouched(tmp_path, config, opset):
    # QuantizeLinear saturates NaN to a finite code: without the guard a poisoned token came out finite.
    torch.manual_seed(0)
    model = Net().eval()
    calibrate(model, [_inputs(1), _inputs(2)])
    quantize_(model, config, skip=())
    path = tmp_path / "q.onnx"
    _export(model, path, opset)
    session = ort.InferenceSession(str(path), exact_session_options(), providers=["CPUExecutionProvider"])
    tokens, fmap = (t.numpy() for t in _inputs(3, batch=3))
    clean = session.run(["y"], {"tokens": tokens, "fmap": fmap})[0]
    for bad in (np.nan, np.inf, -np.inf):
        poisoned = tokens.copy()
        poisoned[1, 7, 5] = bad
        out = session.run(["y"], {"tokens": poisoned, "fmap": fmap})[0]
        assert np.isnan(out[1, 7]).all()
        keep = np.ones(out.shape[:2], bool)
        keep[1, 7] = False
        np.testing.assert_array_equal(out[keep], clean[keep])


def test_fp8_needs_opset_19(tmp_path):
    model = quantize_(Net().eval(), Fp8DynamicConfig(), skip=())
    with pytest.raises((UnsupportedError, FastgenError, RuntimeError), match="opset >= 19"):
        _export(model, tmp_path / "fp8.onnx", opset=17)


def test_fastgen_export_of_a_quantized_unet_verifies_in_onnxruntime(tmp_path):
    comp = fastgen.load_component("tiny", "unet")
    fp32 = fastgen.load_component("tiny", "unet")
    quantize_(comp.module, Int8DynamicConfig())
    config = ExportConfig(verify="opt", tolerance=VERIFY_TOLERANCE, min_cosine=VERIFY_MIN_COSINE)
    result = export(comp, tmp_path / "unet", config=config)
    ops = {n.op_type for n in onnx.load(str(result.onnx_path)).graph.node}
    assert "MatMulIntegerToFloat" in ops
    # Independent check at another seed. Each layer's graph is bit-exact (above), but the float parts
    # differ in the last bits between ORT and PyTorch, and any value that crosses a rounding boundary
    # moves by a whole quantization step: whole-model parity is only "within quantization noise".
    # So: ORT is closer to the quantized module than that is to fp32, and as accurate against fp32.
    inputs = comp.spec.sample_inputs("opt", seed=7)
    session = ort.InferenceSession(str(result.onnx_path), exact_session_options(), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])
    quantized, reference = comp(inputs)["noise_pred"], fp32(inputs)["noise_pred"]
    quant_db = sqnr_db(reference, quantized)
    assert quant_db > 30
    assert sqnr_db(quantized, out) > quant_db
    assert sqnr_db(reference, out) > quant_db - 1.5
