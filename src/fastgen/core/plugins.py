"""A tiny registry that lets a lower layer use what a higher one provides, without importing it.

The composition root (``fastgen/__init__.py``) registers targets as ``"module:function"`` strings;
a lower layer asks for a group's entries and loads them when it needs them. Registering imports
nothing, so ``import fastgen`` stays cheap; loading imports only ``fastgen.`` modules.

Groups in use:

- ``calibration``: ``source(component) -> forward loop | None``, asked in registration order by
  :func:`fastgen.quant.components.default_calibration` for a component's default calibration
  (None: not a component this source knows).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from fastgen.errors import InvalidArgumentError

#: group -> {name: "module:function"}, in registration order.
_REGISTRY: dict[str, dict[str, str]] = {}

#: What a target's module name must start with: plugins are parts of fastgen, not arbitrary code.
ALLOWED_PREFIX = "fastgen."


def _check_target(target: str) -> tuple[str, str]:
    module, sep, attr = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not sep or not module or not attr or not module.startswith(ALLOWED_PREFIX):
        raise InvalidArgumentError("target", target, reason=f"'module:function' with a module under "
                                   f"{ALLOWED_PREFIX.rstrip('.')}")
    return module, attr


def register(group: str, name: str, target: str) -> None:
    """Register ``target`` (``"fastgen.module:function"``) as ``name`` in ``group`` (replacing the
    entry of that name). Nothing is imported until :func:`load`."""
    if not isinstance(group, str) or not group:
        raise InvalidArgumentError("group", group, reason="a non-empty string")
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError("name", name, reason="a non-empty string")
    _check_target(target)
    _REGISTRY.setdefault(group, {})[name] = target


def unregister(group: str, name: str) -> None:
    """Remove ``name`` from ``group`` (nothing happens when it is not there)."""
    _REGISTRY.get(group, {}).pop(name, None)


def entries(group: str) -> dict[str, str]:
    """``{name: target}`` of ``group`` in registration order (a copy; empty for an unknown group)."""
    return dict(_REGISTRY.get(group, {}))


def load(target: str) -> Callable[..., Any]:
    """The callable that ``target`` (``"fastgen.module:function"``) names, its module imported."""
    module, attr = _check_target(target)
    try:
        value = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise InvalidArgumentError("target", target, reason=f"cannot be loaded: {exc}") from None
    if not callable(value):
        raise InvalidArgumentError("target", target, reason="does not name a callable")
    return value


__all__ = ["ALLOWED_PREFIX", "entries", "load", "register", "unregister"]
