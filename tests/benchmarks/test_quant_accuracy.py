"""The accuracy report of ``bench_quant.py`` (``benchmarks/quant_accuracy.py``): SQNR floors of the final
latents, sensitivity ranking, classifier agreement, the ONNX Runtime int8 comparison."""

from __future__ import annotations

import math

import pytest
import torch
from quant_accuracy import (
    FLOORS_DB,
    classifier_accuracy,
    denoise,
    ort_int8_comparison,
    summarize_roles,
    unet_accuracy,
)

import fastgen
from fastgen.quant import (
    DEFAULT_SKIP,
    Fp8DynamicConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    Int8WeightOnlyConfig,
    sensitivity,
)
from fastgen.quant.layerwise import run_module, sqnr_db

FLOOR_CONFIGS = {"int8-weight-only": Int8WeightOnlyConfig(), "w8a8": Int8DynamicConfig(), "fp8": Fp8DynamicConfig()}


def _check_floors(result: dict) -> None:
    for name, config in FLOOR_CONFIGS.items():
        entry = result["configs"][name]
        floor = FLOORS_DB[type(config).__name__]
        assert entry["final_latents_sqnr_db"] >= floor, (name, entry)
        assert entry["meets_floor"] is True


def test_sqnr_floors_of_the_final_latents_on_tiny():
    comp = fastgen.load_component("tiny", "unet")
    result = unet_accuracy(comp, FLOOR_CONFIGS, height=64, width=64, steps=10)
    _check_floors(result)
    # The order the formats' precision predicts, at the single UNet output too.
    out = {k: v["unet_output_sqnr_db"] for k, v in result["configs"].items()}
    assert out["int8-weight-only"] > out["w8a8"] > out["fp8"] > 20


def test_denoise_is_deterministic_and_seeded():
    comp = fastgen.load_component("tiny", "unet")
    a = denoise(comp.module, comp, height=32, width=32, steps=4, seed=3)
    b = denoise(comp.module, comp, height=32, width=32, steps=4, seed=3)
    c = denoise(comp.module, comp, height=32, width=32, steps=4, seed=4)
    assert a.shape == (1, 4, 4, 4) and torch.equal(a, b) and not torch.equal(a, c)


def test_sensitivity_ranks_every_eligible_layer_and_restores_the_module():
    comp = fastgen.load_component("tiny", "unet")
    args = tuple(comp.spec.sample_inputs("min", seed=0).values())
    before = run_module(comp.module, args)
    layers = sensitivity(comp.module, args, Int8DynamicConfig())
    assert torch.equal(run_module(comp.module, args), before)  # every layer was put back
    names = [r.name for r in layers]
    assert len(names) == len(set(names)) == 63  # skip list ignored: time embeddings are measured too
    assert any("time_embedding" in n for n in names)
    values = [r.sqnr_db for r in layers]
    assert values == sorted(values) and all(math.isfinite(v) and v > 30 for v in values)
    roles = summarize_roles(layers)
    assert {"proj_in", "attn_qkv", "time_embedding"} <= set(roles)
    # the ranking agrees with a direct measurement of the worst layer
    worst = layers[0]
    single = sensitivity(comp.module, args, Int8DynamicConfig(), layers=[worst.name])
    assert single[0].sqnr_db == pytest.approx(worst.sqnr_db)


def test_sensitivity_of_calibrated_configs_needs_statistics():
    comp = fastgen.load_component("tiny", "unet")
    args = tuple(comp.spec.sample_inputs("min", seed=0).values())
    with pytest.raises(fastgen.InvalidArgumentError, match="calibrate"):
        sensitivity(comp.module, args, Int8StaticConfig(), layers=["model.time_embedding.linear_1"])


@pytest.mark.parametrize("component", ["classifier", "text-classifier"])
def test_classifier_top1_agreement(component):
    comp = fastgen.load_component("tiny", component)
    configs = {"int8-weight-only": Int8WeightOnlyConfig(), "w8a8": Int8DynamicConfig(), "static": Int8StaticConfig()}
    result = classifier_accuracy(comp, configs, n=256)
    for entry in result["configs"].values():
        assert entry["layers_quantized"] >= 1
        assert entry["top1_agreement"] >= 0.99 and entry["max_prob_diff"] < 0.01, entry


def test_default_skip_list_names_the_sensitive_layers():
    for pattern in ("*time_embedding.*", "*conv_in", "*conv_out", "*conv_shortcut", "*proj_in",
                    "*attentions.*.proj_out"):
        assert pattern in DEFAULT_SKIP


def test_the_default_skip_list_is_worth_it_on_tiny():
    """The measurement behind the 1x1-conv entries: the same config with and without them."""
    comp = fastgen.load_component("tiny", "unet")
    no_convs = tuple(p for p in DEFAULT_SKIP if p not in ("*conv_shortcut", "*proj_in", "*attentions.*.proj_out"))
    configs = {"default": Int8DynamicConfig(), "convs-quantized": Int8DynamicConfig(skip=no_convs)}
    result = unet_accuracy(comp, configs, height=32, width=32, steps=8)["configs"]
    assert result["default"]["layers_quantized"] < result["convs-quantized"]["layers_quantized"]
    assert result["default"]["unet_output_sqnr_db"] > result["convs-quantized"]["unet_output_sqnr_db"] + 6


def test_sqnr_db_edge_cases():
    x = torch.randn(100)
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x + 0.1 * x) == pytest.approx(20.0)
    assert sqnr_db(x, torch.full_like(x, float("nan"))) == -math.inf
    with pytest.raises(fastgen.InvalidArgumentError):
        sqnr_db(x, x[:50])


def test_int8_classifier_in_onnxruntime_agrees_with_fp32():
    comp = fastgen.load_component("tiny", "text-classifier")
    result = ort_int8_comparison(comp, {"static": Int8StaticConfig(), "dynamic": Int8DynamicConfig()},
                                 n=256, repeats=1, min_seconds=0.0)
    # Every quantized layer runs an ORT int8 kernel (q/k/v included: no shared QuantizeLinear). The pooler
    # too: the Add that keeps a non-finite token NaN sits between its MatMul and bias, so ORT no longer
    # folds them into a float Gemm before its QDQ fusions (it did, before that Add).
    for name, kernel, fp32_layers in (("static", "MatMulIntegerToFloat", 0), ("dynamic", "MatMulIntegerToFloat", 0)):
        entry = result["configs"][name]
        assert entry["top1_agreement"] >= 0.99 and entry["max_prob_diff"] < 0.01
        assert entry["ort_int8_kernels"] == {kernel: entry["layers_quantized"] - fp32_layers}
        assert entry["parity_sqnr_db"] > 60


@pytest.mark.slow
def test_sqnr_floors_of_the_final_latents_on_sd15():
    comp = fastgen.load_component("sd15", "unet")
    result = unet_accuracy(comp, FLOOR_CONFIGS, height=256, width=256, steps=20)
    _check_floors(result)
