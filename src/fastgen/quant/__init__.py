"""Post-training quantization: ``quantize_`` (in place, torchao-style), configs, calibration, sensitivity.

::

    import fastgen
    from fastgen.quant import Int8DynamicConfig

    comp = fastgen.load_component("sd15", "unet")
    fastgen.quantize_(comp.module, Int8DynamicConfig())          # nn.Linear / 1x1 conv -> QuantLinear
    fastgen.export(comp, "unet-w8a8")                            # QDQ / int8 MatMul ONNX graph

SmoothQuant and static activation scales need statistics first:
``fastgen.calibrate(comp.module, forward_loop)`` then ``quantize_(..., Int8DynamicConfig(smoothquant=True))``.
``sensitivity(module, inputs, config)`` ranks layers by the output SQNR when each alone is quantized;
(Whole-model accuracy is measured by ``benchmarks/quant_accuracy.py``.) Importing this package does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastgen.core.lazy import lazy_getattr
from fastgen.quant.config import (
    CONFIG_TYPES,
    DEFAULT_SKIP,
    Fp8DynamicConfig,
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
    config_from_dict,
)

_LAZY = {
    "quantize_": "fastgen.quant.api",
    "dequantize_": "fastgen.quant.api",
    "quantized_layers": "fastgen.quant.api",
    "quantization_recipe": "fastgen.quant.api",
    "apply_quantization_recipe": "fastgen.quant.api",
    "calibrate": "fastgen.quant.calibration",
    "QuantLinear": "fastgen.quant.modules",
    "QuantConv1x1": "fastgen.quant.modules",
    "sensitivity": "fastgen.quant.layerwise",
    "LayerSensitivity": "fastgen.quant.layerwise",
    "sqnr_db": "fastgen.quant.layerwise",
}

__getattr__ = lazy_getattr(__name__, _LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from fastgen.quant.api import (
        apply_quantization_recipe,
        dequantize_,
        quantization_recipe,
        quantize_,
        quantized_layers,
    )
    from fastgen.quant.calibration import calibrate
    from fastgen.quant.layerwise import LayerSensitivity, sensitivity, sqnr_db
    from fastgen.quant.modules import QuantConv1x1, QuantLinear

__all__ = sorted(["CONFIG_TYPES", "DEFAULT_SKIP", "Fp8DynamicConfig", "Int4WeightOnlyConfig", "Int8DynamicConfig",
                  "Int8StaticConfig", "Int8WeightOnlyConfig", "QuantConfig", "config_from_dict", *_LAZY])
