"""fp32 -> fp16 ONNX conversion: onnxruntime's CPU EP runs the result, close to PyTorch fp32."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from fastgen.engines.ort_backend import OrtEngine
from fastgen.errors import InvalidArgumentError
from fastgen.export.fp16 import convert_to_fp16
from fastgen.models.component import Component
from fastgen.models.spec import ExportSpec, ShapeProfile, TensorSpec


class ConvLinearNormSoftmax(nn.Module):
    """conv + GroupNorm + linear + LayerNorm + softmax attention + a decomposed RMSNorm."""

    def __init__(self, rms_gain: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.lin = nn.Linear(16, 32)
        self.ln = nn.LayerNorm(32)
        self.q = nn.Linear(32, 32)
        self.rms_gain = rms_gain

    def forward(self, x):  # (batch, 3, 8, 8)
        h = nn.functional.silu(self.gn(self.conv(x)))  # (batch, 16, 8, 8)
        t = self.ln(self.lin(h.flatten(2).transpose(1, 2)))  # (batch, 64, 32)
        attn = torch.softmax(self.q(t) @ t.transpose(1, 2) / 4, dim=-1)  # (batch, 64, 64)
        y = (attn @ t) * self.rms_gain  # large activations make fp16 squares overflow
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (y,)


def make(rms_gain: float = 1.0) -> Component:
    torch.manual_seed(0)
    module = ConvLinearNormSoftmax(rms_gain).eval()
    spec = ExportSpec(component="block", inputs=(TensorSpec("x", "float32", ("batch", 3, 8, 8)),),
                      outputs=(TensorSpec("y", "float32", ("batch", 64, 32)),),
                      profile=ShapeProfile.of(batch=(1, 2, 4)))
    return Component(name="block", module=module, spec=spec, model=module)


def export_fp32(component: Component, path: Path) -> Path:
    """The component as an fp32 ONNX graph (TorchScript exporter, the spec's names and dynamic axes)."""
    spec = component.spec
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(component.module, tuple(spec.sample_inputs("opt").values()), str(path),
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes(), opset_version=17, dynamo=False)
    return path


@pytest.fixture
def onnx_export():
    return export_fp32


def cosine(a, b) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm > 0 else 0.0


def run_ort(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_fp16_engine_close_to_fp32(onnx_export, tmp_path):
    component = make()
    fp32 = onnx_export(component, tmp_path / "fp32.onnx")
    convert_to_fp16(fp32, tmp_path / "fp16" / "model.onnx")
    model = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    onnx.checker.check_model(model)  # also checks the nodes are topologically sorted
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert sorted(p.name for p in (tmp_path / "fp16").iterdir()) == ["model.onnx"]  # no temp files
    engine = OrtEngine(tmp_path / "fp16" / "model.onnx", component.spec, precision="fp16")
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch)) * 2
        out = engine.run(x=x)["y"]  # fp32 in: cast to the engine's fp16
        assert out.dtype == torch.float16
        assert cosine(out, component({"x": x})["y"]) > 0.999


def test_decomposed_norm_stays_fp32_as_a_chain(onnx_export, tmp_path):
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    component = make(rms_gain=400.0)  # |y| up to ~1e4: y**2 overflows fp16 (max 65504)
    fp32 = onnx_export(component, tmp_path / "fp32.onnx")
    x = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2)
    ref = component({"x": x})["y"].numpy()

    # Blocking Pow and ReduceMean one by one casts the squares back to fp16 between them: overflow.
    naive = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=False,
                                     op_block_list=[*DEFAULT_OP_BLOCK_LIST, "Pow", "ReduceMean", "Sqrt"])
    onnx.save(naive, str(tmp_path / "naive.onnx"))
    naive_out = run_ort(tmp_path / "naive.onnx", x.numpy().astype(np.float16))
    assert not (np.isfinite(naive_out).all() and cosine(naive_out, ref) > 0.99)  # all zeros, in fact

    convert_to_fp16(fp32, tmp_path / "fp16.onnx")
    out = run_ort(tmp_path / "fp16.onnx", x.numpy().astype(np.float16))
    assert np.isfinite(out).all()
    assert cosine(out, ref) > 0.999

    # The chain Pow -> ReduceMean -> Add -> Sqrt passes fp32 tensors directly, with no Cast between.
    graph = onnx.load(str(tmp_path / "fp16.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    by_op = {n.op_type: n for n in graph.node}
    assert producer[by_op["ReduceMean"].input[0]].op_type == "Pow"
    assert producer[by_op["Sqrt"].input[0]].op_type == "Add"
    add = producer[by_op["Sqrt"].input[0]]
    assert producer[add.input[0]].op_type == "ReduceMean"


def test_external_data(onnx_export, tmp_path):
    component = make()
    (tmp_path / "src").mkdir()
    fp32 = onnx_export(component, tmp_path / "src" / "model.onnx")
    # Re-save with every weight outside the graph, as exports over 2 GB are.
    model = onnx.load(str(fp32))
    onnx.save(model, str(fp32), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    assert (tmp_path / "src" / "model.onnx.data").exists()
    dst = tmp_path / "out" / "model.onnx"
    convert_to_fp16(fp32, dst)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    graph_only = onnx.load(str(dst), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph_only.graph.initializer)
    x = torch.randn(2, 3, 8, 8)
    out = run_ort(dst, x.numpy().astype(np.float16))
    assert cosine(out, component({"x": x})["y"]) > 0.999
    # In place (src == dst), as a build does inside its staging directory.
    convert_to_fp16(fp32, fp32)
    assert sorted(p.name for p in fp32.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    np.testing.assert_array_equal(run_ort(fp32, x.numpy().astype(np.float16)), out)


def test_failure_leaves_nothing(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"definitely not a model")
    (tmp_path / "out").mkdir()
    with pytest.raises(Exception):  # noqa: B017 - protobuf's own decode error
        convert_to_fp16(tmp_path / "bad.onnx", tmp_path / "out" / "model.onnx")
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(InvalidArgumentError, match="no such file"):
        convert_to_fp16(tmp_path / "missing.onnx", tmp_path / "out" / "model.onnx")


def test_shared_initializer_feeding_several_fp32_nodes(tmp_path):
    """Two LayerNorms sharing one bias tensor (as onnxslim leaves them) convert to a valid graph."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    scale = helper.make_tensor("scale", TensorProto.FLOAT, [8], np.ones(8, np.float32))
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [8], np.zeros(8, np.float32))
    # bias also feeds an Add, which goes fp16, so both LayerNorms need a cast of it back to fp32
    nodes = [helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["h"], axis=-1, name="ln1"),
             helper.make_node("Add", ["h", "bias"], ["h2"], name="add"),
             helper.make_node("LayerNormalization", ["h2", "scale", "bias"], ["y"], axis=-1, name="ln2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [scale, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "ln.onnx"))
    convert_to_fp16(tmp_path / "ln.onnx", tmp_path / "ln16.onnx")
    onnx.checker.check_model(str(tmp_path / "ln16.onnx"))
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    out = ort.InferenceSession(str(tmp_path / "ln16.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.astype(np.float16)})[0]
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out.astype(np.float32), ref, atol=1e-2)

