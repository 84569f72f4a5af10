"""fastgen.build(..., quantization=...): quantized engines on both backends, cached and reloadable."""

from __future__ import annotations

import pytest
import torch

import fastgen
from fastgen.engines.build import build
from fastgen.engines.cache import EngineCache
from fastgen.engines.config import BuildConfig, ExecutionOptions
from fastgen.engines.loading import load_engine
from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.export.config import ExportConfig
from fastgen.models import load_component
from fastgen.quant import (
    Fp8DynamicConfig,
    Int8DynamicConfig,
    QuantLinear,
    quantize_,
    quantized_layers,
    sqnr_db,
)
from fastgen.quant.config import QUANT_PRESETS
from fastgen.quant.onnx import ort_optimized_ops

FAST = ExportConfig(verify="opt")
# One intra-op thread: a torch engine on the CPU otherwise times its first call to choose a count, and
# two engines on different counts may round an activation to the next quantized code differently.
ONE = ExecutionOptions(intra_op_threads=1)


@pytest.fixture
def cache(tmp_path):
    return EngineCache(tmp_path / "cache")


def _out(engine, inputs) -> torch.Tensor:
    return next(iter(engine(inputs).values())).float()


def test_build_config_quantization_field():
    assert BuildConfig().quant_config is None and BuildConfig().artifact_dict()["quantization"] is None
    for name, config in QUANT_PRESETS.items():
        bc = BuildConfig(quantization=name)
        assert bc.quant_config == config
        assert BuildConfig.from_dict(bc.to_dict()) == bc
    custom = BuildConfig(quantization=Int8DynamicConfig(alpha=0.8))
    assert BuildConfig.from_dict(custom.to_dict()) == custom
    assert BuildConfig(quantization=custom.quantization.to_dict()) == custom
    # A preset and the config it names build the same artifact: one cache key.
    named, explicit = BuildConfig(quantization="w8a8-dynamic"), BuildConfig(quantization=Int8DynamicConfig())
    assert named.artifact_dict() == explicit.artifact_dict()
    assert named.artifact_dict() != BuildConfig(quantization="int8-weight-only").artifact_dict()
    with pytest.raises(InvalidArgumentError, match="quantization.*w8a8-dynamic"):
        BuildConfig(quantization="int3")


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize(("preset", "floor_db"), [("int8-weight-only", 45), ("w8a8-dynamic", 38),
                                                   ("fp8-dynamic", 28)])
def test_quantized_unet_engine_against_fp32(cache, backend, preset, floor_db):
    fp32 = build("tiny", component="unet", backend=backend, device="cpu", cache=cache, export=FAST, execution=ONE)
    engine = build("tiny", component="unet", backend=backend, device="cpu", cache=cache, export=FAST, execution=ONE,
                   quantization=preset)
    assert not engine.cache_hit and engine.describe()["quantization"].startswith(f"{preset}: ")
    inputs = engine.spec.sample_inputs("max", seed=5)  # not the shape verification used
    ref, out = _out(fp32, inputs), _out(engine, inputs)
    # Quantization changes the output (not an accidental float engine), within the config's noise.
    assert floor_db < sqnr_db(ref, out) < 90
    again = build("tiny", component="unet", backend=backend, device="cpu", cache=cache, export=FAST, execution=ONE,
                  quantization=preset)
    assert again.cache_hit and again.manifest["cache_key"] == engine.manifest["cache_key"]
    assert torch.equal(_out(again, inputs), out)
    assert engine.manifest["cache_key"] != fp32.manifest["cache_key"]


def test_a_cache_hit_does_not_quantize_again(cache, monkeypatch):
    first = build("tiny", component="text-classifier", backend="onnxruntime", device="cpu", cache=cache,
                  export=FAST, quantization="w8a8-static")  # synthetic calibration: decided by the config

    def refuse(*args, **kwargs):
        raise AssertionError("quantized on a cache hit")

    monkeypatch.setattr("fastgen.quant.components.quantize_component", refuse)
    again = build("tiny", component="text-classifier", backend="onnxruntime", device="cpu", cache=cache,
                  export=FAST, quantization="w8a8-static")
    assert again.cache_hit and again.manifest["cache_key"] == first.manifest["cache_key"]
    assert again.describe()["quantization"] == first.describe()["quantization"]


def test_onnxruntime_runs_the_int8_kernels(cache):
    engine = build("tiny", component="text-classifier", backend="onnxruntime", device="cpu", cache=cache,
                   export=FAST, quantization="w8a8-dynamic")
    layers = int(engine.describe()["quantization"].split(": ")[1].split()[0])
    assert ort_optimized_ops(engine.path / "model.onnx").get("MatMulIntegerToFloat") == layers > 0


def test_saved_torch_engine_rebuilds_the_quantized_layers(tmp_path, cache):
    engine = build("tiny", component="unet", backend="torch", device="cpu", cache=cache, quantization="fp8-dynamic",
                   out=tmp_path / "unet-fp8", execution=ONE)
    loaded = load_engine(tmp_path / "unet-fp8", execution=ONE)
    layers = quantized_layers(loaded.component.model)
    assert layers and all(isinstance(m, QuantLinear) and m.config == Fp8DynamicConfig() for m in layers.values())
    assert next(iter(layers.values())).qweight.dtype == torch.float8_e4m3fn
    inputs = engine.spec.sample_inputs("opt", seed=1)
    assert torch.equal(_out(loaded, inputs), _out(engine, inputs))


def test_half_precision_torch_engine_keeps_the_quantized_format(tmp_path, cache):
    engine = build("tiny", component="text-classifier", backend="torch", device="cpu", precision="bf16", cache=cache,
                   quantization="w8a8-dynamic", out=tmp_path / "tc")
    loaded = load_engine(tmp_path / "tc")
    layer = next(iter(quantized_layers(loaded.component.model).values()))
    assert layer.qweight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    fp32 = build("tiny", component="text-classifier", backend="torch", device="cpu", cache=cache)
    inputs = engine.spec.sample_inputs("opt", seed=2)
    assert sqnr_db(_out(fp32, inputs), _out(loaded, inputs)) > 20


def test_a_component_passed_in_is_not_modified(cache):
    comp = load_component("tiny", "classifier")
    build(comp, backend="torch", device="cpu", cache=cache, quantization="int8-weight-only")
    assert not quantized_layers(comp.module)


def test_a_component_quantized_beforehand_builds_as_it_is(cache):
    comp = load_component("tiny", "text-classifier")
    quantize_(comp.model, Int8DynamicConfig())
    plain = build("tiny", component="text-classifier", backend="onnxruntime", device="cpu", cache=cache, export=FAST)
    engine = build(comp, backend="onnxruntime", device="cpu", cache=cache, export=FAST)
    assert engine.manifest["cache_key"] != plain.manifest["cache_key"]
    assert "Int8DynamicConfig" in engine.describe()["quantization"]
    inputs = comp.spec.sample_inputs("opt", seed=4)
    assert sqnr_db(comp(inputs)["logits"], _out(engine, inputs)) > 40


def test_static_calibration_from_the_caller_or_synthetic(cache, caplog):
    comp = load_component("tiny", "text-classifier")
    batches = [tuple(comp.spec.sample_inputs("opt", seed=s).values()) for s in (11, 12)]
    mine = build(comp, backend="torch", device="cpu", cache=cache, quantization="w8a8-static", calibration=batches)
    with caplog.at_level("WARNING"):
        synthetic = build(comp, backend="torch", device="cpu", cache=cache, quantization="w8a8-static")
    assert "calibrates on its default inputs" in caplog.text
    # Other statistics, other scales: another engine.
    assert mine.manifest["cache_key"] != synthetic.manifest["cache_key"]
    with pytest.raises(InvalidArgumentError, match="calibration"):
        build(comp, backend="torch", device="cpu", cache=cache, calibration=batches)


def test_unsupported_combinations_raise_naming_the_argument(tmp_path, cache):
    with pytest.raises(UnsupportedError, match="onnxruntime.*fp32"):
        build("tiny", component="unet", backend="onnxruntime", precision="fp16", device="cpu", cache=cache,
              quantization="w8a8-dynamic")
    with pytest.raises(UnsupportedError, match="torchscript"):
        build("tiny", component="classifier", backend="onnxruntime", device="cpu", cache=cache,
              quantization="w8a8-dynamic", export=ExportConfig(exporter="dynamo"))
    onnx_file = tmp_path / "m.onnx"
    fastgen.export("tiny", tmp_path / "exp", component="classifier", config=ExportConfig(verify="none"))
    (tmp_path / "exp" / "model.onnx").rename(onnx_file)
    with pytest.raises(InvalidArgumentError, match="quantization"):
        build(onnx_file, backend="onnxruntime", device="cpu", cache=cache, quantization="w8a8-dynamic")


def test_generator_quantizes_the_unet_only(cache):
    gen = fastgen.Generator.from_pretrained("tiny", backend="torch", device="cpu", cache=cache,
                                            quantization="w8a8-dynamic")
    assert quantized_layers(gen.unet.component.model)
    assert not quantized_layers(gen.text_encoder.component.model)
    assert not quantized_layers(gen.vae_decoder.component.model)
    ref = fastgen.Generator.from_pretrained("tiny", backend="torch", device="cpu", cache=cache)
    kwargs = dict(steps=6, seed=3, output_type="latent")
    a = ref.generate("a red car", **kwargs).images
    b = gen.generate("a red car", **kwargs).images
    assert sqnr_db(torch.as_tensor(a), torch.as_tensor(b)) > 30
