"""Export specs read back from ONNX graphs, for ONNX files that fastgen did not export itself."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import onnx

from fastgen.core.onnx_files import check_external_data
from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.models.spec import DimRange, ExportSpec, ShapeProfile, TensorSpec

ONNX_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}

# Sample-input bounds for integer inputs of unknown meaning. Ids 0 and 1 are valid in any
# vocabulary or index range of at least two entries; uint8 inputs are usually image bytes.
_INT_BOUNDS = {"int64": (0, 2), "int32": (0, 2), "uint8": (0, 256), "bool": (0, 2)}

# Heuristic default ranges (min, opt, max) by dim name, so `fastgen bench` has shapes to try.
_KNOWN_DIMS: dict[str, tuple[int, int, int]] = {
    **dict.fromkeys(("batch", "batch_size", "n"), (1, 1, 16)),
    **dict.fromkeys(("seq", "sequence", "sequence_length", "seq_len"), (1, 16, 512)),
    **dict.fromkeys(("height", "width"), (1, 224, 1024)),
}

# fastgen writes derived dims as `height_div8` (see spec.onnx_dim_name); read them back as `height/8`.
_DERIVED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)_div(\d+)$")


def load_graph(model: str | Path | onnx.ModelProto, *, data: bool = False) -> onnx.ModelProto:
    """The graph of an ONNX file without its external data, whose locations are checked
    (:func:`fastgen.core.onnx_files.check_external_data`; ``data``: the files must be there, whole)."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise InvalidArgumentError("onnx model", str(model), reason="no such file")
    try:
        # Only the graph: weights in external data files are not needed to read the IO signature.
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArgumentError("onnx model", str(model), reason=f"not a readable ONNX file ({reason})") from exc
    # The weights are not read here (they may even be absent), but whatever runs this graph next
    # reads them: a location outside the model's folder, a link or a FIFO is refused now.
    check_external_data(path, proto, data=data)
    return proto


def _identifier(text: str) -> str:
    out = re.sub(r"[^A-Za-z0-9_]", "_", text)
    return out if out and not out[0].isdigit() else f"_{out}"


def _dim_entry(dim: onnx.TensorShapeProto.Dimension, tensor: str, axis: int) -> int | str:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    if dim.HasField("dim_param") and dim.dim_param:
        m = _DERIVED.match(dim.dim_param)
        if m and int(m.group(2)) > 1:
            return f"{m.group(1)}/{int(m.group(2))}"
        return _identifier(dim.dim_param)
    return f"{_identifier(tensor)}_dim{axis}"


def _tensor_spec(value: onnx.ValueInfoProto, *, is_input: bool) -> TensorSpec:
    name = value.name
    if not value.type.HasField("tensor_type"):
        raise UnsupportedError(f"onnxruntime engine: {'input' if is_input else 'output'} {name!r} is not a "
                               "tensor (sequences, maps and sparse tensors are not supported)")
    ttype = value.type.tensor_type
    dtype = ONNX_DTYPES.get(ttype.elem_type)
    if dtype is None:
        type_name = onnx.TensorProto.DataType.Name(ttype.elem_type) if ttype.elem_type else "undefined"
        raise UnsupportedError(f"onnxruntime engine: tensor {name!r} has element type {type_name}; "
                               f"supported: {', '.join(sorted(set(ONNX_DTYPES.values())))}")
    if not ttype.HasField("shape"):
        raise UnsupportedError(f"onnxruntime engine: tensor {name!r} has no shape (unknown rank) in the graph")
    shape = tuple(_dim_entry(d, name, axis) for axis, d in enumerate(ttype.shape.dim))
    low = high = None
    if dtype in _INT_BOUNDS:  # TensorSpec wants bounds on every integer tensor, outputs included
        low, high = _INT_BOUNDS[dtype]
    return TensorSpec(name=name, dtype=dtype, shape=shape, low=low, high=high)  # type: ignore[arg-type]


def _default_range(symbol: str, divisors: set[int]) -> DimRange:
    lo, opt, hi = _KNOWN_DIMS.get(symbol.lower(), (1, 1, 1))
    step = math.lcm(*divisors) if divisors else 1
    # Round up so derived dims (`height/8`) divide exactly at every profile point.
    lo, opt, hi = (-(-v // step) * step for v in (lo, opt, hi))
    return DimRange(lo, opt, hi)


def spec_from_onnx(model: str | Path | onnx.ModelProto, component: str = "onnx") -> ExportSpec:
    """Inputs, outputs and a heuristic shape profile read from an ONNX graph.

    Dims: ``dim_value`` -> int, ``dim_param`` -> a symbol (sanitised to an identifier; fastgen's own
    ``height_div8`` reads back as ``height/8``), neither -> ``<tensor>_dim<axis>``. Output symbols
    that no input has stay symbols (``ExportSpec.resolve`` maps such outputs to None). Every input
    symbol gets min = opt = max = 1 unless its name is a known one (batch, seq, height...): a guess
    that users override with ``--profile``.
    """
    proto = load_graph(model)
    graph = proto.graph
    # Before IR version 4, initializers were also listed as graph inputs; they are weights, not inputs.
    weights = {init.name for init in graph.initializer}
    inputs = tuple(_tensor_spec(v, is_input=True) for v in graph.input if v.name not in weights)
    outputs = [v for v in graph.output]
    if any(not v.type.tensor_type.HasField("shape") for v in outputs if v.type.HasField("tensor_type")):
        # Some exporters leave output shapes out; inference from the graph alone usually fills them.
        try:
            inferred = onnx.shape_inference.infer_shapes(proto)
            known = {v.name: v for v in inferred.graph.output}
            outputs = [known.get(v.name, v) for v in outputs]
        except Exception:  # inference is best effort; _tensor_spec reports what is still unknown
            pass
    out_specs = tuple(_tensor_spec(v, is_input=False) for v in outputs)
    if not out_specs:
        raise UnsupportedError("onnxruntime engine: the graph has no outputs")

    divisors: dict[str, set[int]] = {}
    for t in inputs:
        for entry in t.shape:
            if isinstance(entry, str):
                symbol, _, div = entry.partition("/")
                divisors.setdefault(symbol, set()).add(int(div or 1))
    profile = ShapeProfile({s: _default_range(s, d) for s, d in divisors.items()})
    model_type = proto.producer_name or ""
    return ExportSpec(component=component, inputs=inputs, outputs=out_specs, profile=profile,
                      model_type=model_type)


def onnx_precision(model: str | Path | onnx.ModelProto | ExportSpec) -> Literal["fp32", "fp16", "bf16"]:
    """Precision implied by the float inputs: fp16 (bf16) when they are all float16 (bfloat16), else fp32.

    A graph without float inputs (token ids in, logits out) is reported as fp32; the engine casts
    each input to the graph's own element type anyway.
    """
    spec = model if isinstance(model, ExportSpec) else spec_from_onnx(model)
    floats = {t.dtype for t in spec.inputs if t.dtype.startswith(("float", "bfloat"))}
    if floats == {"float16"}:
        return "fp16"
    if floats == {"bfloat16"}:
        return "bf16"
    return "fp32"
