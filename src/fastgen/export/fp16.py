"""fp32 -> fp16 (and bf16) conversion of ONNX graphs (for fp16 onnxruntime and TensorRT engines).

:func:`convert_to_fp16` runs onnxruntime's ``float16`` converter with a wider block list and then
repairs what the converter leaves behind: decomposed norms kept fp32 as whole chains, fp32 -> fp16 ->
fp32 cast round trips between kept nodes folded away, duplicated casts dropped, nodes re-sorted. A
graph transformation, not a backend: ``fastgen.build`` applies it to the exported graph before an
engine loads it. :func:`convert_to_bf16` runs the same conversion and retypes its float16 to
bfloat16 (:mod:`fastgen.export.bf16`), for strongly typed TensorRT networks.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastgen.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

# Ops kept in fp32 (with casts around them) by convert_to_fp16, on top of onnxruntime's default
# block list: whole normalisation ops, whose reductions lose bits in fp16. Decomposed norms
# (Pow -> ReduceMean -> Add -> Sqrt, as exported for RMSNorm / old LayerNorm) are kept fp32 as a
# chain instead (see _norm_chains): blocking Pow or ReduceMean one by one casts the squares back to
# fp16 between the two ops, where they overflow (measured: NaN outputs; tests/export/test_fp16.py).
FP16_KEEP_FP32_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization")
# Ops that may follow a Pow in a decomposed norm's variance (or mean-square) computation.
_NORM_CHAIN = ((("ReduceMean", "ReduceSum"), True), (("Add",), False), (("Sqrt",), False))


def _norm_chains(graph: Any) -> set[str]:
    """Names of the nodes of every ``Pow -> ReduceMean [-> Add] [-> Sqrt]`` chain (a variance or mean square)."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    chained: set[str] = set()
    for node in graph.node:
        if node.op_type != "Pow":
            continue
        chain, current = [node], node
        for ops, required in _NORM_CHAIN:
            nxt = consumers.get(current.output[0], [])
            if len(nxt) == 1 and nxt[0].op_type in ops:
                chain.append(nxt[0])
                current = nxt[0]
            elif required:
                break
        if len(chain) > 1:  # a lone Pow is not a reduction: fp16 is as good as it gets
            chained.update(n.name for n in chain)
    return chained


def _topological_sort(graph: Any) -> None:
    """Reorder nodes so each comes after the producers of its inputs (the fp16 converter appends its
    casts at the end; onnx.checker and TensorRT's parser want a sorted graph)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:  # inputs from an outer scope (subgraphs) or a cycle: keep the rest as is
            ordered.extend(pending)
            break
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for n in ready:
            available.update(n.output)
        ordered.extend(ready)
    del graph.node[:]
    graph.node.extend(ordered)


def _fold_cast_round_trips(graph: Any, fp32_nodes: set[str]) -> int:
    """Remove ``fp32 -> Cast(fp16) -> Cast(fp32)`` pairs between nodes kept in fp32.

    The fp16 converter casts every input and output of a blocked node, so two consecutive fp32
    nodes exchange their tensor through fp16: exactly the rounding (and overflow) blocking was
    meant to avoid. Only tensors produced by nodes in ``fp32_nodes`` are folded, so the source is
    known to be float32.
    """
    import onnx

    def cast_to(node: Any) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    producers = {out: node for node in graph.node for out in node.output}
    graph_outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    dropped: set[int] = set()
    for node in graph.node:
        if cast_to(node) != onnx.TensorProto.FLOAT or node.output[0] in graph_outputs:
            continue
        first = producers.get(node.input[0])
        if first is None or cast_to(first) != onnx.TensorProto.FLOAT16:
            continue
        source = producers.get(first.input[0])
        if source is None or source.name not in fp32_nodes:
            continue
        rename[node.output[0]] = first.input[0]
        dropped.add(id(node))
    if not rename:
        return 0
    kept = [n for n in graph.node if id(n) not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    # fp16 casts whose every consumer was a dropped round trip are dead now.
    used = {name for n in kept for name in n.input} | graph_outputs
    kept = [n for n in kept if not (cast_to(n) == onnx.TensorProto.FLOAT16 and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(kept)
    return len(dropped)


def _drop_duplicate_nodes(graph) -> int:
    """Remove nodes identical to an earlier one (op, inputs, outputs, attributes).

    The converter adds one ``<init>_cast_to_fp32`` Cast per consumer of an initializer that feeds
    several kept-fp32 nodes (onnxslim deduplicates equal initializers, e.g. the zero biases of
    several LayerNorms): same name, same output, which the ONNX checker rejects.
    """
    seen: set[bytes] = set()
    keep = []
    for node in graph.node:
        key = node.SerializeToString(deterministic=True)
        if key in seen:
            continue
        seen.add(key)
        keep.append(node)
    dropped = len(graph.node) - len(keep)
    if dropped:
        del graph.node[:]
        graph.node.extend(keep)
    return dropped


#: Opset a bf16 graph is converted to first: where Conv, the pools, Sin and Cos take bfloat16.
BF16_OPSET = 22


def convert_to_fp16(src: str | os.PathLike, dst: str | os.PathLike, *,
                    keep_fp32_ops: Sequence[str] = FP16_KEEP_FP32_OPS) -> None:
    """Convert an fp32 ONNX model to fp16 (float16 inputs and outputs), written atomically to ``dst``.

    Ops in ``keep_fp32_ops`` (and onnxruntime's default block list) and decomposed-norm chains stay
    fp32 with casts around them. Models with external data (over 2 GB) are read with it and written
    with ``dst.name + ".data"`` beside ``dst``.
    """
    _convert(src, dst, keep_fp32_ops=keep_fp32_ops, bf16=False)


def convert_to_bf16(src: str | os.PathLike, dst: str | os.PathLike, *,
                    keep_fp32_ops: Sequence[str] = FP16_KEEP_FP32_OPS, min_opset: int | None = BF16_OPSET) -> None:
    """Convert an fp32 ONNX model to bf16 (bfloat16 inputs and outputs), written atomically to ``dst``.

    Same contract as :func:`convert_to_fp16` (kept fp32 ops and norm chains, external data, atomic
    write), with bfloat16 wherever the fp16 graph has float16. On top of those, nodes whose op does
    not take bfloat16 at the model's opset (per the ONNX schemas; before opset 22 Conv, Sin, Cos, the
    pools, ...) stay fp32 with casts around them; see :mod:`fastgen.export.bf16`. So a graph of an
    older opset is first converted to ``min_opset`` (ONNX's version converter; None: never), where
    those ops take bfloat16 (the TorchScript exporter writes at most opset 20).
    """
    _convert(src, dst, keep_fp32_ops=keep_fp32_ops, bf16=True, min_opset=min_opset)


def _upgrade_opset(model: Any, opset: int) -> Any:
    """``model`` at default-domain ``opset`` when older (weights stay where they are: the converter
    sees the graph only); unchanged, with a warning, when ONNX's version converter cannot do it."""
    from onnx import version_converter

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current >= opset:
        return model
    try:
        upgraded = version_converter.convert_version(model, opset)
    except Exception as exc:  # an op without an adapter: keep the graph's own opset
        logger.warning("could not convert the graph from opset %d to %d (%s); ops without bf16 at opset %d "
                       "stay fp32", current, opset, str(exc).splitlines()[0] if str(exc) else exc, current)
        return model
    logger.info("graph converted from opset %d to %d for bf16", current, opset)
    return upgraded


def _convert(src: str | os.PathLike, dst: str | os.PathLike, *, keep_fp32_ops: Sequence[str], bf16: bool,
             min_opset: int | None = None) -> None:
    """fp16 conversion, then (``bf16``) every float16 retyped to bfloat16 before the atomic write."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InvalidArgumentError("onnx model", str(src), reason="no such file")
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        graph_only = onnx.load(str(src), load_external_data=False)
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph_only.graph.initializer)
        try:
            # Shape inference through a file works for models over 2 GB (in-memory inference does not).
            inferred = work / "inferred.onnx"
            onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
            model = onnx.load(str(inferred), load_external_data=False)
        except Exception as exc:  # best effort: the converter can still infer types itself
            logger.debug("shape inference of %s failed (%s); converting without it", src, exc)
            model = graph_only
        if bf16 and min_opset is not None:
            model = _upgrade_opset(model, min_opset)  # before the weights load: converting never copies them
        if external:
            load_external_data_for_model(model, str(src.parent))
        names = {n.name for n in model.graph.node}
        for i, node in enumerate(model.graph.node):  # node_block_list works by name
            if not node.name:
                node.name = f"fastgen_node_{i}"
                while node.name in names:
                    node.name += "_"
                names.add(node.name)
        block_ops = {*DEFAULT_OP_BLOCK_LIST, *keep_fp32_ops}
        chains = _norm_chains(model.graph)
        no_bf16: set[str] = set()
        if bf16:
            from fastgen.export.bf16 import Bf16Plan

            plan = Bf16Plan.of(model, block_ops)  # before the converter rounds (and clamps) the weights to fp16
            no_bf16 = plan.fp32_nodes
        model = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=external,
                                         op_block_list=sorted(block_ops), node_block_list=sorted(chains | no_bf16))
        fp32_nodes = chains | no_bf16 | {n.name for n in model.graph.node if n.op_type in set(keep_fp32_ops)}
        folded = _fold_cast_round_trips(model.graph, fp32_nodes)
        _drop_duplicate_nodes(model.graph)
        _topological_sort(model.graph)
        if bf16:
            plan.retype(model)
        logger.debug("%s conversion of %s: %d nodes kept fp32 in norm chains, %d cast round trips folded",
                     "bf16" if bf16 else "fp16", src.name, len(chains), folded)
        weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
        out = work / dst.name
        if external or weight_bytes > 1_800_000_000:  # protobuf cannot serialise 2 GB in one message
            onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=f"{dst.name}.data", size_threshold=1024)
            if (work / f"{dst.name}.data").exists():  # absent when every tensor was small
                os.replace(work / f"{dst.name}.data", dst.parent / f"{dst.name}.data")
        else:
            onnx.save(model, str(out))
        os.replace(out, dst)  # the graph last: it is what makes the pair visible
    finally:
        shutil.rmtree(work, ignore_errors=True)


__all__ = ["BF16_OPSET", "FP16_KEEP_FP32_OPS", "convert_to_bf16", "convert_to_fp16"]
