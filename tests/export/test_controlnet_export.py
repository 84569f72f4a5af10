"""ControlNet and the controlled UNet through fastgen.export / fastgen.build (torch, onnxruntime, TensorRT
stand-in), checked against PyTorch at odd batches and non-square sizes, the residuals passed by name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest
import torch

import fastgen
from fastgen.engines.cache import EngineCache
from fastgen.engines.trt_options import TensorRTOptions, profiles_for
from fastgen.export import ExportConfig, export
from fastgen.export.verify import compare
from fastgen.models import load_component
from fastgen.models.adapters_controlnet import residual_names, sum_residuals
from fastgen.models.spec import ExportSpec

PRESETS = ["tiny-controlnet", "tiny-sdxl-controlnet"]
SIZES = [{"batch": 1, "height": 48, "width": 32}, {"batch": 3, "height": 32, "width": 80}]
FAST = ExportConfig(verify="opt")
TRT_HELPERS = Path(__file__).resolve().parents[1] / "engines" / "tensorrt"


def _close(got, want, name):
    stats = compare(want, got.detach().cpu().float())
    assert stats["cosine"] > 0.9999 and stats["max_rel"] < 1e-4, (name, stats)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return EngineCache(tmp_path_factory.mktemp("controlnet-cache"))


# Over the whole profile for the ControlNet (each export takes seconds here); every other graph is
# exported at opt by the engine tests below and run there at sizes off the profile's points.
@pytest.mark.parametrize(("preset", "name"), [("tiny-controlnet", "controlnet")])
def test_exports_and_verifies_over_the_profile(tmp_path, preset, name):
    comp = load_component(preset, name)
    result = export(comp, tmp_path / name)
    assert [v["shape"] for v in result.verification] == [comp.spec.profile.shape(w) for w in ("min", "opt", "max")]
    for v in result.verification:
        for stats in v["outputs"].values():
            assert stats["cosine"] > 0.9999 and stats["max_rel"] < 1e-3
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    assert [i.name for i in model.graph.input] == comp.spec.input_names
    assert [o.name for o in model.graph.output] == comp.spec.output_names
    axes = comp.spec.dynamic_axes()
    for value in list(model.graph.input) + list(model.graph.output):  # spec dim names, for engines and TensorRT
        dims = value.type.tensor_type.shape.dim
        for axis, dim_name in axes.get(value.name, {}).items():
            assert dims[axis].dim_param == dim_name
    assert ExportSpec.from_dict(json.loads((tmp_path / name / "spec.json").read_text())) == comp.spec


# onnxruntime for SD 1.x (SDXL's graphs run on onnxruntime in the TensorRT stand-in test below).
@pytest.mark.parametrize(("backend", "preset"), [("onnxruntime", "tiny-controlnet"), ("torch", "tiny-sdxl-controlnet")])
def test_engines_chain_controlnet_into_controlled_unet(cache, preset, backend):
    """Two ControlNet runs (two scales per batch, a second net) summed on the host and fed by name into the
    controlled UNet engine: the same prediction as the PyTorch modules."""
    net = load_component(preset, "controlnet")
    other = load_component(preset, "controlnet", seed=1)
    unet = load_component(preset, "unet-controlled")
    engines = {key: fastgen.build(comp, backend=backend, device="cpu", cache=cache, export=FAST)
               for key, comp in (("net", net), ("other", other), ("unet", unet))}
    assert engines["net"].spec == net.spec and engines["unet"].spec == unet.spec
    for dims in SIZES:
        inputs = net.spec.sample_inputs(dims, seed=5)
        inputs["conditioning_scale"] = torch.linspace(0.5, 1.5, dims["batch"])
        second = {**inputs, "controlnet_cond": net.spec.sample_inputs(dims, seed=6)["controlnet_cond"]}
        outs = [engines["net"].run({k: inputs[k] for k in net.spec.input_names}),
                engines["other"].run({k: second[k] for k in net.spec.input_names})]
        refs = [net(inputs), other(second)]
        for out, ref in zip(outs, refs, strict=True):
            for name in residual_names(net.spec):
                assert tuple(out[name].shape) == tuple(ref[name].shape)
                _close(out[name], ref[name], name)
        feeds = {**{k: inputs[k] for k in unet.spec.input_names if k in inputs}, **sum_residuals(outs)}
        got = engines["unet"].run(feeds)["noise_pred"]
        want = unet({**inputs, **sum_residuals(refs)})["noise_pred"]
        _close(got, want, "noise_pred")


@pytest.mark.parametrize("preset", PRESETS)
def test_tensorrt_profiles_resolve_every_residual(preset):
    """The TensorRT profiles (the spec's own, extra buckets, seq buckets) give every residual an integral
    shape at min, opt and max, and the ControlNet's outputs are exactly the controlled UNet's inputs."""
    net = load_component(preset, "controlnet")
    unet = load_component(preset, "unet-controlled")
    options = TensorRTOptions(extra_profiles=("height=48,width=80",), seq_buckets=(77, 154))
    for comp in (net, unet):
        profiles = profiles_for(comp.spec, options)
        assert [str(p) for p in profiles][:2] == ["batch=1:2:8,height=32:64:128,seq=77:77:154,width=32:64:128",
                                                  "batch=1:2:8,height=48:48:48,seq=77:77:154,width=80:80:80"]
        for profile in profiles:
            for which in ("min", "opt", "max"):
                dims = profile.shape(which)
                comp.spec.check_dims(dims)
                shapes = comp.spec.resolve(dims)
                assert all(shapes[n] is not None and all(d > 0 for d in shapes[n]) for n in residual_names(comp.spec))
    out_shapes = net.spec.resolve(net.spec.profile.shape("max"))
    in_shapes = unet.spec.resolve(unet.spec.profile.shape("max"))
    assert {n: out_shapes[n] for n in residual_names(net.spec)} == {n: in_shapes[n] for n in residual_names(unet.spec)}


def test_tensorrt_engines_on_the_standin(tmp_path):
    """Both components built by the TensorRT backend on the TensorRT 11 stand-in (which executes the
    plan's ONNX graph with onnxruntime): the binding of residual inputs and outputs is under test."""
    if str(TRT_HELPERS) not in sys.path:
        sys.path.insert(0, str(TRT_HELPERS))
    trt_bindings = pytest.importorskip("trt_bindings")
    api = trt_bindings.api(11)
    if api is None:
        pytest.skip("TensorRT 11 bindings not installed (make install)")
    import trt_standin

    from fastgen.engines import trt_lib

    record: list = []
    trt_lib.use(trt_standin.make_standin(api, record=record), host_memory=True)
    try:
        net = load_component("tiny-sdxl-controlnet", "controlnet")
        unet = load_component("tiny-sdxl-controlnet", "unet-controlled")
        cache = EngineCache(tmp_path / "cache")
        built = [fastgen.build(c, backend="tensorrt", device="cpu", cache=cache, export=FAST) for c in (net, unet)]
        assert all(e.backend == "tensorrt" for e in built)
        inputs = net.spec.sample_inputs(SIZES[1], seed=2)
        residuals = built[0].run(inputs)
        for name in residual_names(net.spec):
            _close(residuals[name], net(inputs)[name], name)
        got = built[1].run({**{k: inputs[k] for k in unet.spec.input_names if k in inputs}, **residuals})
        _close(got["noise_pred"], unet({**inputs, **net(inputs)})["noise_pred"], "noise_pred")
    finally:
        trt_lib.use(None)
    for major in trt_bindings.VERSIONS:  # every call the backend made exists in both TensorRT versions
        other = trt_bindings.api(major)
        if other is not None:
            assert all(trt_standin.check_call(other, call) is None for call in set(record))

