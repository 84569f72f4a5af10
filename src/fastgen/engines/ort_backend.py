"""ONNX Runtime engines: an InferenceSession behind the Engine interface, and fp16 conversion."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastgen.engines.base import Engine
from fastgen.engines.config import RuntimeOptions
from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.models.spec import ExportSpec, parse_dim

logger = logging.getLogger(__name__)

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"

# onnxruntime's type strings (NodeArg.type) -> torch dtypes.
_ORT_TYPES = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
    "tensor(double)": torch.float64, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
    "tensor(int16)": torch.int16, "tensor(int8)": torch.int8, "tensor(uint8)": torch.uint8,
    "tensor(bool)": torch.bool,
}
_NUMPY_TYPES = {
    torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64,
    torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
}
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}

# Ops kept in fp32 (with casts around them) by convert_to_fp16, on top of onnxruntime's default
# block list: whole normalisation ops, whose reductions lose bits in fp16. Decomposed norms
# (Pow -> ReduceMean -> Add -> Sqrt, as exported for RMSNorm / old LayerNorm) are kept fp32 as a
# chain instead (see _norm_chains): blocking Pow or ReduceMean one by one casts the squares back to
# fp16 between the two ops, where they overflow (measured: NaN outputs; tests/engines/test_fp16.py).
FP16_KEEP_FP32_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization")
# Ops that may follow a Pow in a decomposed norm's variance (or mean-square) computation.
_NORM_CHAIN = ((("ReduceMean", "ReduceSum"), True), (("Add",), False), (("Sqrt",), False))


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def has_cuda_provider() -> bool:
    return CUDA_EP in available_providers() or TRT_EP in available_providers()


def resolve_ort_device(device: str | torch.device | None = "auto") -> torch.device:
    """Like ``resolve_device``, but ``auto`` also needs a CUDA-enabled onnxruntime to pick the GPU."""
    from fastgen.engines.device import resolve_device

    if device is None or device == "auto":
        if torch.cuda.is_available() and has_cuda_provider():
            return torch.device("cuda")
        return torch.device("cpu")
    return resolve_device(device)


def select_providers(device: torch.device, execution_provider: str, available: Sequence[str], *,
                     provider_options: Mapping[str, dict[str, Any]] | None = None
                     ) -> list[tuple[str, dict[str, Any]]]:
    """Execution providers (with options) to ask for, best first, keeping only available ones.

    ``auto`` on a GPU: TensorRT, then CUDA, then CPU for the ops neither supports. A GPU provider
    requested for a CPU engine is ignored with a warning; a CUDA engine without any GPU provider is
    an error (its inputs and outputs live on the GPU).
    """
    options = provider_options or {}
    cpu = [(CPU_EP, {})]
    if device.type == "cpu":
        if execution_provider in ("cuda", "tensorrt"):
            logger.warning("execution provider %r needs a CUDA device; this onnxruntime engine runs on "
                           "cpu with %s", execution_provider, CPU_EP)
        return cpu
    wanted = {"auto": [TRT_EP, CUDA_EP], "tensorrt": [TRT_EP, CUDA_EP], "cuda": [CUDA_EP]}.get(execution_provider, [])
    chosen = [(ep, dict(options.get(ep, {}))) for ep in wanted if ep in available]
    if not chosen:
        raise UnsupportedError(
            f"onnxruntime backend on {device}: this onnxruntime build has no CUDA execution provider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu, or use --device cpu")
    if execution_provider == "tensorrt" and chosen[0][0] != TRT_EP:
        logger.warning("TensorrtExecutionProvider is not available in this onnxruntime build; using %s",
                       chosen[0][0])
    return chosen + cpu


def session_options(runtime: RuntimeOptions):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[runtime.graph_optimization])
    if runtime.intra_op_threads:  # 0 keeps onnxruntime's default (one thread per physical core)
        so.intra_op_num_threads = runtime.intra_op_threads
    if runtime.inter_op_threads:
        so.inter_op_num_threads = runtime.inter_op_threads
    spin = "1" if runtime.spin_wait else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    # Quantized graphs compute what they state (and what their verification checked): weight-only
    # MatMulNBits in fp32 rather than with int8 activations, and no saturating U8S8 GEMMs on CPUs
    # without VNNI. See fastgen.quant.onnx.EXACT_SESSION_ENTRIES.
    from fastgen.quant.onnx import EXACT_SESSION_ENTRIES

    for key, value in EXACT_SESSION_ENTRIES.items():
        so.add_session_config_entry(key, value)
    # onnxruntime prints every provider-assignment warning to stderr; keep its log to errors
    # unless the user asked for debug logging.
    so.log_severity_level = 1 if logger.isEnabledFor(logging.DEBUG) else 3
    return so


def root_sizes(spec: ExportSpec, inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Root symbol sizes (``height`` in pixels, not ``height/8``) read off validated inputs."""
    sizes: dict[str, int] = {}
    for t in spec.inputs:
        for entry, size in zip(t.shape, inputs[t.name].shape, strict=True):
            parsed = parse_dim(entry)
            if parsed is not None:
                sizes[parsed[0]] = size * parsed[1]
    return sizes


class OrtEngine(Engine):
    """An onnxruntime InferenceSession on CPU or CUDA (IO binding, outputs stay on the GPU)."""

    backend = "onnxruntime"

    def __init__(self, model_path: str | os.PathLike, spec: ExportSpec, *, device: str | torch.device = "cpu",
                 precision: str = "fp32", runtime: RuntimeOptions | None = None,
                 manifest: Mapping[str, Any] | None = None, path: Path | None = None) -> None:
        import onnxruntime as ort

        runtime = runtime or RuntimeOptions()
        device = torch.device(device)
        if precision == "bf16":
            raise UnsupportedError("onnxruntime backend: bf16 engines are not supported (numpy and "
                                   "onnxruntime's IO binding have no bfloat16 type); use fp16 or fp32")
        if device.type == "cuda" and runtime.execution_provider == "cpu":
            logger.warning("execution provider 'cpu' was asked for: this onnxruntime engine runs on cpu, "
                           "not %s", device)
            device = torch.device("cpu")
        super().__init__(spec, device=device, precision=precision, manifest=manifest, path=path)
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise InvalidArgumentError("engine", str(self.model_path), reason="no such ONNX file")
        self.runtime = runtime
        providers = select_providers(self.device, runtime.execution_provider, available_providers(),
                                     provider_options=self._provider_options())
        try:
            self._session = ort.InferenceSession(str(self.model_path), sess_options=session_options(runtime),
                                                 providers=[p for p, _ in providers],
                                                 provider_options=[o for _, o in providers])
        except Exception as exc:
            # onnxruntime's own errors (newer IR version than it supports, unknown ops, bad graph):
            # one line naming the backend, with onnxruntime's reason.
            if type(exc).__module__.startswith("onnxruntime"):
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UnsupportedError(f"onnxruntime {ort.__version__} backend cannot load "
                                       f"{self.model_path}: {reason}") from exc
            raise
        actual = self._session.get_providers()
        logger.info("onnxruntime session for %s runs with %s", self.model_path.name, ", ".join(actual))
        if self.device.type == "cuda" and not {CUDA_EP, TRT_EP} & set(actual):
            # onnxruntime falls back to CPU silently when a GPU provider fails to load (missing
            # CUDA or cuDNN libraries); the engine's GPU tensors cannot be fed to a CPU session.
            raise UnsupportedError(f"onnxruntime backend on {self.device}: the CUDA execution provider "
                                   "failed to start (see onnxruntime's log: CUDA/cuDNN libraries?)")
        self.providers = actual
        graph_in = {a.name: a for a in self._session.get_inputs()}
        graph_out = {a.name: a for a in self._session.get_outputs()}
        if set(graph_in) != set(spec.input_names) or not set(spec.output_names) <= set(graph_out):
            raise InvalidArgumentError("engine", str(self.model_path),
                                       reason=f"graph inputs {sorted(graph_in)} / outputs {sorted(graph_out)} "
                                       f"do not match the spec's {spec.input_names} / {spec.output_names}")
        # The graph's own element types: inputs are cast to these, which also serves mixed-precision
        # third-party graphs whose float inputs are not all of the engine's float dtype.
        self._in_types = {n: _ORT_TYPES.get(a.type) for n, a in graph_in.items()}
        self._out_types = {n: _ORT_TYPES.get(graph_out[n].type) for n in spec.output_names}

    def _provider_options(self) -> dict[str, dict[str, Any]]:
        if self.device.type != "cuda":
            return {}
        from fastgen.engines.cache import default_root

        index = self.device.index or 0
        trt_cache = default_root().parent / "ort-tensorrt"
        if TRT_EP in available_providers():
            trt_cache.mkdir(parents=True, exist_ok=True)
        trt: dict[str, Any] = {
            "device_id": index,
            "trt_fp16_enable": self.precision == "fp16",
            # TensorRT builds take minutes; keep them between sessions.
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(trt_cache),
        }
        dynamic = [t for t in self.spec.inputs if t.symbols]
        if dynamic:
            for which in ("min", "opt", "max"):
                dims = self.spec.profile.shape(which)
                trt[f"trt_profile_{which}_shapes"] = ",".join(
                    f"{t.name}:{'x'.join(str(d) for d in t.resolve(dims))}" for t in dynamic)
        return {TRT_EP: trt, CUDA_EP: {"device_id": index}}

    def _graph_dtype(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        want = self._in_types.get(name)
        return tensor if want is None or tensor.dtype == want else tensor.to(want)

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cuda":
            return self._run_bound(inputs)
        # .numpy() shares memory with the tensor: no copy for contiguous inputs.
        feeds = {n: self._graph_dtype(n, t).detach().contiguous().numpy() for n, t in inputs.items()}
        outs = self._session.run(self.spec.output_names, feeds)
        return {n: torch.from_numpy(np.ascontiguousarray(o)) for n, o in zip(self.spec.output_names, outs, strict=True)}

    def _run_bound(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """IO binding: onnxruntime reads the input tensors' memory and writes into torch outputs in place.

        Used on CUDA (no host round trip); it works on CPU too, which is how it is tested here.
        """
        kind, index = self.device.type, self.device.index or 0
        binding = self._session.io_binding()
        keep_alive = []  # the bound buffers must outlive run_with_iobinding
        for name, tensor in inputs.items():
            tensor = self._graph_dtype(name, tensor).detach().contiguous()
            keep_alive.append(tensor)
            binding.bind_input(name=name, device_type=kind, device_id=index,
                               element_type=_NUMPY_TYPES[tensor.dtype], shape=tuple(tensor.shape),
                               buffer_ptr=tensor.data_ptr())
        shapes = self.spec.resolve(root_sizes(self.spec, inputs))
        outs: dict[str, torch.Tensor] = {}
        for name in self.spec.output_names:
            shape, dtype = shapes[name], self._out_types[name]
            if shape is not None and dtype in _NUMPY_TYPES:
                # Known shape: onnxruntime writes straight into a torch tensor.
                outs[name] = torch.empty(shape, dtype=dtype, device=self.device)
                binding.bind_output(name=name, device_type=kind, device_id=index,
                                    element_type=_NUMPY_TYPES[dtype], shape=tuple(shape),
                                    buffer_ptr=outs[name].data_ptr())
            else:  # data-dependent shape: let onnxruntime allocate on the device
                binding.bind_output(name=name, device_type=kind, device_id=index)
        if kind == "cuda":  # torch wrote the inputs on its own stream; onnxruntime runs on another one
            torch.cuda.current_stream(self.device).synchronize()
        self._session.run_with_iobinding(binding)
        if len(outs) < len(self.spec.output_names):
            values = binding.get_outputs()
            for i, (name, value) in enumerate(zip(self.spec.output_names, values, strict=True)):
                if name not in outs:
                    outs[name] = _ortvalue_to_torch(value, self.device, lambda i=i: binding.copy_outputs_to_cpu()[i])
        return {n: outs[n] for n in self.spec.output_names}

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]


def _ortvalue_to_torch(value: Any, device: torch.device, to_cpu: Any) -> torch.Tensor:
    """An OrtValue as a torch tensor on ``device``: DLPack where this onnxruntime has it, else a host copy."""
    if hasattr(value, "__dlpack__"):  # onnxruntime >= 1.2x
        return torch.from_dlpack(value).clone()  # clone: the OrtValue owns the memory
    c_value = value._get_c_value() if hasattr(value, "_get_c_value") else value
    if hasattr(c_value, "to_dlpack"):
        return torch.utils.dlpack.from_dlpack(c_value.to_dlpack()).clone()
    return torch.from_numpy(to_cpu()).to(device)


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


def convert_to_fp16(src: str | os.PathLike, dst: str | os.PathLike, *,
                    keep_fp32_ops: Sequence[str] = FP16_KEEP_FP32_OPS) -> None:
    """Convert an fp32 ONNX model to fp16 (float16 inputs and outputs), written atomically to ``dst``.

    Ops in ``keep_fp32_ops`` (and onnxruntime's default block list) and decomposed-norm chains stay
    fp32 with casts around them. Models with external data (over 2 GB) are read with it and written
    with ``dst.name + ".data"`` beside ``dst``.
    """
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
        model = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=external,
                                         op_block_list=sorted(block_ops), node_block_list=sorted(chains))
        fp32_nodes = chains | {n.name for n in model.graph.node if n.op_type in set(keep_fp32_ops)}
        folded = _fold_cast_round_trips(model.graph, fp32_nodes)
        _drop_duplicate_nodes(model.graph)
        _topological_sort(model.graph)
        logger.debug("fp16 conversion of %s: %d nodes kept fp32 in norm chains, %d cast round trips folded",
                     src.name, len(chains), folded)
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
