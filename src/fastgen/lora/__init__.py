"""LoRA adapters on built engines, swapped without a re-export or a rebuild (docs/lora.md).

Layer: above ``engines``, below ``pipelines``. :class:`AdapterManager` holds loaded adapters and applies
a selection to a pipeline's engines: torch engines fuse in place, onnxruntime engines feed the fused
weights as overridable initializers, TensorRT engines refit.
"""

from fastgen.core.lazy import lazy_getattr

# Lazy: the CLI and the server's config parse PATH[:SCALE] before torch is imported.
_LAZY = {
    "AdapterSelection": "fastgen.lora.config", "parse_lora_arg": "fastgen.lora.config",
    "COMPONENTS": "fastgen.lora.formats", "LoraAdapter": "fastgen.lora.formats", "LoraLayer": "fastgen.lora.formats",
    "parse_state_dict": "fastgen.lora.formats", "read_lora": "fastgen.lora.formats",
    "AdapterManager": "fastgen.lora.manager", "target_for": "fastgen.lora.manager",
}
__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = ["COMPONENTS", "AdapterManager", "AdapterSelection", "LoraAdapter", "LoraLayer", "parse_lora_arg",
           "parse_state_dict", "read_lora", "target_for"]
