"""Engines: one interface over the torch, onnxruntime and (later) tensorrt backends."""

from fastgen.engines.base import Engine
from fastgen.engines.config import BuildConfig, RuntimeOptions


def __getattr__(name: str):
    # build / load_engine / EngineCache pull in onnx and the backends: load them on first use.
    if name == "build":
        from fastgen.engines.build import build

        return build
    if name == "load_engine":
        from fastgen.engines.loading import load_engine

        return load_engine
    if name == "EngineCache":
        from fastgen.engines.cache import EngineCache

        return EngineCache
    raise AttributeError(name)


__all__ = ["BuildConfig", "Engine", "EngineCache", "RuntimeOptions", "build", "load_engine"]
