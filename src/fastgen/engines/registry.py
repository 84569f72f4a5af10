"""The engine backends, registered: one :class:`BackendSpec` per backend, looked up by name.

A backend is one module that defines a ``BackendSpec`` named ``SPEC`` and calls
:func:`register_backend` when it is imported. The built-in backends are registered by module name in ``_BUILTIN_MODULES`` and imported
on first lookup, so that listing the backend names (CLI choices, config checks) imports neither
torch nor onnxruntime. ``fastgen.build`` and ``fastgen.load_engine`` know backends only through
this registry: adding one means its module plus one registration, nothing else.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastgen.errors import InvalidArgumentError, UnsupportedError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fastgen.engines.base import Engine
    from fastgen.engines.build import BuildPlan
    from fastgen.engines.config import BuildConfig
    from fastgen.models.component import Component

logger = logging.getLogger(__name__)

#: Built-in backends: name -> the module that registers its spec on import (imported on first lookup).
_BUILTIN_MODULES = {
    "torch": "fastgen.engines.torch_backend",
    "onnxruntime": "fastgen.engines.ort_spec",
    "tensorrt": "fastgen.engines.tensorrt_backend",
}
#: Names of the built-in backends, in the order the CLI lists them.
BUILTIN_BACKENDS = tuple(_BUILTIN_MODULES)

_REGISTRY: dict[str, BackendSpec] = {}
_LOCK = threading.RLock()


def resolve_torch_device(device: str | torch.device) -> torch.device:
    """The default device resolution: :func:`fastgen.engines.device.resolve_device`."""
    from fastgen.engines.device import resolve_device

    return resolve_device(device)


def torch_can_run(device: str) -> bool:
    """The default check of a saved engine's device: cpu always, cuda when PyTorch sees a GPU."""
    if not device.startswith("cuda"):
        return True
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class BackendSpec:
    """Everything ``fastgen.build`` and ``fastgen.load_engine`` need to know about one backend."""

    name: str
    """The backend's name: ``BuildConfig.backend``, ``--backend`` and the manifest's ``backend``."""
    precisions: tuple[str, ...]
    """Precisions it can build (a subset of ``fp32``, ``fp16``, ``bf16``)."""
    write_artifacts: Callable[[Path, BuildPlan], Mapping[str, Any]]
    """``(staging, plan) -> manifest fields``: write the engine's files into an empty staging directory
    and return the backend's manifest fields (at least ``spec``); the builder adds the common ones."""
    load: Callable[..., Engine]
    """``(path, manifest, *, device, execution) -> Engine``: open a verified engine directory."""
    version: Callable[[], str]
    """The backend library's version, which enters the cache key and the manifest."""
    consumes_onnx: bool = False
    """Whether it builds from an ONNX graph: the component is exported first (``BuildConfig.export`` then
    enters the cache key), and a third-party ``.onnx`` file is a valid source."""
    resolve_device: Callable[[str], torch.device] = resolve_torch_device
    """``auto`` / ``cpu`` / ``cuda[:N]`` -> the device this backend builds and runs on, on this machine."""
    can_run: Callable[[str], bool] = torch_can_run
    """Whether this machine can run a saved engine of this backend on the manifest's device (``cuda``);
    when not, ``load_engine`` without a device falls back to cpu with a warning."""
    check: Callable[[BuildConfig, torch.device], None] | None = None
    """Backend-specific refusals of a build config on its resolved device (raise UnsupportedError)."""
    in_memory: Callable[[Component, torch.device, BuildConfig], Engine] | None = None
    """An engine running a component directly, for components that cannot be rebuilt from saved files
    (custom ``nn.Module`` s without a source recipe); such engines are never cached. None: unsupported."""
    unavailable: Callable[[], str | None] | None = None
    """A one-line reason this backend cannot be used here (missing package, not in this release), or None."""

    def available(self) -> bool:
        """Whether this backend can build and load engines on this machine."""
        return self.unavailable_message() is None

    def unavailable_message(self) -> str | None:
        """Why this backend is unavailable, or None when it is available."""
        return self.unavailable() if self.unavailable is not None else None

    def require_available(self) -> None:
        """Raise :class:`UnsupportedError` with the backend's own message when it is unavailable."""
        message = self.unavailable_message()
        if message is not None:
            raise UnsupportedError(message)

    def check_precision(self, precision: str) -> None:
        """Raise :class:`UnsupportedError` when this backend cannot build ``precision``."""
        if precision not in self.precisions:
            raise UnsupportedError(f"backend {self.name!r} cannot build precision {precision!r} "
                                   f"(allowed: {', '.join(self.precisions)})")


def register_backend(spec: BackendSpec, *, replace: bool = False) -> BackendSpec:
    """Make ``spec`` available under ``spec.name``; a name already taken needs ``replace=True``.

    Returns the spec. Built-in backends call this when their module is imported.
    """
    if not isinstance(spec, BackendSpec):
        raise InvalidArgumentError("spec", type(spec).__name__, "a fastgen.engines.registry.BackendSpec")
    if not spec.name or not isinstance(spec.name, str):
        raise InvalidArgumentError("backend name", spec.name, reason="must be a non-empty string")
    with _LOCK:
        current = _REGISTRY.get(spec.name)
        if current is not None and current is not spec and not replace:
            raise InvalidArgumentError("backend", spec.name, reason="already registered (pass replace=True)")
        _REGISTRY[spec.name] = spec
    logger.debug("engine backend %r registered", spec.name)
    return spec


def unregister_backend(name: str) -> BackendSpec | None:
    """Remove a registered backend (tests and plugins); returns its spec, or None if it was not registered.

    A built-in backend removed this way registers again (from its module's ``SPEC``) on its next lookup.
    """
    with _LOCK:
        return _REGISTRY.pop(name, None)


def backend_names() -> tuple[str, ...]:
    """Names of every backend: the built-in ones, then those registered at run time (nothing is imported)."""
    with _LOCK:
        return tuple(dict.fromkeys([*_BUILTIN_MODULES, *_REGISTRY]))


def check_backend(name: Any, argument: str = "backend") -> str:
    """``name`` if it names a backend; else InvalidArgumentError naming ``argument`` and the backends."""
    if not isinstance(name, str) or name not in backend_names():
        raise InvalidArgumentError(argument, name, backend_names())
    return name


def get_backend(name: Any, argument: str = "backend") -> BackendSpec:
    """The spec of backend ``name`` (its module imported on first use); unknown names raise
    :class:`InvalidArgumentError` naming ``argument`` and the registered backends."""
    check_backend(name, argument)
    with _LOCK:
        spec = _REGISTRY.get(name)
        if spec is None:
            module = importlib.import_module(_BUILTIN_MODULES[name])
            # Registered on import; again from the module's SPEC if it was unregistered since.
            spec = _REGISTRY.get(name) or register_backend(module.SPEC)
    return spec


def backends() -> list[BackendSpec]:
    """Every backend's spec, built-in modules imported (for listings and checks across backends)."""
    return [get_backend(name) for name in backend_names()]


__all__ = ["BUILTIN_BACKENDS", "BackendSpec", "backend_names", "backends", "check_backend", "get_backend",
           "register_backend", "resolve_torch_device", "torch_can_run", "unregister_backend"]
