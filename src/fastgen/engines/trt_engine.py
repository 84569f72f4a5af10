"""TensorRT engines: a deserialized plan behind the Engine interface, run on torch's CUDA stream.

Inputs already on the GPU are passed by pointer (no copy); outputs are torch tensors allocated per
call at the shapes TensorRT infers. The optimization profile is chosen per call from the input
sizes (the nearest opt point among the profiles that hold them); inputs outside every profile are
refused before TensorRT sees them (``strict_profile``). Refit swaps in new weights of the same graph.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fastgen.engines.base import Engine, root_sizes
from fastgen.engines.config import ExecutionOptions, execution_options
from fastgen.engines.cuda_graphs import GraphBucket, ShapeKey, capture, shape_key
from fastgen.engines.trt_build import last_error
from fastgen.engines.trt_lib import host_memory, make_logger, tensorrt
from fastgen.engines.trt_options import choose_profile
from fastgen.errors import CacheCorruptionError, InvalidArgumentError, UnsupportedError
from fastgen.models.spec import ExportSpec, ShapeProfile

logger = logging.getLogger(__name__)

#: TensorRT DataType member name -> torch dtype.
TRT_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
              "INT32": torch.int32, "INT64": torch.int64, "UINT8": torch.uint8, "BOOL": torch.bool,
              "FP8": torch.float8_e4m3fn}


class TrtEngine(Engine):
    """A TensorRT plan on a CUDA device (or, with a host-memory stand-in of TensorRT, on the CPU)."""

    backend = "tensorrt"
    strict_profile = True

    def __init__(self, plan: bytes | str | os.PathLike, spec: ExportSpec, *, profiles: list[ShapeProfile] | None = None,
                 device: str | torch.device = "cuda", precision: str = "fp16",
                 execution: ExecutionOptions | None = None, manifest: Mapping[str, Any] | None = None,
                 path: Path | None = None) -> None:
        device = torch.device(device)
        if device.type != "cuda" and not host_memory():
            raise UnsupportedError(f"backend 'tensorrt' runs on a CUDA device, not {device}")
        super().__init__(spec, device=device, precision=precision, manifest=manifest, path=path)
        self.execution = execution_options(execution)
        if self.execution.cuda_graphs and device.type != "cuda":
            raise UnsupportedError(f"tensorrt backend on {device}: CUDA graphs need a CUDA device")
        trt = tensorrt()
        self._log = make_logger()
        self._runtime = trt.Runtime(self._log)
        data = plan if isinstance(plan, bytes) else Path(plan).read_bytes()
        with self._on_device():
            self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            built = (self.manifest.get("key_material") or {}).get("device", {})
            raise CacheCorruptionError(
                f"{path or 'plan'}: TensorRT {trt.__version__} cannot load this plan (built with TensorRT "
                f"{self.manifest.get('backend_version', '?')} for {built.get('name', '?')}): "
                f"{last_error(self._log, 'no reason given')}; rebuild it on this machine")
        self._io_dtypes: dict[str, torch.dtype] = {}
        names = []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            names.append(name)
            self._io_dtypes[name] = TRT_DTYPES[self._engine.get_tensor_dtype(name).name]
        if set(names) != set(spec.input_names) | set(spec.output_names):
            raise CacheCorruptionError(f"{path or 'plan'}: the plan's tensors {sorted(names)} do not match the "
                                       f"spec's {spec.input_names} / {spec.output_names}")
        self.profiles = list(profiles) if profiles else [spec.profile]
        if len(self.profiles) != self._engine.num_optimization_profiles:
            raise CacheCorruptionError(f"{path or 'plan'}: {self._engine.num_optimization_profiles} optimization "
                                       f"profiles in the plan, {len(self.profiles)} in the manifest")
        self._context = self._engine.create_execution_context()
        self._active: int | None = None
        self._graphs: dict[tuple[int, ShapeKey], GraphBucket] = {}

    def _on_device(self) -> Any:
        import contextlib

        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def choose_profile(self, sizes: Mapping[str, int]) -> int:
        """The optimization profile a call with these root sizes runs (raises naming the profiles)."""
        index = choose_profile(self.profiles, dict(sizes))
        if index is None:
            given = ",".join(f"{k}={v}" for k, v in sizes.items())
            raise InvalidArgumentError("input shape", given, " or ".join(str(p) for p in self.profiles),
                                       reason="outside every profile of this TensorRT engine")
        return index

    def _bind(self, index: int, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Select the profile, set shapes and addresses; return the outputs TensorRT will write."""
        ctx, stream = self._context, self._stream()
        if index != self._active:
            if not ctx.set_optimization_profile_async(index, stream):
                raise UnsupportedError(f"TensorRT refused optimization profile {index}: {last_error(self._log, '?')}")
            self._active = index
        for name, tensor in inputs.items():
            if not ctx.set_input_shape(name, tuple(tensor.shape)):
                raise InvalidArgumentError(f"{name} shape", tuple(tensor.shape), str(self.profiles[index]),
                                           reason=f"TensorRT refused it: {last_error(self._log, '?')}")
            ctx.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.spec.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UnsupportedError(f"TensorRT could not infer the shape of output {name!r} ({shape})")
            out = torch.empty(shape, dtype=self._io_dtypes[name], device=self.device)
            ctx.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        return outputs

    def _enqueue(self, index: int, args: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        outputs = self._bind(index, dict(zip(self.spec.input_names, args, strict=True)))
        if not self._context.execute_async_v3(self._stream()):
            raise UnsupportedError(f"TensorRT failed to run {self.spec.component}: {last_error(self._log, '?')}")
        return tuple(outputs[n] for n in self.spec.output_names)

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        index = self.choose_profile(root_sizes(self.spec, inputs))
        # The plan's own input types (a mixed-precision graph may keep some float inputs fp32).
        args = [inputs[n].to(self._io_dtypes[n]).contiguous() for n in self.spec.input_names]
        with self._on_device():
            if self.execution.cuda_graphs:
                outs = self._replay(index, args)
            else:
                outs = self._enqueue(index, args)
        return dict(zip(self.spec.output_names, outs, strict=True))

    def _replay(self, index: int, args: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        key = (index, shape_key(self.spec.input_names, args))
        bucket = self._graphs.get(key)
        if bucket is None:
            # The profile is switched and shapes set outside the capture: TensorRT does work on the
            # first enqueue after either changes, which must not be recorded.
            bucket = capture(lambda a: self._enqueue(index, a), args, self.device)
            self._graphs[key] = bucket
            logger.info("tensorrt engine: captured a CUDA graph for %s (%d graphs)",
                        {n: s for n, s, _ in key[1]}, len(self._graphs))
        # The graph replays the kernels it recorded, whatever profile the context holds now.
        return bucket.replay(args)

    @property
    def refittable(self) -> bool:
        return bool(self._engine.refittable)

    def refit(self, weights: Any) -> TrtEngine:
        """Apply new weights of the same graph in place, without a rebuild: ``weights`` is an ``.onnx``
        file of the same graph, or a model or Component that fastgen exports to one (at this engine's
        precision). Needs an engine built with ``TensorRTOptions(refittable=True)``."""
        if not self.refittable:
            raise UnsupportedError("this TensorRT engine was not built refittable; rebuild it with "
                                   "--trt-refittable (TensorRTOptions(refittable=True))")
        if isinstance(weights, (str, os.PathLike)) and str(weights).endswith(".onnx"):
            from fastgen.core.onnx_files import check_external_data

            check_external_data(Path(weights))  # TensorRT's parser reads the user's external data
            refit_from_onnx(self._engine, Path(weights))
        else:
            with tempfile.TemporaryDirectory(prefix="fastgen-refit-") as tmp:
                refit_from_onnx(self._engine, export_weights(weights, self, Path(tmp)))
        self._graphs.clear()  # captured graphs hold the old weights' addresses
        logger.info("refitted TensorRT engine %s", self.spec.component)
        return self

    def serialize(self) -> bytes:
        """The plan with its current (refitted) weights."""
        return bytes(memoryview(self._engine.serialize()))

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        record = self.manifest.get("tensorrt") or {}
        info.update({"profiles": [str(p) for p in self.profiles], "tensorrt": record.get("settings"),
                     "refittable": self.refittable})
        return info

    def close(self) -> None:
        self._graphs.clear()
        self._context = None
        self._engine = None


def refit_from_onnx(engine: Any, onnx_path: Path) -> None:
    """Refit ``engine`` (a refittable ICudaEngine) with the weights of ``onnx_path`` (the same graph)."""
    trt = tensorrt()
    log = make_logger()
    refitter = trt.Refitter(engine, log)
    parser = trt.OnnxParserRefitter(refitter, log)
    if not parser.refit_from_file(str(onnx_path)):
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        raise InvalidArgumentError("weights", str(onnx_path), reason="not the graph this engine was built from ("
                                   f"{errors[0] if errors else last_error(log, 'TensorRT refused it')})")
    missing = refitter.get_missing_weights()
    if missing:
        raise InvalidArgumentError("weights", str(onnx_path), reason=f"no values for {', '.join(missing[:5])}")
    if not refitter.refit_cuda_engine():
        raise UnsupportedError(f"TensorRT could not refit the engine: {last_error(log, 'no reason given')}")


def export_weights(model: Any, engine: TrtEngine, out: Path) -> Path:
    """Export ``model`` (a preset, path, module or Component of ``engine``'s component) to ONNX in ``out``,
    at the engine's precision, for a refit."""
    from fastgen.engines.trt_artifacts import onnx_at_precision
    from fastgen.models.resolve import resolve_component

    component = resolve_component(model, engine.spec.component, engine.spec.profile)
    build_config = (engine.manifest.get("build_config") or {})
    return onnx_at_precision(component, out, build_config, engine.precision)


__all__ = ["TRT_DTYPES", "TrtEngine", "export_weights", "refit_from_onnx"]
