"""``fastgen.build``: a model component (or any ONNX file) to a cached, verified engine."""

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

from fastgen._config import sha256_json
from fastgen._version import __version__
from fastgen.engines.base import PRECISION_FLOAT, Engine
from fastgen.engines.config import BuildConfig
from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.export.config import ExportConfig
from fastgen.models.component import Component

logger = logging.getLogger(__name__)

#: Tolerances a fp16 ONNX Runtime engine must meet against the fp32 PyTorch component.
FP16_TOLERANCE = 2e-2
FP16_MIN_COSINE = 0.999
#: precisions each backend can build
SUPPORTED_PRECISIONS = {"torch": ("fp32", "fp16", "bf16"), "onnxruntime": ("fp32", "fp16"),
                        "tensorrt": ("fp32", "fp16", "bf16")}


def _is_onnx_file(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx") and Path(model).is_file()


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _onnx_with_data(path: Path) -> list[Path]:
    """The file and the external-data files its initializers point at."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = {e.value for init in model.graph.initializer for e in init.external_data if e.key == "location"}
    return [path, *(path.parent / loc for loc in sorted(locations))]


def _tokenizer_digest(tokenizer: Any) -> str | None:
    """Identity of a tokenizer for the cache key: its class, vocabulary and settings."""
    if tokenizer is None:
        return None
    return sha256_json({"class": type(tokenizer).__name__, "vocab": tokenizer.get_vocab(),
                        "max_length": tokenizer.model_max_length, "pad": str(tokenizer.pad_token)})


def _backend_version(backend: str) -> str:
    if backend == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    return torch.__version__


def _key_material(source: dict, spec_dict: dict, config: BuildConfig, device: torch.device) -> dict:
    from fastgen.engines.device import device_fingerprint

    material = {
        "fastgen": __version__,
        "source": source,
        "spec": spec_dict,
        "build": config.artifact_dict(),
        "backend_version": _backend_version(config.backend),
        "device": device_fingerprint(device),
    }
    if config.backend != "torch":
        import onnx

        material["exporter"] = {"torch": torch.__version__, "onnx": onnx.__version__}
    return material


def _check_config(config: BuildConfig) -> None:
    if config.precision not in SUPPORTED_PRECISIONS[config.backend]:
        raise UnsupportedError(f"backend {config.backend!r} cannot build precision {config.precision!r} "
                               f"(allowed: {', '.join(SUPPORTED_PRECISIONS[config.backend])})")
    if config.quant_config is not None and config.backend == "onnxruntime" and config.precision != "fp32":
        # ONNX Runtime's int8 kernels (MatMulIntegerToFloat, MatMulNBits) take and give fp32 activations;
        # an fp16 conversion of a Q/DQ graph would only insert casts around them.
        raise UnsupportedError(f"backend 'onnxruntime' builds quantized engines ({config.quantization}) at "
                               f"precision 'fp32' only, not {config.precision!r}")
    if config.backend == "tensorrt":
        from fastgen.engines.tensorrt_backend import check_available

        check_available()


def _build_onnx_artifacts(staging: Path, config: BuildConfig, component: Component | None,
                          onnx_source: Path | None, progress: bool) -> dict:
    """Write model.onnx (exported or copied, then fp16-converted) into ``staging`` and verify it."""
    import onnx

    from fastgen.export.api import export_into
    from fastgen.export.onnx_export import ONNX_FILE, name_dims, save
    from fastgen.export.verify import ort_runner, verify

    fields: dict[str, Any] = {}
    if component is not None:
        result = export_into(component, staging, config.export, progress=progress)
        fields["export"] = {"stats": result.stats, "verification": result.verification}
        spec = component.spec
        reference = component
    else:
        from fastgen.engines.onnx_io import spec_from_onnx

        model = onnx.load(str(onnx_source))
        spec = spec_from_onnx(model).with_profile(config.profile)
        name_dims(model, spec)
        save(model, staging, ExportConfig(external_data="auto"))
        del model
        reference = ort_runner(staging / ONNX_FILE)
    if config.precision == "fp16":
        from fastgen.engines.ort_backend import convert_to_fp16

        convert_to_fp16(staging / ONNX_FILE, staging / ONNX_FILE)
        shapes = ["opt"] if config.export.verify == "opt" else ["min", "opt", "max"]
        if config.export.verify != "none":
            fields["fp16_verification"] = verify(
                spec, reference, ort_runner(staging / ONNX_FILE), shapes=shapes, tolerance=FP16_TOLERANCE,
                min_cosine=FP16_MIN_COSINE, seed=config.export.seed + 100, float_dtype=torch.float16,
                label="onnxruntime fp16")
    fields["spec"] = spec.to_dict()
    return fields


def _check_calibration(config: BuildConfig, calibration: Any) -> None:
    if config.quant_config is None and calibration is not None:
        raise InvalidArgumentError("calibration", type(calibration).__name__,
                                   reason="given without a quantization to calibrate")


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
    from fastgen.engines.cache import EngineCache, publish_dir
    from fastgen.engines.device import resolve_device
    from fastgen.engines.loading import load_engine
    from fastgen.quant.components import component_recipe, quantize_component

    config = config or BuildConfig()
    if overrides:
        config = dataclasses.replace(config, **overrides)
    _check_config(config)
    if config.backend == "onnxruntime":
        # auto picks the GPU only when onnxruntime itself can use it (onnxruntime-gpu installed)
        from fastgen.engines.ort_backend import resolve_ort_device

        device = resolve_ort_device(config.device)
    else:
        device = resolve_device(config.device)
    if device.type == "cpu" and config.precision == "bf16" and config.backend != "torch":
        raise UnsupportedError(f"backend {config.backend!r} has no bf16 on cpu")

    onnx_source = Path(model) if _is_onnx_file(model) else None
    comp: Component | None = None
    qconfig = owned = None
    if onnx_source is not None:
        if config.quant_config is not None:
            raise InvalidArgumentError("quantization", config.quantization, ("none",),
                                       reason="an .onnx file has no PyTorch layers to quantize (export a "
                                              "quantized component instead)")
        if config.backend == "torch":
            raise InvalidArgumentError("backend", "torch", ("onnxruntime", "tensorrt"),
                                       reason="an .onnx file has no PyTorch module")
        from fastgen.engines.onnx_io import spec_from_onnx

        spec_dict = spec_from_onnx(onnx_source).with_profile(config.profile).to_dict()
        source: dict[str, Any] = {"onnx_sha256": _hash_files(_onnx_with_data(onnx_source))}
    else:
        from fastgen.export.api import resolve_component
        from fastgen.models import weights_digest
        _check_calibration(config, calibration)
        comp = resolve_component(model, component, config.profile)
        owned = isinstance(model, (str, os.PathLike))
        qconfig = config.quant_config
        # Quantized on a cache miss only, when the float weights and the config decide the result.
        # Statistics from the caller's calibration data do not: calibrate and quantize first, and let
        # the weights digest cover the quantized tensors. So must an in-memory torch engine.
        if qconfig is not None and (calibration is not None or (config.backend == "torch" and not comp.source)):
            comp, qconfig = quantize_component(comp, qconfig, calibration=calibration, inplace=owned), None
        spec_dict = comp.spec.to_dict()
        # A recipe says how the layers compute (int8 weight-only and W8A8 layers hold identical tensors).
        quantization = component_recipe(comp) or (
            {"config": qconfig.to_dict(), "calibration": "synthetic" if qconfig.needs_calibration else None}
            if qconfig is not None else None)
        source = {"recipe": comp.source or {"class": type(comp.model).__qualname__, "repr": repr(comp.model)},
                  "weights": weights_digest(comp.model), "extras": comp.extras,
                  "tokenizer": _tokenizer_digest(comp.tokenizer), "quantization": quantization}
        if config.backend == "torch" and not comp.source:
            # A custom nn.Module cannot be rebuilt without pickle, so it is not cached on disk.
            if out is not None:
                raise UnsupportedError("backend 'torch' cannot save an engine of a custom nn.Module "
                                       "(no pickle); build an onnxruntime engine or drop --out")
            from fastgen.engines.torch_backend import TorchEngine

            engine = TorchEngine(comp, device=device, precision=config.precision, runtime=config.runtime)
            return engine.attach(tokenizer=comp.tokenizer, extras=comp.extras)

    material = _key_material(source, spec_dict, config, device)
    key = sha256_json(material)

    def build_into(staging: Path) -> dict:
        nonlocal comp
        t0 = time.perf_counter()
        if comp is not None and qconfig is not None:
            comp = quantize_component(comp, qconfig, inplace=owned)
        if config.backend == "torch":
            from fastgen.engines.torch_backend import save_torch_engine

            save_torch_engine(comp, staging, config.precision)
            fields: dict[str, Any] = {"spec": spec_dict}
        else:
            fields = _build_onnx_artifacts(staging, config, comp, onnx_source, progress)
        if comp is not None and comp.tokenizer is not None:
            comp.tokenizer.save_pretrained(str(staging / "tokenizer"))  # JSON and text files only
        return {
            **fields,
            "backend": config.backend,
            "precision": config.precision,
            "device": device.type,
            "cache_key": key,
            "key_material": material,
            "build_config": config.to_dict(),
            "source": comp.source if comp is not None else {"onnx": str(onnx_source)},
            "quantization": component_recipe(comp) if comp is not None else None,
            "origin": comp.origin if comp is not None else str(onnx_source),
            "extras": comp.extras if comp is not None else {},
            "fastgen_version": __version__,
            "backend_version": _backend_version(config.backend),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": time.perf_counter() - t0,
        }

    if cache is False:
        if out is None:
            raise InvalidArgumentError("out", None, reason="required when the cache is disabled")
        from fastgen._fs import atomic_dir
        from fastgen.engines.cache import write_manifest

        with atomic_dir(out) as staging:
            write_manifest(staging, build_into(staging))
        entry, hit = Path(out).absolute(), False
    else:
        cache = cache if isinstance(cache, EngineCache) else EngineCache(cache)
        entry, hit = cache.get_or_build(key, build_into)
        if out is not None:
            publish_dir(entry, Path(out))
            entry = Path(out).absolute()
    logger.info("engine %s (%s/%s) %s: %s", spec_dict["component"], config.backend, config.precision,
                "cache hit" if hit else "built", entry)
    # Just written or just verified by the cache: a size check is enough here.
    engine = load_engine(entry, device=str(device), runtime=config.runtime, verify="size")
    engine.cache_hit = hit
    return engine


__all__ = ["build", "PRECISION_FLOAT"]
