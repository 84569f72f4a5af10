"""ONNX Runtime engines: an InferenceSession behind the Engine interface.

(The fp16 graph conversion is an ONNX transformation, in :mod:`fastgen.export.fp16`.)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastgen.core import cpus
from fastgen.core.ort import session_options as ort_session_options
from fastgen.engines.base import Engine, root_sizes
from fastgen.engines.config import ExecutionOptions, execution_options
from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.models.spec import ExportSpec

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


def session_options(execution: ExecutionOptions):
    """The onnxruntime ``SessionOptions`` of an engine with these execution options (``fastgen.core.ort``)."""
    # Spinning is set explicitly either way (off by default, unlike onnxruntime's). Quantized graphs
    # compute what they state (see fastgen.core.ort.EXACT_QUANT_ENTRIES). onnxruntime's log is kept
    # to errors unless the user asked for debug logging. Automatic intra-op threads: onnxruntime counts
    # the machine's cores, so where affinity or a cgroup quota gives this process fewer, that many.
    return ort_session_options(intra_op_threads=execution.intra_op_threads or cpus.limited_cpus(),
                               inter_op_threads=execution.inter_op_threads,
                               spin_wait=execution.spin_wait, graph_optimization=execution.graph_optimization,
                               exact_quant=True, log_severity=1 if logger.isEnabledFor(logging.DEBUG) else 3)


class OrtEngine(Engine):
    """An onnxruntime InferenceSession on CPU or CUDA (IO binding, outputs stay on the GPU)."""

    backend = "onnxruntime"

    def __init__(self, model_path: str | os.PathLike, spec: ExportSpec, *, device: str | torch.device = "cpu",
                 precision: str = "fp32", execution: ExecutionOptions | None = None,
                 manifest: Mapping[str, Any] | None = None, path: Path | None = None,
                 runtime: ExecutionOptions | None = None) -> None:
        import onnxruntime as ort

        execution = execution_options(execution, runtime)  # runtime=: the deprecated keyword
        device = torch.device(device)
        if precision == "bf16":
            raise UnsupportedError("onnxruntime backend: bf16 engines are not supported (numpy and "
                                   "onnxruntime's IO binding have no bfloat16 type); use fp16 or fp32")
        if device.type == "cuda" and execution.execution_provider == "cpu":
            logger.warning("execution provider 'cpu' was asked for: this onnxruntime engine runs on cpu, "
                           "not %s", device)
            device = torch.device("cpu")
        super().__init__(spec, device=device, precision=precision, manifest=manifest, path=path)
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise InvalidArgumentError("engine", str(self.model_path), reason="no such ONNX file")
        self.execution = execution
        providers = select_providers(self.device, execution.execution_provider, available_providers(),
                                     provider_options=self._provider_options())
        try:
            self._session = ort.InferenceSession(str(self.model_path), sess_options=session_options(execution),
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
        self._provider_list = providers
        #: Values fed for overridable initializers on every run (LoRA-fused weights, see replace_session):
        #: initializer name -> tensor on the engine's device, in the initializer's dtype and layout.
        self.initializer_feeds: dict[str, torch.Tensor] = {}
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
        from fastgen.core.paths import cache_dir

        index = self.device.index or 0
        trt_cache = cache_dir("ort-tensorrt")
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
        feeds.update({n: t.numpy() for n, t in self.initializer_feeds.items()})
        outs = self._session.run(self.spec.output_names, feeds)
        return {n: torch.from_numpy(np.ascontiguousarray(o)) for n, o in zip(self.spec.output_names, outs, strict=True)}

    def _run_bound(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """IO binding: onnxruntime reads the input tensors' memory and writes into torch outputs in place.

        Used on CUDA (no host round trip); it works on CPU too, which is how it is tested here.
        """
        kind, index = self.device.type, self.device.index or 0
        binding = self._session.io_binding()
        keep_alive = []  # the bound buffers must outlive run_with_iobinding
        for name, tensor in {**inputs, **self.initializer_feeds}.items():
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

    def replace_session(self, model: bytes, *, external_data_dir: str | os.PathLike | None = None) -> None:
        """Run a serialized variant of this engine's graph from now on (same inputs and outputs; e.g.
        with some initializers made overridable, so :attr:`initializer_feeds` can replace their values
        per run without another session). ``external_data_dir``: where its external data files are."""
        import onnxruntime as ort

        options = session_options(self.execution)
        if external_data_dir is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             os.fspath(external_data_dir))
        session = ort.InferenceSession(model, sess_options=options, providers=[p for p, _ in self._provider_list],
                                       provider_options=[o for _, o in self._provider_list])
        if [a.name for a in session.get_inputs()] != [a.name for a in self._session.get_inputs()]:
            raise InvalidArgumentError("model", "a replacement graph", reason="its inputs differ from the engine's")
        self._session = session
        self.initializer_feeds = {}

    def overridable_initializers(self) -> list[str]:
        """Names of the initializers a run may feed (:attr:`initializer_feeds`)."""
        return [a.name for a in self._session.get_overridable_initializers()]

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
