"""``fastgen.build``: a model component (or any ONNX file) to a cached, verified engine.

Three steps, each its own function:

1. :func:`resolve_source`: the ``model`` argument (preset, path, module, Component, or ``.onnx`` file)
   to a :class:`BuildSource` (a Component, quantized now when the cache key cannot describe it);
2. :func:`plan_build`: the backend (from :mod:`fastgen.engines.registry`), its device, the cache key
   and its material, and the artifact writer: a :class:`BuildPlan`;
3. :func:`publish`: the plan's artifacts written into the cache (a hit skips writing) and/or ``out``;
   then ``load_engine`` opens the result.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from fastgen.core.config import sha256_json
from fastgen.core.onnx_files import check_external_data, open_checked
from fastgen.engines.base import PRECISION_FLOAT, Engine
from fastgen.engines.config import BuildConfig
from fastgen.engines.registry import BackendSpec, backends, get_backend
from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.models.component import Component
from fastgen.models.metadata import GenericMetadata
from fastgen.quant.config import QuantConfig
from fastgen.version import __version__

logger = logging.getLogger(__name__)


def _is_onnx_file(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx") and Path(model).is_file()


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open_checked(p) as f:  # regular files only: a FIFO or /dev/zero swapped in must not hang this
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _onnx_with_data(path: Path) -> list[Path]:
    """The file and the external-data files its tensors point at, checked before any is read."""
    return [path, *check_external_data(path)]


def _tokenizer_digest(tokenizer: Any) -> str | None:
    """Identity of a tokenizer for the cache key: its class, vocabulary and settings."""
    if tokenizer is None:
        return None
    return sha256_json({"class": type(tokenizer).__name__, "vocab": tokenizer.get_vocab(),
                        "max_length": tokenizer.model_max_length, "pad": str(tokenizer.pad_token)})


# --- 1. the source -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BuildSource:
    """What an engine is built from: a Component, or a third-party ``.onnx`` file."""

    component: Component | None = None
    """The component (quantized already when ``pending_quantization`` is None and a recipe applied)."""
    onnx_file: Path | None = None
    """A third-party ONNX graph (then ``component`` is None)."""
    pending_quantization: QuantConfig | None = None
    """Quantize the component with this config on a cache miss only (see :func:`resolve_source`)."""
    owned: bool = False
    """Whether the component was loaded here (then it may be quantized in place, not on a copy)."""


def resolve_source(model: Any, component: str | None, config: BuildConfig, backend: BackendSpec, *,
                   calibration: Any = None) -> BuildSource:
    """``model`` (preset, path, module, Component, or ``.onnx`` file) to what ``backend`` builds from."""
    from fastgen.quant.components import quantize_component

    if _is_onnx_file(model):
        if config.quant_config is not None:
            raise InvalidArgumentError("quantization", config.quantization, ("none",),
                                       reason="an .onnx file has no PyTorch layers to quantize (export a "
                                              "quantized component instead)")
        if not backend.consumes_onnx:
            raise InvalidArgumentError("backend", backend.name, [b.name for b in backends() if b.consumes_onnx],
                                       reason="an .onnx file has no PyTorch module")
        return BuildSource(onnx_file=Path(model))
    from fastgen.models.resolve import resolve_component

    if config.quant_config is None and calibration is not None:
        raise InvalidArgumentError("calibration", type(calibration).__name__,
                                   reason="given without a quantization to calibrate")
    if calibration is not None:  # structural mistakes fail now, before the model loads
        from fastgen.quant.calibration import check_calibration

        calibration = check_calibration(calibration)
    comp = resolve_component(model, component, config.profile)
    owned = isinstance(model, (str, os.PathLike))
    qconfig = config.quant_config
    # Quantized on a cache miss only, when the float weights and the config decide the result.
    # Statistics from the caller's calibration data do not: calibrate and quantize first, and let
    # the weights digest cover the quantized tensors. So must an in-memory engine (never cached).
    if qconfig is not None and (calibration is not None or _in_memory(backend, comp)):
        comp, qconfig = quantize_component(comp, qconfig, calibration=calibration, inplace=owned), None
    return BuildSource(component=comp, pending_quantization=qconfig, owned=owned)


def _in_memory(backend: BackendSpec, comp: Component) -> bool:
    """A component that cannot be rebuilt from files (a custom nn.Module) runs in memory, if the backend can."""
    return backend.in_memory is not None and not comp.source


# --- 2. the plan -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """One engine to build: the backend, what from, the cache key, and (:meth:`write`) the artifact writer.

    Backends' ``write_artifacts(staging, plan)`` read ``component`` (or ``onnx_file``), ``config``,
    ``device``, ``spec_dict`` and ``progress``; the component is quantized by then.
    """

    backend: BackendSpec
    config: BuildConfig
    device: torch.device
    source: BuildSource
    key: str
    """sha256 of ``material``: the cache entry."""
    material: dict[str, Any]
    """Everything that decides the artifacts (recorded in the manifest as ``key_material``)."""
    spec_dict: dict[str, Any]
    progress: bool = False
    cache: Any = None
    """The ``EngineCache`` the engine is written into (None: none), whose entries a backend may reuse:
    TensorRT refits a cached refittable engine of the same graph instead of rebuilding it."""

    @property
    def graph_key(self) -> str:
        """The key without the weights: equal for two builds that differ only in weight values (a
        fine-tuned checkpoint, fused LoRA weights). A third-party ``.onnx`` file's graph and weights
        are hashed together, so there it is the key."""
        source = self.material.get("source", {})
        if "weights" not in source:
            return self.key
        return sha256_json({**self.material, "source": {**source, "weights": None}})

    @property
    def component(self) -> Component | None:
        return self.source.component

    @property
    def onnx_file(self) -> Path | None:
        return self.source.onnx_file

    def write(self, staging: Path) -> dict[str, Any]:
        """Write the engine's artifacts into ``staging``; return its manifest fields."""
        from fastgen.quant.components import component_recipe, quantize_component

        t0 = time.perf_counter()
        plan, comp = self, self.source.component
        if comp is not None and self.source.pending_quantization is not None:
            comp = quantize_component(comp, self.source.pending_quantization, inplace=self.source.owned)
            plan = dataclasses.replace(self, source=dataclasses.replace(self.source, component=comp,
                                                                        pending_quantization=None))
        fields = dict(self.backend.write_artifacts(staging, plan))
        if comp is not None and comp.tokenizer is not None:
            comp.tokenizer.save_pretrained(str(staging / "tokenizer"))  # JSON and text files only
        config = self.config
        return {
            **fields,
            "backend": config.backend,
            "precision": config.precision,
            "device": self.device.type,
            "cache_key": self.key,
            "key_material": self.material,
            "build_config": config.to_dict(),
            "source": comp.source if comp is not None else {"onnx": str(self.onnx_file)},
            "quantization": component_recipe(comp) if comp is not None else None,
            "origin": comp.origin if comp is not None else str(self.onnx_file),
            "metadata": (comp.metadata if comp is not None else GenericMetadata()).to_manifest(),
            "fastgen_version": __version__,
            "backend_version": self.backend.version(),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": time.perf_counter() - t0,
        }


def select_backend(config: BuildConfig) -> tuple[BackendSpec, torch.device]:
    """The config's backend and the device it builds for, after the backend's own refusals."""
    backend = get_backend(config.backend)
    backend.check_precision(config.precision)
    backend.require_available()
    device = backend.resolve_device(config.device)
    if backend.check is not None:
        backend.check(config, device)
    return backend, device


def _source_material(source: BuildSource, config: BuildConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the source's entry of the key material, the spec) of what is built."""
    from fastgen.quant.components import component_recipe

    if source.onnx_file is not None:
        from fastgen.engines.onnx_io import spec_from_onnx

        spec_dict = spec_from_onnx(source.onnx_file).with_profile(config.profile).to_dict()
        return {"onnx_sha256": _hash_files(_onnx_with_data(source.onnx_file))}, spec_dict
    from fastgen.models import weights_digest

    comp, qconfig = source.component, source.pending_quantization
    # A recipe says how the layers compute (int8 weight-only and W8A8 layers hold identical tensors).
    quantization = component_recipe(comp) or (
        {"config": qconfig.to_dict(), "calibration": "synthetic" if qconfig.needs_calibration else None}
        if qconfig is not None else None)
    material = {"recipe": comp.source or {"class": type(comp.model).__qualname__, "repr": repr(comp.model)},
                "weights": weights_digest(comp.model), "extras": comp.metadata.to_dict(),
                "tokenizer": _tokenizer_digest(comp.tokenizer), "quantization": quantization}
    return material, comp.spec.to_dict()


def plan_build(source: BuildSource, config: BuildConfig, backend: BackendSpec, device: torch.device, *,
               progress: bool = False) -> BuildPlan:
    """The cache key of building ``source`` with ``config`` on ``device``, and the writer of its artifacts."""
    from fastgen.engines.device import device_fingerprint

    source_material, spec_dict = _source_material(source, config)
    material = {
        "fastgen": __version__,
        "source": source_material,
        "spec": spec_dict,
        "build": config.artifact_dict(),
        "backend_version": backend.version(),
        "device": device_fingerprint(device),
    }
    if backend.consumes_onnx:
        import onnx

        from fastgen.export.onnx_export import GRAPH_REVISION

        material["exporter"] = {"torch": torch.__version__, "onnx": onnx.__version__, "graphs": GRAPH_REVISION}
    return BuildPlan(backend=backend, config=config, device=device, source=source, key=sha256_json(material),
                     material=material, spec_dict=spec_dict, progress=progress)


# --- 3. publishing and loading -----------------------------------------------------------------

def _brief(value: Any) -> Any:
    """A bad argument as an error message shows it: short values as they are, anything else by its type."""
    if value is None or isinstance(value, (bool, int, float)) or (isinstance(value, (str, bytes)) and len(value) <= 80):
        return value
    return f"<{type(value).__name__}>"


def _check_path(argument: str, value: Any) -> None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise InvalidArgumentError(argument, _brief(value), reason="must be a path (str or os.PathLike)")


def resolve_cache(cache: Any) -> Any:
    """The ``cache`` argument of :func:`build` as an ``EngineCache``, or False for none."""
    from fastgen.engines.cache import EngineCache

    if cache is False:
        return False
    if cache is None or cache is True:
        return EngineCache()
    if isinstance(cache, EngineCache):
        return cache
    if isinstance(cache, (str, os.PathLike)):
        return EngineCache(cache)
    raise InvalidArgumentError("cache", _brief(cache), reason="must be an EngineCache, a directory path, "
                               "None (the default cache) or False (no cache)")


def resolve_config(config: Any, overrides: dict[str, Any]) -> BuildConfig:
    """``config`` (a BuildConfig or None) with keyword ``overrides`` of its fields applied."""
    if config is None:
        config = BuildConfig()
    elif not isinstance(config, BuildConfig):
        raise InvalidArgumentError("config", f"<{type(config).__name__}>", reason="must be a fastgen.BuildConfig "
                                   "(BuildConfig.from_dict reads a dict; its fields may also be given as keywords)")
    if "runtime" in overrides:  # the old name of the execution field
        import warnings

        warnings.warn("build(runtime=...) is deprecated; use execution=", DeprecationWarning, stacklevel=3)
        overrides["execution"] = overrides.pop("runtime")
    names = sorted(f.name for f in dataclasses.fields(BuildConfig))
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise InvalidArgumentError("build option", unknown[0], names, reason="not a BuildConfig field")
    return dataclasses.replace(config, **overrides) if overrides else config


def publish(plan: BuildPlan, *, out: str | os.PathLike | None = None, cache: Any = None) -> tuple[Path, bool]:
    """Write the plan's engine into the cache (unless there already) and/or ``out``: ``(directory, cache hit)``.

    ``cache``: an ``EngineCache``, None for the default one, or False for none (then ``out`` is required).
    """
    from fastgen.engines.cache import publish_dir

    _check_path("out", out)
    cache = resolve_cache(cache)
    if cache is False:
        if out is None:
            raise InvalidArgumentError("out", None, reason="required when the cache is disabled")
        from fastgen.core.fs import atomic_dir
        from fastgen.engines.cache import write_manifest

        with atomic_dir(out) as staging:
            write_manifest(staging, plan.write(staging))
        return Path(out).absolute(), False
    if out is not None:
        cache.check_outside(out)
    entry, hit = cache.get_or_build(plan.key, dataclasses.replace(plan, cache=cache).write)
    if out is not None:
        publish_dir(entry, Path(out))
        entry = Path(out).absolute()
    return entry, hit


def build(model: Any, *, component: str | None = None, config: BuildConfig | None = None,
          out: str | os.PathLike | None = None, cache: Any = None, progress: bool = False,
          calibration: Any = None, **overrides: Any) -> Engine:
    """Build (or fetch from the cache) an engine for one component of ``model`` and load it.

    ``model``: a preset name, a local checkpoint, an ``nn.Module``, a :class:`Component`, or a path
    to any ``.onnx`` file. ``config`` fields may also be given as keyword overrides
    (``build("tiny", component="unet", backend="torch")``). ``cache``: an ``EngineCache``, None for
    the default cache, or False to skip caching (then ``out`` is required). ``out``: also publish the
    engine directory there (atomically). ``calibration``: representative inputs for a static or
    SmoothQuant ``quantization`` (a forward loop ``fn(module)`` or an iterable of input tuples for
    the component's module; default: synthetic inputs, see ``fastgen.quant.components``). A
    ``model`` you pass as a module or Component is quantized on a copy; a component quantized
    beforehand with ``fastgen.quantize_`` builds as it is.
    """
    from fastgen.engines.loading import load_engine

    config = resolve_config(config, overrides)
    # Arguments first, before minutes of export: a bad cache or out fails now, in one line.
    _check_path("out", out)
    cache = resolve_cache(cache)
    if cache is not False and out is not None:
        cache.check_outside(out)
    backend, device = select_backend(config)
    source = resolve_source(model, component, config, backend, calibration=calibration)
    if source.component is not None and _in_memory(backend, source.component):
        # A custom nn.Module cannot be rebuilt without pickle, so it is not cached on disk.
        if out is not None:
            raise UnsupportedError(f"backend {backend.name!r} cannot save an engine of a custom nn.Module "
                                   "(no pickle); build an onnxruntime engine or drop --out")
        return backend.in_memory(source.component, device, config)
    plan = plan_build(source, config, backend, device, progress=progress)
    entry, hit = publish(plan, out=out, cache=cache)
    logger.info("engine %s (%s/%s) %s: %s", plan.spec_dict["component"], config.backend, config.precision,
                "cache hit" if hit else "built", entry)
    # Just written or just verified by the cache: a size check is enough here.
    engine = load_engine(entry, device=str(device), execution=config.execution, verify="size")
    engine.cache_hit = hit
    return engine


__all__ = ["BuildPlan", "BuildSource", "PRECISION_FLOAT", "build", "plan_build", "publish", "resolve_cache",
           "resolve_config", "resolve_source", "select_backend"]
