"""PyTorch engines: the component's module run eagerly, compiled, or replayed from CUDA graphs.

Saved torch engines hold only ``weights.safetensors`` and the JSON recipe in the manifest; the model
is rebuilt from its library class and config, so loading never unpickles anything.

Threads (:class:`ThreadPolicy`): torch's intra-op count is process-global, so an engine sets its own
around each call and restores torch's after (measured: 0.2 us a switch, nothing on the step time).
Importing this module changes nothing. On the CPU the automatic count is timed on the first call:
torch's OpenMP threads spin, then sleep, at every operator's barrier, and when a busy process holds a
CPU every barrier waits for a descheduled thread (the tiny UNet on 2 CPUs, one busy process beside
it: 20 to 30 ms a call on one thread, 80 ms to 2.7 s on two; benchmarks/bench_contention.py). OpenMP's
wait policy is fixed once torch has loaded it, so the lever left to a library is the thread count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastgen.core import cpus
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


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` inside the block, the caller's restored after
    (None: left alone).

    OpenMP keeps the count per calling thread, so engines called from several threads do not undo
    each other's; MKL's is process-wide, and torch sets up a thread's count lazily, at its first
    query, from the last count set in any thread: a thread whose very first torch call runs while
    another thread's engine call is under way starts with that engine's count (torch's behaviour
    with any ``torch.set_num_threads``).
    """
    before = torch.get_num_threads() if threads is not None else None
    if before is None or before == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _set_inter_op_threads(threads: int) -> None:
    """torch's inter-op pool: sized once per process, before its first use; a later request is a warning."""
    current = torch.get_num_interop_threads()
    if not threads or current == threads:
        return
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.warning("torch engine: inter-op threads stay %d, not %d: torch sizes that pool once per "
                       "process (%s)", current, threads, reason)
    else:
        logger.info("torch engine: %d inter-op threads (torch's process-wide inter-op pool)", threads)


class ThreadPolicy:
    """The intra-op threads of one torch engine's calls.

    ``ExecutionOptions.intra_op_threads`` > 0: that count. Otherwise, on a CUDA device: torch's own
    (the host threads barely work). On the CPU: at most the CPUs this process may use
    (:func:`fastgen.core.cpus.usable_cpus`) and torch's setting when the engine is made; compiled
    modules keep that (inductor builds its kernels for one count). Eager ones time their first call
    (:func:`fastgen.core.cpus.calibrate`, starting below the CPUs other runnable threads hold now) and
    keep the fastest count for every call after, so repeated calls compute the same bits; when calls on
    more than one thread collapse (4x their own median, :class:`fastgen.core.cpus.CollapseWatch`: a busy
    process arrived) the next call times the counts again.
    """

    def __init__(self, name: str, execution: ExecutionOptions, device: torch.device) -> None:
        self.name = name
        self.ladder: tuple[int, ...] = ()
        self._fixed: int | None = execution.intra_op_threads or None
        if self._fixed is None and device.type == "cpu":
            most = max(1, min(cpus.usable_cpus(), torch.get_num_threads()))
            if most == 1 or execution.compile != "none":
                self._fixed = most
            else:
                self.ladder = cpus.thread_ladder(most)
        self._chosen: int | None = self._fixed
        self._lock = threading.Lock()
        self._watch = cpus.CollapseWatch()

    @property
    def threads(self) -> int | None:
        """The count the next call runs with (None: torch's own, or not chosen yet)."""
        return self._chosen

    def run(self, fn: Callable[[list[torch.Tensor]], tuple[torch.Tensor, ...]],
            args: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if not self.ladder:
            with intra_op_threads(self._fixed):
                return fn(args)
        threads = self._chosen
        if threads is None:
            with self._lock:  # one caller times the counts; concurrent first calls wait for its choice
                if self._chosen is None:
                    self._chosen = self._calibrate(fn, args)
                threads = self._chosen
        with intra_op_threads(threads):
            start = time.perf_counter()
            outs = fn(args)
            seconds = time.perf_counter() - start
        if threads > 1:  # one thread waits at no barrier: nothing to collapse
            with self._lock:
                if self._watch.observe(tuple(tuple(a.shape) for a in args), seconds) and self._chosen == threads:
                    logger.info("torch engine %s: calls on %d threads got over %.0fx slower (busy processes?): "
                                "timing thread counts again", self.name, threads, self._watch.factor)
                    self._chosen = None
                    self._watch.reset()
        return outs

    def _calibrate(self, fn: Callable[[list[torch.Tensor]], tuple[torch.Tensor, ...]],
                   args: list[torch.Tensor]) -> int:
        def time_call(threads: int) -> float:
            with intra_op_threads(threads):
                start = time.perf_counter()
                fn(args)
                return time.perf_counter() - start

        others = cpus.others_running()
        start = self.ladder[0] if others is None else max(1, self.ladder[0] - others)
        result = cpus.calibrate(time_call, self.ladder, start=start)
        logger.info("torch engine %s: %d intra-op thread(s) of %d usable CPUs (timed %s; %.2f s)", self.name,
                    result.threads, self.ladder[0], result.describe(), result.spent)
        return result.threads


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
        self.thread_policy = ThreadPolicy(component.name, execution, self.device)
        _set_inter_op_threads(execution.inter_op_threads)

    @property
    def intra_op_threads(self) -> int | None:
        """The intra-op threads this engine's next call runs with (None: torch's own setting, or not
        timed yet); see :class:`ThreadPolicy`."""
        return self.thread_policy.threads

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
            outs = self.thread_policy.run(self._replay if self.execution.cuda_graphs else self._call, args)
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
