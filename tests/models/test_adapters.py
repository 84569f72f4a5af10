"""Adapters: each wrapper against its raw library model, spec shapes at min/opt/max, errors."""

from __future__ import annotations

import json

import pytest
import torch

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.models import adapt, load_component, model_components

TINY = model_components("tiny")


@pytest.fixture(scope="module")
def tiny():
    return {name: load_component("tiny", name) for name in TINY}


def _raw_outputs(name, model, x):
    """The component's outputs computed straight from the library model (no wrapper)."""
    with torch.inference_mode():
        if name == "unet":
            return [model(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"]).sample]
        if name == "vae-decoder":
            return [model.decode(x["latent"]).sample]
        if name == "vae-encoder":
            # Independent of DiagonalGaussianDistribution: moments = quant_conv(encoder(x)), split, clamp.
            moments = model.quant_conv(model.encoder(x["image"]))
            mean, logvar = moments.chunk(2, dim=1)
            return [mean, logvar.clamp(-30.0, 20.0)]
        if name == "text-encoder":
            out = model(input_ids=x["input_ids"], output_hidden_states=True)
            ids = x["input_ids"]
            # eos_token_id 2 (legacy): pool at the highest token id of each row.
            pooled = out.last_hidden_state[torch.arange(ids.shape[0]), ids.argmax(-1)]
            torch.testing.assert_close(pooled, out.pooler_output, rtol=0, atol=0)
            assert len(out.hidden_states) == model.config.num_hidden_layers + 1
            return [out.last_hidden_state, out.hidden_states[-2], pooled]
        if name == "classifier":
            return [model(pixel_values=x["pixel_values"]).logits]
        if name == "text-classifier":
            return [model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits]
    raise AssertionError(name)


@pytest.mark.parametrize("name", TINY)
def test_tiny_wrapper_matches_raw_model(tiny, name):
    comp = tiny[name]
    x = comp.spec.sample_inputs("opt", seed=3)
    got = comp(x)
    assert list(got) == comp.spec.output_names
    for out, ref in zip(got.values(), _raw_outputs(name, comp.model, x), strict=True):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["min", "opt", "max"])
@pytest.mark.parametrize("name", TINY)
def test_tiny_shapes_at_profile_points(tiny, name, which):
    comp = tiny[name]
    dims = comp.spec.shape_at(which)
    resolved = comp.spec.resolve(dims)
    out = comp(comp.spec.sample_inputs(which))
    for t in comp.spec.outputs:
        assert tuple(out[t.name].shape) == resolved[t.name]
        assert out[t.name].dtype == torch.float32
        assert torch.isfinite(out[t.name]).all()


def test_tiny_specs(tiny):
    unet = tiny["unet"].spec
    assert [(t.name, t.dtype, t.shape) for t in unet.inputs] == [
        ("sample", "float32", ("batch", 4, "height/8", "width/8")),
        ("timestep", "float32", ("batch",)),
        ("encoder_hidden_states", "float32", ("batch", "seq", 32)),
    ]
    assert (unet.inputs[1].low, unet.inputs[1].high) == (0, 1000)
    assert str(unet.profile) == "batch=1:2:8,height=32:64:128,seq=77:77:154,width=32:64:128"
    # Latents must survive the UNet's one internal downsampling: 8 * 2 pixels.
    assert dict(unet.multiples) == {"height": 16, "width": 16}
    with pytest.raises(InvalidArgumentError, match="multiples of 16"):
        unet.with_profile("height=40:64:128")
    assert tiny["vae-decoder"].spec.inputs[0].shape == ("batch", 4, "height/8", "width/8")
    assert tiny["vae-decoder"].spec.outputs[0].shape == ("batch", 3, "height", "width")
    assert str(tiny["vae-decoder"].spec.profile) == "batch=1:1:4,height=32:64:128,width=32:64:128"
    enc = tiny["vae-encoder"].spec
    assert (enc.inputs[0].low, enc.inputs[0].high) == (-1, 1)
    assert enc.output_names == ["latent_mean", "latent_logvar"]
    te = tiny["text-encoder"].spec
    assert te.output_names == ["last_hidden_state", "penultimate_hidden_state", "pooler_output"]
    assert (te.inputs[0].low, te.inputs[0].high) == (0, 1000)
    assert str(te.profile) == "batch=1:2:8,seq=1:77:77"
    cls = tiny["classifier"].spec
    assert cls.inputs[0].shape == ("batch", 3, "height", "width")
    assert cls.outputs[0].shape == ("batch", 4)
    assert str(cls.profile) == "batch=1:8:32,height=64:64:64,width=64:64:64"
    tc = tiny["text-classifier"].spec
    assert tc.input_names == ["input_ids", "attention_mask"] and tc.inputs[1].kind == "mask"
    assert str(tc.profile) == "batch=1:8:32,seq=1:64:128"
    assert tc.outputs[0].shape == ("batch", 3)
    for comp in tiny.values():
        assert comp.spec.component == comp.name and not comp.module.training and not comp.model.training
        json.dumps(comp.source)  # the recipe is JSON


def test_text_classifier_mask_is_respected(tiny):
    """A right-padded row scores as the same text unpadded: the mask, not the padding, decides."""
    comp = tiny["text-classifier"]
    ids = torch.randint(0, 1000, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 1:] = 0
    padded = comp({"input_ids": ids, "attention_mask": mask})["logits"]
    for row, length in ((1, 7), (2, 1)):
        alone = comp({"input_ids": ids[row:row + 1, :length], "attention_mask": mask[row:row + 1, :length]})
        torch.testing.assert_close(padded[row:row + 1], alone["logits"], rtol=1e-5, atol=1e-6)
    # ... and the padding does change the result when unmasked.
    full = comp({"input_ids": ids, "attention_mask": torch.ones_like(ids)})["logits"]
    assert not torch.allclose(full[1], padded[1], rtol=1e-4, atol=1e-6)


def test_sdxl_style_unet(tiny_sdxl_unet):
    comp = adapt(tiny_sdxl_unet)
    assert comp.name == "unet"
    spec = comp.spec
    assert spec.input_names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert spec.inputs[3].shape == ("batch", 32) and spec.inputs[4].shape == ("batch", 6)
    assert (spec.inputs[4].low, spec.inputs[4].high) == (0, 1024)
    x = spec.sample_inputs("opt", seed=1)
    with torch.inference_mode():
        ref = tiny_sdxl_unet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                             added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}).sample
    torch.testing.assert_close(comp(x)["noise_pred"], ref, rtol=0, atol=0)
    for which in ("min", "max"):
        out = comp(spec.sample_inputs(which))["noise_pred"]
        assert tuple(out.shape) == spec.resolve(spec.shape_at(which))["noise_pred"]


def test_unet_per_sample_timesteps(tiny):
    """Each sample is denoised at its own timestep (what guidance and batching rely on)."""
    comp = tiny["unet"]
    x = comp.spec.sample_inputs({"batch": 2}, seed=2)
    x["timestep"] = torch.tensor([10.0, 900.0])
    both = comp(x)["noise_pred"]
    for i in range(2):
        one = comp({k: v[i:i + 1] for k, v in x.items()})["noise_pred"]
        torch.testing.assert_close(both[i:i + 1], one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_class_embeds", [None, 10])
def test_unet_2d(tiny_unet_2d_factory, num_class_embeds):
    model = tiny_unet_2d_factory(num_class_embeds)
    comp = adapt(model, latent_factor=8)  # pixel space: the latent factor does not apply
    spec = comp.spec
    assert spec.inputs[0].shape == ("batch", 3, "height", "width")
    assert str(spec.profile) == "batch=1:2:8,height=8:16:32,width=8:16:32"
    assert dict(spec.multiples) == {"height": 2, "width": 2}
    names = ["sample", "timestep"] + (["class_labels"] if num_class_embeds else [])
    assert spec.input_names == names
    x = spec.sample_inputs("opt", seed=4)
    if num_class_embeds:
        assert spec.inputs[2].dtype == "int64" and spec.inputs[2].high == num_class_embeds
    with torch.inference_mode():
        ref = model(x["sample"], x["timestep"], class_labels=x.get("class_labels")).sample
    torch.testing.assert_close(comp(x)["noise_pred"], ref, rtol=0, atol=0)


def test_clip_with_projection(tiny_clip_proj):
    comp = adapt(tiny_clip_proj, "text-encoder-2")
    assert comp.name == "text-encoder-2" and comp.spec.component == "text-encoder-2"
    spec = comp.spec
    assert spec.output_names == ["last_hidden_state", "penultimate_hidden_state", "text_embeds"]
    assert spec.outputs[2].shape == ("batch", 24)
    x = spec.sample_inputs({"batch": 3, "seq": 11}, seed=5)
    with torch.inference_mode():
        ref = tiny_clip_proj(input_ids=x["input_ids"], output_hidden_states=True)
    got = comp(x)
    torch.testing.assert_close(got["last_hidden_state"], ref.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(got["penultimate_hidden_state"], ref.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(got["text_embeds"], ref.text_embeds, rtol=0, atol=0)
    assert adapt(tiny_clip_proj).name == "text-encoder"


def test_bert_text_encoder(tiny_bert):
    comp = adapt(tiny_bert)
    spec = comp.spec
    assert comp.name == "text-encoder"
    assert spec.input_names == ["input_ids", "attention_mask"] and spec.inputs[1].kind == "mask"
    assert spec.outputs[0].shape == ("batch", "seq", 32)
    assert str(spec.profile) == "batch=1:2:8,seq=1:64:96"  # capped by max_position_embeddings
    x = spec.sample_inputs("max", seed=6)
    with torch.inference_mode():
        ref = tiny_bert(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state
    torch.testing.assert_close(comp(x)["last_hidden_state"], ref, rtol=0, atol=0)


@pytest.mark.parametrize("output", ["tensor", "tuple", "object"])
def test_custom_image_classifier(tiny_cnn_factory, output):
    model = tiny_cnn_factory(output=output)
    comp = adapt(model)
    assert comp.name == "classifier" and comp.source == {}
    assert comp.origin == "<module TinyCNN>"
    spec = comp.spec
    assert spec.inputs[0].shape == ("batch", 3, "height", "width")
    assert spec.outputs[0].shape == ("batch", 5)
    assert str(spec.profile) == "batch=1:8:32,height=224:224:224,width=224:224:224"
    x = spec.sample_inputs({"batch": 2, "height": 40, "width": 40}, seed=7)
    with torch.inference_mode():
        raw = model(x["pixel_values"])
    ref = raw if output == "tensor" else raw[0] if output == "tuple" else raw.logits
    torch.testing.assert_close(comp(x)["logits"], ref, rtol=0, atol=0)


def test_custom_classifier_options(tiny_cnn_factory):
    model = tiny_cnn_factory(in_channels=1, num_classes=3)
    comp = adapt(model, image_size=48, profile="height=32:48:96")
    spec = comp.spec
    assert spec.inputs[0].shape == ("batch", 1, "height", "width")
    assert str(spec.profile) == "batch=1:8:32,height=32:48:96,width=48:48:48"
    # A non-contiguous input (a strided view) gives the same logits as a contiguous one.
    x = torch.randn(4, 1, 48, 96, generator=torch.Generator().manual_seed(8))[..., ::2]
    assert not x.is_contiguous()
    torch.testing.assert_close(comp({"pixel_values": x})["logits"],
                               comp({"pixel_values": x.contiguous()})["logits"], rtol=0, atol=0)


def test_vae_component_choice(tiny):
    vae = tiny["vae-decoder"].model
    assert adapt(vae).name == "vae-decoder"
    assert adapt(vae, "vae-encoder").name == "vae-encoder"
    with pytest.raises(InvalidArgumentError, match="vae-decoder, vae-encoder"):
        adapt(vae, "unet")


def test_text_classifier_alias(tiny):
    model = tiny["text-classifier"].model
    assert adapt(model, "classifier").name == "text-classifier"
    with pytest.raises(InvalidArgumentError):
        adapt(model, "text-encoder")


def test_adapt_errors(tiny, tiny_cnn_factory):
    with pytest.raises(InvalidArgumentError, match="model"):
        adapt("not a module")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="latent-factor"):
        adapt(tiny["unet"].model, latent_factor=3)
    with pytest.raises(InvalidArgumentError, match="profile"):
        adapt(tiny["unet"].model, profile="depth=1:2:3")

    class Scalar(torch.nn.Module):
        def forward(self, x):
            return x.mean()

    with pytest.raises(UnsupportedError, match="batch, num_labels"):
        adapt(Scalar())


def test_unsupported_library_models():
    import diffusers

    with torch.device("meta"):
        vq = diffusers.VQModel(block_out_channels=(8,), norm_num_groups=8, latent_channels=2)
    with pytest.raises(UnsupportedError, match="VQModel"):
        adapt(vq)


def test_latent_factor_option(tiny):
    comp = adapt(tiny["unet"].model, latent_factor=4, image_size=32)
    assert comp.spec.inputs[0].shape == ("batch", 4, "height/4", "width/4")
    # multiples of 4 * 2 (one internal downsample): 16:32:64
    assert str(comp.spec.profile) == "batch=1:2:8,height=16:32:64,seq=77:77:154,width=16:32:64"
    assert comp.source["adapter"]["latent_factor"] == 4
