"""Two-tower image-text models (CLIPModel, SiglipModel) as text-tower and image-tower components."""

from __future__ import annotations

import math

import pytest
import torch

from fastgen.errors import InvalidArgumentError
from fastgen.models import load_component, model_components, rebuild_component
from fastgen.models.adapters_clip import CLIP_MEAN, CLIP_STD, preset_tokenizer
from fastgen.models.metadata import (
    ImageTowerMetadata,
    TextTowerMetadata,
    metadata_from_manifest,
)
from fastgen.models.presets import build_preset_model, preset_config

PRESETS = ("tiny-clip", "tiny-siglip")
TEXTS = ["a red car", "a photo of a golden retriever wearing sunglasses on a beach, funny social media ad", "x"]


def _text_feeds(comp, texts):
    siglip = comp.spec.model_type == "SiglipModel"
    enc = comp.tokenizer(texts, padding="max_length" if siglip else True, truncation=True,
                         max_length=comp.metadata.max_length, return_tensors="pt")
    return {n: enc[n] for n in comp.spec.input_names}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_offer_both_towers_with_scale_and_bias(preset):
    assert model_components(preset) == ["text-tower", "image-tower"]
    text, image = load_component(preset, "text-tower"), load_component(preset, "image-tower")
    model = text.model
    scale = float(model.logit_scale.detach().exp())
    assert isinstance(text.metadata, TextTowerMetadata) and isinstance(image.metadata, ImageTowerMetadata)
    for meta in (text.metadata, image.metadata):
        assert meta.logit_scale == scale
    if preset == "tiny-siglip":  # SigLIP's initial temperature and bias, not transformers' zeros
        assert math.isclose(scale, 10.0, rel_tol=1e-6) and image.metadata.logit_bias == -10.0
        assert text.metadata.family == "siglip" and text.spec.inputs[0].shape == ("batch", 24)
        assert text.tokenizer.pad_token_id == 1 and text.metadata.max_length == 24
        assert image.metadata.center_crop is False and image.metadata.mean == (0.5, 0.5, 0.5)
    else:
        assert math.isclose(scale, math.exp(2.6592), rel_tol=1e-6) and image.metadata.logit_bias is None
        assert list(text.spec.input_names) == ["input_ids", "attention_mask"] and text.metadata.max_length == 77
        assert image.metadata.center_crop is True and image.metadata.mean == CLIP_MEAN
        assert image.metadata.std == CLIP_STD and image.metadata.resample == 3
    assert image.metadata.image_size == 32
    # the same seed gives both towers the same model, as one checkpoint would
    assert torch.equal(build_preset_model(preset, "text-tower").logit_scale, model.logit_scale)


@pytest.mark.parametrize("preset", PRESETS)
def test_towers_equal_get_features(preset):
    text, image = load_component(preset, "text-tower"), load_component(preset, "image-tower")
    model = text.model
    feeds = _text_feeds(text, TEXTS)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_text = model.get_text_features(**feeds).pooler_output
        ref_image = model.get_image_features(pixel_values=pixels).pooler_output
    assert torch.equal(text(feeds)["text_embeds"], ref_text)
    assert torch.equal(image({"pixel_values": pixels})["image_embeds"], ref_image)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("tower", ["text-tower", "image-tower"])
def test_towers_export_to_onnx(preset, tower, onnx_check):
    report = onnx_check(load_component(preset, tower), shapes=("min", "max"))
    assert set(report) == {"min", "max"}


def _save_folder(tmp_path, family: str, logit_scale: float):
    import transformers

    library, cls_name, config = preset_config(f"tiny-{family}", "text-tower")
    model = getattr(transformers, cls_name)(getattr(transformers, cls_name).config_class.from_dict(config))
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
        if family == "siglip":
            model.logit_bias.fill_(-3.5)
    folder = tmp_path / family
    model.save_pretrained(folder)
    preset_tokenizer(family, config["text_config"]).save_pretrained(folder)
    if family == "clip":
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                    image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3])
    else:
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32}, resample=2)
    processor.save_pretrained(folder)
    return folder, model.eval()


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_local_folder_loads_both_towers(tmp_path, family):
    folder, model = _save_folder(tmp_path, family, 3.0)
    expected = ["text-tower", "image-tower"] + (["text-encoder"] if family == "clip" else [])
    assert model_components(folder) == expected
    text, image = load_component(folder, "text-tower"), load_component(folder, "image-tower")
    assert text.metadata.logit_scale == image.metadata.logit_scale == float(torch.tensor(3.0).exp())
    assert image.metadata.logit_bias == (-3.5 if family == "siglip" else None)
    assert image.metadata.image_size == 32
    if family == "clip":
        assert image.metadata.center_crop and image.metadata.mean == (0.4, 0.45, 0.5)
        assert load_component(folder, "text-encoder").spec.component == "text-encoder"  # still a pipeline's encoder
    else:
        assert not image.metadata.center_crop and image.metadata.resample == 2
    assert text.tokenizer is not None
    feeds = _text_feeds(text, TEXTS)
    with torch.no_grad():
        assert torch.equal(text(feeds)["text_embeds"], model.get_text_features(**feeds).pooler_output)
    with pytest.raises(InvalidArgumentError, match="several components"):
        load_component(folder)


@pytest.mark.parametrize("preset", PRESETS)
def test_rebuild_from_source(preset):
    comp = load_component(preset, "image-tower")
    rebuilt = rebuild_component(comp.source, comp.model.state_dict())
    assert rebuilt.name == "image-tower" and rebuilt.spec == comp.spec
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(rebuilt({"pixel_values": pixels})["image_embeds"], comp({"pixel_values": pixels})["image_embeds"])


def test_tower_metadata_is_validated_and_round_trips():
    meta = ImageTowerMetadata(image_size=32, family="siglip", logit_scale=10, logit_bias=-10)
    assert metadata_from_manifest("image-tower", meta.to_manifest()) == meta
    assert isinstance(meta.logit_scale, float)
    for bad in ({"family": "align"}, {"logit_scale": 0.0}, {"logit_scale": float("nan")}, {"logit_bias": "x"}):
        with pytest.raises(InvalidArgumentError) as err:
            TextTowerMetadata(**bad)
        assert "\n" not in str(err.value)
