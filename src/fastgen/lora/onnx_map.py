"""Which ONNX initializer holds which PyTorch module's weight, in which layout.

fastgen's exported graphs (TorchScript exporter, constant folding, onnxslim) keep parameter names for
the initializers that are used as they are (``model.conv_in.weight`` of a Conv, biases), but a Linear
applied to a 3-D input becomes a ``MatMul`` with the weight's transpose folded into a new initializer
named ``onnx::MatMul_1636``; the node keeps the module's path (``/model/down_blocks.0/.../to_k/MatMul``).
So a weight is found from its consumer: the first MatMul / Gemm / Conv reached from the initializer
through Cast / Transpose / Identity nodes (fp16 graphs may cast), with its layout worked out from the op
(MatMul: (in, out); Gemm: per ``transB``; Conv: as PyTorch) and the Transposes on the way. The module
path comes from the initializer's name when it is a parameter name, else from the consumer's name.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import onnx

logger = logging.getLogger(__name__)

#: Ops that leave a weight's values alone on the way to its consumer (Transpose flips the layout).
_PASS_THROUGH = ("Cast", "Transpose", "Identity")
_WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


@dataclasses.dataclass(frozen=True)
class OnnxWeight:
    """One module's weight in a graph."""

    initializer: str
    """The initializer's name."""
    transposed: bool
    """Whether it holds the PyTorch weight transposed ((in, out): a MatMul's right operand)."""
    dims: tuple[int, ...]
    """The initializer's shape."""
    data_type: int
    """``onnx.TensorProto`` element type (FLOAT, FLOAT16...)."""

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """The PyTorch weight's shape."""
        return tuple(reversed(self.dims)) if self.transposed else self.dims

    @property
    def numpy_dtype(self) -> np.dtype:
        return onnx.helper.tensor_dtype_to_np_dtype(self.data_type)


def _strip(path: str, prefix: str) -> str | None:
    return path[len(prefix):] if path.startswith(prefix) else None


def _module_from_node(node_name: str, op: str, prefix: str) -> str | None:
    """``/model/down_blocks.0/attn1/to_k/MatMul`` -> ``down_blocks.0.attn1.to_k`` (prefix ``model.``)."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2 or not parts[-1].startswith(op):
        return None
    scopes: list[str] = []
    for part in parts[:-1]:
        # A container's child is scoped ``to_out/to_out.0`` (Sequential) or ``to_out.0`` (ModuleList).
        if scopes and part.startswith(f"{scopes[-1]}."):
            scopes[-1] = part
        else:
            scopes.append(part)
    path = ".".join(scopes)
    if not prefix:
        return path
    stripped = _strip(path + ".", prefix)
    return stripped.rstrip(".") or None if stripped is not None else None


def weight_map(proto: onnx.ModelProto, prefix: str = "model.") -> tuple[dict[str, OnnxWeight], set[str]]:
    """(module path -> its weight, module paths whose initializer other modules share too).

    ``prefix``: the wrapper's attribute in parameter names (fastgen's wrappers call their model ``model``).
    Initializers of no recognisable module are left out (a LoRA naming such a module is refused).
    """
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
    found: dict[str, OnnxWeight] = {}
    owners: dict[str, set[str]] = {}
    for name, init in inits.items():
        if len(init.dims) not in (2, 4):
            continue
        current, transposed = name, False
        users = consumers.get(current, [])
        while len(users) == 1 and users[0].op_type in _PASS_THROUGH:
            node = users[0]
            if node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                if len(init.dims) != 2 or perm not in (None, [1, 0]):
                    break
                transposed = not transposed
            current = node.output[0]
            users = consumers.get(current, [])
        for node in users:
            if node.op_type not in _WEIGHT_OPS or list(node.input).index(current) != 1:
                continue
            if node.op_type == "MatMul":
                layout = not transposed
            elif node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                layout = transposed if trans_b else not transposed
            else:
                layout = transposed
            param = _strip(name, prefix) if prefix else name
            if param is not None and param.endswith(".weight"):
                module = param[: -len(".weight")]
            else:
                module = _module_from_node(node.name, node.op_type, prefix)
            if module is None:
                continue
            owners.setdefault(name, set()).add(module)
            found[module] = OnnxWeight(name, layout, tuple(int(d) for d in init.dims), int(init.data_type))
    shared = {m for mods in owners.values() if len(mods) > 1 for m in mods}
    return found, shared


def read_initializer(proto: onnx.ModelProto, name: str, base_dir: str | Path) -> np.ndarray:
    """The values of one initializer (from the external data file where it lives there)."""
    from onnx import external_data_helper, numpy_helper

    init = next(i for i in proto.graph.initializer if i.name == name)
    if external_data_helper.uses_external_data(init) and not init.HasField("raw_data"):
        tensor = onnx.TensorProto()
        tensor.CopyFrom(init)
        external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
        return numpy_helper.to_array(tensor)
    return numpy_helper.to_array(init)


__all__ = ["OnnxWeight", "read_initializer", "weight_map"]
