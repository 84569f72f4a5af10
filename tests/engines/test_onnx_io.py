"""Export specs read from ONNX graphs that fastgen did not write."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper

from fastgen.engines.onnx_io import onnx_precision, spec_from_onnx
from fastgen.errors import InvalidArgumentError, UnsupportedError


def graph_model(inputs, outputs, nodes=(), initializers=(), ir_version=8) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="third-party")
    model.ir_version = ir_version
    return model


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def test_dims_dtypes_and_default_profile():
    model = graph_model(
        inputs=[vi("x", TensorProto.FLOAT, ["N", None, 8]),
                vi("input_ids", TensorProto.INT64, ["batch_size", "sequence"]),
                vi("pixels", TensorProto.UINT8, [1, "height", "width", 3]),
                vi("flag", TensorProto.BOOL, [1])],
        outputs=[vi("y", TensorProto.FLOAT16, ["N", "unk__12", None]),
                 vi("z", TensorProto.INT32, ["batch_size"])],
    )
    spec = spec_from_onnx(model, component="thing")
    assert spec.component == "thing" and spec.model_type == "third-party"
    x, ids, pixels, flag = spec.inputs
    assert (x.dtype, x.shape) == ("float32", ("N", "x_dim1", 8))
    assert (ids.dtype, ids.shape, ids.low, ids.high) == ("int64", ("batch_size", "sequence"), 0, 2)
    assert (pixels.dtype, pixels.low, pixels.high) == ("uint8", 0, 256)
    assert flag.dtype == "bool"
    y, z = spec.outputs
    assert (y.dtype, y.shape) == ("float16", ("N", "unk__12", "y_dim2"))
    assert z.dtype == "int32"
    profile = {k: (v.min, v.opt, v.max) for k, v in spec.profile.dims.items()}
    assert profile == {"N": (1, 1, 16), "x_dim1": (1, 1, 1), "batch_size": (1, 1, 16),
                       "sequence": (1, 16, 512), "height": (1, 224, 1024), "width": (1, 224, 1024)}
    # Output dims that no input determines resolve to None; the others resolve.
    shapes = spec.resolve(spec.shape_at("opt"))
    assert shapes["y"] is None and shapes["z"] == (1,)
    # Sample inputs can be drawn at the heuristic profile, so `fastgen bench` has something to run.
    sample = spec.sample_inputs("opt")
    assert tuple(sample["pixels"].shape) == (1, 224, 224, 3)
    assert int(sample["input_ids"].max()) < 2


def test_dim_params_are_sanitised_and_derived_dims_read_back():
    model = graph_model(
        inputs=[vi("a", TensorProto.FLOAT, ["batch size", "2d", "height", "height_div8"])],
        outputs=[vi("b", TensorProto.FLOAT, ["batch size"])],
    )
    spec = spec_from_onnx(model)
    assert spec.inputs[0].shape == ("batch_size", "_2d", "height", "height/8")
    h = spec.profile.dims["height"]
    assert (h.min, h.opt, h.max) == (8, 224, 1024)  # rounded up so height/8 divides
    assert spec.outputs[0].shape == ("batch_size",)


def test_fastgen_export_round_trips(conv, onnx_export, tmp_path):
    path = onnx_export(conv, tmp_path / "conv.onnx")
    spec = spec_from_onnx(path)
    assert [t.shape for t in spec.inputs] == [t.shape for t in conv.spec.inputs]
    assert [t.shape for t in spec.outputs] == [t.shape for t in conv.spec.outputs]
    assert spec.input_names == conv.spec.input_names and spec.output_names == conv.spec.output_names


def test_unsupported_types_name_the_tensor():
    model = graph_model(inputs=[vi("weights64", TensorProto.DOUBLE, [3])], outputs=[vi("o", TensorProto.FLOAT, [3])])
    with pytest.raises(UnsupportedError, match="weights64.*DOUBLE"):
        spec_from_onnx(model)
    model = graph_model(inputs=[vi("i", TensorProto.FLOAT, [3])], outputs=[vi("out_c", TensorProto.COMPLEX64, [3])])
    with pytest.raises(UnsupportedError, match="out_c"):
        spec_from_onnx(model)
    seq = helper.make_tensor_sequence_value_info("seq_in", TensorProto.FLOAT, [3])
    with pytest.raises(UnsupportedError, match="seq_in.*not a tensor"):
        spec_from_onnx(graph_model(inputs=[seq], outputs=[vi("o", TensorProto.FLOAT, [3])]))


def test_initializers_listed_as_inputs_are_not_inputs():
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, 0.0, 0.0, 1.0])
    model = graph_model(inputs=[vi("x", TensorProto.FLOAT, ["N", 2]), vi("w", TensorProto.FLOAT, [2, 2])],
                        outputs=[vi("y", TensorProto.FLOAT, ["N", 2])],
                        nodes=[helper.make_node("MatMul", ["x", "w"], ["y"])], initializers=[w], ir_version=3)
    assert spec_from_onnx(model).input_names == ["x"]


def test_missing_output_shapes_are_inferred():
    model = graph_model(inputs=[vi("x", TensorProto.FLOAT, ["N", 4])],
                        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                        nodes=[helper.make_node("Relu", ["x"], ["y"])])
    assert spec_from_onnx(model).outputs[0].shape == ("N", 4)


def test_external_weights_are_not_read(tmp_path):
    w = onnx.numpy_helper.from_array(np.full((64, 64), 0.5, np.float32), "w")
    model = graph_model(inputs=[vi("x", TensorProto.FLOAT, ["N", 64])], outputs=[vi("y", TensorProto.FLOAT, ["N", 64])],
                        nodes=[helper.make_node("MatMul", ["x", "w"], ["y"])], initializers=[w])
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    (tmp_path / "m.onnx.data").unlink()  # reading the IO signature must not need the weights
    assert spec_from_onnx(tmp_path / "m.onnx").input_names == ["x"]


def test_bad_paths(tmp_path):
    with pytest.raises(InvalidArgumentError, match="no such file"):
        spec_from_onnx(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\xffnot protobuf at all" * 10)
    with pytest.raises(InvalidArgumentError, match="not a readable ONNX file"):
        spec_from_onnx(tmp_path / "junk.onnx")


@pytest.mark.parametrize(("elems", "expected"), [
    ([TensorProto.FLOAT], "fp32"),
    ([TensorProto.FLOAT16, TensorProto.INT64], "fp16"),
    ([TensorProto.INT64], "fp32"),
    ([TensorProto.FLOAT16, TensorProto.FLOAT], "fp32"),
    ([TensorProto.BFLOAT16], "bf16"),
])
def test_onnx_precision(elems, expected):
    model = graph_model(inputs=[vi(f"i{k}", e, [2]) for k, e in enumerate(elems)],
                        outputs=[vi("o", TensorProto.FLOAT, [2])])
    assert onnx_precision(model) == expected
