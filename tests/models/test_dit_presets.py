"""DiT presets: exact public architectures (counted on the meta device), tiny stand-ins, tokenizers, metadata."""

from __future__ import annotations

import pytest
import torch

from fastgen.errors import InvalidArgumentError
from fastgen.models import UNetMetadata, VaeMetadata, load_component, model_components, preset_config
from fastgen.models.metadata import metadata_from_manifest
from fastgen.models.presets import PRESET_IMAGE_SIZES, build_preset_model, list_presets
from fastgen.models.tokenizers import t5_tokenizer

# Parameter counts of the public checkpoints, and where each figure is published:
# - FLUX.1-dev transformer 11,901,408,320 and its VAE 83,819,683: the safetensors headers of
#   black-forest-labs/FLUX.1-dev (flux1-dev.safetensors, ae.safetensors) as a public model scanner lists
#   them ("unet" 11901408320, "vae" 83819683), and a public validator of FLUX.1-dev's VAE (244 tensors,
#   83819683 values).
# - T5-XXL encoder 4,762,310,656 (SD3's text_encoder_3, FLUX's text_encoder_2, PixArt's text_encoder),
#   SD3.5-medium transformer 2,243,171,520 and CLIP-G with projection 694,659,840: a public SD3.5-medium
#   GRPO training script's comments on pipeline.text_encoder_2/3 and pipeline.transformer.
# - PixArt-Sigma-XL-2-1024-MS transformer 610,856,096 (and its T5 4,762,310,656): a public memory
#   estimator's test pinning that checkpoint at revision e102b359.
# - CLIP-L 123,060,480 (tests/models/test_presets.py, SD 1.5's text encoder) plus SD3's 768x768 text
#   projection (CLIPTextModelWithProjection) = 123,650,304; the SDXL VAE 83,653,863 (test_presets.py).
PARAMS = {
    ("flux-dev", "transformer"): 11_901_408_320,
    ("flux-dev", "vae-decoder"): 83_819_683,
    ("flux-dev", "text-encoder"): 123_060_480,
    ("flux-dev", "text-encoder-2"): 4_762_310_656,
    ("sd35-medium", "transformer"): 2_243_171_520,
    ("sd35-medium", "vae-decoder"): 83_819_683,
    ("sd35-medium", "text-encoder"): 123_060_480 + 768 * 768,
    ("sd35-medium", "text-encoder-2"): 694_659_840,
    ("sd35-medium", "text-encoder-3"): 4_762_310_656,
    ("pixart-sigma", "transformer"): 610_856_096,
    ("pixart-sigma", "vae-decoder"): 83_653_863,
    ("pixart-sigma", "text-encoder"): 4_762_310_656,
}
TINY = ("tiny-sd3", "tiny-flux", "tiny-pixart")


def test_presets_and_components():
    assert {"tiny-sd3", "tiny-flux", "tiny-pixart", "sd35-medium", "flux-dev", "pixart-sigma"} <= set(list_presets())
    sd3 = ["transformer", "vae-decoder", "vae-encoder", "text-encoder", "text-encoder-2", "text-encoder-3"]
    flux = sd3[:-1]
    pixart = sd3[:4]
    for tiny, big, names in (("tiny-sd3", "sd35-medium", sd3), ("tiny-flux", "flux-dev", flux),
                             ("tiny-pixart", "pixart-sigma", pixart)):
        assert model_components(tiny) == model_components(big) == names
        assert PRESET_IMAGE_SIZES[tiny] == (32, 64, 128) and PRESET_IMAGE_SIZES[big] == (512, 1024, 1536)
        for name in names:  # same classes in the tiny stand-in as in the public model
            assert preset_config(tiny, name)[:2] == preset_config(big, name)[:2]


@pytest.mark.parametrize(("preset", "component"), list(PARAMS))
def test_parameter_counts_on_meta(preset, component):
    model = build_preset_model(preset, component, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PARAMS[preset, component]


def test_architecture_facts():
    _, _, sd35 = preset_config("sd35-medium", "transformer")
    assert (sd35["qk_norm"], sd35["dual_attention_layers"], sd35["pos_embed_max_size"]) == ("rms_norm", list(range(13)), 384)
    _, _, tiny_sd3 = preset_config("tiny-sd3", "transformer")
    assert tiny_sd3["qk_norm"] == "rms_norm" and tiny_sd3["dual_attention_layers"] == [0]
    assert preset_config("flux-dev", "transformer")[2]["guidance_embeds"] is True
    assert preset_config("tiny-flux", "transformer")[2]["guidance_embeds"] is True
    assert preset_config("pixart-sigma", "transformer")[2]["out_channels"] == 8
    assert preset_config("pixart-sigma", "vae-decoder") == preset_config("sdxl", "vae-decoder")
    for preset, scale, shift in (("sd35-medium", 1.5305, 0.0609), ("flux-dev", 0.3611, 0.1159),
                                 ("tiny-sd3", 1.5305, 0.0609), ("tiny-flux", 0.3611, 0.1159)):
        vae = preset_config(preset, "vae-decoder")[2]
        assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, scale, shift)
    # The tiny text encoders fit the tiny transformers as the real ones fit the real ones.
    t5 = preset_config("tiny-sd3", "text-encoder-3")[2]
    clip_l, clip_g = (preset_config("tiny-sd3", c)[2] for c in ("text-encoder", "text-encoder-2"))
    assert tiny_sd3["joint_attention_dim"] == t5["d_model"] >= clip_l["hidden_size"] + clip_g["hidden_size"]
    assert tiny_sd3["pooled_projection_dim"] == clip_l["projection_dim"] + clip_g["projection_dim"]
    assert preset_config("tiny-flux", "transformer")[2]["pooled_projection_dim"] == \
        preset_config("tiny-flux", "text-encoder")[2]["hidden_size"]
    assert preset_config("tiny-pixart", "transformer")[2]["caption_channels"] == t5["d_model"]


def test_tiny_models_are_small_and_deterministic():
    for preset in TINY:
        comp = load_component(preset, "transformer")
        assert sum(p.numel() for p in comp.model.parameters()) < 500_000
        again = load_component(preset, "transformer", seed=0)
        x = comp.spec.sample_inputs("opt")
        torch.testing.assert_close(comp(x)["noise_pred"], again(x)["noise_pred"], rtol=0, atol=0)


def test_transformer_metadata_and_schedulers():
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    meta = {p: load_component(p, "transformer").metadata for p in TINY}
    assert all(isinstance(m, UNetMetadata) for m in meta.values())
    assert [meta[p].pipeline for p in TINY] == ["sd3", "flux", "pixart"]
    sd3 = FlowMatchEulerDiscreteScheduler.from_config(meta["tiny-sd3"].scheduler)
    assert sd3.config.shift == 3.0 and not sd3.config.use_dynamic_shifting
    flux = FlowMatchEulerDiscreteScheduler.from_config(meta["tiny-flux"].scheduler)
    assert flux.config.use_dynamic_shifting and (flux.config.base_shift, flux.config.max_shift) == (0.5, 1.15)
    assert (flux.config.base_image_seq_len, flux.config.max_image_seq_len, flux.config.shift) == (256, 4096, 3.0)
    pixart = DPMSolverMultistepScheduler.from_config(meta["tiny-pixart"].scheduler)
    assert (pixart.config.algorithm_type, pixart.config.beta_schedule, pixart.config.solver_order) == \
        ("dpmsolver++", "linear", 2)
    # Metadata survives the manifest round trip.
    back = metadata_from_manifest("transformer", meta["tiny-flux"].to_manifest())
    assert back == meta["tiny-flux"]


def test_vae_metadata_shift_factor():
    assert load_component("tiny-flux", "vae-decoder").metadata == VaeMetadata(0.3611, 8, 0.1159)
    assert load_component("tiny-sd3", "vae-encoder").metadata.shift_factor == 0.0609
    pixart = load_component("tiny-pixart", "vae-decoder").metadata
    assert pixart.shift_factor is None and pixart.scaling_factor == 0.13025
    assert "shift_factor" not in pixart.to_dict()
    for bad in ("0.1", float("nan"), True):
        with pytest.raises(InvalidArgumentError, match="shift_factor"):
            VaeMetadata(shift_factor=bad)
    assert VaeMetadata(shift_factor=0).shift_factor == 0.0
    with pytest.raises(InvalidArgumentError, match="sd3, flux, pixart"):
        UNetMetadata(pipeline="dit")


def test_t5_tokenizers():
    for preset, name in (("tiny-sd3", "text-encoder-3"), ("tiny-flux", "text-encoder-2"), ("tiny-pixart", "text-encoder")):
        tok = load_component(preset, name).tokenizer
        assert type(tok).__name__ in ("T5TokenizerFast", "T5Tokenizer") and len(tok) == 1000
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
        enc = tok("a photo of a red sports car", padding="max_length", max_length=512, truncation=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        n = sum(mask)
        assert len(ids) == 512 and ids[n - 1] == 1 and set(ids[n:]) == {0} and 2 not in ids[:n]
        assert n == 8  # seven known words, one piece each, then </s>
    # Deterministic, and T5's layout at full size: 32000 pieces + 100 sentinels, </s> appended.
    big = t5_tokenizer(32128)
    assert len(big) == 32100 and big.convert_tokens_to_ids("<extra_id_0>") == 32099
    assert big("buy now")["input_ids"] == t5_tokenizer(32128)("buy now")["input_ids"]
    assert big("buy now")["input_ids"][-1] == 1


def test_sd3_clip_tokenizers_pad_like_sd3():
    """SD3's first tokenizer pads with the end token, the second (CLIP-G) with "!", though both encoders
    are projection models."""
    assert load_component("tiny-sd3", "text-encoder").tokenizer.pad_token == "<|endoftext|>"
    assert load_component("tiny-sd3", "text-encoder-2").tokenizer.pad_token == "!"
    assert load_component("tiny-flux", "text-encoder").tokenizer.pad_token == "<|endoftext|>"


def _pipeline_folder(preset, root):
    """The tiny preset saved as the diffusers pipeline folder of its family (save_pretrained, safetensors)."""
    import diffusers

    comps = {name: load_component(preset, name) for name in model_components(preset)}
    meta = comps["transformer"].metadata
    scheduler = getattr(diffusers, meta.scheduler["_class_name"]).from_config(meta.scheduler)
    parts = {"transformer": comps["transformer"].model, "vae": comps["vae-decoder"].model, "scheduler": scheduler}
    folders = {"text-encoder": "", "text-encoder-2": "_2", "text-encoder-3": "_3"}
    for name, suffix in folders.items():
        if name in comps:
            parts[f"text_encoder{suffix}"] = comps[name].model
            parts[f"tokenizer{suffix}"] = comps[name].tokenizer
    cls = {"tiny-sd3": diffusers.StableDiffusion3Pipeline, "tiny-flux": diffusers.FluxPipeline,
           "tiny-pixart": diffusers.PixArtSigmaPipeline}[preset]
    extra = {"image_encoder": None, "feature_extractor": None} if preset == "tiny-flux" else {}
    cls(**parts, **extra).save_pretrained(root, safe_serialization=True)
    return comps


@pytest.mark.parametrize("preset", TINY)
def test_saved_diffusers_pipeline_folders_load(tmp_path, preset):
    from fastgen.models import weights_digest

    comps = _pipeline_folder(preset, tmp_path)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert model_components(tmp_path) == list(comps)
    for name, comp in comps.items():
        loaded = load_component(tmp_path, name)
        assert loaded.spec.input_names == comp.spec.input_names, name
        assert weights_digest(loaded.model) == weights_digest(comp.model), name
        if name == "transformer":  # the folder's scheduler_config.json: the preset's, with every default written
            assert loaded.metadata.pipeline == comp.metadata.pipeline
            assert loaded.metadata.scheduler.items() >= comp.metadata.scheduler.items()
        else:
            assert loaded.metadata == comp.metadata, name
        x = comp.spec.sample_inputs({"batch": 1, "height": 48, "width": 80, "seq": 77}, seed=2) \
            if name == "transformer" else comp.spec.sample_inputs("min", seed=2)
        for key, value in comp(x).items():
            torch.testing.assert_close(loaded(x)[key], value, rtol=0, atol=0)
        if comp.tokenizer is not None:  # the folder's tokenizer_N/ is the preset's
            text = "luxury watch on black marble"
            assert loaded.tokenizer(text)["input_ids"] == comp.tokenizer(text)["input_ids"], name
            assert loaded.tokenizer.pad_token == comp.tokenizer.pad_token, name


@pytest.mark.parametrize(("preset", "channels", "extra"), [
    ("sd35-medium", 16, [("pooled_projections", ("batch", 2048))]),
    ("flux-dev", 16, [("pooled_projections", ("batch", 768)), ("guidance", ("batch",))]),
    ("pixart-sigma", 4, [("encoder_attention_mask", ("batch", "seq"))]),
])
def test_big_preset_specs_on_meta(preset, channels, extra):
    """The specs load_component gives the public architectures (adapters never run the model)."""
    from fastgen.models import adapt
    from fastgen.models.loading import _preset_plan

    options = _preset_plan(preset).options
    spec = adapt(build_preset_model(preset, "transformer", device="meta"), **options["transformer"]).spec
    assert spec.inputs[0].shape == ("batch", channels, "height/8", "width/8")
    assert spec.inputs[2].shape == ("batch", "seq", 4096)  # T5-XXL's width (SD3: CLIP states padded to it)
    assert [(t.name, t.shape) for t in spec.inputs[3:]] == extra
    h = spec.profile.dims["height"]
    assert (h.min, h.opt, h.max) == (512, 1024, 1536)
    t5 = "text-encoder-3" if preset == "sd35-medium" else "text-encoder-2" if preset == "flux-dev" else "text-encoder"
    t5_spec = adapt(build_preset_model(preset, t5, device="meta"), t5).spec
    assert t5_spec.outputs[0].shape == ("batch", "seq", 4096) and t5_spec.profile.dims["seq"].max == 512


@pytest.mark.parametrize("preset", TINY)
def test_rebuild_from_source_recipe(preset):
    """The transformer classes and T5EncoderModel are on the rebuild allowlist (JSON config + state dict)."""
    from fastgen.models import rebuild_component

    for name in ("transformer", model_components(preset)[-1]):
        comp = load_component(preset, name)
        rebuilt = rebuild_component(comp.source, comp.model.state_dict())
        x = comp.spec.sample_inputs("min", seed=1)
        for key, value in comp(x).items():
            torch.testing.assert_close(rebuilt(x)[key], value, rtol=0, atol=0)
