"""A TensorRT plan from fastgen's ONNX: a strongly typed network, one profile per shape range, a timing cache.

Strongly typed: TensorRT 11 removed the FP16 / BF16 / INT8 / FP8 builder flags, and TensorRT 10
supports the same mode, so precision comes from the graph alone: its float types (fastgen converts
the exported graph to fp16 or bf16) and its QuantizeLinear / DequantizeLinear nodes (fastgen's
quantized export). Every TensorRT call here goes through :func:`fastgen.engines.trt_lib.tensorrt`.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastgen.engines.trt_lib import make_logger, tensorrt
from fastgen.engines.trt_options import TensorRTOptions
from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.models.spec import ExportSpec, ShapeProfile

logger = logging.getLogger(__name__)

GIB = 1 << 30


@dataclass(frozen=True)
class PlanBuild:
    """What one TensorRT build made: the serialized plan and what the builder was told."""

    plan: bytes
    settings: dict[str, Any]
    """The builder settings as applied (recorded in the manifest, shown by ``fastgen inspect``)."""
    profiles: list[dict[str, Any]]
    """Per optimization profile, ``{input name: {"min", "opt", "max"}}`` as given to TensorRT."""


def last_error(log: Any, default: str) -> str:
    """The last error TensorRT logged (its calls return None / False and log why), or ``default``."""
    errors = getattr(log, "errors", None)
    return errors[-1] if errors else default


def _network_inputs(network: Any) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.shape) for t in (network.get_input(i) for i in range(network.num_inputs))}


def _add_profiles(builder: Any, config: Any, network: Any, spec: ExportSpec,
                  profiles: list[ShapeProfile]) -> list[dict[str, Any]]:
    """One TensorRT optimization profile per fastgen profile (derived dims resolved: ``height/8``)."""
    graph_inputs = _network_inputs(network)
    if set(graph_inputs) != set(spec.input_names):
        raise UnsupportedError(f"backend 'tensorrt': the parsed network's inputs {sorted(graph_inputs)} do not "
                               f"match the component's {spec.input_names}")
    recorded = []
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        shapes: dict[str, Any] = {}
        points = {which: profile.shape(which) for which in ("min", "opt", "max")}
        for t in spec.inputs:
            if -1 not in graph_inputs[t.name]:
                continue  # a static input: TensorRT wants no profile entry for it
            lo, opt, hi = (t.resolve(points[w]) for w in ("min", "opt", "max"))
            trt_profile.set_shape(t.name, lo, opt, hi)
            shapes[t.name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
        index = config.add_optimization_profile(trt_profile)
        if index < 0:
            raise InvalidArgumentError("profile", str(profile), reason="TensorRT refused it as an optimization profile")
        recorded.append(shapes)
    return recorded


def timing_cache_path(device_fingerprint: dict[str, Any], trt_version: str) -> Path:
    """Where the timing cache of this GPU model and TensorRT version lives (under fastgen's cache)."""
    from fastgen.core.paths import cache_dir

    name = device_fingerprint.get("name") or device_fingerprint.get("arch") or "device"
    capability = device_fingerprint.get("capability", "")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{name}-sm{capability.replace('.', '')}").strip("-").lower()
    return cache_dir("tensorrt-timing") / f"{slug}-trt{trt_version}.cache"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _configure(builder: Any, options: TensorRTOptions, timing: Path | None, progress: bool) -> Any:
    trt = tensorrt()
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.workspace_gib > 0:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * GIB))
    if options.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    # Layer names, tactics and formats in the plan: what `fastgen inspect` shows (engine inspector).
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if progress:
        config.progress_monitor = make_progress_monitor()
    if timing is not None:
        data = timing.read_bytes() if timing.is_file() else b""
        cache = config.create_timing_cache(data)
        if not config.set_timing_cache(cache, False):  # ignore_mismatch=False: a cache of another GPU is refused
            logger.warning("TensorRT refused the timing cache %s; building without it", timing)
            config.set_timing_cache(config.create_timing_cache(b""), False)
    return config


def parse_onnx(builder: Any, log: Any, onnx_path: Path, name: str | None = None) -> tuple[Any, Any]:
    """A strongly typed network parsed from ``onnx_path`` (external data read beside it): (network, parser).
    ``name``: what the graph is called in errors (the component, or the user's ``.onnx`` file)."""
    trt = tensorrt()
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        raise UnsupportedError(f"backend 'tensorrt': TensorRT's ONNX parser refused {name or onnx_path.name}: "
                               f"{errors[0] if errors else last_error(log, 'no reason given')}")
    return network, parser


def build_plan(onnx_path: Path, spec: ExportSpec, profiles: list[ShapeProfile], options: TensorRTOptions, *,
               timing_cache: Path | None = None, progress: bool = False, name: str | None = None) -> PlanBuild:
    """Build a serialized TensorRT plan of the ONNX graph at ``onnx_path`` (on the current CUDA device).

    ``profiles``: the optimization profiles, on root dims (see :func:`~fastgen.engines.trt_options.profiles_for`).
    ``timing_cache``: a file read before and written (atomically) after the build; None: no cache.
    ``name``: what the graph is called in errors (default: the component).
    """
    trt = tensorrt()
    log = make_logger()
    builder = trt.Builder(log)
    network, _parser = parse_onnx(builder, log, onnx_path, name or spec.component)  # the parser owns weights the network points at
    config = _configure(builder, options, timing_cache, progress)
    recorded = _add_profiles(builder, config, network, spec, profiles)
    logger.info("TensorRT %s: building %s (%d profile(s), optimization level %d)", trt.__version__, spec.component,
                len(recorded), options.optimization_level)
    host = builder.build_serialized_network(network, config)
    if host is None:
        raise UnsupportedError(f"backend 'tensorrt': TensorRT could not build {spec.component}: "
                               f"{last_error(log, 'no reason given (run with -vv for its log)')}")
    plan = bytes(memoryview(host))
    if timing_cache is not None:
        _write_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    settings = {"strongly_typed": True, "optimization_level": options.optimization_level,
                "workspace_bytes": int(options.workspace_gib * GIB) or None, "refittable": options.refittable,
                "timing_cache": str(timing_cache) if timing_cache is not None else None,
                "tensorrt": str(trt.__version__)}
    return PlanBuild(plan=plan, settings=settings, profiles=recorded)


def make_progress_monitor() -> Any:
    """A ``trt.IProgressMonitor`` showing TensorRT's build phases as rich progress bars."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    trt = tensorrt()

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), transient=True)
            self._tasks: dict[str, Any] = {}
            self._depth: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if not self._tasks:
                self._bars.start()
            depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
            self._depth[phase_name] = depth
            self._tasks[phase_name] = self._bars.add_task("  " * depth + phase_name, total=max(num_steps, 1))
            logger.debug("TensorRT build phase %s (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            task = self._tasks.get(phase_name)
            if task is not None:
                self._bars.update(task, completed=step + 1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            task = self._tasks.pop(phase_name, None)
            if task is not None:
                self._bars.remove_task(task)
            if not self._tasks:
                self._bars.stop()

    return _Monitor()


def engine_info(plan: bytes) -> dict[str, Any]:
    """IO tensors, per-profile shapes and layers of a plan (TensorRT's engine inspector), as JSON data:
    written beside the plan so ``fastgen inspect`` shows them on machines without TensorRT."""
    import json

    trt = tensorrt()
    log = make_logger()
    runtime = trt.Runtime(log)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise UnsupportedError(f"backend 'tensorrt': the plan just built does not load: {last_error(log, '?')}")
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        entry: dict[str, Any] = {"name": name, "mode": "input" if mode == trt.TensorIOMode.INPUT else "output",
                                 "dtype": engine.get_tensor_dtype(name).name,
                                 "shape": list(engine.get_tensor_shape(name))}
        if mode == trt.TensorIOMode.INPUT and -1 in entry["shape"]:
            entry["profiles"] = [[list(d) for d in engine.get_tensor_profile_shape(name, p)]
                                 for p in range(engine.num_optimization_profiles)]
        io.append(entry)
    inspector = engine.create_engine_inspector()
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    try:
        layers = json.loads(text).get("Layers", [])
    except ValueError:
        layers = [line for line in text.splitlines() if line.strip()]
    return {"io": io, "num_layers": engine.num_layers, "num_profiles": engine.num_optimization_profiles,
            "refittable": bool(engine.refittable), "device_memory_bytes": int(engine.device_memory_size_v2),
            "layers": layers}


__all__ = ["PlanBuild", "build_plan", "engine_info", "last_error", "make_progress_monitor", "parse_onnx",
           "timing_cache_path"]
