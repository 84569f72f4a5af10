"""Model components: adapters for diffusers / transformers / PyTorch models, presets, local loading.

``load_component("tiny", "unet")`` gives a :class:`Component` (wrapper module, export spec,
provenance, typed metadata: ``UNetMetadata``, ``ImageClassifierMetadata``... from
:mod:`fastgen.models.metadata`); ``adapt(module)`` wraps a model you already have. Importing this
package imports neither torch nor diffusers nor transformers: the names below load on first use
(the spec types are plain dataclasses, so configs and the CLI stay light).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastgen.core.lazy import lazy_getattr
from fastgen.models.spec import DimRange, ExportSpec, ShapeProfile, TensorSpec

_LAZY = {
    "COMPONENT_NAMES": "fastgen.models.adapters",
    "adapt": "fastgen.models.adapters",
    "Component": "fastgen.models.component",
    "ComponentMetadata": "fastgen.models.metadata",
    "DetectorMetadata": "fastgen.models.metadata",
    "GenericMetadata": "fastgen.models.metadata",
    "ImageClassifierMetadata": "fastgen.models.metadata",
    "ImageEncoderMetadata": "fastgen.models.metadata",
    "ImageTowerMetadata": "fastgen.models.metadata",
    "TextClassifierMetadata": "fastgen.models.metadata",
    "TextEncoderMetadata": "fastgen.models.metadata",
    "TextTowerMetadata": "fastgen.models.metadata",
    "UNetMetadata": "fastgen.models.metadata",
    "VaeMetadata": "fastgen.models.metadata",
    "load_component": "fastgen.models.loading",
    "model_components": "fastgen.models.loading",
    "rebuild_component": "fastgen.models.loading",
    "weights_digest": "fastgen.models.loading",
    "list_presets": "fastgen.models.presets",
    "preset_config": "fastgen.models.presets",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


if TYPE_CHECKING:  # pragma: no cover
    from fastgen.models.adapters import COMPONENT_NAMES, adapt
    from fastgen.models.component import Component
    from fastgen.models.loading import load_component, model_components, rebuild_component, weights_digest
    from fastgen.models.metadata import (
        ComponentMetadata,
        DetectorMetadata,
        GenericMetadata,
        ImageClassifierMetadata,
        ImageEncoderMetadata,
        ImageTowerMetadata,
        TextClassifierMetadata,
        TextEncoderMetadata,
        TextTowerMetadata,
        UNetMetadata,
        VaeMetadata,
    )
    from fastgen.models.presets import list_presets, preset_config

__all__ = ["COMPONENT_NAMES", "Component", "DimRange", "ExportSpec", "ShapeProfile", "TensorSpec", *_LAZY]
__all__ = sorted(set(__all__))
