"""DiT components through fastgen.export: verified at min/opt/max, re-checked at sizes off the profile's
points (FLUX's rotary embeddings, SD3's position-table crop and PixArt's sin-cos table under dynamic
resolution), the T5 encoder with external data, and the engines the runtime builds from them."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch

import fastgen
from fastgen.engines.config import BuildConfig
from fastgen.errors import FastgenError
from fastgen.export import ExportConfig, export
from fastgen.export.onnx_export import DATA_FILE, PROTOBUF_LIMIT, wants_external_data
from fastgen.export.verify import compare
from fastgen.models import load_component

TRANSFORMERS = ["tiny-sd3", "tiny-flux", "tiny-pixart"]
# Sizes none of min/opt/max (32/64/128 px, seq at its range's points), odd batches, non-square.
OFF_PROFILE = [{"batch": 1, "height": 48, "width": 80}, {"batch": 3, "height": 112, "width": 32},
               {"batch": 2, "height": 64, "width": 64}]


def _check_onnx(directory, comp, dims, seed=7):
    """A fresh ORT session against the PyTorch component at ``dims`` (independent of export's own check)."""
    sess = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = comp.spec.sample_inputs(dims, seed=seed)
    ref = comp(inputs)
    outs = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
    for name, got in zip(comp.spec.output_names, outs, strict=True):
        assert got.shape == tuple(ref[name].shape), (name, dims)
        stats = compare(ref[name], torch.from_numpy(got))
        assert stats["cosine"] > 0.9999 and stats["max_rel"] < 1e-3, (name, dims, stats)


def _verified_at_profile(result, comp):
    assert [v["shape"] for v in result.verification] == [comp.spec.profile.shape(w) for w in ("min", "opt", "max")]
    for v in result.verification:
        for stats in v["outputs"].values():
            assert stats["cosine"] > 0.9999 and stats["max_rel"] < 1e-3


@pytest.mark.parametrize("preset", TRANSFORMERS)
def test_transformer_exports_with_dynamic_batch_seq_and_resolution(tmp_path, preset):
    comp = load_component(preset, "transformer")
    result = export(comp, tmp_path / preset)
    _verified_at_profile(result, comp)
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert dims["sample"][0] == "batch" and dims["sample"][2:] == ["height_div8", "width_div8"]
    assert dims["encoder_hidden_states"][:2] == ["batch", "seq"]
    seq = comp.spec.profile.dims["seq"]
    for i, size in enumerate(OFF_PROFILE):
        _check_onnx(tmp_path / preset, comp, {**size, "seq": seq.min + 5 + i})


def test_t5_exports_with_external_data(tmp_path):
    comp = load_component("tiny-sd3", "text-encoder-3")
    result = export(comp, tmp_path / "t5", config=ExportConfig(external_data="always"))
    assert result.stats["external_data"] and result.files == ["model.onnx", DATA_FILE]
    assert (tmp_path / "t5" / DATA_FILE).stat().st_size > 100_000  # the weights live beside the graph
    _verified_at_profile(result, comp)
    assert result.verification[-1]["shape"] == {"batch": 8, "seq": 512}
    _check_onnx(tmp_path / "t5", comp, {"batch": 3, "seq": 77})


def test_external_data_decision():
    """auto stores weights beside the graph once they near protobuf's 2 GB limit (T5-XXL's 19 GB, FLUX's 48 GB)."""
    auto, never, always = (ExportConfig(external_data=v) for v in ("auto", "never", "always"))
    t5_xxl = 4_762_310_656 * 4
    assert wants_external_data(t5_xxl, auto) and wants_external_data(PROTOBUF_LIMIT, auto)
    assert not wants_external_data(1_000_000, auto) and not wants_external_data(PROTOBUF_LIMIT - 65 * 2**20, auto)
    assert wants_external_data(1_000, always) and not wants_external_data(1_000, never)
    with pytest.raises(FastgenError, match="2 GB"):
        wants_external_data(t5_xxl, never)


@pytest.mark.parametrize("name", ["vae-decoder", "vae-encoder"])
def test_16_channel_vae_exports(tmp_path, name):
    comp = load_component("tiny-flux", name)
    assert 16 in comp.spec.inputs[0].shape or 16 in comp.spec.outputs[0].shape
    result = export(comp, tmp_path / name)
    _verified_at_profile(result, comp)
    _check_onnx(tmp_path / name, comp, {"batch": 3, "height": 48, "width": 80})


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_engines_for_every_tiny_transformer(backend):
    for preset in TRANSFORMERS:
        comp = load_component(preset, "transformer")
        engine = fastgen.build(comp, config=BuildConfig(backend=backend, export=ExportConfig(verify="opt")))
        inputs = comp.spec.sample_inputs({"batch": 3, "height": 48, "width": 80, "seq": 90}, seed=5)
        got = torch.as_tensor(engine.run(inputs)["noise_pred"])
        stats = compare(comp(inputs)["noise_pred"], got.float())
        assert stats["cosine"] > 0.9999 and stats["max_rel"] < 1e-3, (preset, backend, stats)
