"""Engines: one interface over the torch, onnxruntime and (later) tensorrt backends."""

from fastgen._lazy import lazy_getattr
from fastgen.engines.config import BuildConfig, RuntimeOptions

# Engine / build / load_engine / EngineCache import torch, onnx and the backends: on first use only,
# so that the CLI answers --help and argument errors without loading them.
_LAZY = {"Engine": "fastgen.engines.base", "build": "fastgen.engines.build",
         "load_engine": "fastgen.engines.loading", "EngineCache": "fastgen.engines.cache"}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = ["BuildConfig", "Engine", "EngineCache", "RuntimeOptions", "build", "load_engine"]
