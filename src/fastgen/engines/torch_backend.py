"""PyTorch engines: the component's module run eagerly, compiled, or replayed from CUDA graphs.

Saved torch engines hold only ``weights.safetensors`` and the JSON recipe in the manifest; the model
is rebuilt from its library class and config, so loading never unpickles anything.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastgen.engines.base import PRECISION_FLOAT, Engine
from fastgen.engines.config import BuildConfig, ExecutionOptions, execution_options
from fastgen.engines.cuda_graphs import GraphBucket, ShapeKey, capture, shape_key
from fastgen.engines.registry import BackendSpec, register_backend
from fastgen.errors import CacheCorruptionError, InvalidArgumentError, UnsupportedError
from fastgen.models.component import Component
from fastgen.models.spec import ExportSpec

if TYPE_CHECKING:  # pragma: no cover
    from fastgen.engines.build import BuildPlan

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
_ALIASES_KEY = "fastgen_aliases"  # safetensors metadata: JSON {tied name: saved name}

class TorchEngine(Engine):
    """The component's wrapper module on a device, at a precision, in inference mode.

    The module is moved and cast in place (no copy: diffusion models are gigabytes), so the
    component's own module ends up on the engine's device and dtype too.
    """

    backend = "torch"

    def __init__(self, component: Component, *, device: str | torch.device = "cpu", precision: str = "fp32",
                 execution: ExecutionOptions | None = None, manifest: Mapping[str, Any] | None = None,
                 path: Path | None = None, spec: ExportSpec | None = None,
                 runtime: ExecutionOptions | None = None) -> None:
        if precision not in PRECISION_FLOAT:
            raise InvalidArgumentError("precision", precision, PRECISION_FLOAT)
        execution = execution_options(execution, runtime)  # runtime=: the deprecated keyword
        super().__init__(spec or component.spec, device=device, precision=precision, manifest=manifest, path=path)
        if execution.cuda_graphs and self.device.type != "cuda":
            raise UnsupportedError(f"torch backend on {self.device}: CUDA graphs need a CUDA device")
        if execution.cuda_graphs and execution.compile == "reduce-overhead":
            raise InvalidArgumentError("cuda-graphs", True,
                                       reason="compile='reduce-overhead' already captures CUDA graphs")
        self.execution = execution
        self.component = component
        self.module = component.module.to(device=self.device, dtype=self.float_dtype).eval()
        if execution.attention != "default":
            from fastgen.ops.optimize import optimize

            report = optimize(self.module, attention=execution.attention)
            logger.info("%s: %d attention layers on %s", component.name, len(report.layers), execution.attention)
        self._fn = self.module
        if execution.compile != "none":
            # Compilation happens lazily on the first call of each new input shape.
            self._fn = torch.compile(self.module, mode=execution.compile)
        self._graphs: dict[ShapeKey, GraphBucket] = {}
        self._graphs_revision = self._model_revision()

    def _call(self, args: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        outs = self._fn(*args)
        if isinstance(outs, torch.Tensor):
            outs = (outs,)
        outs = tuple(outs)
        if len(outs) != len(self.spec.outputs):
            raise UnsupportedError(f"torch backend: the module returned {len(outs)} outputs, the spec "
                                   f"names {len(self.spec.outputs)} ({self.spec.output_names})")
        return outs

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [inputs[n] for n in self.spec.input_names]
        with torch.inference_mode():
            if self.execution.cuda_graphs:
                outs = self._replay(args)
            else:
                outs = self._call(args)
        return dict(zip(self.spec.output_names, outs, strict=True))

    def _model_revision(self) -> tuple[int, int]:
        from fastgen.ops.optimize import attention_revision

        return attention_revision(self.module), attention_revision(self.component.model)

    def _replay(self, args: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        revision = self._model_revision()
        if revision != self._graphs_revision:  # fastgen.optimize changed the model: graphs replay old kernels
            self._graphs.clear()
            self._graphs_revision = revision
        key = shape_key(self.spec.input_names, args)
        bucket = self._graphs.get(key)
        if bucket is None:
            bucket = capture(self._call, args, self.device)
            self._graphs[key] = bucket
            logger.info("torch engine: captured a CUDA graph for %s (%d graphs)",
                        {n: s for n, s, _ in key}, len(self._graphs))
        return bucket.replay(args)

    @property
    def runtime(self) -> ExecutionOptions:
        """Deprecated name of :attr:`execution`."""
        return self.execution

    def torch_modules(self) -> dict[str, torch.nn.Module]:
        """``{component name: the library model this engine runs}`` (the diffusers / transformers model
        inside the component's wrapper), for ``fastgen.optimize``; CUDA graphs are captured anew once
        optimize changed it."""
        return {self.spec.component: self.component.model}

    def close(self) -> None:
        self._graphs.clear()


def _dedupe(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied weights (one tensor under several names) saved once: (unique tensors, {alias: saved name})."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state_dict.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor
    return unique, aliases


def _quantized_format_tensors(model: torch.nn.Module) -> set[str]:
    """State-dict names of quantized layers' codes and scales, whose dtype is part of their format
    (fp8 codes and fp32 scales are "floating point" too, but must not follow the engine precision)."""
    from fastgen.quant.api import quantized_layers

    return {f"{name}.{buf}" for name, layer in quantized_layers(model).items() for buf in layer.FIXED_DTYPE}


def save_torch_engine(component: Component, directory: str | os.PathLike, precision: str) -> list[str]:
    """Write the model's weights at ``precision`` to ``directory/weights.safetensors``; return artifact names.

    The manifest (written by the caller) must carry ``component.source`` as ``source`` and the spec:
    that is what ``load_torch_engine`` rebuilds the model from.
    """
    from safetensors.torch import save_file

    if not component.source:
        raise UnsupportedError("torch engines of custom nn.Modules can't be saved; build an onnxruntime "
                               "engine or keep the engine in memory")
    if precision not in PRECISION_FLOAT:
        raise InvalidArgumentError("precision", precision, PRECISION_FLOAT)
    dtype = PRECISION_FLOAT[precision]
    unique, aliases = _dedupe(component.model.state_dict())
    fixed = _quantized_format_tensors(component.model)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[tuple] = set()
    for name, tensor in unique.items():
        t = tensor.detach()
        if t.is_floating_point() and name not in fixed:
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        # safetensors refuses tensors that share memory (views of one buffer that are not the same
        # tensor); give each its own storage.
        storage = (t.untyped_storage().data_ptr(), t.device)
        if t.numel() and storage in storages:
            t = t.clone()
        storages.add((t.untyped_storage().data_ptr(), t.device))
        tensors[name] = t
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
    try:
        save_file(tensors, str(tmp), metadata={_ALIASES_KEY: json.dumps(aliases, sort_keys=True),
                                                "precision": precision})
        os.replace(tmp, directory / WEIGHTS_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    return [WEIGHTS_FILE]


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors state dict with tied names restored (both names map to one tensor)."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    try:
        aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
    except json.JSONDecodeError as exc:
        raise CacheCorruptionError(f"{path}: unreadable tied-weight metadata ({exc})") from exc
    for alias, name in aliases.items():
        if name not in tensors:
            raise CacheCorruptionError(f"{path}: tied weight {alias!r} points at missing tensor {name!r}")
        tensors[alias] = tensors[name]
    return tensors


def _prepare_quantized(recipe: Mapping[str, Any] | None):
    """The hook that swaps a rebuilt model's layers for empty quantized ones before its weights load."""
    if not recipe:
        return None
    from fastgen.quant.api import apply_quantization_recipe

    def prepare(model: torch.nn.Module) -> None:
        apply_quantization_recipe(model, dict(recipe))

    return prepare


def load_torch_engine(directory: str | os.PathLike, manifest: Mapping[str, Any], *,
                      device: str | torch.device = "cpu", execution: ExecutionOptions | None = None,
                      runtime: ExecutionOptions | None = None) -> TorchEngine:
    """Rebuild a saved torch engine from ``manifest["source"]`` and its safetensors weights."""
    from fastgen.models import rebuild_component  # lazy: fastgen.models imports diffusers/transformers

    directory = Path(directory)
    source = manifest.get("source")
    if not source:
        raise CacheCorruptionError(f"{directory}: torch engine manifest has no 'source' to rebuild the model from")
    state_dict = load_weights(directory / WEIGHTS_FILE)
    component = rebuild_component(source, state_dict, prepare=_prepare_quantized(source.get("quantization")))
    spec = ExportSpec.from_dict(manifest["spec"]) if manifest.get("spec") else component.spec
    return TorchEngine(component, device=device, precision=manifest.get("precision", "fp32"),
                       execution=execution_options(execution, runtime), manifest=manifest, path=directory,
                       spec=spec)


def _write_artifacts(staging: Path, plan: BuildPlan) -> dict[str, Any]:
    save_torch_engine(plan.component, staging, plan.config.precision)
    return {"spec": plan.spec_dict}


def _in_memory(component: Component, device: torch.device, config: BuildConfig) -> TorchEngine:
    engine = TorchEngine(component, device=device, precision=config.precision, execution=config.execution)
    return engine.attach(tokenizer=component.tokenizer, metadata=component.metadata)


def _version() -> str:
    return torch.__version__


SPEC = register_backend(BackendSpec(
    name="torch", precisions=("fp32", "fp16", "bf16"), write_artifacts=_write_artifacts,
    load=load_torch_engine, version=_version, consumes_onnx=False, in_memory=_in_memory))
