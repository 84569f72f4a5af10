"""Lazy package attributes (PEP 562), so importing fastgen packages stays cheap."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``names[attr]`` (a module path) on first access."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__


class _CallableModule(types.ModuleType):
    """A module that, called, calls its verb: ``fastgen.export`` is both a package and a function."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["__verb__"]()(*args, **kwargs)


def callable_module(module_name: str, verb: Callable[[], Callable[..., Any]]) -> None:
    """Make module ``module_name`` callable as ``verb()(...)``.

    Importing a submodule sets it as an attribute of its package, shadowing a lazily exported function
    of the same name (``fastgen.export`` the package vs the verb; ``fastgen.ops.attention`` the module
    vs the op). Making the module itself callable keeps ``fastgen.export(...)`` working either way.
    """
    module = sys.modules[module_name]
    module.__verb__ = verb
    module.__class__ = _CallableModule
