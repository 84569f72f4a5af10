"""Fixtures for the generation pipeline tests: generators on the tiny presets (engines built once per
session) and the presets' PyTorch models, for diffusers pipelines on the very same weights."""

from __future__ import annotations

import pytest

from fastgen.engines.config import BuildConfig
from fastgen.export.config import ExportConfig

# Verify each export at the opt shape only: the export tests cover the full profile; this keeps
# the (session-cached) onnxruntime builds of both tiny presets to a few seconds.
FAST_BUILD = BuildConfig(export=ExportConfig(verify="opt"))


_GENERATORS: dict = {}


@pytest.fixture(scope="session")
def generator_for():
    """``generator_for(preset, backend)``: a Generator built once per session (engines cached)."""
    from fastgen.pipelines.generator import Generator

    def get(preset: str, backend: str):
        key = (preset, backend)
        if key not in _GENERATORS:
            _GENERATORS[key] = Generator.from_pretrained(preset, backend=backend, device="cpu",
                                                         build_config=FAST_BUILD)
        return _GENERATORS[key]

    return get


@pytest.fixture(scope="session")
def models_for():
    """``models_for(preset)``: component name -> the preset's PyTorch model (diffusers / transformers)."""
    from fastgen.models import load_component, model_components

    cache: dict = {}

    def get(preset: str) -> dict:
        if preset not in cache:
            names = [c for c in model_components(preset) if c in ("unet", "vae-decoder", "text-encoder",
                                                                  "text-encoder-2")]
            cache[preset] = {name: load_component(preset, name).model for name in names}
        return cache[preset]

    return get


@pytest.fixture(scope="session")
def fast_build() -> BuildConfig:
    return FAST_BUILD
