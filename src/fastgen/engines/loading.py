"""Open an engine from disk: a bare ``.onnx`` file or an engine directory with a manifest."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch

from fastgen.engines.base import Engine
from fastgen.engines.cache import MANIFEST, verify_dir
from fastgen.engines.config import ExecutionOptions, execution_options
from fastgen.engines.registry import BackendSpec, get_backend
from fastgen.errors import InvalidArgumentError
from fastgen.models.onnx_metadata import detector_metadata_from_onnx

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"


def _manifest_device(manifest: dict[str, Any]) -> str:
    device = manifest.get("device", "cpu")
    if isinstance(device, dict):  # a device fingerprint
        device = device.get("kind", "cpu")
    return str(device)


def _pick_device(device: str | None, manifest: dict[str, Any], backend: BackendSpec, path: Path) -> torch.device:
    if device is None and _manifest_device(manifest) == "auto":
        device = "auto"
    if device is not None:  # explicit: cuda without a GPU is an error, not a fallback
        return backend.resolve_device(device)
    wanted = _manifest_device(manifest)
    try:
        if backend.can_run(wanted):
            return torch.device(wanted)
    except RuntimeError:  # not a device string torch knows
        pass
    logger.warning("engine %s was built for %s, which this machine cannot run; loading it on cpu", path, wanted)
    return torch.device("cpu")


def _load_onnx_file(path: Path, device: str | None, execution: ExecutionOptions | None) -> Engine:
    # A bare graph has no manifest to name its backend: onnxruntime runs any ONNX file.
    from fastgen.engines.onnx_io import load_graph, onnx_precision, spec_from_onnx
    from fastgen.engines.ort_backend import OrtEngine, resolve_ort_device

    # onnxruntime reads the weights next: every external data file must be there, whole, inside the folder.
    proto = load_graph(path, data=True)
    spec = spec_from_onnx(proto, component=path.stem)
    dev = resolve_ort_device(device)
    engine = OrtEngine(path, spec, device=dev, precision=onnx_precision(spec), execution=execution, path=path)
    # A detector exported by ultralytics (NudeNet's too) names its classes and input size in the graph.
    detector = detector_metadata_from_onnx({p.key: p.value for p in proto.metadata_props})
    return engine if detector is None else engine.attach(metadata=detector)


def load_engine(path: str | os.PathLike, *, device: str | None = None, execution: ExecutionOptions | None = None,
                verify: Literal["full", "size"] = "full", runtime: ExecutionOptions | None = None) -> Engine:
    """Load an engine: an ``.onnx`` file (spec read from the graph), or an engine directory.

    An engine directory is checked against its manifest first (``verify``: sha256 of every file, or
    sizes only), then opened by the backend its manifest names (see :mod:`fastgen.engines.registry`).
    ``device`` None means the manifest's device if this machine has it, else cpu. ``execution``: how
    the engine executes (``runtime`` is its deprecated name).
    """
    execution = execution_options(execution, runtime)
    raw = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(raw, str) or not raw.strip() or "\x00" in raw:
        # None, bytes, numbers, "" (which would mean the current directory), a NUL byte (os refuses it)
        shown = path if path is None or isinstance(path, (str, bytes, int, float)) else f"<{type(path).__name__}>"
        raise InvalidArgumentError("engine", shown, reason="must be the path of an .onnx file or an engine directory")
    p = Path(path).expanduser()
    if not p.exists():
        raise InvalidArgumentError("engine", str(path), reason="no such file or directory")
    if verify not in ("full", "size"):
        raise InvalidArgumentError("verify", verify, ("full", "size"))
    if p.is_file():
        if p.suffix.lower() == ".onnx":
            return _load_onnx_file(p, device, execution)
        raise InvalidArgumentError("engine", str(path), reason="not an .onnx file or an engine directory")
    if not os.path.lexists(p / MANIFEST):  # a manifest that is a link, FIFO or folder is verify_dir's to refuse
        onnx_files = sorted(p.glob("*.onnx"))
        if len(onnx_files) == 1:
            return _load_onnx_file(onnx_files[0], device, execution)
        raise InvalidArgumentError("engine", str(path), reason="not an .onnx file or an engine directory")

    manifest = verify_dir(p, check=verify)
    backend = get_backend(manifest.get("backend"), argument="engine backend")
    backend.require_available()
    dev = _pick_device(device, manifest, backend, p)
    logger.info("loading %s engine %s on %s", backend.name, p, dev)
    return backend.load(p, manifest, device=dev, execution=execution)
