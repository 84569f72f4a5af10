"""Typed component metadata: one class per kind, exact round trips, tolerant readers, one set of defaults."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fastgen.errors import InvalidArgumentError
from fastgen.models import load_component
from fastgen.models.assets import SD_SCHEDULER, SDXL_SCHEDULER
from fastgen.models.component import Component
from fastgen.models.metadata import (
    DEFAULT_RESAMPLE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    METADATA_VERSION,
    GenericMetadata,
    ImageClassifierMetadata,
    TextClassifierMetadata,
    TextEncoderMetadata,
    UNetMetadata,
    VaeMetadata,
    metadata_class,
    metadata_from_dict,
    metadata_from_manifest,
)

# What models.assets wrote as a component's untyped "extras" before the metadata was typed (and what
# format-1 manifests hold): the typed metadata's dict must be exactly this, so cache keys stay put.
TINY_EXTRAS = {
    "unet": {"pipeline": "sd", "scheduler": SD_SCHEDULER},
    "vae-decoder": {"scaling_factor": 0.18215, "latent_factor": 8},
    "vae-encoder": {"scaling_factor": 0.18215, "latent_factor": 8},
    "text-encoder": {},
    "classifier": {"labels": ["clean", "text-heavy", "low-quality", "unsafe"], "image_size": 64,
                   "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resample": 2},
    "text-classifier": {"labels": ["compliant", "misleading", "prohibited"], "max_length": 128},
}
KINDS = {"unet": UNetMetadata, "vae-decoder": VaeMetadata, "vae-encoder": VaeMetadata,
         "text-encoder": TextEncoderMetadata, "classifier": ImageClassifierMetadata,
         "text-classifier": TextClassifierMetadata}


@pytest.fixture(scope="module")
def tiny() -> dict[str, Component]:
    return {name: load_component("tiny", name) for name in TINY_EXTRAS}


@pytest.mark.parametrize("name", list(TINY_EXTRAS))
def test_presets_get_typed_metadata_equal_to_the_old_extras(tiny, name):
    comp = tiny[name]
    assert type(comp.metadata) is KINDS[name]
    assert comp.metadata.to_dict() == TINY_EXTRAS[name]
    assert json.dumps(comp.metadata.to_dict(), sort_keys=True) == json.dumps(TINY_EXTRAS[name], sort_keys=True)
    assert not hasattr(comp, "extras")  # the untyped bridge is gone


@pytest.mark.parametrize("name", list(TINY_EXTRAS))
def test_round_trips(tiny, name):
    meta = tiny[name].metadata
    assert metadata_from_dict(name, meta.to_dict()) == meta
    entry = json.loads(json.dumps(meta.to_manifest()))  # through JSON, as in a manifest
    assert entry["version"] == METADATA_VERSION and entry["kind"] == meta.kind
    assert metadata_from_manifest(name, entry) == meta


def test_sdxl_unet_records_empty_prompt_zeros():
    meta = load_component("tiny-sdxl", "unet").metadata
    assert meta == UNetMetadata(scheduler=SDXL_SCHEDULER, pipeline="sdxl", force_zeros_for_empty_prompt=True)
    assert meta.zeros_for_empty_prompt()
    sd = UNetMetadata(scheduler=SD_SCHEDULER, pipeline="sd")
    assert "force_zeros_for_empty_prompt" not in sd.to_dict()
    assert not sd.zeros_for_empty_prompt() and sd.zeros_for_empty_prompt("sdxl")
    assert UNetMetadata(force_zeros_for_empty_prompt=False).zeros_for_empty_prompt("sdxl") is False


def test_frozen_and_not_aliased():
    scheduler = {"_class_name": "PNDMScheduler"}
    meta = UNetMetadata(scheduler=scheduler, pipeline="sd")
    scheduler["_class_name"] = "changed"
    meta.to_dict()["scheduler"]["_class_name"] = "changed too"
    assert meta.scheduler == {"_class_name": "PNDMScheduler"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.pipeline = "sdxl"  # type: ignore[misc]


def test_component_defaults_to_the_empty_metadata_of_its_kind(tiny):
    comp = tiny["classifier"]
    bare = Component(name="classifier", module=comp.module, spec=comp.spec, model=comp.model)
    assert bare.metadata == ImageClassifierMetadata() and bare.metadata.to_dict() == {}
    custom = Component(name="block", module=comp.module, spec=comp.spec, model=comp.model)
    assert type(custom.metadata) is GenericMetadata and custom.metadata.to_dict() == {}


def test_unrecorded_fields_are_left_out_and_defaults_live_in_one_place():
    assert ImageClassifierMetadata().to_dict() == {}
    rgb = ImageClassifierMetadata(image_size=32).with_defaults(channels=3)
    assert (rgb.mean, rgb.std, rgb.resample, rgb.center_crop) == (IMAGENET_MEAN, IMAGENET_STD, DEFAULT_RESAMPLE, False)
    assert rgb.image_size == 32 and rgb.labels is None
    gray = ImageClassifierMetadata().with_defaults(channels=1)
    assert (gray.mean, gray.std) == ((0.5,), (0.5,))
    recorded = ImageClassifierMetadata(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], resample="bicubic", center_crop=True)
    assert recorded.resample == 3 and recorded.with_defaults() == recorded
    assert recorded.to_dict() == {"mean": [0.5] * 3, "std": [0.5] * 3, "resample": 3, "center_crop": True}
    assert ImageClassifierMetadata(image_size=[224, 160]).to_dict() == {"image_size": [224, 160]}


def test_readers_tolerate_newer_writers():
    newer = {"labels": ["a", "b"], "max_length": 64, "lowercase": True}  # a key from the future
    assert metadata_from_dict("text-classifier", newer) == TextClassifierMetadata(labels=("a", "b"), max_length=64)
    entry = {"version": METADATA_VERSION + 1, "kind": "text-classifier-v9", "fields": newer}
    assert metadata_from_manifest("text-classifier", entry) == TextClassifierMetadata(labels=("a", "b"), max_length=64)
    # the recorded kind wins over the component name, and no entry at all is the empty metadata
    assert type(metadata_from_manifest("model", {"kind": "vae", "fields": {"latent_factor": 8}})) is VaeMetadata
    assert metadata_from_manifest("unet", None) == UNetMetadata()
    assert metadata_class("my-component") is GenericMetadata
    assert metadata_from_dict("my-component", {"anything": 1}).to_dict() == {}


@pytest.mark.parametrize(("cls", "fields", "match"), [
    (UNetMetadata, {"pipeline": "sd4"}, "pipeline"),  # sd3 / flux / pixart are the DiT families
    (UNetMetadata, {"scheduler": "PNDM"}, "scheduler"),
    (UNetMetadata, {"force_zeros_for_empty_prompt": "yes"}, "force_zeros_for_empty_prompt"),
    (VaeMetadata, {"scaling_factor": 0}, "scaling_factor"),
    (VaeMetadata, {"latent_factor": 3}, "latent_factor"),
    (ImageClassifierMetadata, {"labels": "cat"}, "labels"),
    (ImageClassifierMetadata, {"image_size": 0}, "image_size"),
    (ImageClassifierMetadata, {"mean": [0.5, 0.5], "std": [0.5]}, "std"),
    (ImageClassifierMetadata, {"std": [0.0]}, "std"),
    (ImageClassifierMetadata, {"resample": "sharpest"}, "resample"),
    (ImageClassifierMetadata, {"center_crop": 1}, "center_crop"),
    (TextClassifierMetadata, {"max_length": -1}, "max_length"),
])
def test_validation_names_the_field(cls, fields, match):
    with pytest.raises(InvalidArgumentError, match=match) as info:
        cls.from_dict(fields)
    assert "\n" not in str(info.value)
