"""Build and execution configuration of engines (frozen dataclasses; CLI flags come from them)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from fastgen.core.config import ConfigMixin
from fastgen.core.cpus import MAX_THREADS
from fastgen.engines.registry import backend_names, check_backend
from fastgen.engines.trt_options import TensorRTOptions
from fastgen.errors import InvalidArgumentError
from fastgen.export.config import ExportConfig
from fastgen.models.spec import ShapeProfile
from fastgen.quant.config import QuantConfig, QuantPreset, check_config, resolve_quantization

#: The built-in backends, for type checkers only: the allowed values (backends registered at run time
#: included) come from fastgen.engines.registry; tests/engines/test_registry.py keeps the two equal.
Backend = Literal["torch", "onnxruntime", "tensorrt"]
Precision = Literal["fp32", "fp16", "bf16"]
Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class ExecutionOptions(ConfigMixin):
    """Settings that change how an engine executes, not what is built (not part of the cache key).

    Not to be confused with :class:`fastgen.RuntimeConfig`, the serving runtime's settings.
    """

    execution_provider: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"
    """onnxruntime: preferred execution provider; auto tries TensorRT, then CUDA, then CPU on a GPU machine."""
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    """onnxruntime: graph optimisation level of the session."""
    intra_op_threads: int = 0
    """onnxruntime and torch: threads inside one operator, 1 to 1024 (0: automatic). Automatic sizes
    from the CPUs this process may really use (affinity and cgroup CPU quota): onnxruntime keeps its
    default (one thread per physical core) unless those are fewer; a torch engine on the CPU times its
    first call with up to that many threads and with fewer, keeps the faster (one thread when busy
    processes share the CPUs: OpenMP's threads otherwise wait at every operator for a CPU), and measures
    again when its calls collapse. A torch engine sets torch's count around each call and restores it
    after. Thread counts change float rounding: give a count for bit-identical results run to run."""
    inter_op_threads: int = 0
    """onnxruntime: threads across independent operators; torch: its inter-op pool (TorchScript forks),
    which torch sizes once per process: set when the engine is created if still possible, else a
    warning (0: the defaults)."""
    spin_wait: bool = False
    """onnxruntime: let idle intra-op threads spin between runs; faster back-to-back calls, but they take
    the cores from the PyTorch work between calls (scheduler steps, guidance), so off by default."""
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = "none"
    """torch: torch.compile mode, or none for eager."""
    cuda_graphs: bool = False
    """torch and tensorrt: capture one CUDA graph per input-shape bucket and replay it (GPU only)."""
    attention: Literal["default", "triton", "triton-int8", "sdpa", "reference"] = "default"
    """torch: run the model's attention layers on this fastgen.ops.attention backend (fastgen.optimize);
    default keeps the model's own attention. triton-int8 is lossy (int8 Q.K^T)."""

    def __post_init__(self) -> None:
        self.validate_literals()
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            # bool is an int to Python, and a huge count would make torch or onnxruntime start that
            # many threads: both refused here, before an engine exists.
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_THREADS:
                raise InvalidArgumentError(name.replace("_", "-"), value, f"integers 0 to {MAX_THREADS}, 0: automatic")


@dataclass(frozen=True)
class BuildConfig(ConfigMixin):
    """What engine to build from a model component."""

    backend: str = field(default="onnxruntime", metadata={"choices": backend_names})
    """Engine backend: torch (eager or compiled PyTorch), onnxruntime, or tensorrt (any registered
    backend, see fastgen.engines.registry)."""
    precision: Precision = "fp32"
    """Numeric precision of the engine's weights and float tensors."""
    device: Device = "auto"
    """Where the engine runs: cuda when a GPU is present (auto), or forced."""
    profile: ShapeProfile | None = None
    """Overrides of the component's shape profile (min/opt/max per dim), e.g. batch=1:4:8."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """How the component is exported to ONNX (onnxruntime and tensorrt backends)."""
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)
    """How the engine executes once built (not part of the cache key)."""
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)
    """TensorRT builder settings (tensorrt backend only: then they enter the cache key)."""
    quantization: QuantPreset | QuantConfig = "none"
    """Quantize the component's nn.Linear and 1x1 conv layers before building (fastgen.quantize_ with
    fastgen.quant.DEFAULT_SKIP): a named recipe or, from Python, any fastgen.quant config. Static and
    SmoothQuant recipes are calibrated first (fastgen.build(calibration=...), else synthetic inputs)."""

    def __post_init__(self) -> None:
        if isinstance(self.quantization, dict):
            object.__setattr__(self, "quantization", check_config(self.quantization))
        check_backend(self.backend)
        self.validate_literals()
        resolve_quantization(self.quantization)  # a config object of another kind raises here
        if isinstance(self.profile, str):
            object.__setattr__(self, "profile", ShapeProfile.parse(self.profile))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildConfig:
        """Also reads manifests written before ``runtime`` was renamed ``execution``."""
        if "runtime" in data and "execution" not in data:
            data = {("execution" if k == "runtime" else k): v for k, v in data.items()}
        return super().from_dict(data)

    @property
    def quant_config(self) -> QuantConfig | None:
        """The quantization config this build applies (None: none)."""
        return resolve_quantization(self.quantization)

    def artifact_dict(self) -> dict:
        """The fields that change what is built: these, not the execution options, enter the cache key."""
        from fastgen.engines.registry import get_backend

        return {"backend": self.backend, "precision": self.precision,
                "profile": self.profile.to_dict() if self.profile else None,
                "export": self.export.artifact_dict() if get_backend(self.backend).consumes_onnx else None,
                **({"tensorrt": self.tensorrt.artifact_dict()} if self.backend == "tensorrt" else {}),
                # The config itself, not its preset name: one artifact, one key.
                "quantization": self.quant_config.to_dict() if self.quant_config else None}


def execution_options(execution: ExecutionOptions | None, runtime: ExecutionOptions | None = None,
                      ) -> ExecutionOptions:
    """``execution``, or the deprecated ``runtime=`` keyword's value (with a DeprecationWarning), or defaults."""
    if runtime is not None:
        if execution is not None:
            raise InvalidArgumentError("runtime", runtime, reason="give execution= only (runtime= is its old name)")
        warnings.warn("the runtime= keyword is deprecated; use execution=", DeprecationWarning, stacklevel=3)
        execution = runtime
    return execution if execution is not None else ExecutionOptions()


def __getattr__(name: str) -> Any:
    # RuntimeOptions: the old name of ExecutionOptions, kept for scripts written before the rename.
    if name == "RuntimeOptions":
        warnings.warn("fastgen.RuntimeOptions is deprecated; use fastgen.ExecutionOptions", DeprecationWarning,
                      stacklevel=2)
        return ExecutionOptions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Backend", "BuildConfig", "Device", "ExecutionOptions", "Precision", "execution_options"]
