"""What a TensorRT engine directory holds, and how it is made: ``model.plan``, ``engine_info.json``.

The component is exported to ONNX and verified (as for onnxruntime), converted to the build's
precision, then built into a plan, or, when a refittable engine of the same graph (same key but
for the weights) is in the cache, that engine is refitted with the new weights instead of rebuilt.
The plan is then run against the fp32 PyTorch component on the profile's shapes (the TensorRT
engine's own verification) and the ONNX graph is dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastgen.engines.trt_lib import tensorrt
from fastgen.engines.trt_options import TensorRTOptions, profiles_for
from fastgen.errors import CacheCorruptionError, UnsupportedError
from fastgen.models.spec import ShapeProfile

if TYPE_CHECKING:  # pragma: no cover
    from fastgen.engines.build import BuildPlan
    from fastgen.engines.trt_engine import TrtEngine
    from fastgen.models.component import Component

logger = logging.getLogger(__name__)

PLAN_FILE = "model.plan"
INFO_FILE = "engine_info.json"
#: A TensorRT engine must match the fp32 PyTorch component this closely (fp16/bf16 engines: the
#: reduced precision's own error; TF32 tactics in fp32 engines stay well inside it).
TOLERANCE = {"fp32": 1e-2, "fp16": 3e-2, "bf16": 6e-2}
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.995}
#: Quantized engines: TensorRT fuses Q/DQ into int8 / fp8 kernels whose rounding of activations differs
#: from the PyTorch module's reference math by about one quantization step.
QUANT_TOLERANCE, QUANT_MIN_COSINE = 5e-2, 0.999


def options_of(config: Any) -> TensorRTOptions:
    return getattr(config, "tensorrt", None) or TensorRTOptions()


def onnx_at_precision(component: Component, out: Path, build_config: dict[str, Any], precision: str) -> Path:
    """``component`` exported (with the build's export settings) into ``out`` and converted to ``precision``."""
    from fastgen.engines.config import BuildConfig
    from fastgen.engines.ort_spec import ONNX_FILE, convert_precision
    from fastgen.export.api import export_into
    from fastgen.export.config import ExportConfig

    export = ExportConfig.from_dict(build_config.get("export") or {})
    config = BuildConfig(backend="tensorrt", precision=precision, export=export)
    export_into(component, out, config.export)
    convert_precision(out / ONNX_FILE, component.spec, component, config, "onnxruntime")
    return out / ONNX_FILE


def _donor(plan: BuildPlan) -> Path | None:
    """A cached, intact, refittable TensorRT engine of the same graph as ``plan`` (other weights), or None."""
    from fastgen.engines.cache import EngineCache

    cache = plan.cache
    if not isinstance(cache, EngineCache) or not options_of(plan.config).refittable:
        return None
    graph_key = plan.graph_key
    for path in cache.find(lambda m: (m.get("backend") == "tensorrt"
                                      and (m.get("tensorrt") or {}).get("graph_key") == graph_key
                                      and (m.get("tensorrt") or {}).get("settings", {}).get("refittable"))):
        entry = cache.lookup(path.name)  # verified: a damaged donor is dropped, not used
        if entry is not None and entry.name != plan.key:
            return entry
    return None


def _verify_engine(engine: TrtEngine, spec: Any, reference: Any, plan: BuildPlan) -> list[dict[str, Any]]:
    """The built engine against the fp32 reference at min / opt / max (or opt only, or not at all)."""
    from fastgen.export.verify import verify

    config = plan.config
    if config.export.verify == "none":
        return []
    shapes = ["opt"] if config.export.verify == "opt" else ["min", "opt", "max"]

    def run(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.float().cpu() for k, v in engine.run(inputs).items()}

    tolerance, min_cosine = TOLERANCE[config.precision], MIN_COSINE[config.precision]
    from fastgen.quant.components import component_recipe

    if config.quant_config is not None or (plan.component is not None and component_recipe(plan.component)):
        tolerance, min_cosine = max(tolerance, QUANT_TOLERANCE), min(min_cosine, QUANT_MIN_COSINE)
    return verify(spec, reference, run, shapes=shapes, tolerance=tolerance, min_cosine=min_cosine,
                  seed=config.export.seed + 200,
                  label=f"TensorRT {config.precision} engine")


def write_artifacts(staging: Path, plan: BuildPlan) -> dict[str, Any]:
    """Export, convert, build (or refit a cached engine of the same graph), verify; return manifest fields."""
    from fastgen.engines.device import device_fingerprint
    from fastgen.engines.ort_spec import ONNX_FILE, convert_precision, write_onnx
    from fastgen.engines.trt_build import build_plan, engine_info, timing_cache_path
    from fastgen.engines.trt_engine import TrtEngine

    trt = tensorrt()
    options = options_of(plan.config)
    fields, spec, reference = write_onnx(staging, plan)
    fields.update(convert_precision(staging / ONNX_FILE, spec, reference, plan.config, "onnxruntime"))
    profiles = profiles_for(spec, options)
    donor = _donor(plan)
    record: dict[str, Any] = {"graph_key": plan.graph_key, "profiles": [str(p) for p in profiles]}
    if donor is not None:
        # Same graph, same builder settings, other weights: refit the cached plan instead of rebuilding.
        donor_manifest = json.loads((donor / "manifest.json").read_text())
        engine = TrtEngine(donor / PLAN_FILE, spec, profiles=profiles, device=plan.device,
                           precision=plan.config.precision, manifest=donor_manifest, path=donor)
        data = engine.refit(staging / ONNX_FILE).serialize()
        engine.close()
        record.update(settings=donor_manifest["tensorrt"]["settings"],
                      trt_profiles=donor_manifest["tensorrt"]["trt_profiles"], refitted_from=donor.name)
        logger.info("TensorRT: refitted the cached engine %s with new weights (no rebuild)", donor.name[:12])
    else:
        timing = timing_cache_path(device_fingerprint(plan.device), str(trt.__version__)) \
            if options.timing_cache else None
        with torch.cuda.device(plan.device) if plan.device.type == "cuda" else contextlib.nullcontext():
            built = build_plan(staging / ONNX_FILE, spec, profiles, options, timing_cache=timing,
                               progress=plan.progress, name=plan.onnx_file.name if plan.onnx_file else None)
        data = built.plan
        record.update(settings=built.settings, trt_profiles=built.profiles)
    (staging / PLAN_FILE).write_bytes(data)
    (staging / INFO_FILE).write_text(json.dumps(engine_info(data), indent=1))
    engine = TrtEngine(data, spec, profiles=profiles, device=plan.device, precision=plan.config.precision)
    try:
        fields["tensorrt_verification"] = _verify_engine(engine, spec, reference, plan)
    finally:
        engine.close()
    for onnx_file in (staging / ONNX_FILE, staging / f"{ONNX_FILE}.data"):
        onnx_file.unlink(missing_ok=True)  # the plan holds the weights; the graph was only its source
    fields["tensorrt"] = record
    fields["spec"] = spec.to_dict()
    return fields


def load(directory: Path, manifest: dict[str, Any], *, device: torch.device, execution: Any = None) -> TrtEngine:
    """Open a TensorRT engine directory (its manifest already verified)."""
    from fastgen.engines.trt_engine import TrtEngine
    from fastgen.models.spec import ExportSpec

    directory = Path(directory)
    record = manifest.get("tensorrt")
    if not isinstance(manifest.get("spec"), dict) or not isinstance(record, dict):
        raise CacheCorruptionError(f"{directory}: a TensorRT engine manifest without spec or tensorrt record")
    if not (directory / PLAN_FILE).is_file():
        raise CacheCorruptionError(f"{directory}: TensorRT engine without {PLAN_FILE}")
    built_for = (manifest.get("key_material") or {}).get("device") or {}
    if device.type == "cuda" and built_for.get("kind") == "cuda":
        from fastgen.engines.device import device_fingerprint

        here = device_fingerprint(device)
        if (here.get("name"), here.get("capability")) != (built_for.get("name"), built_for.get("capability")):
            # A plan is tied to the GPU model it was built on (and its compute capability).
            raise UnsupportedError(f"TensorRT engine {directory} was built for {built_for.get('name')} "
                                   f"(sm {built_for.get('capability')}), not this {here.get('name')} "
                                   f"(sm {here.get('capability')}); rebuild it here")
    built_with, here_version = manifest.get("backend_version"), str(tensorrt().__version__)
    if built_with and built_with != here_version:
        raise UnsupportedError(f"TensorRT engine {directory} was built with TensorRT {built_with}, this machine has "
                               f"{here_version}; a plan only loads on the version that built it: rebuild it here")
    spec = ExportSpec.from_dict(manifest["spec"])
    profiles = [ShapeProfile.parse(p) if p else spec.profile for p in record.get("profiles", [])]
    return TrtEngine(directory / PLAN_FILE, spec, profiles=profiles, device=device,
                     precision=manifest.get("precision", "fp16"), execution=execution, manifest=manifest,
                     path=directory)


__all__ = ["INFO_FILE", "PLAN_FILE", "load", "onnx_at_precision", "write_artifacts"]
