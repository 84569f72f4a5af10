"""Lazy access to the optional C++ extension ``fastgen._C``.

The extension is imported on first use, never at ``import fastgen``, so a build without it (or a
broken one) costs nothing until an op asks. ``FASTGEN_DISABLE_EXT=1`` makes every op take its
PyTorch path, which is how tests and benchmarks compare the two.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from types import ModuleType

logger = logging.getLogger(__name__)

DISABLE_ENV = "FASTGEN_DISABLE_EXT"

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None
_tried = False


def disabled() -> bool:
    """Whether ``FASTGEN_DISABLE_EXT`` asks for the PyTorch paths (read on every call)."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _import() -> ModuleType | None:
    global _module, _error, _tried
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                _module = importlib.import_module("fastgen._C")
            except ImportError as exc:  # not built (FASTGEN_BUILD_EXT=0) or built for another Python
                _error = f"{type(exc).__name__}: {exc}"
                logger.debug("fastgen._C not available (%s); using the PyTorch paths", _error)
            _tried = True
    return _module


def load() -> ModuleType | None:
    """The extension module, or None when it is not built or disabled by ``FASTGEN_DISABLE_EXT``."""
    if disabled():
        return None
    return _import()


def available() -> bool:
    """Whether ops will use the extension: it is built, importable and not disabled."""
    return load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (for error messages and test skips), else None."""
    if disabled():
        return f"the fastgen._C extension is disabled by {DISABLE_ENV}=1"
    if _import() is None:
        return ("the fastgen._C extension is not built (reinstall without FASTGEN_BUILD_EXT=0: "
                f"{_error})")
    return None
