"""torch -> ONNX for one Component: trace, clean up, save (with external data when large)."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch

from fastgen.errors import FastgenError, UnsupportedError
from fastgen.export import symbolics
from fastgen.export.config import ExportConfig
from fastgen.models.component import Component
from fastgen.models.spec import ExportSpec, onnx_dim_name

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
#: protobuf's hard limit on one serialised message
PROTOBUF_LIMIT = 2**31 - 1
#: seed of the tracing inputs; verification draws from ExportConfig.seed, so they differ
TRACE_SEED = 12345
#: Revision of the graphs fastgen's export writes from the same module (its own symbolics, clean-up):
#: part of every ONNX engine's cache key, so engines exported before a change are rebuilt, not reused.
#: 2: SDPA with a boolean mask without torch's NaN guard (export/symbolics.py).
GRAPH_REVISION = 2


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for init in model.graph.initializer:
        if init.raw_data:
            total += len(init.raw_data)
        else:
            for entry in init.external_data:
                if entry.key == "length":
                    total += int(entry.value)
    return total


def _trace(component: Component, args: tuple, path: Path, config: ExportConfig) -> None:
    if config.exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise UnsupportedError("exporter 'dynamo' needs the onnxscript package (pip install 'fastgen[dynamo]')") from e
        extra = {"dynamo": True, "external_data": True, "optimize": True, "verbose": False}
    else:
        extra = {"dynamo": False, "do_constant_folding": True}
        symbolics.register(config.resolved_opset)
    spec = component.spec
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # The tracer warns about every Python branch on a shape; the verification step is what
        # tells whether a branch was baked in wrongly, so the warnings are noise here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            component.module, args, str(path),
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(), opset_version=config.resolved_opset, **extra,
        )


def name_dims(model: onnx.ModelProto, spec: ExportSpec) -> None:
    """Give every graph input and output the spec's dim names.

    The dynamo exporter names output dims by expressions (``2*((h - 1)//2) + 2``); engines, TensorRT
    profiles and ``fastgen inspect`` need the spec's symbols instead.
    """
    by_name = {t.name: t for t in spec.inputs + spec.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        t = by_name.get(value.name)
        if t is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, entry in enumerate(t.shape):
            if axis >= len(dims):
                break
            if isinstance(entry, int):
                dims[axis].Clear()
                dims[axis].dim_value = entry
            else:
                dims[axis].Clear()
                dims[axis].dim_param = onnx_dim_name(entry)


def cleanup(model: onnx.ModelProto, config: ExportConfig) -> onnx.ModelProto:
    if config.cleanup == "none":
        return model
    if initializer_bytes(model) > PROTOBUF_LIMIT:
        # onnxslim serialises the whole model for shape inference, which protobuf refuses
        # above 2 GB; the exporter has already folded constants, so skip rather than fail.
        logger.info("graph clean-up skipped: weights exceed 2 GB")
        return model
    import onnxslim

    before = len(model.graph.node)
    with contextlib.redirect_stdout(io.StringIO()):
        slimmed = onnxslim.slim(model)
    logger.info("onnxslim: %d -> %d nodes", before, len(slimmed.graph.node))
    return slimmed


def wants_external_data(weight_bytes: int, config: ExportConfig) -> bool:
    """Whether weights of this size are stored beside the graph: always, never, or (auto) when they would
    bring the serialised graph near protobuf's 2 GB limit (64 MiB are left for the graph itself)."""
    too_big = weight_bytes > PROTOBUF_LIMIT - 64 * 2**20
    if config.external_data == "never" and too_big:
        raise FastgenError("external-data 'never' is impossible: the weights exceed protobuf's 2 GB limit")
    return config.external_data == "always" or (config.external_data == "auto" and too_big)


def save(model: onnx.ModelProto, directory: Path, config: ExportConfig) -> bool:
    """Write ``model.onnx`` (and ``model.onnx.data`` when external); returns whether external."""
    external = wants_external_data(initializer_bytes(model), config)
    path = directory / ONNX_FILE
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return external


def export_onnx(component: Component, directory: Path, config: ExportConfig) -> dict:
    """Trace ``component`` to ``directory/model.onnx``; returns timings and graph statistics."""
    args = tuple(component.spec.sample_inputs("opt", seed=TRACE_SEED).values())
    with tempfile.TemporaryDirectory(prefix="fastgen-export-", dir=directory) as raw_dir:
        raw = Path(raw_dir) / "raw.onnx"
        t0 = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():
            try:
                _trace(component, args, raw, config)
            except FastgenError:
                raise
            except Exception as e:  # exporter internals: name the exporter, keep the cause chained
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise FastgenError(f"exporter {config.exporter!r} failed on {component.spec.component}: {first}"
                                   + (" (try --exporter torchscript)" if config.exporter == "dynamo" else "")) from e
        export_s = time.perf_counter() - t0
        # Loads external data too: the exporter may have written one file per tensor, which is
        # consolidated into a single model.onnx.data by save().
        model = onnx.load(str(raw))
        nodes_raw = len(model.graph.node)
        t0 = time.perf_counter()
        model = cleanup(model, config)
        cleanup_s = time.perf_counter() - t0
        name_dims(model, component.spec)
        model.producer_name = "fastgen"
        external = save(model, directory, config)
        weights = initializer_bytes(model)
        nodes = len(model.graph.node)
        del model
        shutil.rmtree(raw_dir, ignore_errors=True)
    return {"export_seconds": export_s, "cleanup_seconds": cleanup_s, "nodes_exported": nodes_raw,
            "nodes": nodes, "weight_bytes": weights, "external_data": external,
            "exporter": config.exporter, "opset": config.resolved_opset, "torch_version": torch.__version__,
            "onnx_version": onnx.__version__}
