"""LoRA on onnxruntime engines: the adapted weights fed per run as overridable initializers.

An onnxruntime session's weights are fixed when it is created. Of the ways to change them:

* ``SessionOptions.add_initializer`` / ``add_external_initializers`` supply values at session
  creation only: every swap would create (and optimise) a session again;
* an initializer that is also listed as a graph input is *overridable*: a run may feed a value for
  it, and runs that do not use the graph's. That is what is used here: when an adapter is loaded, the
  graph is re-serialised once with the adapted modules' weight initializers listed as inputs and the
  engine's session replaced (``OrtEngine.replace_session``; the file on disk, external data included,
  is read where it is: no re-export). A swap then only computes the fused weights (base + delta, in the
  initializer's layout and dtype) into :attr:`OrtEngine.initializer_feeds`; unloading everything
  clears them (the graph's own values run again).

The price: onnxruntime neither constant-folds nor pre-packs an overridable initializer, so the adapted
MatMuls lose their pre-packed weights (benchmarks/bench_lora_swap.py measures the step time).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastgen.errors import UnsupportedError
from fastgen.lora.onnx_map import OnnxWeight, read_initializer, weight_map
from fastgen.lora.targets import Terms, fuse

logger = logging.getLogger(__name__)


class OnnxTarget:
    """The adaptable weights of an ONNX graph, with their base values read on first use."""

    def __init__(self, onnx_path: Any) -> None:
        import onnx

        from fastgen.engines.onnx_io import load_graph

        self.onnx_path = Path(onnx_path)
        self.proto: onnx.ModelProto = load_graph(onnx_path)  # no external data: read per weight when needed
        self.weights, self.shared = weight_map(self.proto)
        self._base: dict[str, np.ndarray] = {}

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {m: w.torch_shape for m, w in self.weights.items()}

    def check(self, modules: set[str]) -> None:
        shared = sorted(modules & self.shared)
        if shared:
            raise UnsupportedError(f"LoRA on {shared[0]}: its weight is one initializer shared with other modules "
                                   "in this ONNX graph (identical weights merged on export); rebuild without merging")

    def base(self, module: str) -> np.ndarray:
        """The graph's own weight of ``module``, in the initializer's layout and dtype."""
        if module not in self._base:
            value = read_initializer(self.proto, self.weights[module].initializer, self.onnx_path.parent)
            self._base[module] = value if value.flags.writeable else value.copy()  # torch wants writable arrays
        return self._base[module]

    def fused(self, module: str, terms: list) -> torch.Tensor:
        """A new tensor: base + the terms, in the initializer's layout and dtype (summed in float32)."""
        weight: OnnxWeight = self.weights[module]
        base = torch.from_numpy(self.base(module))
        out = fuse(base.float(), terms, transposed=weight.transposed)  # a new tensor: base is never written
        return out if out.dtype == base.dtype else out.to(base.dtype)


class OrtTarget(OnnxTarget):
    """An :class:`~fastgen.engines.ort_backend.OrtEngine`'s adaptable weights (module docstring)."""

    backend = "onnxruntime"

    def __init__(self, engine: Any) -> None:
        super().__init__(engine.model_path)
        self.engine = engine
        self._overridable: set[str] = set()

    def prepare(self, modules: set[str]) -> None:
        self.check(modules)
        names = {self.weights[m].initializer for m in modules}
        if names <= self._overridable:
            return
        import onnx

        names |= self._overridable
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        listed = {i.name for i in proto.graph.input}
        for init in proto.graph.initializer:
            if init.name in names and init.name not in listed:
                proto.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        external = any(onnx.external_data_helper.uses_external_data(i) for i in proto.graph.initializer)
        # Once per new set of adapted modules (at load time): onnxruntime reads the weights where they
        # are and optimises the graph again; no swap after this creates a session.
        self.engine.replace_session(proto.SerializeToString(),
                                    external_data_dir=self.onnx_path.parent if external else None)
        self._overridable = names
        logger.info("onnxruntime LoRA: %d weight initializers of %s made overridable", len(names), self.onnx_path.name)

    def apply(self, terms: Terms) -> None:
        # New tensors every swap (never written in place): a run still using the previous feeds is safe.
        self.engine.initializer_feeds = {self.weights[m].initializer: self.fused(m, t).to(self.engine.device)
                                         for m, t in terms.items()}


__all__ = ["OnnxTarget", "OrtTarget"]
