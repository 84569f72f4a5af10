"""LoRA on TensorRT engines: a refit with the fused weights, through ``TrtEngine.refit``.

A refittable plan (``TensorRTOptions(refittable=True)``) takes new values for its weights without a
rebuild. The engine's refit reads them from an ONNX file of the same graph: the base component is
exported once (``fastgen.engines.trt_engine.export_weights``, at the engine's precision) into a folder
this target owns; each swap writes a copy of that graph whose adapted initializers hold base + delta
(the others still point at the export's values) and refits from it. Captured CUDA graphs are dropped
by the refit (the engine re-captures on the next call).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from fastgen.errors import UnsupportedError
from fastgen.lora.ort_apply import OnnxTarget
from fastgen.lora.targets import Terms

logger = logging.getLogger(__name__)

REFIT_FILE = "lora-refit.onnx"


class TrtTarget(OnnxTarget):
    """A refittable :class:`~fastgen.engines.trt_engine.TrtEngine`'s adaptable weights.

    ``base``: what the engine was built from (a preset, a model folder, a module or a Component), whose
    weights are the base the deltas are added to.
    """

    backend = "tensorrt"

    def __init__(self, engine: Any, base: Any) -> None:
        from fastgen.engines.trt_engine import export_weights

        if not engine.refittable:
            raise UnsupportedError("LoRA on a TensorRT engine needs a refittable engine; rebuild it with "
                                   "--trt-refittable (TensorRTOptions(refittable=True))")
        self.engine = engine
        self._folder = tempfile.TemporaryDirectory(prefix="fastgen-lora-trt-")
        super().__init__(export_weights(base, engine, Path(self._folder.name)))

    def prepare(self, modules: set[str]) -> None:
        self.check(modules)

    def apply(self, terms: Terms) -> None:
        import onnx
        from onnx import numpy_helper

        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        by_name = {self.weights[m].initializer: m for m in terms}
        for init in proto.graph.initializer:
            module = by_name.get(init.name)
            if module is not None:
                init.CopyFrom(numpy_helper.from_array(self.fused(module, terms[module]).numpy(), init.name))
        path = self.onnx_path.parent / REFIT_FILE
        onnx.save(proto, str(path))  # beside the export: its external data locations stay valid
        self.engine.refit(path)
        logger.info("TensorRT LoRA: refitted %s with %d fused weights", self.engine.spec.component, len(terms))

    def close(self) -> None:
        self._folder.cleanup()


__all__ = ["REFIT_FILE", "TrtTarget"]
