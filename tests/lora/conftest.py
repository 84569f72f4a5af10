"""Fixtures for the LoRA tests: tiny-preset generators (built once per session), the preset's PyTorch
models, LoRA files written by peft / diffusers' own save functions, and the TensorRT stand-in."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TRT_TESTS = HERE.parent / "engines" / "tensorrt"
for p in (HERE, TRT_TESTS):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

_GENERATORS: dict = {}


@pytest.fixture(scope="session")
def generator_for():
    """``generator_for(preset, backend)``: a Generator built once per session (engines cached). Tests
    that load adapters unload them again (``lora_files.unloaded``)."""
    from fastgen.engines.config import BuildConfig
    from fastgen.export.config import ExportConfig
    from fastgen.pipelines.generator import Generator

    def get(preset: str, backend: str):
        if (preset, backend) not in _GENERATORS:
            _GENERATORS[(preset, backend)] = Generator.from_pretrained(
                preset, backend=backend, device="cpu", build_config=BuildConfig(export=ExportConfig(verify="opt")))
        return _GENERATORS[(preset, backend)]

    return get


@pytest.fixture(scope="session")
def models_for():
    """``models_for(preset)``: component name -> a fresh copy of the preset's PyTorch model."""
    from fastgen.models import load_component

    def get(preset: str) -> dict:
        return {name: load_component(preset, name).model for name in ("unet", "vae-decoder", "text-encoder")}

    return get


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("loras")


@pytest.fixture
def trt():
    """The TensorRT backend on a stand-in of TensorRT 10 (tests/engines/tensorrt), calls checked after."""
    import trt_bindings
    import trt_standin

    from fastgen.engines import trt_lib

    api = trt_bindings.api(10)
    if api is None:
        if os.environ.get("CI"):
            pytest.fail("TensorRT bindings not installed")
        pytest.skip("TensorRT bindings not installed (make install)")
    record: list = []
    trt_lib.use(trt_standin.make_standin(api, record=record), host_memory=True)
    try:
        yield
    finally:
        trt_lib.use(None)
    for major in trt_bindings.VERSIONS:
        other = trt_bindings.api(major)
        for call in set(record):
            assert trt_standin.check_call(other, call) is None
