"""load_engine: bare ONNX files (fastgen's or anyone's), engine directories, and bad paths."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fastgen.engines.cache import write_manifest
from fastgen.engines.config import ExecutionOptions
from fastgen.engines.loading import load_engine
from fastgen.engines.ort_backend import OrtEngine
from fastgen.engines.registry import get_backend, register_backend
from fastgen.errors import CacheCorruptionError, InvalidArgumentError, UnsupportedError
from fastgen.export.fp16 import convert_to_fp16


def third_party_onnx(path):
    """MatMul + Relu, built by hand: a named dynamic dim "N" and an unnamed dynamic dim."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 5)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "W"], ["mm"]), helper.make_node("Relu", ["mm"], ["activ"])],
        "third_party",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", None, 8])],
        [helper.make_tensor_value_info("activ", TensorProto.FLOAT, ["N", None, 5])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="by-hand")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w


def test_third_party_onnx_runs_at_two_batch_sizes(tmp_path):
    w = third_party_onnx(tmp_path / "x.onnx")
    engine = load_engine(str(tmp_path / "x.onnx"))
    assert isinstance(engine, OrtEngine) and engine.precision == "fp32" and engine.device.type == "cpu"
    assert engine.spec.inputs[0].shape == ("N", "features_dim1", 8)
    assert engine.spec.component == "x"
    for n, m in [(1, 3), (7, 2)]:
        x = np.random.default_rng(n).standard_normal((n, m, 8)).astype(np.float32)
        out = engine.run(features=x)["activ"]
        assert out.shape == (n, m, 5)
        np.testing.assert_allclose(out.numpy(), np.maximum(x @ w, 0), rtol=1e-5, atol=1e-6)


def test_fastgen_onnx_file_and_folder(conv, onnx_export, tmp_path):
    (tmp_path / "only").mkdir()
    path = onnx_export(conv, tmp_path / "only" / "conv.onnx")
    inputs = conv.spec.sample_inputs({"batch": 3, "height": 10, "width": 12})
    want = conv(inputs)
    for target in (path, tmp_path / "only"):  # a folder with exactly one .onnx is that file
        engine = load_engine(target)
        got = engine.run(inputs)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


def make_engine_dir(component, onnx_export, directory, precision="fp32", device="cpu"):
    directory.mkdir(parents=True)
    onnx_export(component, directory / "fp32.onnx")
    if precision == "fp16":
        convert_to_fp16(directory / "fp32.onnx", directory / "model.onnx")
        (directory / "fp32.onnx").unlink()
    else:
        (directory / "fp32.onnx").rename(directory / "model.onnx")
    write_manifest(directory, {"backend": "onnxruntime", "precision": precision, "device": device,
                               "spec": component.spec.to_dict(), "cache_key": "k", "built_at": "now"})
    return directory


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_directory(conv, onnx_export, tmp_path, precision, monkeypatch):
    directory = make_engine_dir(conv, onnx_export, tmp_path / "engine", precision)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle must never be loaded")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    engine = load_engine(directory)
    assert engine.precision == precision and engine.path == directory
    assert engine.spec == conv.spec  # the manifest's spec, profile included
    assert engine.describe()["cache_key"] == "k"
    inputs = conv.spec.sample_inputs("opt")
    got, want = engine.run(inputs), conv(inputs)
    tol = 1e-5 if precision == "fp32" else 2e-2
    for name in want:
        assert got[name].dtype == (torch.float32 if precision == "fp32" else torch.float16)
        torch.testing.assert_close(got[name].float(), want[name], rtol=tol, atol=tol)


def test_damaged_engine_directory(conv, onnx_export, tmp_path):
    directory = make_engine_dir(conv, onnx_export, tmp_path / "engine")
    data = bytearray((directory / "model.onnx").read_bytes())
    weight = onnx.load(str(directory / "model.onnx")).graph.initializer[0].raw_data
    data[data.find(weight)] ^= 0x01  # one bit of one weight: still a valid model
    (directory / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(CacheCorruptionError, match=r"model\.onnx.*corrupted"):
        load_engine(directory)
    load_engine(directory, verify="size")  # sizes only: the flipped bit goes unnoticed
    (directory / "model.onnx").write_bytes(bytes(data[:-1]))
    with pytest.raises(CacheCorruptionError, match="truncated"):
        load_engine(directory, verify="size")


def test_manifest_device_unavailable_falls_back_to_cpu(conv, onnx_export, tmp_path, caplog):
    directory = make_engine_dir(conv, onnx_export, tmp_path / "engine", device="cuda")
    if torch.cuda.is_available():
        pytest.skip("this machine can run cuda engines")
    caplog.set_level(logging.WARNING, logger="fastgen.engines.loading")
    engine = load_engine(directory)
    assert engine.device.type == "cpu"
    assert "built for cuda" in caplog.text
    with pytest.raises(UnsupportedError, match="cuda"):
        load_engine(directory, device="cuda")  # explicit: an error, not a fallback


def test_bad_paths(tmp_path, conv, onnx_export):
    with pytest.raises(InvalidArgumentError, match="no such file or directory"):
        load_engine(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InvalidArgumentError, match="not an .onnx file or an engine directory"):
        load_engine(tmp_path / "notes.txt")
    (tmp_path / "two").mkdir()
    onnx_export(conv, tmp_path / "two" / "a.onnx")
    shutil.copy(tmp_path / "two" / "a.onnx", tmp_path / "two" / "b.onnx")
    with pytest.raises(InvalidArgumentError, match="not an .onnx file or an engine directory"):
        load_engine(tmp_path / "two")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgumentError, match="engine"):
        load_engine(tmp_path / "empty")


def test_unknown_backend(tmp_path):
    (tmp_path / "e").mkdir()
    write_manifest(tmp_path / "e", {"backend": "openvino"})
    with pytest.raises(InvalidArgumentError, match="engine backend 'openvino'"):
        load_engine(tmp_path / "e")


def test_tensorrt_dispatch(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "model.plan").write_bytes(b"plan")
    write_manifest(tmp_path / "e", {"backend": "tensorrt", "device": "cpu"})
    from fastgen.engines import trt_lib

    if not trt_lib.installed():
        with pytest.raises(UnsupportedError, match="backend 'tensorrt' needs NVIDIA TensorRT"):
            load_engine(tmp_path / "e", device="cpu")
    calls = []
    real = get_backend("tensorrt")
    # What the TensorRT issue fills in: an available spec whose load opens the directory.
    register_backend(dataclasses.replace(real, unavailable=None, resolve_device=torch.device,
                                         load=lambda directory, manifest, *, device, execution:
                                         calls.append((directory, manifest["backend"], device, execution)) or "trt-engine"),
                     replace=True)
    try:
        assert load_engine(tmp_path / "e", device="cpu") == "trt-engine"
    finally:
        register_backend(real, replace=True)
    assert calls == [(tmp_path / "e", "tensorrt", torch.device("cpu"), ExecutionOptions())]


def test_torch_engine_directory(tmp_path):
    models = pytest.importorskip("fastgen.models")
    if not hasattr(models, "rebuild_component"):
        pytest.skip("fastgen.models.rebuild_component is not written yet")
    from fastgen.engines.torch_backend import TorchEngine, save_torch_engine

    component = models.load_component("tiny", "vae-decoder")
    save_torch_engine(component, tmp_path, "bf16")
    write_manifest(tmp_path, {"backend": "torch", "precision": "bf16", "device": "cpu",
                              "spec": component.spec.to_dict(), "source": component.source})
    engine = load_engine(tmp_path)
    assert isinstance(engine, TorchEngine) and engine.precision == "bf16"
    inputs = component.spec.sample_inputs("min")
    want = component(inputs)
    got = engine.run(inputs)
    for name in want:
        assert got[name].dtype == torch.bfloat16
        torch.testing.assert_close(got[name].float(), want[name], rtol=0.1, atol=0.1)


def test_graph_onnxruntime_cannot_load_names_the_backend(tmp_path):
    third_party_onnx(tmp_path / "x.onnx")
    model = onnx.load(str(tmp_path / "x.onnx"))
    model.graph.node[1].op_type = "NoSuchOp"
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(UnsupportedError, match=r"onnxruntime .* backend cannot load .*bad\.onnx.*NoSuchOp"):
        load_engine(tmp_path / "bad.onnx")
