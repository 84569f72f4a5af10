"""Presets: exact public architectures (counted on the meta device), determinism, default profiles."""

from __future__ import annotations

import pytest
import torch

from fastgen.errors import InvalidArgumentError
from fastgen.models import (
    adapt,
    list_presets,
    load_component,
    model_components,
    preset_config,
    weights_digest,
)
from fastgen.models.presets import PRESET_IMAGE_SIZES, build_preset_model

# Parameter counts of the public checkpoints (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-xl-base-1.0).
PARAMS = {
    ("sd15", "unet"): 859_520_964,
    ("sd15", "vae-decoder"): 83_653_863,
    ("sd15", "text-encoder"): 123_060_480,
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "vae-decoder"): 83_653_863,
    ("sdxl", "text-encoder"): 123_060_480,
    ("sdxl", "text-encoder-2"): 694_659_840,
}


def test_list_presets_and_components():
    assert list_presets() == ["tiny", "sd15", "sdxl", "tiny-sdxl", "tiny-inpaint", "tiny-sdxl-inpaint",
                              "tiny-controlnet", "tiny-sdxl-controlnet", "tiny-sd3", "tiny-flux", "tiny-pixart",
                              "sd35-medium", "flux-dev", "pixart-sigma", "tiny-clip", "tiny-siglip", "tiny-embed"]
    assert model_components("tiny") == ["unet", "vae-decoder", "vae-encoder", "text-encoder", "classifier",
                                        "text-classifier"]
    assert model_components("sd15") == ["unet", "vae-decoder", "vae-encoder", "text-encoder"]
    assert model_components("sdxl") == ["unet", "vae-decoder", "vae-encoder", "text-encoder", "text-encoder-2"]
    assert model_components("tiny-sdxl") == model_components("sdxl")


@pytest.mark.parametrize(("preset", "component"), list(PARAMS))
def test_parameter_counts_on_meta(preset, component):
    model = build_preset_model(preset, component, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PARAMS[preset, component]


def test_architecture_facts():
    _, cls, unet = preset_config("sdxl", "unet")
    assert cls == "UNet2DConditionModel"
    assert (unet["addition_embed_type"], unet["cross_attention_dim"],
            unet["projection_class_embeddings_input_dim"]) == ("text_time", 2048, 2816)
    assert preset_config("sdxl", "vae-decoder")[2]["scaling_factor"] == 0.13025
    assert preset_config("sd15", "vae-decoder")[2]["scaling_factor"] == 0.18215
    _, cls, clip = preset_config("sd15", "text-encoder")
    assert (cls, clip["hidden_act"], clip["vocab_size"], clip["eos_token_id"]) == ("CLIPTextModel", "quick_gelu", 49408, 2)
    _, cls, big_g = preset_config("sdxl", "text-encoder-2")
    assert cls == "CLIPTextModelWithProjection"
    assert (big_g["hidden_size"], big_g["num_hidden_layers"], big_g["num_attention_heads"],
            big_g["intermediate_size"], big_g["projection_dim"], big_g["hidden_act"]) == (1280, 32, 20, 5120, 1280, "gelu")
    assert preset_config("sdxl", "text-encoder") == preset_config("sd15", "text-encoder")


def test_preset_config_is_a_copy_and_validates():
    _, _, cfg = preset_config("tiny", "unet")
    cfg["block_out_channels"].append(7)
    assert preset_config("tiny", "unet")[2]["block_out_channels"] == [32, 64]
    with pytest.raises(InvalidArgumentError, match="tiny, sd15, sdxl"):
        preset_config("sd3", "unet")
    with pytest.raises(InvalidArgumentError, match="text-encoder-2"):
        preset_config("sdxl", "classifier")


@pytest.mark.parametrize("preset", ["sd15", "sdxl"])
def test_big_preset_specs_on_meta(preset):
    """The specs and profiles load_component gives (adapters never run the model)."""
    from fastgen.models.loading import _preset_plan

    options = _preset_plan(preset).options
    lo, opt, hi = PRESET_IMAGE_SIZES[preset]
    for component in model_components(preset):
        comp = adapt(build_preset_model(preset, component, device="meta"), component, **options[component])
        profile = comp.spec.profile.dims
        if component == "unet":
            assert (profile["height"].min, profile["height"].opt, profile["height"].max) == (lo, opt, hi)
            assert (profile["seq"].min, profile["seq"].opt, profile["seq"].max) == (77, 77, 154)
            assert (profile["batch"].min, profile["batch"].opt, profile["batch"].max) == (1, 2, 8)
        elif component.startswith("vae"):
            assert (profile["width"].min, profile["width"].max) == (lo, hi)
            assert (profile["batch"].min, profile["batch"].opt, profile["batch"].max) == (1, 1, 4)
        else:
            assert (profile["seq"].min, profile["seq"].opt, profile["seq"].max) == (1, 77, 77)
    unet = adapt(build_preset_model(preset, "unet", device="meta"), **options["unet"]).spec
    if preset == "sdxl":
        assert [(t.name, t.shape) for t in unet.inputs[2:]] == [
            ("encoder_hidden_states", ("batch", "seq", 2048)), ("text_embeds", ("batch", 1280)),
            ("time_ids", ("batch", 6))]
        te2 = adapt(build_preset_model("sdxl", "text-encoder-2", device="meta"), "text-encoder-2").spec
        assert te2.outputs[2].shape == ("batch", 1280)
    else:
        assert unet.input_names == ["sample", "timestep", "encoder_hidden_states"]
        assert unet.inputs[2].shape == ("batch", "seq", 768)


def test_preset_determinism_and_global_rng_untouched():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    digests = {name: weights_digest(load_component("tiny", name).model) for name in model_components("tiny")}
    assert torch.equal(torch.get_rng_state(), before)
    again = {name: weights_digest(load_component("tiny", name, seed=0).model) for name in digests}
    assert again == digests
    other = {name: weights_digest(load_component("tiny", name, seed=1).model) for name in digests}
    assert all(other[n] != digests[n] for n in digests)
    # The VAE's two halves come from one VAE.
    assert digests["vae-decoder"] == digests["vae-encoder"]
    assert len(set(digests.values())) == len(digests) - 1


def test_tiny_labels():
    classifier = load_component("tiny", "classifier").model.config
    assert list(classifier.id2label.values()) == ["clean", "text-heavy", "low-quality", "unsafe"]
    text = load_component("tiny", "text-classifier").model.config
    assert text.num_labels == 3 and len(set(text.id2label.values())) == 3
    assert all(not v.startswith("LABEL_") for v in text.id2label.values())


def test_sd15_vae_with_real_random_weights():
    comp = load_component("sd15", "vae-decoder")
    assert sum(p.numel() for p in comp.model.parameters()) == PARAMS["sd15", "vae-decoder"]
    out = comp(comp.spec.sample_inputs({"batch": 1, "height": 64, "width": 64}))["image"]
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_sd15_text_encoder_with_real_random_weights():
    comp = load_component("sd15", "text-encoder")
    out = comp(comp.spec.sample_inputs({"batch": 1, "seq": 77}))
    assert out["last_hidden_state"].shape == (1, 77, 768) and out["pooler_output"].shape == (1, 768)


@pytest.mark.slow
def test_sd15_unet_with_real_random_weights_rebuilds():
    """The full-size UNet (3.4 GB of fp32 weights) builds, runs and rebuilds from its state dict."""
    from fastgen.models import rebuild_component

    comp = load_component("sd15", "unet")
    x = comp.spec.sample_inputs("min")
    ref = comp(x)["noise_pred"]
    assert ref.shape == (1, 4, 32, 32) and torch.isfinite(ref).all()
    rebuilt = rebuild_component(comp.source, comp.model.state_dict())
    torch.testing.assert_close(rebuilt(x)["noise_pred"], ref, rtol=0, atol=0)


def test_tiny_sdxl_is_sdxl_shaped_and_runs():
    """tiny-sdxl: SDXL's conditioning (two CLIP encoders side by side, pooled projection, six time
    ids) at a size that runs in milliseconds; its VAE and first encoder are tiny's own."""
    _, _, unet = preset_config("tiny-sdxl", "unet")
    _, cls1, te1 = preset_config("tiny-sdxl", "text-encoder")
    _, cls2, te2 = preset_config("tiny-sdxl", "text-encoder-2")
    assert (cls1, cls2) == ("CLIPTextModel", "CLIPTextModelWithProjection")
    assert unet["addition_embed_type"] == "text_time"
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    assert unet["projection_class_embeddings_input_dim"] == te2["projection_dim"] + 6 * unet["addition_time_embed_dim"]
    assert preset_config("tiny-sdxl", "vae-decoder") == preset_config("tiny", "vae-decoder")
    assert preset_config("tiny-sdxl", "text-encoder") == preset_config("tiny", "text-encoder")
    assert PRESET_IMAGE_SIZES["tiny-sdxl"] == PRESET_IMAGE_SIZES["tiny"]

    comps = {name: load_component("tiny-sdxl", name) for name in ("unet", "text-encoder", "text-encoder-2")}
    spec = comps["unet"].spec
    assert spec.input_names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert spec.inputs[2].shape == ("batch", "seq", 96) and spec.inputs[3].shape == ("batch", 32)
    assert comps["unet"].metadata.pipeline == "sdxl" and comps["unet"].metadata.force_zeros_for_empty_prompt
    assert comps["unet"].metadata.scheduler["_class_name"] == "EulerDiscreteScheduler"
    assert sum(p.numel() for p in comps["unet"].model.parameters()) < 2_000_000  # fast on a CPU
    # SDXL's second tokenizer pads with "!", the first with the end token.
    assert comps["text-encoder"].tokenizer.pad_token == "<|endoftext|>"
    assert comps["text-encoder-2"].tokenizer.pad_token == "!"
    te2_out = comps["text-encoder-2"](comps["text-encoder-2"].spec.sample_inputs("opt"))
    assert te2_out["penultimate_hidden_state"].shape == (2, 77, 64) and te2_out["text_embeds"].shape == (2, 32)
    out = comps["unet"](spec.sample_inputs({"batch": 2, "height": 64, "width": 48}))["noise_pred"]
    assert out.shape == (2, 4, 8, 6) and torch.isfinite(out).all()
