"""Open an engine from disk: a bare ``.onnx`` file or an engine directory with a manifest."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch

from fastgen.engines.base import Engine
from fastgen.engines.cache import MANIFEST, verify_dir
from fastgen.engines.config import RuntimeOptions
from fastgen.errors import CacheCorruptionError, InvalidArgumentError
from fastgen.models.spec import ExportSpec

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")
ONNX_FILE = "model.onnx"


def _manifest_device(manifest: dict[str, Any]) -> str:
    device = manifest.get("device", "cpu")
    if isinstance(device, dict):  # a device fingerprint
        device = device.get("kind", "cpu")
    return str(device)


def _device_usable(device: str, backend: str) -> bool:
    if not device.startswith("cuda"):
        return True
    if not torch.cuda.is_available():
        return False
    if backend == "onnxruntime":
        from fastgen.engines.ort_backend import has_cuda_provider

        return has_cuda_provider()
    return True


def _pick_device(device: str | None, manifest: dict[str, Any], backend: str, path: Path) -> torch.device:
    from fastgen.engines.device import resolve_device

    if device is None and _manifest_device(manifest) == "auto":
        device = "auto"
    if device is not None:  # explicit: cuda without a GPU is an error, not a fallback
        if backend == "onnxruntime":
            from fastgen.engines.ort_backend import resolve_ort_device

            return resolve_ort_device(device)
        return resolve_device(device)
    wanted = _manifest_device(manifest)
    try:
        if _device_usable(wanted, backend):
            return torch.device(wanted)
    except RuntimeError:  # not a device string torch knows
        pass
    logger.warning("engine %s was built for %s, which this machine cannot run; loading it on cpu", path, wanted)
    return torch.device("cpu")


def _load_onnx_file(path: Path, device: str | None, runtime: RuntimeOptions | None) -> Engine:
    from fastgen.engines.onnx_io import onnx_precision, spec_from_onnx
    from fastgen.engines.ort_backend import OrtEngine, resolve_ort_device

    spec = spec_from_onnx(path, component=path.stem)
    dev = resolve_ort_device(device)
    return OrtEngine(path, spec, device=dev, precision=onnx_precision(spec), runtime=runtime, path=path)


def _onnx_in_dir(directory: Path, manifest: dict[str, Any]) -> Path:
    if (directory / ONNX_FILE).is_file():
        return directory / ONNX_FILE
    listed = [n for n in manifest.get("artifacts", {}) if n.endswith(".onnx")]
    if len(listed) == 1:
        return directory / listed[0]
    raise CacheCorruptionError(f"{directory}: onnxruntime engine without {ONNX_FILE}")


def load_engine(path: str | os.PathLike, *, device: str | None = None, runtime: RuntimeOptions | None = None,
                verify: Literal["full", "size"] = "full") -> Engine:
    """Load an engine: an ``.onnx`` file (spec read from the graph), or an engine directory.

    An engine directory is checked against its manifest first (``verify``: sha256 of every file, or
    sizes only). ``device`` None means the manifest's device if this machine has it, else cpu.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InvalidArgumentError("engine", str(path), reason="no such file or directory")
    if verify not in ("full", "size"):
        raise InvalidArgumentError("verify", verify, ("full", "size"))
    if p.is_file():
        if p.suffix.lower() == ".onnx":
            return _load_onnx_file(p, device, runtime)
        raise InvalidArgumentError("engine", str(path), reason="not an .onnx file or an engine directory")
    if not (p / MANIFEST).is_file():
        onnx_files = sorted(p.glob("*.onnx"))
        if len(onnx_files) == 1:
            return _load_onnx_file(onnx_files[0], device, runtime)
        raise InvalidArgumentError("engine", str(path), reason="not an .onnx file or an engine directory")

    manifest = verify_dir(p, check=verify)
    backend = manifest.get("backend")
    if backend not in BACKENDS:
        raise InvalidArgumentError("engine backend", backend, BACKENDS)
    dev = _pick_device(device, manifest, backend, p)
    logger.info("loading %s engine %s on %s", backend, p, dev)
    if backend == "onnxruntime":
        from fastgen.engines.ort_backend import OrtEngine

        if not isinstance(manifest.get("spec"), dict):
            raise CacheCorruptionError(f"{p / MANIFEST}: no spec")
        spec = ExportSpec.from_dict(manifest["spec"])
        return OrtEngine(_onnx_in_dir(p, manifest), spec, device=dev, precision=manifest.get("precision", "fp32"),
                         runtime=runtime, manifest=manifest, path=p)
    if backend == "torch":
        from fastgen.engines.torch_backend import load_torch_engine

        return load_torch_engine(p, manifest, device=dev, runtime=runtime)
    from fastgen.engines.tensorrt_backend import load_tensorrt_engine  # needs the tensorrt package

    return load_tensorrt_engine(p, manifest, device=dev, runtime=runtime)
