"""Model components: adapters for diffusers / transformers / PyTorch models, presets, local loading.

``load_component("tiny", "unet")`` gives a :class:`Component` (wrapper module, export spec,
provenance); ``adapt(module)`` wraps a model you already have. Importing this package does not
import diffusers or transformers: they load on first use.
"""

from __future__ import annotations

from fastgen.models.adapters import COMPONENT_NAMES, adapt
from fastgen.models.component import Component
from fastgen.models.loading import load_component, model_components, rebuild_component, weights_digest
from fastgen.models.presets import list_presets, preset_config
from fastgen.models.spec import DimRange, ExportSpec, ShapeProfile, TensorSpec

__all__ = [
    "COMPONENT_NAMES",
    "Component",
    "DimRange",
    "ExportSpec",
    "ShapeProfile",
    "TensorSpec",
    "adapt",
    "list_presets",
    "load_component",
    "model_components",
    "preset_config",
    "rebuild_component",
    "weights_digest",
]
