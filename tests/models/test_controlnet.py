"""ControlNet components: presets, the controlnet and unet-controlled wrappers against diffusers, host helpers."""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.models import adapt, load_component, model_components, rebuild_component, weights_digest
from fastgen.models.adapters_controlnet import (
    MID_RESIDUAL,
    ControlGuidance,
    guess_mode_weights,
    residual_names,
    sum_residuals,
    zero_residuals,
)
from fastgen.models.metadata import UNetMetadata
from fastgen.models.presets import build_preset_model, preset_config

PRESETS = ["tiny-controlnet", "tiny-sdxl-controlnet"]
BASE = {"tiny-controlnet": "tiny", "tiny-sdxl-controlnet": "tiny-sdxl"}
# Odd batches and non-square sides (multiples of the tiny UNet's 16 px).
SIZES = [{"batch": 1, "height": 48, "width": 32}, {"batch": 3, "height": 32, "width": 80}]


def _listed(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _added(inputs):
    if "text_embeds" not in inputs:
        return None
    return {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}


def _diffusers_controlnet(model, inputs, scale, *, guess_mode=False):
    """diffusers' own ControlNet call, as its pipelines make it (a float scale for the whole batch)."""
    with torch.inference_mode():
        down, mid = model(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                          controlnet_cond=inputs["controlnet_cond"], conditioning_scale=scale,
                          added_cond_kwargs=_added(inputs), guess_mode=guess_mode, return_dict=False)
    return [*down, mid]


def _diffusers_unet(model, inputs, down=None, mid=None):
    with torch.inference_mode():
        return model(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                     added_cond_kwargs=_added(inputs), down_block_additional_residuals=down,
                     mid_block_additional_residual=mid, return_dict=False)[0]


@pytest.fixture(scope="module", params=PRESETS)
def loaded(request):
    preset = request.param
    return preset, {c: load_component(preset, c) for c in ("unet", "unet-controlled", "controlnet")}


def test_presets_list_their_components():
    assert model_components("tiny-controlnet") == [*model_components("tiny"), "unet-controlled", "controlnet"]
    assert model_components("tiny-sdxl-controlnet") == [*model_components("tiny-sdxl"), "unet-controlled",
                                                        "controlnet"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_controlnet_matches_from_unet_and_is_not_zero(preset):
    """The ControlNet config is what diffusers' ControlNetModel.from_unet derives from the UNet; its
    zero-initialised convolutions are random in the preset (a stand-in for a trained one)."""
    unet = build_preset_model(preset, "unet")
    _, cls, config = preset_config(preset, "controlnet")
    derived = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16)).config
    assert cls == "ControlNetModel"
    assert {k: _listed(derived[k]) for k in config} == {k: _listed(v) for k, v in config.items()}
    net = build_preset_model(preset, "controlnet")
    assert float(net.controlnet_mid_block.weight.detach().abs().sum()) > 0
    assert all(float(b.weight.detach().abs().sum()) > 0 for b in net.controlnet_down_blocks)
    assert float(net.controlnet_cond_embedding.conv_out.weight.detach().abs().sum()) > 0
    assert weights_digest(net) == weights_digest(build_preset_model(preset, "controlnet"))  # deterministic
    # The controlled UNet is the preset's (and the base preset's) UNet, weight for weight.
    assert weights_digest(build_preset_model(preset, "unet-controlled")) == weights_digest(unet) \
        == weights_digest(build_preset_model(BASE[preset], "unet"))


def test_specs_name_the_residuals_and_share_profiles(loaded):
    preset, comps = loaded
    net, controlled, plain = comps["controlnet"], comps["unet-controlled"], comps["unet"]
    names = residual_names(net.spec)
    assert names == [f"down_block_res_{i}" for i in range(len(names) - 1)] + [MID_RESIDUAL]
    assert residual_names(controlled.spec) == names
    assert controlled.spec.input_names == plain.spec.input_names + names
    assert net.spec.input_names == [*plain.spec.input_names, "controlnet_cond", "conditioning_scale"]
    assert net.spec.profile == controlled.spec.profile == plain.spec.profile
    assert net.spec.multiples == plain.spec.multiples == {"height": 16, "width": 16}
    by_name = {t.name: t for t in net.spec.inputs}
    assert by_name["controlnet_cond"].shape == ("batch", 3, "height", "width")
    assert by_name["conditioning_scale"].shape == ("batch",)
    assert isinstance(controlled.metadata, UNetMetadata)
    # torch.export (the dynamo exporter) maps dynamic axes to inputs by the forward's parameter names.
    for comp in (net, controlled):
        assert list(inspect.signature(comp.module.forward).parameters) == comp.spec.input_names


@pytest.mark.parametrize("dims", SIZES)
def test_controlnet_matches_diffusers_with_a_scale_per_row(loaded, dims):
    _, comps = loaded
    net = comps["controlnet"]
    inputs = net.spec.sample_inputs(dims, seed=4)
    scales = [0.5, 1.0, 1.75][:dims["batch"]]
    inputs["conditioning_scale"] = torch.tensor(scales)
    got = net(inputs)
    resolved = net.spec.resolve(net.spec.shape_at(dims))
    for name in net.spec.output_names:
        assert tuple(got[name].shape) == resolved[name]
    for row, scale in enumerate(scales):  # each row as diffusers computes it alone, at its own scale
        one = {k: v[row:row + 1] for k, v in inputs.items()}
        want = _diffusers_controlnet(net.model, one, scale)
        for name, ref in zip(net.spec.output_names, want, strict=True):
            # (batch of 3 vs alone: CPU kernels block differently, float noise only)
            torch.testing.assert_close(got[name][row:row + 1], ref, rtol=1e-4, atol=1e-5)
            assert float(ref.abs().max()) > 0


@pytest.mark.parametrize("dims", SIZES)
def test_controlled_unet_zero_residuals_are_the_plain_unet_exactly(loaded, dims):
    _, comps = loaded
    plain, controlled = comps["unet"], comps["unet-controlled"]
    inputs = plain.spec.sample_inputs(dims, seed=2)
    zeros = zero_residuals(controlled.spec, dims)
    assert torch.equal(controlled({**inputs, **zeros})["noise_pred"], plain(inputs)["noise_pred"])


@pytest.mark.parametrize("dims", SIZES)
def test_controlnet_into_controlled_unet_matches_diffusers(loaded, dims):
    _, comps = loaded
    net, controlled = comps["controlnet"], comps["unet-controlled"]
    inputs = net.spec.sample_inputs(dims, seed=6)
    inputs["conditioning_scale"] = torch.full((dims["batch"],), 0.8)
    residuals = net(inputs)
    got = controlled({**inputs, **residuals})["noise_pred"]
    ref = _diffusers_controlnet(net.model, inputs, 0.8)
    want = _diffusers_unet(controlled.model, inputs, tuple(ref[:-1]), ref[-1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    plain = _diffusers_unet(controlled.model, inputs)
    assert float((want - plain).abs().max()) > 1e-2  # the control changes the prediction


def test_several_controlnets_sum_as_multicontrolnet(loaded):
    """Two nets (different weights, scales, images) summed on the host = diffusers' MultiControlNetModel."""
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    preset, comps = loaded
    first = comps["controlnet"]
    second = load_component(preset, "controlnet", seed=1)
    dims = {"batch": 3, "height": 48, "width": 64}
    inputs = first.spec.sample_inputs(dims, seed=8)
    other_image = first.spec.sample_inputs(dims, seed=9)["controlnet_cond"]
    outs = [first({**inputs, "conditioning_scale": torch.full((3,), 0.7)}),
            second({**inputs, "controlnet_cond": other_image, "conditioning_scale": torch.full((3,), 1.3)})]
    got = sum_residuals(outs)
    multi = MultiControlNetModel([first.model, second.model]).eval()
    with torch.inference_mode():
        down, mid = multi(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                          controlnet_cond=[inputs["controlnet_cond"], other_image], conditioning_scale=[0.7, 1.3],
                          added_cond_kwargs=_added(inputs), return_dict=False)
    for name, ref in zip(residual_names(first.spec), [*down, mid], strict=True):
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-6)
    assert sum_residuals(outs[:1]) == {n: outs[0][n] for n in residual_names(first.spec)}
    with pytest.raises(InvalidArgumentError, match="controlnet outputs"):
        sum_residuals([])
    with pytest.raises(InvalidArgumentError, match="net 1"):
        sum_residuals([outs[0], {"mid_block_res": outs[1][MID_RESIDUAL]}])


def test_guess_mode_weights_reproduce_diffusers_guess_mode(loaded):
    _, comps = loaded
    net = comps["controlnet"]
    inputs = net.spec.sample_inputs({"batch": 1, "height": 32, "width": 48}, seed=1)
    inputs["conditioning_scale"] = torch.tensor([0.9])
    got = net(inputs)
    names = residual_names(net.spec)
    weights = guess_mode_weights(len(names))
    assert weights[0] == pytest.approx(0.1) and weights[-1] == pytest.approx(1.0)
    want = _diffusers_controlnet(net.model, inputs, 0.9, guess_mode=True)
    for name, weight, ref in zip(names, weights, want, strict=True):
        torch.testing.assert_close(got[name] * weight, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="num_residuals"):
        guess_mode_weights(1)


def test_control_guidance_window_is_diffusers_controlnet_keep():
    # 10 steps, start 0.2, end 0.8: off at steps 0-1 (i/n < 0.2) and 8-9 ((i+1)/n > 0.8).
    window = ControlGuidance(scale=0.5, start=0.2, end=0.8)
    assert [window.keep(i, 10) for i in range(10)] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert [window.scale_at(i, 10) for i in (1, 5)] == [0.0, 0.5]
    assert [ControlGuidance().keep(i, 3) for i in range(3)] == [1.0, 1.0, 1.0]
    # 3 steps, end 0.5: only step 0 ((0+1)/3 <= 0.5).
    assert [ControlGuidance(end=0.5).keep(i, 3) for i in range(3)] == [1.0, 0.0, 0.0]
    for kwargs, arg in [({"start": -0.1}, "control-guidance-start"), ({"end": 1.5}, "control-guidance-end"),
                        ({"start": 0.6, "end": 0.6}, "control-guidance-start"), ({"scale": float("nan")}, "scale"),
                        ({"scale": True}, "scale")]:
        with pytest.raises(InvalidArgumentError, match=arg) as info:
            ControlGuidance(**kwargs)
        assert "\n" not in str(info.value)


def test_rebuild_without_pickle(loaded):
    _, comps = loaded
    for name in ("controlnet", "unet-controlled"):
        comp = comps[name]
        rebuilt = rebuild_component(comp.source, comp.model.state_dict())
        assert rebuilt.name == name and rebuilt.spec == comp.spec
        inputs = comp.spec.sample_inputs("min", seed=3)
        for key, value in comp(inputs).items():
            assert torch.equal(rebuilt(inputs)[key], value)


def test_refusals_name_what_is_supported():
    small = {"block_out_channels": (32, 64), "layers_per_block": 1, "cross_attention_dim": 32,
             "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "attention_head_dim": 8}
    with torch.random.fork_rng(devices=[]):
        pooled = diffusers.ControlNetModel(**small, global_pool_conditions=True,
                                           conditioning_embedding_out_channels=(4, 8, 8, 16))
        two_stride = diffusers.ControlNetModel(**small, conditioning_embedding_out_channels=(4, 8, 16))
        classes = diffusers.UNet2DConditionModel(**small, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                                 sample_size=8, num_class_embeds=5)
    with pytest.raises(UnsupportedError, match="global_pool_conditions"):
        adapt(pooled)
    with pytest.raises(UnsupportedError, match="downsamples by 4"):
        adapt(two_stride)
    assert adapt(two_stride, latent_factor=4).spec.component == "controlnet"
    with pytest.raises(UnsupportedError, match="num_class_embeds"):
        adapt(classes, "unet-controlled")
    with pytest.raises(InvalidArgumentError, match="controlnet"):
        adapt(pooled, "unet")
    with pytest.raises(InvalidArgumentError, match="unet-controlled"):
        load_component("tiny-controlnet", "unet-controled")


def test_local_controlnet_pipeline_folder(tmp_path):
    """A diffusers ControlNet pipeline folder offers controlnet and unet-controlled (its UNet), a bare
    ControlNet model folder just controlnet; weights come back exactly."""
    import json

    root = tmp_path / "pipe"
    unet = build_preset_model("tiny-controlnet", "unet")
    net = build_preset_model("tiny-controlnet", "controlnet")
    unet.save_pretrained(root / "unet", safe_serialization=True)
    net.save_pretrained(root / "controlnet", safe_serialization=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionControlNetPipeline"}))
    assert model_components(root) == ["unet", "controlnet", "unet-controlled"]
    loaded = load_component(root, "unet-controlled")
    assert loaded.spec.component == "unet-controlled" and weights_digest(loaded.model) == weights_digest(unet)
    assert model_components(root / "controlnet") == ["controlnet"]
    alone = load_component(root / "controlnet")
    assert weights_digest(alone.model) == weights_digest(net)
    assert residual_names(alone.spec) == residual_names(loaded.spec)
