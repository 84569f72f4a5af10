"""Any way of naming a model component (preset, local path, module, Component) to a :class:`Component`."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastgen.models.component import Component
from fastgen.models.spec import ShapeProfile


def resolve_component(model: Any, component: str | None, profile: ShapeProfile | str | None) -> Component:
    """A Component from a preset name, a local path, a module or a Component (``profile``: overrides)."""
    if isinstance(model, Component):
        return dataclasses.replace(model, spec=model.spec.with_profile(profile)) if profile else model
    from fastgen.models.loading import load_component

    return load_component(model, component, profile=profile)


__all__ = ["resolve_component"]
