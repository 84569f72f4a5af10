"""DiT adapters: each tiny wrapper equals the diffusers model called the way its diffusers pipeline calls it."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.models import adapt, load_component
from fastgen.models.adapters_dit import pack_latents, rotate_pairs, unpack_latents

# Odd sizes: 48x80 pixels is a 6x10 latent grid, 3x5 FLUX patches / PixArt and SD3 patches.
SIZES = [(1, 48, 80), (3, 48, 80), (2, 64, 32), (1, 128, 128)]


@pytest.fixture(scope="module")
def transformers_():
    return {p: load_component(p, "transformer") for p in ("tiny-sd3", "tiny-flux", "tiny-pixart")}


def _inputs(comp, batch, height, width, seq=19, seed=0):
    return comp.spec.sample_inputs({"batch": batch, "height": height, "width": width, "seq": seq}, seed=seed)


@pytest.mark.parametrize(("batch", "height", "width"), SIZES)
def test_sd3_wrapper_is_the_pipeline_call(transformers_, batch, height, width):
    comp = transformers_["tiny-sd3"]
    x = _inputs(comp, batch, height, width, seq=77 + 13)
    with torch.inference_mode():
        # StableDiffusion3Pipeline: hidden_states, timestep, encoder_hidden_states, pooled_projections.
        ref = comp.model(hidden_states=x["sample"], timestep=x["timestep"],
                         encoder_hidden_states=x["encoder_hidden_states"],
                         pooled_projections=x["pooled_projections"], return_dict=False)[0]
    out = comp(x)["noise_pred"]
    assert out.shape == (batch, 16, height // 8, width // 8)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert ref.abs().mean() > 1e-3  # a real prediction, not zeros


@pytest.mark.parametrize(("batch", "height", "width"), SIZES)
def test_flux_wrapper_is_the_pipeline_call(transformers_, batch, height, width):
    comp = transformers_["tiny-flux"]
    x = _inputs(comp, batch, height, width)
    assert comp.spec.input_names == ["sample", "timestep", "encoder_hidden_states", "pooled_projections", "guidance"]
    lat = x["sample"]
    c, h, w = lat.shape[1:]
    # FluxPipeline's own helpers: pack, position ids of the (h/2, w/2) grid, zero text ids, timestep / 1000.
    packed = FluxPipeline._pack_latents(lat, batch, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, lat.device, lat.dtype)
    txt_ids = torch.zeros(x["encoder_hidden_states"].shape[1], 3)
    with torch.inference_mode():
        pred = comp.model(hidden_states=packed, timestep=x["timestep"] / 1000, guidance=x["guidance"],
                          pooled_projections=x["pooled_projections"],
                          encoder_hidden_states=x["encoder_hidden_states"], txt_ids=txt_ids, img_ids=img_ids,
                          return_dict=False)[0]
    ref = FluxPipeline._unpack_latents(pred, height, width, 8)
    out = comp(x)["noise_pred"]
    assert out.shape == lat.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # The guidance input is used (FLUX.1-dev's distilled guidance embedding).
    other = comp({**x, "guidance": x["guidance"] + 2})["noise_pred"]
    assert (other - out).abs().max() > 1e-4


@pytest.mark.parametrize(("batch", "height", "width"), SIZES)
def test_pixart_wrapper_is_the_pipeline_call(transformers_, batch, height, width):
    comp = transformers_["tiny-pixart"]
    x = _inputs(comp, batch, height, width)
    assert x["encoder_attention_mask"].dtype == torch.int64
    with torch.inference_mode():
        pred = comp.model(x["sample"], encoder_hidden_states=x["encoder_hidden_states"],
                          encoder_attention_mask=x["encoder_attention_mask"], timestep=x["timestep"],
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    assert pred.shape[1] == 8  # learned sigma: epsilon and variance
    ref = pred.chunk(2, dim=1)[0]  # PixArtSigmaPipeline keeps the epsilon half
    out = comp(x)["noise_pred"]
    assert out.shape == (batch, 4, height // 8, width // 8)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # The mask matters: masking out a token changes the prediction.
    mask = torch.ones_like(x["encoder_attention_mask"])
    mask[:, -1] = 0
    a = comp({**x, "encoder_attention_mask": torch.ones_like(mask)})["noise_pred"]
    b = comp({**x, "encoder_attention_mask": mask})["noise_pred"]
    assert (a - b).abs().max() > 1e-5


def test_pack_unpack_roundtrip_and_rotary_match_diffusers():
    from diffusers.models.embeddings import apply_rotary_emb

    g = torch.Generator().manual_seed(0)
    lat = torch.randn(3, 16, 6, 10, generator=g)
    torch.testing.assert_close(pack_latents(lat), FluxPipeline._pack_latents(lat, 3, 16, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(pack_latents(lat), 6, 10), lat, rtol=0, atol=0)
    x = torch.randn(2, 7, 3, 16, generator=g)  # (batch, seq, heads, head_dim)
    cos, sin = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    torch.testing.assert_close(rotate_pairs(x, (cos, sin), sequence_dim=1),
                               apply_rotary_emb(x, (cos, sin), sequence_dim=1), rtol=0, atol=0)
    xt = x.transpose(1, 2)
    torch.testing.assert_close(rotate_pairs(xt, (cos, sin), sequence_dim=2),
                               apply_rotary_emb(xt, (cos, sin), sequence_dim=2), rtol=0, atol=0)


def test_specs_follow_the_contract(transformers_):
    sd3, flux, pixart = (transformers_[p].spec for p in ("tiny-sd3", "tiny-flux", "tiny-pixart"))
    assert sd3.input_names == ["sample", "timestep", "encoder_hidden_states", "pooled_projections"]
    assert pixart.input_names == ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
    assert pixart.inputs[3].dtype == "int64" and pixart.inputs[3].kind == "mask"
    for spec, channels in ((sd3, 16), (flux, 16), (pixart, 4)):
        assert spec.component == "transformer" and spec.output_names == ["noise_pred"]
        assert spec.inputs[0].shape == ("batch", channels, "height/8", "width/8")
        assert spec.outputs[0].shape == spec.inputs[0].shape
        assert spec.inputs[1].shape == ("batch",) and (spec.inputs[1].low, spec.inputs[1].high) == (0, 1000)
        assert spec.multiples == {"height": 16, "width": 16}
        assert set(spec.profile.dims) == {"batch", "seq", "height", "width"}
        h = spec.profile.dims["height"]
        assert (h.min, h.opt, h.max) == (32, 64, 128)
    assert str(sd3.profile.dims["seq"].to_dict()) == str({"min": 77, "opt": 333, "max": 589})
    assert flux.profile.dims["seq"].max == 512 and pixart.profile.dims["seq"].opt == 300
    with pytest.raises(InvalidArgumentError, match="multiples of 16"):
        sd3.sample_inputs({"height": 40})


def test_adapt_a_bare_module_and_component_names(transformers_):
    model = transformers_["tiny-flux"].model
    comp = adapt(model)
    assert comp.name == "transformer" and comp.source["class"] == "FluxTransformer2DModel"
    with pytest.raises(InvalidArgumentError, match="transformer"):
        adapt(model, "unet")
    import diffusers

    with torch.device("meta"):
        other = diffusers.UNet1DModel()
    # Another diffusers class is refused with the supported list, which names the transformers.
    with pytest.raises(UnsupportedError, match="SD3Transformer2DModel, FluxTransformer2DModel"):
        adapt(other)


def test_t5_goes_through_the_text_encoder_adapter():
    comp = load_component("tiny-flux", "text-encoder-2")
    spec = comp.spec
    assert comp.model.__class__.__name__ == "T5EncoderModel"
    assert spec.input_names == ["input_ids", "attention_mask"] and spec.output_names == ["last_hidden_state"]
    assert spec.inputs[1].kind == "mask" and spec.outputs[0].shape == ("batch", "seq", 128)
    seq = spec.profile.dims["seq"]
    assert (seq.min, seq.max) == (1, 512)
    x = spec.sample_inputs({"batch": 3, "seq": 29}, seed=4)
    with torch.inference_mode():
        ref = comp.model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state
        # SD3/FLUX call T5 without a mask: identical to an all-ones mask.
        bare = comp.model(input_ids=x["input_ids"]).last_hidden_state
    torch.testing.assert_close(comp(x)["last_hidden_state"], ref, rtol=0, atol=0)
    ones = comp({**x, "attention_mask": torch.ones_like(x["attention_mask"])})["last_hidden_state"]
    torch.testing.assert_close(ones, bare, rtol=0, atol=0)
