"""The ``tensorrt`` module, imported on first use only, and the seam that lets tests stand in for it.

Importing fastgen never imports TensorRT: every TensorRT call in the backend goes through
:func:`tensorrt`. Without the package, asking for the backend fails with :data:`INSTALL` (one line).
:func:`use` installs another module in its place (``tests/engines/tensorrt``: a stand-in generated
from NVIDIA's real bindings, which runs on a CPU with host pointers in place of device pointers).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from types import ModuleType
from typing import Any

from fastgen.errors import UnsupportedError

logger = logging.getLogger(__name__)

INSTALL = ("backend 'tensorrt' needs NVIDIA TensorRT 10 or 11 and a CUDA GPU: pip install 'fastgen[tensorrt]' "
           "(tensorrt-cu12 or tensorrt-cu13) on a GPU machine; or use --backend onnxruntime or torch")

_LOCK = threading.Lock()
_MODULE: ModuleType | None = None
_HOST_MEMORY = False


def use(module: ModuleType | None, *, host_memory: bool = False) -> None:
    """Run the backend on ``module`` instead of ``tensorrt`` (None: back to the real one).

    ``host_memory``: the module executes on host pointers (a CPU stand-in), so engines may be built
    and run on the ``cpu`` device.
    """
    global _MODULE, _HOST_MEMORY
    with _LOCK:
        _MODULE, _HOST_MEMORY = module, bool(host_memory and module is not None)


def host_memory() -> bool:
    """Whether the module in use runs on host memory (a stand-in on a CPU)."""
    return _HOST_MEMORY


def installed() -> bool:
    """Whether ``tensorrt`` (or a stand-in) can be imported, without importing it."""
    if _MODULE is not None:
        return True
    try:
        return importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        return False


def tensorrt() -> Any:
    """The ``tensorrt`` module (or the stand-in in use); UnsupportedError with :data:`INSTALL` without it."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    with _LOCK:
        if _MODULE is None:
            try:
                _MODULE = importlib.import_module("tensorrt")
            except ImportError as exc:  # also a wheel whose CUDA libraries fail to load
                raise UnsupportedError(f"{INSTALL} ({exc})") from exc
            logger.debug("tensorrt %s loaded", getattr(_MODULE, "__version__", "?"))
    return _MODULE


def version() -> str:
    """TensorRT's version string (``10.16.1.11``)."""
    return str(tensorrt().__version__)


def major() -> int:
    """TensorRT's major version (10 or 11)."""
    return int(version().split(".", 1)[0])


def make_logger() -> Any:
    """A ``trt.ILogger`` writing TensorRT's messages to this module's Python logger."""
    trt = tensorrt()
    severity = trt.ILogger.Severity
    levels = {severity.INTERNAL_ERROR: logging.CRITICAL, severity.ERROR: logging.ERROR,
              severity.WARNING: logging.WARNING, severity.INFO: logging.DEBUG, severity.VERBOSE: logging.DEBUG}

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.DEBUG)
            if level >= logging.ERROR:
                self.errors.append(msg)  # the last one explains a None/False from TensorRT
            logger.log(level, "TensorRT: %s", msg)

    return _Logger()


__all__ = ["INSTALL", "host_memory", "installed", "major", "make_logger", "tensorrt", "use", "version"]
