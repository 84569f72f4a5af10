"""The onnxruntime backend's registration: how its artifacts are written and loaded, which devices it uses.

The engine itself (``OrtEngine``, fp16 conversion, providers) lives in :mod:`fastgen.engines.ort_backend`.
:func:`write_onnx` (a component exported, or a third-party ``.onnx`` file copied, into a staging
directory) is shared with the other backends that build from ONNX graphs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastgen.engines.registry import BackendSpec, register_backend
from fastgen.errors import CacheCorruptionError, UnsupportedError

if TYPE_CHECKING:  # pragma: no cover
    from fastgen.engines.build import BuildPlan
    from fastgen.engines.config import BuildConfig, ExecutionOptions
    from fastgen.engines.ort_backend import OrtEngine
    from fastgen.models.spec import ExportSpec

#: Tolerances a fp16 ONNX Runtime engine must meet against the fp32 PyTorch component.
FP16_TOLERANCE = 2e-2
FP16_MIN_COSINE = 0.999
ONNX_FILE = "model.onnx"


def write_onnx(staging: Path, plan: BuildPlan) -> tuple[dict[str, Any], ExportSpec, Callable[..., Any]]:
    """Write ``model.onnx`` into ``staging``: the plan's component exported (and verified), or its
    ``.onnx`` file copied with the profile's dims named.

    Returns ``(manifest fields, spec, reference)``: ``reference`` runs the fp32 model (the component,
    or onnxruntime on the copied graph), to verify what a backend makes of the graph against.
    """
    import onnx
    import onnx.external_data_helper

    from fastgen.core.onnx_files import check_external_data
    from fastgen.export.api import export_into
    from fastgen.export.config import ExportConfig
    from fastgen.export.onnx_export import name_dims, save
    from fastgen.export.verify import ort_runner

    fields: dict[str, Any] = {}
    if plan.component is not None:
        result = export_into(plan.component, staging, plan.config.export, progress=plan.progress)
        fields["export"] = {"stats": result.stats, "verification": result.verification}
        return fields, plan.component.spec, plan.component
    from fastgen.engines.onnx_io import spec_from_onnx

    # The graph alone first: its external data is checked before onnx reads any of it.
    model = onnx.load(str(plan.onnx_file), load_external_data=False)
    check_external_data(plan.onnx_file, model)
    onnx.external_data_helper.load_external_data_for_model(model, str(plan.onnx_file.parent))
    spec = spec_from_onnx(model).with_profile(plan.config.profile)
    name_dims(model, spec)
    save(model, staging, ExportConfig(external_data="auto"))
    del model
    return fields, spec, ort_runner(staging / ONNX_FILE)


def convert_precision(onnx_path: Path, spec: ExportSpec, reference: Callable[..., Any], config: BuildConfig,
                      label: str) -> dict[str, Any]:
    """Convert the fp32 graph at ``onnx_path`` in place to ``config.precision`` (fp16 or bf16; fp32 leaves it).

    A fp16 graph is verified against ``reference`` with onnxruntime; a bf16 one cannot be (onnxruntime's
    CPU provider has no bf16 kernels): the backend verifies what it builds. Returns manifest fields.
    """
    from fastgen.export.verify import ort_runner, verify

    fields: dict[str, Any] = {}
    if config.precision == "fp16":
        from fastgen.export.fp16 import convert_to_fp16

        convert_to_fp16(onnx_path, onnx_path)
        shapes = ["opt"] if config.export.verify == "opt" else ["min", "opt", "max"]
        if config.export.verify != "none":
            fields["fp16_verification"] = verify(
                spec, reference, ort_runner(onnx_path), shapes=shapes, tolerance=FP16_TOLERANCE,
                min_cosine=FP16_MIN_COSINE, seed=config.export.seed + 100, float_dtype=torch.float16,
                label=f"{label} fp16 graph")
    elif config.precision == "bf16":
        from fastgen.export.fp16 import convert_to_bf16

        convert_to_bf16(onnx_path, onnx_path)
    return fields


def _write_artifacts(staging: Path, plan: BuildPlan) -> dict[str, Any]:
    """model.onnx (exported or copied, then fp16-converted and verified at fp16)."""
    fields, spec, reference = write_onnx(staging, plan)
    fields.update(convert_precision(staging / ONNX_FILE, spec, reference, plan.config, "onnxruntime"))
    fields["spec"] = spec.to_dict()
    return fields


def _check(config: BuildConfig, device: torch.device) -> None:
    if config.quant_config is not None and config.precision != "fp32":
        # ONNX Runtime's int8 kernels (MatMulIntegerToFloat, MatMulNBits) take and give fp32 activations;
        # an fp16 conversion of a Q/DQ graph would only insert casts around them.
        raise UnsupportedError(f"backend 'onnxruntime' builds quantized engines ({config.quantization}) at "
                               f"precision 'fp32' only, not {config.precision!r}")


def _resolve_device(device: str | torch.device) -> torch.device:
    # auto picks the GPU only when onnxruntime itself can use it (onnxruntime-gpu installed)
    from fastgen.engines.ort_backend import resolve_ort_device

    return resolve_ort_device(device)


def _can_run(device: str) -> bool:
    if not device.startswith("cuda"):
        return True
    if not torch.cuda.is_available():
        return False
    from fastgen.engines.ort_backend import has_cuda_provider

    return has_cuda_provider()


def onnx_in_dir(directory: Path, manifest: Mapping[str, Any]) -> Path:
    """The ONNX graph of an engine directory: ``model.onnx``, else the one ``.onnx`` artifact listed."""
    if (directory / ONNX_FILE).is_file():
        return directory / ONNX_FILE
    listed = [n for n in manifest.get("artifacts", {}) if n.endswith(".onnx")]
    if len(listed) == 1:
        return directory / listed[0]
    raise CacheCorruptionError(f"{directory}: onnxruntime engine without {ONNX_FILE}")


def load_ort_engine(directory: str | os.PathLike, manifest: Mapping[str, Any], *, device: str | torch.device = "cpu",
                    execution: ExecutionOptions | None = None) -> OrtEngine:
    """Open an onnxruntime engine directory (its manifest already verified)."""
    from fastgen.core.onnx_files import check_external_data
    from fastgen.engines.cache import MANIFEST
    from fastgen.engines.ort_backend import OrtEngine
    from fastgen.models.spec import ExportSpec

    directory = Path(directory)
    if not isinstance(manifest.get("spec"), dict):
        raise CacheCorruptionError(f"{directory / MANIFEST}: no spec")
    spec = ExportSpec.from_dict(manifest["spec"])
    onnx_path = onnx_in_dir(directory, manifest)
    # The manifest covers the files, not where the graph says its weights are: a crafted model.onnx
    # may still point outside the directory.
    check_external_data(onnx_path)
    return OrtEngine(onnx_path, spec, device=device,
                     precision=manifest.get("precision", "fp32"), execution=execution, manifest=manifest,
                     path=directory)


def _version() -> str:
    import onnxruntime

    return onnxruntime.__version__


SPEC = register_backend(BackendSpec(
    name="onnxruntime", precisions=("fp32", "fp16"), write_artifacts=_write_artifacts, load=load_ort_engine,
    version=_version, consumes_onnx=True, resolve_device=_resolve_device, can_run=_can_run, check=_check))


__all__ = ["FP16_MIN_COSINE", "FP16_TOLERANCE", "SPEC", "convert_precision", "load_ort_engine", "onnx_in_dir", "write_onnx"]
