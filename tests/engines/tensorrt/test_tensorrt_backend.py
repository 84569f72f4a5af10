"""The TensorRT backend's logic on stand-ins of TensorRT 10 and 11 (generated from the real bindings).

The stand-in executes the plan's ONNX graph with onnxruntime on the CPU, reading inputs from and
writing outputs to the addresses the backend binds, so a wrong pointer, shape, profile or dtype
shows up as a wrong number here. Every TensorRT call the backend makes is checked against both
versions' real signatures after each test (conftest.py).
"""

from __future__ import annotations

import json

import pytest
import torch

import fastgen
from fastgen.engines.cache import EngineCache
from fastgen.engines.loading import load_engine
from fastgen.engines.trt_options import TensorRTOptions, choose_profile, profiles_for
from fastgen.errors import InvalidArgumentError, UnsupportedError


def _build(component, tmp_path, **kwargs):
    kwargs.setdefault("cache", EngineCache(tmp_path / "cache"))
    return fastgen.build(component, backend="tensorrt", device="cpu", **kwargs)


def _close(engine, component, shape="opt", seed=0, atol=1e-4):
    inputs = component.spec.sample_inputs(shape, seed=seed)
    got = engine.run(inputs)
    with torch.no_grad():
        want = component.module(*inputs.values())
    for name, ref in zip(component.spec.output_names, want, strict=True):
        torch.testing.assert_close(got[name].float(), ref, atol=atol, rtol=atol)


def test_build_runs_and_matches_torch(trt, mlp, tmp_path):
    engine = _build(mlp, tmp_path)
    assert engine.backend == "tensorrt" and engine.strict_profile
    for shape in ("min", "opt", "max", {"batch": 5}):
        _close(engine, mlp, shape)
    directory = engine.path
    names = sorted(p.name for p in directory.iterdir())
    assert "model.plan" in names and "engine_info.json" in names and "model.onnx" not in names
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["backend_version"] == trt.__version__
    assert manifest["tensorrt"]["settings"]["strongly_typed"] and manifest["tensorrt_verification"]
    assert manifest["tensorrt"]["profiles"] == ["batch=1:2:8"]
    assert manifest["tensorrt"]["trt_profiles"] == [{"x": {"min": [1, 16], "opt": [2, 16], "max": [8, 16]}}]
    reloaded = load_engine(directory, device="cpu")
    _close(reloaded, mlp, {"batch": 3})


def test_outside_every_profile_is_refused_naming_it(trt, mlp, tmp_path):
    engine = _build(mlp, tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"batch.*1 to 8") as info:
        engine.run(x=torch.randn(9, 16))
    assert "\n" not in str(info.value)


def test_derived_dims_and_extra_profiles(trt, conv, tmp_path):
    options = TensorRTOptions(extra_profiles=("height=16,width=16", "batch=4,height=32,width=32"))
    engine = _build(conv, tmp_path, tensorrt=options)
    assert [str(p) for p in engine.profiles] == ["batch=1:2:4,height=8:16:32,width=8:16:32",
                                                 "batch=1:2:4,height=16:16:16,width=16:16:16",
                                                 "batch=4:4:4,height=32:32:32,width=32:32:32"]
    recorded = json.loads((engine.path / "manifest.json").read_text())["tensorrt"]["trt_profiles"]
    assert recorded[0]["image"] == {"min": [1, 3, 8, 8], "opt": [2, 3, 16, 16], "max": [4, 3, 32, 32]}
    assert recorded[2]["scale"] == {"min": [4], "opt": [4], "max": [4]}
    assert engine.choose_profile({"batch": 2, "height": 16, "width": 16}) == 1
    assert engine.choose_profile({"batch": 4, "height": 32, "width": 32}) == 2
    assert engine.choose_profile({"batch": 1, "height": 8, "width": 24}) == 0
    for shape in ({"batch": 2, "height": 16, "width": 16}, {"batch": 4, "height": 32, "width": 32},
                  {"batch": 1, "height": 8, "width": 24}, {"batch": 2, "height": 16, "width": 16}):
        _close(engine, conv, shape)  # switching profiles back and forth


def test_seq_bucket_profiles_and_per_call_choice(trt, tokens, tmp_path):
    options = TensorRTOptions(seq_buckets=(4, 8, 48))
    profiles = profiles_for(tokens.spec, options)
    assert [str(p) for p in profiles] == ["batch=1:2:4,seq=1:8:16", "batch=1:2:4,seq=1:4:4",
                                          "batch=1:2:4,seq=5:8:8", "batch=1:2:4,seq=9:16:16"]
    assert choose_profile(profiles, {"batch": 1, "seq": 3}) == 1
    assert choose_profile(profiles, {"batch": 1, "seq": 12}) == 3
    engine = _build(tokens, tmp_path, tensorrt=options)
    for seq in (1, 3, 7, 8, 12, 16):
        _close(engine, tokens, {"batch": 2, "seq": seq}, atol=1e-5)


def test_options_validate_in_one_line(mlp):
    for kwargs, needle in (({"optimization_level": 6}, "trt-optimization-level"),
                           ({"workspace_gib": -1}, "trt-workspace-gib"),
                           ({"extra_profiles": ("batch",)}, "profile"),
                           ({"seq_buckets": (8, 4)}, "trt-seq-buckets")):
        with pytest.raises(InvalidArgumentError, match=needle) as info:
            TensorRTOptions(**kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(InvalidArgumentError, match="engine's range"):
        profiles_for(mlp.spec, TensorRTOptions(extra_profiles=("batch=1:4:16",)))
    with pytest.raises(InvalidArgumentError, match="not a dim"):
        profiles_for(mlp.spec, TensorRTOptions(extra_profiles=("seq=4",)))
    assert profiles_for(mlp.spec, TensorRTOptions(extra_profiles=("batch=1:2:8",))) == [mlp.spec.profile]


def test_cache_key_holds_builder_settings_not_the_timing_cache(trt, mlp, tmp_path):
    cache = EngineCache(tmp_path / "cache")
    first = _build(mlp, tmp_path, cache=cache)
    again = _build(mlp, tmp_path, cache=cache, tensorrt=TensorRTOptions(timing_cache=False))
    assert again.cache_hit and again.path == first.path
    other = _build(mlp, tmp_path, cache=cache, tensorrt=TensorRTOptions(optimization_level=5))
    assert not other.cache_hit and other.path != first.path
    bounded = _build(mlp, tmp_path, cache=cache, tensorrt=TensorRTOptions(workspace_gib=0.5), progress=True)
    assert bounded.path not in (first.path, other.path)
    assert bounded.describe()["tensorrt"]["workspace_bytes"] == 1 << 29
    material = json.loads((first.path / "manifest.json").read_text())["key_material"]
    assert material["backend_version"] == trt.__version__
    assert material["build"]["tensorrt"] == {"optimization_level": 3, "workspace_gib": 0.0, "refittable": False,
                                             "extra_profiles": [], "seq_buckets": []}
    assert material["device"]["kind"] == "cpu"  # on a GPU: its name and compute capability


def test_timing_cache_is_persisted_per_device_and_version(trt, mlp, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _build(mlp, tmp_path)
    files = list((tmp_path / "xdg" / "fastgen" / "tensorrt-timing").glob("*.cache"))
    assert len(files) == 1 and files[0].name.endswith(f"-trt{trt.__version__}.cache")
    before = files[0].read_bytes()
    _build(mlp, tmp_path, tensorrt=TensorRTOptions(optimization_level=1))
    assert files[0].read_bytes() != before  # read, extended by the second build, written back


def _retrained(component, seed):
    import copy

    other = copy.deepcopy(component)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.module.parameters():
            p.normal_(std=0.3)
    return other


def test_refittable_engine_is_refitted_not_rebuilt(trt, mlp, tmp_path):
    cache = EngineCache(tmp_path / "cache")
    options = TensorRTOptions(refittable=True)
    first = _build(mlp, tmp_path, cache=cache, tensorrt=options)
    tuned = _retrained(mlp, seed=7)
    second = _build(tuned, tmp_path, cache=cache, tensorrt=options)
    record = json.loads((second.path / "manifest.json").read_text())["tensorrt"]
    assert record["refitted_from"] == first.path.name and record["graph_key"] != second.manifest["cache_key"]
    _close(second, tuned)
    _close(first, mlp)  # the donor entry keeps its own weights
    plain = _build(_retrained(mlp, seed=8), tmp_path, cache=cache)  # not refittable: a build of its own
    assert "refitted_from" not in json.loads((plain.path / "manifest.json").read_text())["tensorrt"]


def test_engine_refit_in_place(trt, mlp, tmp_path):
    engine = _build(mlp, tmp_path, tensorrt=TensorRTOptions(refittable=True))
    tuned = _retrained(mlp, seed=3)
    engine.refit(tuned)
    _close(engine, tuned)
    fixed = _build(mlp, tmp_path)
    with pytest.raises(UnsupportedError, match="not built refittable"):
        fixed.refit(tuned)


def test_fp16_engine(trt, conv, tmp_path):
    engine = _build(conv, tmp_path, precision="fp16")
    inputs = conv.spec.sample_inputs("opt")
    out = engine.run(inputs)
    assert out["features"].dtype == torch.float16
    with torch.no_grad():
        want = conv.module(*inputs.values())
    torch.testing.assert_close(out["features"].float(), want[0], atol=2e-2, rtol=2e-2)


def test_bf16_engine_from_the_bf16_graph(trt, conv, tmp_path):
    engine = _build(conv, tmp_path, precision="bf16")
    inputs = conv.spec.sample_inputs("opt")
    out = engine.run(inputs)
    assert out["features"].dtype == torch.bfloat16
    with torch.no_grad():
        want = conv.module(*inputs.values())
    torch.testing.assert_close(out["features"].float(), want[0], atol=5e-2, rtol=5e-2)
    assert engine.manifest["tensorrt_verification"]  # the engine itself checked against PyTorch at bf16


@pytest.mark.parametrize("recipe", ["int8-weight-only", "w8a8-static"])
def test_quantized_engines_build_from_qdq_graphs(trt, mlp, tmp_path, recipe):
    engine = _build(mlp, tmp_path, quantization=recipe)
    assert engine.manifest["tensorrt_verification"] and engine.describe()["quantization"].startswith(recipe)
    # The graph TensorRT parsed holds the Q/DQ nodes that carry the precision (strongly typed).
    layers = json.loads((engine.path / "engine_info.json").read_text())["layers"]
    assert {"DequantizeLinear"} <= {layer["LayerType"] for layer in layers}


def test_refusals_name_the_allowed_values(trt, mlp, tmp_path):
    with pytest.raises(UnsupportedError, match="allowed: int8-weight-only"):
        _build(mlp, tmp_path, quantization="w8a8-dynamic")


def test_inspect_shows_profiles_io_and_layers(trt, conv, tmp_path):
    from click.testing import CliRunner

    from fastgen.cli.main import cli

    engine = _build(conv, tmp_path, tensorrt=TensorRTOptions(extra_profiles=("height=16,width=16",)))
    result = CliRunner().invoke(cli, ["inspect", str(engine.path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)["tensorrt"]
    assert info["settings"]["optimization_level"] == 3 and len(info["profiles"]) == 2
    image = next(t for t in info["io"] if t["name"] == "image")
    assert image["profiles"][1] == [[1, 3, 16, 16], [2, 3, 16, 16], [4, 3, 16, 16]]
    assert info["layers"] and info["num_layers"] >= 1
    table = CliRunner().invoke(cli, ["inspect", str(engine.path)])
    assert table.exit_code == 0 and "optimization profiles" in table.output and "layers" in table.output


def test_onnx_files_build_and_parser_errors_are_one_line(trt, mlp, tmp_path, onnx_export):
    import onnx

    path = onnx_export(mlp, tmp_path / "mlp.onnx")
    engine = fastgen.build(str(path), backend="tensorrt", device="cpu", cache=EngineCache(tmp_path / "cache"))
    _close(engine, mlp, {"batch": 2})
    h, f = onnx.helper, onnx.TensorProto.FLOAT
    graph = h.make_graph([h.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")], "g",  # onnxruntime's op:
                         [h.make_tensor_value_info("x", f, ["batch", 4])],              # TensorRT has no importer
                         [h.make_tensor_value_info("y", f, ["batch", 4])])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)]),
              str(tmp_path / "contrib.onnx"))
    with pytest.raises(UnsupportedError, match="ONNX parser refused contrib.onnx: No importer registered") as info:
        fastgen.build(str(tmp_path / "contrib.onnx"), backend="tensorrt", device="cpu", cache=False,
                      out=tmp_path / "never", export=fastgen.ExportConfig(verify="none"))
    assert "\n" not in str(info.value) and not (tmp_path / "never").exists()


def test_refit_with_another_graph_is_refused(trt, mlp, conv, tmp_path, onnx_export):
    engine = _build(mlp, tmp_path, tensorrt=TensorRTOptions(refittable=True))
    with pytest.raises(InvalidArgumentError, match="not the graph this engine was built from"):
        engine.refit(onnx_export(conv, tmp_path / "conv.onnx"))
    _close(engine, mlp)  # untouched
