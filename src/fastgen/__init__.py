"""fastgen: fast diffusion generation and classifier scoring.

Importing fastgen is cheap and side-effect free: it does not import torch, touch CUDA or change any
global torch setting. The public names below are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastgen.core import plugins as _plugins
from fastgen.core.lazy import lazy_getattr
from fastgen.version import __version__

# public name -> module that defines it
_LAZY = {
    "export": "fastgen.export.api",
    "ExportConfig": "fastgen.export.config",
    "ExportResult": "fastgen.export.api",
    "build": "fastgen.engines.build",
    "BuildConfig": "fastgen.engines.config",
    "ExecutionOptions": "fastgen.engines.config",
    "RuntimeOptions": "fastgen.engines.config",  # deprecated name of ExecutionOptions
    "TensorRTOptions": "fastgen.engines.trt_options",
    "Engine": "fastgen.engines.base",
    "EngineCache": "fastgen.engines.cache",
    "load_engine": "fastgen.engines.loading",
    "Component": "fastgen.models.component",
    "load_component": "fastgen.models",
    "adapt": "fastgen.models",
    "ExportSpec": "fastgen.models.spec",
    "ShapeProfile": "fastgen.models.spec",
    "TensorSpec": "fastgen.models.spec",
    "Generator": "fastgen.pipelines.generator",
    "GenerateConfig": "fastgen.pipelines.config",
    "GenerationResult": "fastgen.pipelines.config",
    "Scorer": "fastgen.pipelines.scorer",
    "Score": "fastgen.pipelines.scorer",
    "VideoScore": "fastgen.pipelines.scorer",
    "Runtime": "fastgen.runtime.runtime",
    "RuntimeConfig": "fastgen.runtime.config",
    "quantize_": "fastgen.quant.api",
    "calibrate": "fastgen.quant.calibration",
    "Int8WeightOnlyConfig": "fastgen.quant.config",
    "Int4WeightOnlyConfig": "fastgen.quant.config",
    "Int8DynamicConfig": "fastgen.quant.config",
    "Int8StaticConfig": "fastgen.quant.config",
    "Fp8DynamicConfig": "fastgen.quant.config",
    "FastgenError": "fastgen.errors",
    "InvalidArgumentError": "fastgen.errors",
    "optimize": "fastgen.ops.optimize",
}

__all__ = ["__version__", *_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY)

# What lower layers use from higher ones, registered as strings (nothing is imported here).
_plugins.register("calibration", "sd-unet", "fastgen.pipelines.calibration:sd_unet_calibration")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from fastgen.engines.base import Engine
    from fastgen.engines.build import build
    from fastgen.engines.cache import EngineCache
    from fastgen.engines.config import BuildConfig, ExecutionOptions
    from fastgen.engines.config import ExecutionOptions as RuntimeOptions
    from fastgen.engines.loading import load_engine
    from fastgen.engines.trt_options import TensorRTOptions
    from fastgen.errors import FastgenError, InvalidArgumentError
    from fastgen.export.api import ExportResult, export
    from fastgen.export.config import ExportConfig
    from fastgen.models import adapt, load_component
    from fastgen.models.component import Component
    from fastgen.models.spec import ExportSpec, ShapeProfile, TensorSpec
    from fastgen.ops.optimize import optimize
    from fastgen.pipelines.config import GenerateConfig, GenerationResult
    from fastgen.pipelines.generator import Generator
    from fastgen.pipelines.scorer import Score, Scorer, VideoScore
    from fastgen.quant.api import quantize_
    from fastgen.quant.calibration import calibrate
    from fastgen.quant.config import (
        Fp8DynamicConfig,
        Int4WeightOnlyConfig,
        Int8DynamicConfig,
        Int8StaticConfig,
        Int8WeightOnlyConfig,
    )
    from fastgen.runtime.config import RuntimeConfig
    from fastgen.runtime.runtime import Runtime
