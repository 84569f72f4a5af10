"""Engines carry their component's typed metadata in the manifest (format 2) and still read format 1."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from fastgen.engines.build import build
from fastgen.engines.cache import FORMAT_VERSION, EngineCache, read_manifest
from fastgen.engines.loading import load_engine
from fastgen.errors import CacheCorruptionError
from fastgen.export.config import ExportConfig
from fastgen.models import adapt, load_component
from fastgen.models.metadata import ImageClassifierMetadata, TextClassifierMetadata

FAST = ExportConfig(verify="opt")
# models.assets' untyped extras for the tiny classifier, as format-1 manifests and cache keys hold them.
CLASSIFIER_EXTRAS = {"labels": ["clean", "text-heavy", "low-quality", "unsafe"], "image_size": 64,
                     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resample": 2}


def as_format_1(directory: Path) -> None:
    """Rewrite a manifest as format 1 wrote it: the metadata's fields as an untyped ``extras`` dict."""
    manifest = json.loads((directory / "manifest.json").read_text())
    extras = manifest.pop("metadata")["fields"]
    (directory / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1, "extras": extras}))


@pytest.fixture(scope="module")
def classifier():
    return load_component("tiny", "classifier")


@pytest.fixture(scope="module")
def built(classifier, tmp_path_factory):
    """(engine directory, cache, engine) of the tiny classifier built once into a fresh cache."""
    root = tmp_path_factory.mktemp("meta")
    cache = EngineCache(root / "cache")
    engine = build(classifier, backend="onnxruntime", device="cpu", cache=cache, export=FAST, out=root / "engine")
    return root / "engine", cache, engine


def test_manifest_stores_typed_metadata_and_the_key_is_unchanged(classifier, built):
    directory, _, engine = built
    manifest = read_manifest(directory, upgrade=False)
    assert manifest["format_version"] == FORMAT_VERSION == 2 and "extras" not in manifest
    assert manifest["metadata"] == {"version": 1, "kind": "image-classifier", "fields": CLASSIFIER_EXTRAS}
    # The key material holds the same dict as before the metadata was typed: cache keys did not change.
    assert manifest["key_material"]["source"]["extras"] == CLASSIFIER_EXTRAS
    assert engine.metadata == classifier.metadata and type(engine.metadata) is ImageClassifierMetadata
    assert load_engine(directory).metadata == classifier.metadata
    assert engine.metadata.to_dict() == CLASSIFIER_EXTRAS and not hasattr(engine, "extras")  # no untyped bridge


def test_format_1_engine_directory_loads_with_its_metadata(classifier, built, tmp_path):
    directory = tmp_path / "old"
    shutil.copytree(built[0], directory)
    as_format_1(directory)
    engine = load_engine(directory)
    assert engine.metadata == classifier.metadata and engine.metadata.to_dict() == CLASSIFIER_EXTRAS
    inputs = classifier.spec.sample_inputs("opt")
    assert engine(inputs)["logits"].shape == built[2](inputs)["logits"].shape


def test_format_1_cache_entry_is_rebuilt(classifier, built, caplog):
    _, cache, first = built
    entry = cache.path_for(first.manifest["cache_key"])
    as_format_1(entry)
    again = build(classifier, backend="onnxruntime", device="cpu", cache=cache, export=FAST)
    assert not again.cache_hit  # the old entry was a miss, rebuilt at the same key
    assert again.manifest["cache_key"] == first.manifest["cache_key"]
    assert read_manifest(entry, upgrade=False)["format_version"] == FORMAT_VERSION
    assert build(classifier, backend="onnxruntime", device="cpu", cache=cache, export=FAST).cache_hit


def test_bad_metadata_in_a_manifest_says_how_to_rebuild(built, tmp_path):
    directory = tmp_path / "bad"
    shutil.copytree(built[0], directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["metadata"]["fields"]["resample"] = "sharpest"
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptionError, match=r"bad component metadata.*resample.*fastgen build \.\.\. --out DIR"):
        load_engine(directory)


def test_in_memory_engines_get_the_components_metadata(tmp_path):
    import torch

    from fastgen.engines.torch_backend import TorchEngine

    comp = load_component("tiny", "text-classifier")
    saved = build(comp, backend="torch", device="cpu", cache=False, out=tmp_path / "t")
    assert type(saved.metadata) is TextClassifierMetadata and saved.metadata == comp.metadata
    # A custom module's torch engine is never saved: build attaches the component's metadata.
    named = dataclasses.replace(adapt(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2)),
                                      "classifier", image_size=8))
    named.metadata = ImageClassifierMetadata(labels=("no", "yes"))
    assert build(named, backend="torch", device="cpu", cache=False).metadata == named.metadata
    # attach(): typed metadata only (the untyped extras= bridge is gone)
    assert TorchEngine(comp).attach(metadata=comp.metadata).metadata == comp.metadata
    with pytest.raises(TypeError, match="extras"):
        TorchEngine(comp).attach(extras=comp.metadata.to_dict())  # type: ignore[call-arg]
    assert TorchEngine(comp).attach().metadata == TextClassifierMetadata()
