"""fastgen.build: cached, verified engines from presets, modules and third-party ONNX files."""

from __future__ import annotations

import json
import logging

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from fastgen.engines.build import build
from fastgen.engines.cache import EngineCache
from fastgen.engines.config import ExecutionOptions
from fastgen.engines.loading import load_engine
from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.export.config import ExportConfig
from fastgen.export.verify import compare
from fastgen.models import adapt, load_component

FAST = ExportConfig(verify="opt")


@pytest.fixture
def cache(tmp_path):
    return EngineCache(tmp_path / "cache")


def _cos(a: dict, b: dict) -> float:
    return min(compare(a[k], b[k])["cosine"] for k in a)


def test_onnxruntime_engine_matches_torch_and_hits_the_cache(cache):
    comp = load_component("tiny", "unet")
    first = build(comp, backend="onnxruntime", device="cpu", cache=cache, export=FAST)
    assert first.backend == "onnxruntime" and not first.cache_hit
    inputs = comp.spec.sample_inputs("max", seed=3)
    assert _cos(comp(inputs), first(inputs)) > 0.9999
    second = build(comp, backend="onnxruntime", device="cpu", cache=cache, export=FAST)
    assert second.cache_hit and second.manifest["cache_key"] == first.manifest["cache_key"]
    # runtime options are not part of the key
    third = build(comp, device="cpu", cache=cache, export=FAST, execution=ExecutionOptions(intra_op_threads=1))
    assert third.cache_hit


@pytest.mark.parametrize("change", [
    {"profile": "batch=1:2:4,height=32:64:96,width=64,seq=77"},
    {"precision": "fp16"},
    {"export": ExportConfig(verify="opt", opset=18)},
])
def test_changed_input_gives_a_new_key(cache, change):
    comp = load_component("tiny", "unet")
    base = build(comp, device="cpu", cache=cache, export=FAST)
    other = build(comp, device="cpu", cache=cache, **{"export": FAST, **change})
    assert other.manifest["cache_key"] != base.manifest["cache_key"] and not other.cache_hit


def test_changed_weights_give_a_new_key(cache):
    comp = load_component("tiny", "text-encoder")
    a = build(comp, device="cpu", cache=cache, export=FAST)
    with torch.no_grad():
        next(comp.model.parameters()).add_(1e-3)
    b = build(comp, device="cpu", cache=cache, export=FAST)
    assert a.manifest["cache_key"] != b.manifest["cache_key"]


def test_corrupted_entry_is_detected_and_rebuilt(cache, caplog):
    comp = load_component("tiny", "classifier")
    engine = build(comp, device="cpu", cache=cache, export=FAST)
    onnx_path = engine.path / "model.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = build(comp, device="cpu", cache=cache, export=FAST)
    assert not again.cache_hit
    assert any("corrupt" in r.getMessage().lower() or "sha256" in r.getMessage() for r in caplog.records)
    inputs = comp.spec.sample_inputs("opt", seed=1)
    assert _cos(comp(inputs), again(inputs)) > 0.9999


def test_fp16_onnxruntime_engine(cache):
    comp = load_component("tiny", "vae-decoder")
    engine = build(comp, precision="fp16", device="cpu", cache=cache, export=FAST)
    assert engine.precision == "fp16"
    assert engine.manifest["fp16_verification"]
    inputs = comp.spec.sample_inputs("opt", seed=5)
    out = engine(inputs)
    assert out["image"].dtype == torch.float16
    assert _cos(comp(inputs), {k: v.float() for k, v in out.items()}) > 0.999


def test_torch_engine_is_saved_without_pickle_and_reloads(cache, tmp_path, monkeypatch):
    comp = load_component("tiny", "text-encoder")
    engine = build(comp, backend="torch", device="cpu", cache=cache, out=tmp_path / "te")
    assert (tmp_path / "te" / "weights.safetensors").exists()
    import pickle

    def no_pickle(*a, **k):
        raise AssertionError("pickle must never be loaded")
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    reloaded = load_engine(tmp_path / "te")
    inputs = comp.spec.sample_inputs("opt", seed=2)
    ref = comp(inputs)
    for out in (engine(inputs), reloaded(inputs)):
        for k in ref:
            torch.testing.assert_close(out[k], ref[k])


def test_custom_module_engines(cache, tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2)).eval()
    comp = adapt(net, "classifier", image_size=32)
    in_memory = build(comp, backend="torch", device="cpu", cache=cache)
    ort_engine = build(comp, backend="onnxruntime", device="cpu", cache=cache, export=FAST)
    x = comp.spec.sample_inputs("opt", seed=0)
    assert _cos(in_memory(x), ort_engine(x)) > 0.9999
    with pytest.raises(UnsupportedError, match="torch"):
        build(comp, backend="torch", device="cpu", cache=cache, out=tmp_path / "nope")


def _third_party_onnx(path):
    # (N, 8) @ (8, 4) -> relu; N is a named dim, the graph was not made by fastgen
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 4], [0.1 * (i % 7 - 3) for i in range(32)])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what exporters of opset 17 write; onnx's helper writes the newest IR
    onnx.save(model, str(path))
    return path


def test_third_party_onnx_builds_and_caches(cache, tmp_path):
    src = _third_party_onnx(tmp_path / "third.onnx")
    engine = build(src, cache=cache, device="cpu", profile="N=1:4:16")
    assert engine.spec.profile.dims["N"].opt == 4
    x = torch.randn(3, 8)
    w = torch.tensor([0.1 * (i % 7 - 3) for i in range(32)]).view(8, 4)
    torch.testing.assert_close(engine({"x": x})["y"], torch.relu(x @ w))
    assert build(src, cache=cache, device="cpu", profile="N=1:4:16").cache_hit
    fp16 = build(src, cache=cache, device="cpu", precision="fp16", profile="N=1:4:16")
    torch.testing.assert_close(fp16({"x": x})["y"].float(), torch.relu(x @ w), atol=1e-2, rtol=1e-2)
    with pytest.raises(InvalidArgumentError, match="backend"):
        build(src, backend="torch", cache=cache)


def test_unsupported_combinations_name_the_backend(cache):
    with pytest.raises(UnsupportedError, match="onnxruntime.*bf16"):
        build("tiny", component="unet", precision="bf16", cache=cache)
    with pytest.raises(UnsupportedError, match="tensorrt"):
        build("tiny", component="unet", backend="tensorrt", cache=cache)


def test_no_cache_needs_out_and_writes_it(tmp_path):
    with pytest.raises(InvalidArgumentError, match="out"):
        build("tiny", component="classifier", cache=False)
    engine = build("tiny", component="classifier", cache=False, out=tmp_path / "c", device="cpu", export=FAST)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["backend"] == "onnxruntime" and engine.path == (tmp_path / "c").absolute()
    assert set(manifest["artifacts"]) >= {"model.onnx", "spec.json", "export.json"}
