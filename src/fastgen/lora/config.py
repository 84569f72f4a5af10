"""The active adapters and their scales (a frozen dataclass), and the CLI's ``PATH[:SCALE]`` form."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastgen.errors import InvalidArgumentError


@dataclass(frozen=True)
class AdapterSelection:
    """Which loaded adapters are applied, each at its scale (diffusers' ``set_adapters(names, adapter_weights)``)."""

    names: tuple[str, ...] = ()
    """Names of loaded adapters, each at most once; empty: none (the base weights)."""
    weights: tuple[float, ...] = ()
    """One finite scale per name (the LoRA's ``alpha / rank`` scaling is applied on top)."""

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.names):
            raise InvalidArgumentError("weights", list(self.weights), f"a list of {len(self.names)} numbers, one per "
                                       "adapter name")
        for i, name in enumerate(self.names):
            if not isinstance(name, str) or not name:
                raise InvalidArgumentError(f"names[{i}]", name, "names of loaded adapters")
        if len(set(self.names)) != len(self.names):
            dup = next(n for n in self.names if self.names.count(n) > 1)
            raise InvalidArgumentError("names", dup, reason="an adapter is named twice")
        for i, w in enumerate(self.weights):
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
                raise InvalidArgumentError(f"weights[{i}]", w, "finite numbers")

    @classmethod
    def of(cls, names: str | Sequence[str] | None, weights: float | Sequence[float] | None = None) -> AdapterSelection:
        """From ``set_adapters``' arguments: a name or a list of names; weights as one number for all,
        a list (one per name), or None (1.0 each)."""
        if names is None:
            names = ()
        if isinstance(names, str):
            names = (names,)
        if not isinstance(names, Sequence):
            raise InvalidArgumentError("names", type(names).__name__, "a name or a list of adapter names")
        names = tuple(names)
        if weights is None:
            weights = (1.0,) * len(names)
        elif isinstance(weights, numbers.Real) and not isinstance(weights, bool):
            weights = (float(weights),) * len(names)
        elif isinstance(weights, Sequence) and not isinstance(weights, str):
            weights = tuple(weights)
        else:
            raise InvalidArgumentError("weights", weights, "a number or a list of numbers")
        return cls(names, tuple(weights))  # type: ignore[arg-type]

    def scale_of(self, name: str) -> float:
        return self.weights[self.names.index(name)] if name in self.names else 0.0


def parse_lora_arg(text: Any) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); the scale defaults to 1. A trailing ``:<number>`` is the scale,
    so paths with colons work unless they end in one."""
    if not isinstance(text, str) or not text:
        raise InvalidArgumentError("lora", text, "PATH or PATH:SCALE")
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(scale):
            raise InvalidArgumentError("lora", text, "PATH or PATH:SCALE with a finite SCALE")
        return path, scale
    return text, 1.0


__all__ = ["AdapterSelection", "parse_lora_arg"]
