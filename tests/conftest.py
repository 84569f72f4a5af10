"""Suite-wide fixtures: an isolated engine cache, offline hubs, GPU markers."""

from __future__ import annotations

import os

import pytest

# Tests never download: make any accidental hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. when a kernel module is first
# imported, and pytest imports every test module (and whatever they import) before running any: set it
# here, before collection, so no test module that happens to be collected before tests/kernels and
# tests/ops (whose conftests set it too) fixes the kernels as compiled ones.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Every test run gets its own engine cache, never the user's ~/.cache."""
    root = tmp_path_factory.mktemp("engine-cache")
    old = os.environ.get("FASTGEN_CACHE_DIR")
    os.environ["FASTGEN_CACHE_DIR"] = str(root)
    yield root
    if old is None:
        os.environ.pop("FASTGEN_CACHE_DIR", None)
    else:
        os.environ["FASTGEN_CACHE_DIR"] = old


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU (none on this machine)"))
        if item.get_closest_marker("tensorrt") is not None and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs the TensorRT Python package (not installable here)"))
