"""float16 -> bfloat16 retyping of converted graphs, for :func:`fastgen.export.fp16.convert_to_bf16`.

A bf16 graph is the fp16 graph (same kept-fp32 ops, norm chains and casts) with every float16 type
renamed bfloat16 (graph inputs and outputs, value_info, initializers, Constant tensors, ``Cast.to``
and other dtype attributes, in subgraphs too), except for two things:

- weights and constants are rounded to bf16 from their fp32 values (round to nearest even, finite
  values saturating at bf16's largest, as fp32's largest would round to infinity), not from the fp16
  values, which the fp16 converter clamped to +-65504;
- nodes whose op takes no bfloat16 at the model's opset, per the ONNX schemas, stay fp32 with casts
  around them, as kept-fp32 ops do: before opset 22 that is Conv, ConvTranspose, the pools,
  InstanceNormalization, Sin, Cos, Dropout, ... (ConstantOfShape before 21), at every opset up to 23
  Einsum, TopK and Resize given a float roi, ... (``Bf16Plan.of`` logs which, and warns when a newer
  opset would take some).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastgen.errors import InvalidArgumentError, UnsupportedError

logger = logging.getLogger(__name__)

# INT attributes of standard ops that hold a tensor element type (Cast; EyeLike, Random*, Bernoulli,
# SequenceEmpty; QuantizeLinear / DequantizeLinear).
_DTYPE_ATTRIBUTES = ("to", "dtype", "output_dtype")
_BF16_MAX_BITS = 0x7F7F


def bf16_bits(values: Any) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of ``values``: round to nearest even from float32, NaN kept NaN,
    finite values beyond bf16's range saturated to +-max (like the fp16 converter's clamping)."""
    x = np.ascontiguousarray(values, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16  # NaN may wrap around: replaced below
    sign = (bits >> 16) & 0x8000
    rounded = np.where(np.isnan(x), sign | 0x7FC0, rounded)
    rounded = np.where(np.isfinite(x) & ((rounded & 0x7FFF) == 0x7F80), sign | _BF16_MAX_BITS, rounded)
    return rounded.astype(np.uint16)


def _graphs(graph: Any) -> Iterator[Any]:
    """``graph`` and every subgraph (If / Loop / Scan bodies) in it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graphs(sub)


def _elem_types(graph: Any) -> dict[str, int]:
    """Element type of each tensor the graph declares (inputs, outputs, value_info, initializers, Constants)."""
    import onnx

    types = {v.name: v.type.tensor_type.elem_type for v in itertools.chain(graph.input, graph.output, graph.value_info)
             if v.type.HasField("tensor_type")}
    types.update((t.name, t.data_type) for t in graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    types[node.output[0]] = attr.t.data_type
    return types


def _lacking_bf16(graph: Any, opset: int, bad: Callable[[int, set[str]], bool]) -> dict[str, str]:
    """Names (and op types) of the nodes with an input or output that ``bad(elem type, allowed types)``
    rejects, the allowed types coming from the op's schema at ``opset`` (ops without one are skipped)."""
    import onnx

    types = _elem_types(graph)
    found: dict[str, str] = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except onnx.defs.SchemaError:
            continue
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        for names, formals in ((node.input, schema.inputs), (node.output, schema.outputs)):
            for i, name in enumerate(names):
                if not name or not formals:
                    continue
                formal = formals[min(i, len(formals) - 1)]  # past the end: the variadic last one
                if bad(types.get(name, 0), allowed.get(formal.type_str, {formal.type_str})):
                    found[node.name] = node.op_type
    return found


def _becomes_bf16(elem_type: int, allowed: set[str]) -> bool:
    """Before conversion: a float (or untyped) tensor the fp16 converter would make float16, where the op takes no bf16."""
    return elem_type in (0, 1) and "tensor(float16)" in allowed and "tensor(bfloat16)" not in allowed


def _is_bad_bf16(elem_type: int, allowed: set[str]) -> bool:
    """After conversion: a bfloat16 tensor where the op takes none."""
    return elem_type == 16 and "tensor(bfloat16)" not in allowed


def _retype_type(type_proto: Any) -> None:
    """FLOAT16 -> BFLOAT16 in a TypeProto (tensors, sparse tensors, and sequences / optionals / maps of them)."""
    import onnx

    kind = type_proto.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        inner = getattr(type_proto, kind)
        if inner.elem_type == onnx.TensorProto.FLOAT16:
            inner.elem_type = onnx.TensorProto.BFLOAT16
    elif kind in ("sequence_type", "optional_type"):
        _retype_type(getattr(type_proto, kind).elem_type)
    elif kind == "map_type":
        _retype_type(type_proto.map_type.value_type)


def _retype_tensor(tensor: Any, bits: bytes | None) -> None:
    """A FLOAT16 TensorProto to BFLOAT16: ``bits`` (rounded from the fp32 original) or, without them,
    its fp16 values rounded."""
    import onnx
    from onnx import numpy_helper

    if tensor.data_type != onnx.TensorProto.FLOAT16:
        return
    if bits is None or len(bits) != 2 * int(np.prod(tensor.dims)):  # no fp32 original (or not this one)
        bits = bf16_bits(numpy_helper.to_array(tensor).astype(np.float32)).tobytes()
    tensor.data_type = onnx.TensorProto.BFLOAT16
    del tensor.int32_data[:]
    tensor.raw_data = bits


@dataclass
class Bf16Plan:
    """What the bf16 conversion needs from the fp32 graph before the fp16 converter runs."""

    opset: int
    fp32_nodes: set[str] = field(default_factory=set)
    """Top-level nodes whose op takes no bfloat16 at ``opset``: the converter keeps them fp32."""
    weights: dict[tuple[str, str], bytes] = field(default_factory=dict)
    """bf16 bits of the fp32 initializers, by (graph name, initializer name)."""
    constants: dict[tuple[str, str], bytes] = field(default_factory=dict)
    """bf16 bits of fp32 tensor attributes (Constant, ConstantOfShape), by (node's first output, attribute)."""

    @classmethod
    def of(cls, model: Any, kept_fp32_ops: Collection[str] = ()) -> Bf16Plan:
        """The plan for ``model`` (fp32, before conversion), whose ``kept_fp32_ops`` stay fp32 anyway."""
        import onnx
        from onnx import numpy_helper

        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 13:  # Cast takes bfloat16 from opset 13
            raise InvalidArgumentError("onnx model opset", opset, reason="bf16 needs opset 13 or newer")

        def lacking(version: int) -> dict[str, str]:
            found = _lacking_bf16(model.graph, version, _becomes_bf16)
            return {name: op for name, op in found.items() if op not in kept_fp32_ops}

        plan = cls(opset, set(found := lacking(opset)))
        if found:
            ops = sorted(set(found.values()))
            newest = onnx.defs.onnx_opset_version()
            still = set(lacking(newest).values())
            if still == set(ops):
                logger.debug("bf16 graph: %d nodes stay fp32, their ops take no bfloat16: %s", len(found), ", ".join(ops))
            else:  # a newer opset would take some: say which, for an export at that opset
                version = next(v for v in range(opset + 1, newest + 1) if set(lacking(v).values()) == still)
                logger.warning("bf16 graph: %d nodes stay fp32, their ops take no bfloat16 at opset %d: %s (opset %d "
                               "takes %s: export at that opset)", len(found), opset, ", ".join(ops), version,
                               ", ".join(sorted(set(ops) - still)))
        for graph in _graphs(model.graph):
            for t in graph.initializer:
                if t.data_type == onnx.TensorProto.FLOAT:
                    plan.weights[graph.name, t.name] = bf16_bits(numpy_helper.to_array(t)).tobytes()
            for node in graph.node:
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == onnx.TensorProto.FLOAT:
                        plan.constants[node.output[0], attr.name] = bf16_bits(numpy_helper.to_array(attr.t)).tobytes()
        return plan

    def retype(self, model: Any) -> None:
        """Every FLOAT16 of the fp16-converted ``model`` to BFLOAT16, in place; raises
        UnsupportedError if a node is left with a bf16 tensor its op does not take."""
        import onnx

        for graph in _graphs(model.graph):
            for value in itertools.chain(graph.input, graph.output, graph.value_info):
                _retype_type(value.type)
            for t in graph.initializer:
                _retype_tensor(t, self.weights.get((graph.name, t.name)))
            for sparse in graph.sparse_initializer:
                _retype_tensor(sparse.values, None)
            for node in graph.node:
                for attr in node.attribute:
                    if (attr.type == onnx.AttributeProto.INT and attr.name in _DTYPE_ATTRIBUTES
                            and attr.i == onnx.TensorProto.FLOAT16 and node.domain in ("", "ai.onnx")):
                        attr.i = onnx.TensorProto.BFLOAT16
                    elif attr.type == onnx.AttributeProto.TENSOR:
                        _retype_tensor(attr.t, self.constants.get((node.output[0], attr.name)))
                    elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                        _retype_tensor(attr.sparse_tensor.values, None)
                    for t in itertools.chain(attr.tensors, (s.values for s in attr.sparse_tensors)):
                        _retype_tensor(t, None)
        left = _lacking_bf16(model.graph, self.opset, _is_bad_bf16)
        if left:
            raise UnsupportedError(f"bf16 conversion left bfloat16 tensors on ops that take none at opset {self.opset}: "
                                   + ", ".join(f"{name} ({op})" for name, op in sorted(left.items())))


__all__ = ["Bf16Plan", "bf16_bits"]
