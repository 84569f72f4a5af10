"""fp32 -> bf16 ONNX conversion: bfloat16 wherever the fp16 graph has float16, valid ONNX, close to PyTorch.

onnxruntime's CPU provider has almost no bf16 kernels, so the graphs run on onnx's reference
evaluator (numpy with ml_dtypes' bfloat16), against the PyTorch fp32 module fed the same
bf16-rounded inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from fastgen.errors import InvalidArgumentError
from fastgen.export.bf16 import bf16_bits
from fastgen.export.fp16 import convert_to_bf16


class ConvMlp(nn.Module):
    """conv + MLP + LayerNorm + softmax attention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32))
        self.ln = nn.LayerNorm(32)

    def forward(self, x):  # (batch, 3, 8, 8) -> (batch, 64, 32)
        t = self.ln(self.mlp(self.conv(x).flatten(2).transpose(1, 2)))
        return torch.softmax(t @ t.transpose(1, 2) / 4, dim=-1) @ t


def export_fp32(module: nn.Module, path: Path, opset: int) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 3, 8, 8),), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=opset, dynamo=False)
    return path


def float16_uses(model: onnx.ModelProto) -> list[str]:
    """Every place a FLOAT16 type is named: value types, tensors, dtype attributes, in subgraphs too."""

    def graphs(graph) -> Iterator[onnx.GraphProto]:
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                yield from (g for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
                            for g in graphs(sub))

    found = []
    for graph in graphs(model.graph):
        for value in [*graph.input, *graph.output, *graph.value_info]:
            if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
                found.append(f"value {value.name}")
        found += [f"initializer {t.name}" for t in graph.initializer if t.data_type == TensorProto.FLOAT16]
        for node in graph.node:
            for attr in node.attribute:
                if (attr.type == onnx.AttributeProto.INT and attr.i == TensorProto.FLOAT16
                        or attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16):
                    found.append(f"{node.op_type} {node.name}.{attr.name}")
    return found


def bf16_types_only(path: Path, full_check: bool = True) -> onnx.ModelProto:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=full_check)  # full_check: strict type inference against the schemas
    assert float16_uses(model) == []
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.elem_type in (TensorProto.BFLOAT16, TensorProto.INT64), value.name
    return model


def run_bf16(model: onnx.ModelProto | Path, **inputs: torch.Tensor) -> np.ndarray:
    """First output of the graph on the reference evaluator, fed bf16 inputs, as float32."""
    model = onnx.load(str(model)) if isinstance(model, Path) else model
    feeds = {k: v.numpy().astype(ml_dtypes.bfloat16) if v.is_floating_point() else v.numpy() for k, v in inputs.items()}
    return ReferenceEvaluator(model).run(None, feeds)[0].astype(np.float32)


def assert_close(out: np.ndarray, ref: np.ndarray, max_rel: float = 3e-2) -> None:
    """Within bf16's tolerance (8 significant bits, and bf16 arithmetic in the reference evaluator)."""
    a, b = out.ravel().astype(np.float64), np.asarray(ref).ravel().astype(np.float64)
    assert np.isfinite(a).all()
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999
    assert np.abs(a - b).max() / np.abs(b).max() < max_rel


def bf16_rounded(x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().float()


def test_bf16_bits_round_to_nearest_even_like_torch():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(1000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 1000),
                        np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 0.0, -0.0, 1e-40, np.inf, -np.inf, 3e38],
                                 np.float32)])  # ties go to even, subnormals, infinities
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_bits(x), expected)
    nan = bf16_bits(np.array([np.nan, -np.nan, np.float32(np.uint32(0xFFFFFFFF).view(np.float32))]))
    assert np.isnan(nan.view(ml_dtypes.bfloat16).astype(np.float32)).all()
    # fp32's largest finite values round to infinity in torch; here they saturate, as masks need.
    big = bf16_bits(np.array([np.finfo(np.float32).max, np.finfo(np.float32).min], np.float32))
    np.testing.assert_array_equal(big.view(ml_dtypes.bfloat16).astype(np.float32),
                                  [float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), float(ml_dtypes.finfo(ml_dtypes.bfloat16).min)])


@pytest.mark.parametrize("opset", [17, 22])
def test_bf16_graph_types_and_parity(tmp_path, opset):
    torch.manual_seed(0)
    module = ConvMlp().eval()
    fp32 = export_fp32(module, tmp_path / "fp32.onnx", opset)
    convert_to_bf16(fp32, tmp_path / "bf16" / "model.onnx", min_opset=None)  # the graph's own opset
    assert sorted(p.name for p in (tmp_path / "bf16").iterdir()) == ["model.onnx"]  # no temp files
    model = bf16_types_only(tmp_path / "bf16" / "model.onnx")
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.value_info]}
    types.update((t.name, t.data_type) for t in model.graph.initializer)
    nodes = {n.op_type: n for n in model.graph.node}
    # Conv takes bfloat16 from opset 22: before that it stays fp32, its input cast from bf16.
    assert types[nodes["Conv"].input[0]] == (TensorProto.FLOAT if opset < 22 else TensorProto.BFLOAT16)
    assert types[nodes["MatMul"].input[0]] == TensorProto.BFLOAT16
    assert types[nodes["LayerNormalization"].input[0]] == TensorProto.FLOAT  # kept fp32, as in fp16 graphs
    # Weights are rounded from their fp32 values, round to nearest even.
    weight = next(t for t in model.graph.initializer if t.data_type == TensorProto.BFLOAT16 and t.dims == [32, 32])
    expected = {bf16_rounded(p.detach().T if p.dim() == 2 else p.detach()).numpy().tobytes()
                for p in module.mlp[2].parameters()}
    assert numpy_helper.to_array(weight).astype(np.float32).tobytes() in expected

    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch)) * 2
        assert_close(run_bf16(model, x=x), module(bf16_rounded(x)).detach().numpy())


@pytest.mark.parametrize("opset", [17, 22])
def test_ops_without_bf16_stay_fp32(tmp_path, opset):
    """ConstantOfShape and Sin take no bfloat16 before opsets 21 and 22, Resize (with roi) none at all:
    they stay fp32 behind casts. A -fp32 max mask constant saturates to bf16's min (fp16 would clamp it to
    -65504), inside an If branch too."""
    mask = np.full([1, 4], np.finfo(np.float32).min, np.float32)
    branch = helper.make_graph([helper.make_node("Add", ["x", "mask"], ["masked"])], "then", [],
                               [helper.make_tensor_value_info("masked", TensorProto.FLOAT, None)],
                               [numpy_helper.from_array(mask, "mask")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["same"])], "else", [],
                              [helper.make_tensor_value_info("same", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("Sin", ["x"], ["sin"]),
        helper.make_node("Add", ["sin", "ones"], ["a"]),
        helper.make_node("Resize", ["a", "roi", "scales"], ["up"], mode="nearest"),
        helper.make_node("ReduceMax", ["up"], ["m"], keepdims=0),
        helper.make_node("Greater", ["m", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], then_branch=branch, else_branch=other),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("up", TensorProto.FLOAT, [2, 8])],
                              [numpy_helper.from_array(np.zeros(4, np.float32), "roi"),
                               numpy_helper.from_array(np.array([2, 2], np.float32), "scales"),
                               numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(tmp_path / "fp32.onnx"))

    convert_to_bf16(tmp_path / "fp32.onnx", tmp_path / "bf16.onnx", min_opset=None)  # the graph's own opset
    converted = bf16_types_only(tmp_path / "bf16.onnx")
    types = {v.name: v.type.tensor_type.elem_type for v in [*converted.graph.input, *converted.graph.value_info]}
    by_op = {n.op_type: n for n in converted.graph.node}
    expected = TensorProto.FLOAT if opset < 22 else TensorProto.BFLOAT16
    assert types[by_op["Sin"].input[0]] == expected
    assert next(a.t.data_type for a in by_op["ConstantOfShape"].attribute) == (
        TensorProto.FLOAT if opset < 21 else TensorProto.BFLOAT16)
    assert types[by_op["Resize"].input[0]] == TensorProto.FLOAT
    then = next(a.g for a in by_op["If"].attribute if a.name == "then_branch")
    assert then.initializer[0].data_type == TensorProto.BFLOAT16
    np.testing.assert_array_equal(numpy_helper.to_array(then.initializer[0]).astype(np.float32),
                                  np.full([1, 4], float(ml_dtypes.finfo(ml_dtypes.bfloat16).min)))

    x = torch.tensor([[0.5, 1.0, 2.0, 3.0]])
    masked, up = ReferenceEvaluator(converted).run(None, {"x": x.numpy().astype(ml_dtypes.bfloat16)})
    assert np.isfinite(masked.astype(np.float32)).all() and masked.astype(np.float32).max() < -3e38
    up_ref = np.repeat(np.repeat(np.sin(x.numpy()) + 1, 2, axis=0), 2, axis=1)
    np.testing.assert_allclose(up.astype(np.float32), up_ref, rtol=1e-2)


@pytest.mark.slow  # 12 to 17 s here, nearly all of it importing diffusers and exporting: the rest take ~1.5 s
def test_tiny_unet(tmp_path):
    """The preset's UNet at the exporter's default opset (17): Conv, Sin and Cos stay fp32."""
    from fastgen.export import ExportConfig, export
    from fastgen.models import load_component

    comp = load_component("tiny", "unet")
    result = export(comp, tmp_path / "unet", config=ExportConfig(verify="none"))
    convert_to_bf16(result.onnx_path, tmp_path / "bf16.onnx")
    model = bf16_types_only(tmp_path / "bf16.onnx")
    produced = {o: n for n in model.graph.node for o in n.output}
    fp32_ops = {n.op_type for n in model.graph.node if n.op_type != "Cast"
                and any(produced.get(i) is not None and produced[i].op_type == "Cast"
                        and next(a.i for a in produced[i].attribute if a.name == "to") == TensorProto.FLOAT
                        for i in n.input)}
    assert {"Conv", "Sin", "Cos", "InstanceNormalization", "LayerNormalization"} <= fp32_ops
    assert not fp32_ops & {"MatMul", "Gemm", "Softmax"}
    for seed in (0, 1):
        inputs = comp.spec.sample_inputs("opt", seed=seed)
        ref = comp({k: bf16_rounded(v) for k, v in inputs.items()})["noise_pred"]
        # bf16 intermediates throughout (TensorRT accumulates in fp32): measured 1.8e-2 to 3.4e-2.
        assert_close(run_bf16(model, **inputs), ref.numpy(), max_rel=5e-2)


def test_external_data(tmp_path):
    torch.manual_seed(0)
    module = ConvMlp().eval()
    (tmp_path / "src").mkdir()
    fp32 = export_fp32(module, tmp_path / "src" / "model.onnx", 17)
    onnx.save(onnx.load(str(fp32)), str(fp32), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    dst = tmp_path / "out" / "model.onnx"
    convert_to_bf16(fp32, dst)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    graph_only = onnx.load(str(dst), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL and t.data_type == TensorProto.BFLOAT16
               for t in graph_only.graph.initializer)
    bf16_types_only(dst, full_check=False)
    x = torch.randn(2, 3, 8, 8)
    out = run_bf16(dst, x=x)
    assert_close(out, module(bf16_rounded(x)).detach().numpy())
    convert_to_bf16(fp32, fp32)  # in place, as a build does in its staging directory
    assert sorted(p.name for p in fp32.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    np.testing.assert_array_equal(run_bf16(fp32, x=x), out)


def test_old_opset_is_refused_and_leaves_nothing(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]), str(tmp_path / "old.onnx"))
    (tmp_path / "out").mkdir()
    with pytest.raises(InvalidArgumentError, match="opset 13 or newer"):
        convert_to_bf16(tmp_path / "old.onnx", tmp_path / "out" / "model.onnx", min_opset=None)
    assert list((tmp_path / "out").iterdir()) == []


def test_older_opsets_are_converted_so_convs_run_in_bf16(tmp_path):
    torch.manual_seed(0)
    fp32 = export_fp32(ConvMlp().eval(), tmp_path / "fp32.onnx", 17)
    convert_to_bf16(fp32, tmp_path / "bf16.onnx")  # default: opset 22 first
    model = bf16_types_only(tmp_path / "bf16.onnx")
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 22
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight = next(t for t in model.graph.initializer if t.name == conv.input[1])
    assert weight.data_type == TensorProto.BFLOAT16
