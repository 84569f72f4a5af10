"""What the TensorRT stand-in does: a small simulation of TensorRT on a CPU, onnxruntime running the graph.

One class per TensorRT class, under TensorRT's name; its public members are exactly the ones
``trt_standin.SOURCE`` lists (``make_standin`` checks it), helpers start with ``_``. Parameter names
are TensorRT's (keyword calls pass through). Calls arrive through the generated module: stand-in
objects unwrapped to these classes, loggers and progress monitors as the caller's objects (their
overrides are called), enum members as the generated module's (``self._trt``). Like TensorRT, a
failure returns None / False / -1 and logs why through the logger at ERROR.

The simulated device: "device pointers" are host addresses (``torch`` CPU tensors' ``data_ptr()``),
read and written with ctypes. A plan is a header (JSON: TensorRT version, flags, profiles, settings,
IO tensors) and the ONNX model; engines only load in the TensorRT version that built them.
"""

from __future__ import annotations

import copy
import ctypes
import json
import logging
import struct
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PLAN_MAGIC = b"fastgen-trt-standin-plan\n"
CACHE_MAGIC = b"fastgen-trt-standin-timing-cache\n"
#: The default workspace limit (TensorRT's default is the device's global memory): an 80 GiB GPU.
DEVICE_MEMORY = 80 << 30
#: ONNX element type -> TensorRT DataType member (TensorRT has no float64, int16 or uint16 tensors).
DTYPES = {TensorProto.FLOAT: "FLOAT", TensorProto.FLOAT16: "HALF", TensorProto.BFLOAT16: "BF16",
          TensorProto.INT8: "INT8", TensorProto.INT32: "INT32", TensorProto.INT64: "INT64",
          TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL", TensorProto.FLOAT8E4M3FN: "FP8"}
_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN}
_LEVELS = {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO, 4: logging.DEBUG}


class Impl:
    """Base of the implementations: the generated module, and the public object once handed out."""

    _trampoline = False  # a Python subclass overrides the methods (ILogger, IProgressMonitor)
    _buffer = False  # the public object is a bytes (IHostMemory: the buffer protocol)

    def __init__(self, trt: Any, logger: Any = None) -> None:
        self._trt, self._logger, self._public = trt, logger, None

    def _error(self, msg: str, result: Any = None) -> Any:
        self._logger.log(self._trt.ILogger.Severity.ERROR, msg)
        return result


# -- loggers and progress monitors: pure virtual, overridden in Python (pybind11 trampolines)
def _pure_virtual(name: str) -> Any:
    def method(self: Any, *args: Any) -> Any:
        raise RuntimeError(f'Tried to call pure virtual function "{name}"')
    return method


class ILogger(Impl):
    _trampoline = True
    log = _pure_virtual("ILogger::log")


class Logger(ILogger):
    """TensorRT's own logger: messages at ``min_severity`` or worse go to Python's logger "tensorrt"."""

    def __init__(self, trt: Any, min_severity: Any = None) -> None:
        super().__init__(trt)
        self._min = trt.ILogger.Severity.WARNING if min_severity is None else min_severity

    @property
    def min_severity(self) -> Any:
        return self._min

    @min_severity.setter
    def min_severity(self, value: Any) -> None:
        self._min = value

    def log(self, severity: Any, msg: str) -> None:
        if int(severity) <= int(self._min):
            logging.getLogger("tensorrt").log(_LEVELS[int(severity)], "%s", msg)


class IProgressMonitor(Impl):
    _trampoline = True
    phase_start = _pure_virtual("IProgressMonitor::phaseStart")
    step_complete = _pure_virtual("IProgressMonitor::stepComplete")
    phase_finish = _pure_virtual("IProgressMonitor::phaseFinish")


# -- building
class IHostMemory(Impl):
    _buffer = True

    def __init__(self, trt: Any, data: bytes) -> None:
        super().__init__(trt)
        self._data = data

    @property
    def nbytes(self) -> int:
        return len(self._data)


class ITensor(Impl):
    def __init__(self, trt: Any, name: str, shape: tuple[int, ...], elem: int) -> None:
        super().__init__(trt)
        self._name, self._shape, self._elem = name, shape, elem

    name = property(lambda self: self._name)
    shape = property(lambda self: self._shape)  # TensorRT's Dims; -1 for a dynamic dim
    dtype = property(lambda self: getattr(self._trt.DataType, DTYPES[self._elem]))

    def _json(self) -> dict:
        return {"name": self._name, "shape": list(self._shape), "elem": self._elem}


class INetworkDefinition(Impl):
    def __init__(self, trt: Any, flags: int, logger: Any) -> None:
        super().__init__(trt, logger)
        self._flags, self._model = flags, None
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []

    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))

    def get_input(self, index: int) -> ITensor | None:
        return self._inputs[index] if 0 <= index < len(self._inputs) else None

    def get_output(self, index: int) -> ITensor | None:
        return self._outputs[index] if 0 <= index < len(self._outputs) else None


class ParserError(Impl):
    def __init__(self, trt: Any, desc: str, node: int = -1, name: str = "", op: str = "") -> None:
        super().__init__(trt)
        self._desc, self._node, self._name, self._op = desc, node, name, op

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def __str__(self) -> str:
        return (f"In node {self._node} with name: {self._name} and operator: {self._op} (stand-in): "
                f"UNSUPPORTED_NODE: {self._desc}")


class _Parsing(Impl):
    """ONNX parser errors: kept until the parser goes away, each one also logged."""

    def __init__(self, trt: Any, logger: Any) -> None:
        super().__init__(trt, logger)
        self._errors: list[ParserError] = []

    num_errors = property(lambda self: len(self._errors))

    def get_error(self, index: int) -> ParserError | None:
        return self._errors[index] if 0 <= index < len(self._errors) else None

    def _fail(self, desc: str, node: int = -1, name: str = "", op: str = "") -> bool:
        self._errors.append(ParserError(self._trt, desc, node, name, op))
        return self._error(f"ModelImporter: {desc}", False)

    def _load(self, path: str) -> onnx.ModelProto | None:
        try:
            model = onnx.load(path)  # external data beside the file, like TensorRT's parser
        except Exception as exc:  # noqa: BLE001 - a missing file or not a protobuf: TensorRT reports, not raises
            self._fail(f"Failed to parse ONNX model from file: {path} ({type(exc).__name__}: {exc})")
            return None
        if not model.graph.output:
            self._fail(f"Failed to parse ONNX model from file: {path} (no graph outputs)")
            return None
        return model


class OnnxParser(_Parsing):
    def __init__(self, trt: Any, network: INetworkDefinition, logger: Any) -> None:
        super().__init__(trt, logger)
        self._network = network

    def parse_from_file(self, model: str) -> bool:
        proto = self._load(model)
        if proto is None:
            return False
        ok = True
        for i, node in enumerate(proto.graph.node):  # TensorRT imports the default ONNX domain only
            if node.domain not in ("", "ai.onnx"):
                ok = self._fail(f"No importer registered for op: {node.op_type}", i, node.name, node.op_type)
        graph, weights = proto.graph, {t.name for t in proto.graph.initializer}
        tensors = []
        for value in [v for v in graph.input if v.name not in weights] + list(graph.output):
            tt = value.type.tensor_type
            if tt.elem_type not in DTYPES:
                ok = self._fail(f"{value.name}: {TensorProto.DataType.Name(tt.elem_type)} is not a TensorRT type")
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
            tensors.append(ITensor(self._trt, value.name, shape, tt.elem_type))
        if ok:
            net = self._network
            net._model, n = proto, len(tensors) - len(graph.output)
            net._inputs, net._outputs = tensors[:n], tensors[n:]
        return ok


class IOptimizationProfile(Impl):
    def __init__(self, trt: Any) -> None:
        super().__init__(trt)
        self._shapes: dict[str, list[tuple[int, ...]]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - TensorRT's names
        self._shapes[input] = [tuple(int(d) for d in s) for s in (min, opt, max)]

    def get_shape(self, input: str) -> list[tuple[int, ...]]:  # noqa: A002
        return list(self._shapes.get(input, []))

    def _problem(self) -> str | None:
        for name, (lo, opt, hi) in self._shapes.items():
            if not len(lo) == len(opt) == len(hi):
                return f"profile shapes of {name} differ in rank: {lo}, {opt}, {hi}"
            if not all(0 <= a <= b <= c for a, b, c in zip(lo, opt, hi)):
                return f"profile shapes of {name} are not ordered 0 <= min <= opt <= max: {lo}, {opt}, {hi}"
        return None


class ITimingCache(Impl):
    """Content: the TensorRT version, how many builds used the cache, the layer types they timed."""

    def __init__(self, trt: Any, version: str, builds: int = 0, layers: tuple[str, ...] = ()) -> None:
        super().__init__(trt)
        self._version, self._builds, self._layers = version, builds, set(layers)

    def serialize(self) -> IHostMemory:
        data = {"tensorrt": self._version, "builds": self._builds, "layers": sorted(self._layers)}
        return IHostMemory(self._trt, CACHE_MAGIC + json.dumps(data).encode())

    def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if input_cache._version != self._version and not ignore_mismatch:
            return False
        self._builds += input_cache._builds
        self._layers |= input_cache._layers
        return True


class IBuilderConfig(Impl):
    def __init__(self, trt: Any, logger: Any) -> None:
        super().__init__(trt, logger)
        self._level, self._verbosity, self._monitor = 3, trt.ProfilingVerbosity.LAYER_NAMES_ONLY, None
        self._pools = {int(trt.MemoryPoolType.WORKSPACE): DEVICE_MEMORY}
        self._flags = {int(trt.BuilderFlag.TF32)}  # TensorRT enables TF32 by default
        self._profiles: list[IOptimizationProfile] = []
        self._cache: ITimingCache | None = None

    @property
    def builder_optimization_level(self) -> int:
        return self._level

    @builder_optimization_level.setter
    def builder_optimization_level(self, value: int) -> None:
        if not 0 <= int(value) <= 5:
            self._error(f"IBuilderConfig::setBuilderOptimizationLevel: level {value} outside 0..5 (ignored)")
        else:
            self._level = int(value)

    @property
    def profiling_verbosity(self) -> Any:
        return self._verbosity

    @profiling_verbosity.setter
    def profiling_verbosity(self, value: Any) -> None:
        if not isinstance(value, self._trt.ProfilingVerbosity):
            raise TypeError(f"profiling_verbosity: a ProfilingVerbosity, not {value!r}")
        self._verbosity = value

    @property
    def progress_monitor(self) -> Any:
        return self._monitor

    @progress_monitor.setter
    def progress_monitor(self, value: Any) -> None:
        if value is not None and not isinstance(value, self._trt.IProgressMonitor):
            raise TypeError(f"progress_monitor: an IProgressMonitor or None, not {value!r}")
        self._monitor = value

    num_optimization_profiles = property(lambda self: len(self._profiles))

    def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
        self._pools[int(pool)] = int(pool_size)

    def get_memory_pool_limit(self, pool: Any) -> int:
        return self._pools.get(int(pool), 0)

    def set_flag(self, flag: Any) -> None:
        self._flags.add(int(flag))

    def get_flag(self, flag: Any) -> bool:
        return int(flag) in self._flags

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        problem = profile._problem()
        if problem:
            return self._error(f"IBuilderConfig::addOptimizationProfile: invalid profile: {problem}", -1)
        self._profiles.append(profile)
        return len(self._profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache:
        data, version = bytes(serialized_timing_cache), self._trt.__version__
        if not data:
            return ITimingCache(self._trt, version)
        try:
            if not data.startswith(CACHE_MAGIC):
                raise ValueError("not a timing cache")
            c = json.loads(data[len(CACHE_MAGIC):])
            return ITimingCache(self._trt, c["tensorrt"], c["builds"], tuple(c["layers"]))
        except (ValueError, KeyError, TypeError):
            self._logger.log(self._trt.ILogger.Severity.WARNING,
                             "IBuilderConfig::createTimingCache: the serialized cache is invalid; a new one is used")
            return ITimingCache(self._trt, version)

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if cache is not None and cache._version != self._trt.__version__ and not ignore_mismatch:
            return self._error(f"IBuilderConfig::setTimingCache: the cache is from TensorRT {cache._version}, "
                               f"not {self._trt.__version__} (ignore_mismatch=False)", False)
        self._cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._cache


class Builder(Impl):  # Builder(logger): Impl's constructor
    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(self._trt, int(flags), self._logger)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig(self._trt, self._logger)

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile(self._trt)

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        trt = self._trt
        problem = _build_problem(trt, network, config)
        if problem:
            return self._error(f"IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error ({problem})")
        nodes = network._model.graph.node
        if not _progress(config._monitor, len(nodes)):
            return self._error("IBuilder::buildSerializedNetwork: the build was cancelled by the progress monitor")
        if config._cache is not None:
            config._cache._builds += 1
            config._cache._layers |= {n.op_type for n in nodes}
        header = {"tensorrt": trt.__version__, "flags": network._flags,
                  "refittable": config.get_flag(trt.BuilderFlag.REFIT), "optimization_level": config._level,
                  "workspace": config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE),
                  "profiling_verbosity": int(config._verbosity),
                  "inputs": [t._json() for t in network._inputs], "outputs": [t._json() for t in network._outputs],
                  "profiles": [{t._name: p._shapes.get(t._name, [t._shape] * 3) for t in network._inputs}
                               for p in config._profiles] or [{t._name: [t._shape] * 3 for t in network._inputs}]}
        return IHostMemory(trt, _plan(header, network._model))


def _build_problem(trt: Any, network: INetworkDefinition, config: IBuilderConfig) -> str | None:
    """Why TensorRT would refuse to build ``network`` with ``config`` (None: it builds)."""
    if not network._flags >> int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) & 1:
        return ("the network is not strongly typed: create it with 1 << int(NetworkDefinitionCreationFlag."
                "STRONGLY_TYPED) (TensorRT 11 requires it; the stand-in does for 10 too)")
    if not network._outputs:
        return "Network must have at least one output"
    inputs = {t._name: t._shape for t in network._inputs}
    if not config._profiles and any(-1 in s for s in inputs.values()):
        return "Network has dynamic or shape inputs, but no optimization profile has been defined."
    for i, profile in enumerate(config._profiles):
        for name in profile._shapes.keys() - inputs.keys():
            return f"optimization profile {i} sets a shape for {name}, which is not a network input"
        for name, shape in inputs.items():
            if name not in profile._shapes:
                if -1 in shape:
                    return f"{name}: dynamic input is missing dimensions in profile {i}."
                continue
            lo, opt, hi = profile._shapes[name]
            if len(lo) != len(shape) or any(d != -1 and not a == b == c == d for a, b, c, d in zip(lo, opt, hi, shape)):
                return f"optimization profile {i}: {name} {lo}..{hi} does not fit the network's dims {shape}"
    return None


def _progress(monitor: Any, layers: int) -> bool:
    """TensorRT's build phases as an IProgressMonitor sees them; False: it cancelled (open phases finish)."""
    if monitor is None:
        return True
    top = "Building engine"
    monitor.phase_start(top, None, 2)
    try:
        for step, (phase, steps) in enumerate((("Optimizing network", 1), ("Timing layers", max(layers, 1)))):
            monitor.phase_start(phase, top, steps)
            try:
                if not all(monitor.step_complete(phase, i) for i in range(steps)):
                    return False
            finally:
                monitor.phase_finish(phase)
            if not monitor.step_complete(top, step):
                return False
    finally:
        monitor.phase_finish(top)
    return True


def _plan(header: dict, model: onnx.ModelProto) -> bytes:
    text = json.dumps(header).encode()
    return PLAN_MAGIC + struct.pack("<Q", len(text)) + text + model.SerializeToString()


# -- running
class Runtime(Impl):  # Runtime(logger): Impl's constructor
    def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
        data = bytes(memoryview(serialized_engine))
        try:
            if not data.startswith(PLAN_MAGIC):
                raise ValueError("magic tag does not match")
            start = len(PLAN_MAGIC) + 8
            end = start + struct.unpack("<Q", data[len(PLAN_MAGIC):start])[0]
            header, model = json.loads(data[start:end]), onnx.load_model_from_string(data[end:])
        except Exception as exc:  # noqa: BLE001 - not a plan: TensorRT logs and returns None
            return self._error(f"IRuntime::deserializeCudaEngine: Error Code 1: Serialization ({exc})")
        if header["tensorrt"] != self._trt.__version__:
            return self._error("IRuntime::deserializeCudaEngine: Error Code 6: The engine plan file is not compatible "
                               f"with this version of TensorRT, expecting library version {self._trt.__version__} "
                               f"got {header['tensorrt']}, please rebuild.")
        return ICudaEngine(self._trt, header, model, self._logger)


class ICudaEngine(Impl):
    def __init__(self, trt: Any, header: dict, model: onnx.ModelProto, logger: Any) -> None:
        super().__init__(trt, logger)
        self._header, self._model, self._session = header, model, None
        self._io = {t["name"]: (mode, t) for mode, ts in (("INPUT", header["inputs"]), ("OUTPUT", header["outputs"]))
                    for t in ts}
        self._names = list(self._io)
        self._output_shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}

    num_io_tensors = property(lambda self: len(self._names))
    num_optimization_profiles = property(lambda self: len(self._header["profiles"]))
    num_layers = property(lambda self: len(self._model.graph.node))
    refittable = property(lambda self: self._header["refittable"])

    @property
    def device_memory_size_v2(self) -> int:
        """A deterministic estimate: twice the inputs' bytes at the largest shapes of any profile."""
        inputs = self._header["inputs"]
        largest = max(sum(int(np.prod(p[t["name"]][2])) * _np_dtype(t["elem"]).itemsize for t in inputs)
                      for p in self._header["profiles"])
        return min(2 * largest, self._header["workspace"])

    def _tensor(self, name: str, want: str | None = None) -> dict | None:
        mode, t = self._io.get(name, (None, None))
        if t is None or (want and mode != want):
            return self._error(f"ICudaEngine: {name!r} is not an {want.lower() if want else 'IO'} tensor of the engine")
        return t

    def get_tensor_name(self, index: int) -> str | None:
        if not 0 <= index < len(self._names):
            return self._error(f"ICudaEngine::getIOTensorName: index {index} outside 0..{len(self._names) - 1}")
        return self._names[index]

    def get_tensor_mode(self, name: str) -> Any:
        return getattr(self._trt.TensorIOMode, self._io.get(name, ("NONE",))[0])

    def get_tensor_dtype(self, name: str) -> Any:
        t = self._tensor(name)
        return None if t is None else getattr(self._trt.DataType, DTYPES[t["elem"]])

    def get_tensor_shape(self, name: str) -> tuple[int, ...] | None:
        t = self._tensor(name)
        return None if t is None else tuple(t["shape"])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        if self._tensor(name, "INPUT") is None:
            return []
        if not 0 <= profile_index < self.num_optimization_profiles:
            return self._error(f"ICudaEngine::getProfileShape: profile {profile_index} does not exist", [])
        return [tuple(s) for s in self._header["profiles"][profile_index][name]]

    def create_execution_context(self) -> IExecutionContext:
        return IExecutionContext(self._trt, self)

    def create_engine_inspector(self) -> EngineInspector:
        return EngineInspector(self._trt, self)

    def serialize(self) -> IHostMemory:
        return IHostMemory(self._trt, _plan(self._header, self._model))

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._session = ort.InferenceSession(_without_bf16(self._model).SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"])
        names = [t["name"] for t in self._header["outputs"]]
        bf16 = _np_dtype(TensorProto.BFLOAT16)
        feeds = {k: v.astype(np.float32) if v.dtype == bf16 else v for k, v in feeds.items()}
        return dict(zip(names, self._session.run(names, feeds)))

    def _shapes_for(self, inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The output shapes for these input shapes (the graph run once on zeros, remembered)."""
        key = tuple(sorted(inputs.items()))
        if key not in self._output_shapes:
            feeds = {t["name"]: np.zeros(inputs[t["name"]], _np_dtype(t["elem"])) for t in self._header["inputs"]}
            self._output_shapes[key] = {k: tuple(v.shape) for k, v in self._run(feeds).items()}
        return self._output_shapes[key]


class EngineInspector(Impl):
    def __init__(self, trt: Any, engine: ICudaEngine) -> None:
        super().__init__(trt, engine._logger)
        self._engine = engine

    def get_engine_information(self, format: Any) -> str:  # noqa: A002 - TensorRT's name
        # Like TensorRT: layer details with ProfilingVerbosity.DETAILED, names only otherwise.
        engine = self._engine
        detailed = engine._header["profiling_verbosity"] == int(self._trt.ProfilingVerbosity.DETAILED)
        layers = []
        for i, node in enumerate(engine._model.graph.node):
            name = node.name or f"{node.op_type}_{i}"
            layers.append({"Name": name, "LayerType": node.op_type, "Inputs": list(node.input),
                           "Outputs": list(node.output)} if detailed else name)
        return json.dumps({"Layers": layers, "Bindings": engine._names})


class IExecutionContext(Impl):
    def __init__(self, trt: Any, engine: ICudaEngine) -> None:
        super().__init__(trt, engine._logger)
        self._engine, self._profile = engine, 0
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}

    active_optimization_profile = property(lambda self: self._profile)

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if not 0 <= profile_index < self._engine.num_optimization_profiles:
            return self._error(f"IExecutionContext::setOptimizationProfileAsync: profile {profile_index} does not "
                               f"exist ({self._engine.num_optimization_profiles} in the engine)", False)
        if profile_index != self._profile:
            self._profile, self._shapes = profile_index, {}  # input shapes are set again for the new profile
        return True

    def set_input_shape(self, name: str, shape: Any) -> bool:
        t = self._engine._tensor(name, "INPUT")
        if t is None:
            return False
        shape = tuple(int(d) for d in shape)
        lo, _, hi = self._engine._header["profiles"][self._profile][name]
        if len(shape) != len(t["shape"]) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return self._error(f"IExecutionContext::setInputShape: Error Code 3: API Usage Error (Set dimension "
                               f"{list(shape)} for tensor {name} does not satisfy any optimization profiles. Valid "
                               f"range for profile {self._profile}: {lo}..{hi}.)", False)
        self._shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...] | None:
        t = self._engine._tensor(name)
        if t is None:
            return None
        if name in self._shapes:
            return self._shapes[name]
        inputs = [i["name"] for i in self._engine._header["inputs"]]
        if name in inputs or any(i not in self._shapes for i in inputs):
            return tuple(t["shape"])  # -1 where not known yet, like TensorRT
        return self._engine._shapes_for(self._shapes)[name]

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if self._engine._tensor(name) is None:
            return False
        self._addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        engine, header = self._engine, self._engine._header
        for t in header["inputs"]:
            if t["name"] not in self._shapes:
                return self._error(f"IExecutionContext::enqueueV3: input shape of {t['name']} not specified", False)
        shapes = dict(self._shapes)
        shapes.update(engine._shapes_for(self._shapes))
        for t in header["inputs"] + header["outputs"]:
            size = int(np.prod(shapes[t["name"]]))
            if not self._addresses.get(t["name"]) and size:
                return self._error(f"IExecutionContext::enqueueV3: Error Code 3: API Usage Error (Neither address "
                                   f"or allocator is set for {t['name']}.)", False)
        feeds = {t["name"]: _read(self._addresses.get(t["name"], 0), shapes[t["name"]], _np_dtype(t["elem"]))
                 for t in header["inputs"]}
        results = engine._run(feeds)
        for t in header["outputs"]:
            _write(self._addresses.get(t["name"], 0), results[t["name"]].astype(_np_dtype(t["elem"]), copy=False))
        return True


def _without_bf16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with bfloat16 retyped to float32: onnxruntime's CPU provider has no bfloat16 kernels.

    TensorRT's bfloat16 kernels accumulate in float32; outputs are rounded to bfloat16 when written.
    """
    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    model = copy.deepcopy(model)
    graph = model.graph
    for i, t in enumerate(graph.initializer):
        if t.data_type == bf16:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == bf16:  # Cast
                attr.i = f32
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == bf16:  # Constant(OfShape)
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32)))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == bf16:
            value.type.tensor_type.elem_type = f32
    return model


def _np_dtype(elem: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem))


def _read(address: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    count = int(np.prod(shape))
    if count == 0:
        return np.zeros(shape, dtype)
    buffer = (ctypes.c_char * (count * dtype.itemsize)).from_address(address)
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape).copy()


def _write(address: int, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    if array.nbytes:
        ctypes.memmove(address, array.ctypes.data, array.nbytes)


# -- refitting
class Refitter(Impl):
    """A full refit: every weight (floating-point initializer) of the engine is supplied before it runs."""

    def __init__(self, trt: Any, engine: ICudaEngine, logger: Any) -> None:
        super().__init__(trt, logger)
        self._engine, self._staged = engine, {}

    def get_all_weights(self) -> list[str]:
        if not self._engine.refittable:
            return []
        return [t.name for t in self._engine._model.graph.initializer if t.data_type in _FLOATS]

    def get_missing_weights(self) -> list[str]:
        return [n for n in self.get_all_weights() if n not in self._staged]

    def refit_cuda_engine(self) -> bool:
        if not self._engine.refittable:
            return self._error("IRefitter::refitCudaEngine: Error Code 3: API Usage Error (the engine was not built "
                               "refittable: BuilderFlag.REFIT)", False)
        missing = self.get_missing_weights()
        if missing:
            return self._error(f"IRefitter::refitCudaEngine: missing weights: {', '.join(missing)}", False)
        for init in self._engine._model.graph.initializer:
            if init.name in self._staged:
                init.CopyFrom(self._staged[init.name])
        self._engine._session = None  # the next run sees the new weights (shapes are unchanged)
        return True


class OnnxParserRefitter(_Parsing):
    def __init__(self, trt: Any, refitter: Refitter, logger: Any) -> None:
        super().__init__(trt, logger)
        self._refitter = refitter

    def refit_from_file(self, model: str) -> bool:
        new = self._load(model)
        if new is None:
            return False
        old = self._refitter._engine._model.graph
        ops, new_ops = [n.op_type for n in old.node], [n.op_type for n in new.graph.node]
        if ops != new_ops:
            i = next((i for i, (a, b) in enumerate(zip(ops, new_ops)) if a != b), min(len(ops), len(new_ops)))
            return self._fail(f"the graph differs from the engine's at node {i} ({new_ops[i:i + 1]} vs {ops[i:i + 1]})",
                              i)
        weights = {t.name: t for t in new.graph.initializer}
        for init in old.initializer:
            other = weights.get(init.name)
            if other is None:
                return self._fail(f"weight {init.name} of the engine is not in the model")
            if (other.data_type, tuple(other.dims)) != (init.data_type, tuple(init.dims)):
                return self._fail(f"weight {init.name}: {tuple(other.dims)} type {other.data_type} in the model, "
                                  f"{tuple(init.dims)} type {init.data_type} in the engine")
            if init.data_type not in _FLOATS and not np.array_equal(numpy_helper.to_array(init),
                                                                    numpy_helper.to_array(other)):
                return self._fail(f"constant {init.name} differs (not a refittable weight)")
        extra = sorted(weights.keys() - {i.name for i in old.initializer})
        if extra:
            return self._fail(f"the model has weights the engine lacks: {extra}")
        for name in self._refitter.get_all_weights():
            self._refitter._staged[name] = weights[name]
        return True
