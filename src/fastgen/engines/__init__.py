"""Engines: one interface over the registered backends (torch, onnxruntime, and tensorrt later).

Backends are :class:`BackendSpec` s in :mod:`fastgen.engines.registry`; ``build`` and ``load_engine``
reach them only through it.
"""

from fastgen.core.lazy import lazy_getattr
from fastgen.engines.config import BuildConfig, ExecutionOptions
from fastgen.engines.registry import BackendSpec, backend_names, get_backend, register_backend

# Engine / build / load_engine / EngineCache import torch, onnx and the backends: on first use only,
# so that the CLI answers --help and argument errors without loading them.
_LAZY = {"Engine": "fastgen.engines.base", "build": "fastgen.engines.build",
         "load_engine": "fastgen.engines.loading", "EngineCache": "fastgen.engines.cache",
         "RuntimeOptions": "fastgen.engines.config"}  # RuntimeOptions: deprecated name of ExecutionOptions


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = ["BackendSpec", "BuildConfig", "Engine", "EngineCache", "ExecutionOptions", "backend_names", "build",
           "get_backend", "load_engine", "register_backend"]
