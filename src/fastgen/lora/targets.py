"""LoRA module keys to a target's weights, and the fused weight update of several scaled adapters.

A *target* is one engine's set of adaptable weights, whatever the backend: it names its modules
(diffusers' / transformers' dotted module paths, no wrapper prefix) with their weight shapes in
PyTorch's layout, (out, in) or (out, in, kh, kw). Backends lay weights out differently (an ONNX MatMul
holds the transpose); each target converts the deltas computed here in that common layout.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from fastgen.errors import InvalidArgumentError
from fastgen.lora.formats import LoraAdapter, LoraLayer

logger = logging.getLogger(__name__)


#: module path -> [(layer, adapter scale)]: what is added to that module's base weight.
Terms = dict[str, list[tuple[LoraLayer, float]]]


class Target(Protocol):
    """What the adapter manager needs of a backend's weights (see the module docstring)."""

    def weight_shapes(self) -> Mapping[str, tuple[int, ...]]:
        """module path -> weight shape in PyTorch's layout, for every module a LoRA may adapt."""
        ...

    def prepare(self, modules: set[str]) -> None:
        """Get ready to change these modules' weights (once per new set, at load time, not per swap)."""
        ...

    def apply(self, terms: Terms) -> None:
        """Weights become base + the terms (:func:`fuse`) for the modules in ``terms``, base for
        every other one."""
        ...


def resolve_keys(adapter: LoraAdapter, component: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """{adapter module key: target module path} for ``component``'s layers of ``adapter``.

    Dotted keys must name a module exactly (``text_model.`` may be added or left out); kohya keys (underscore-joined) are matched against the
    target's paths with dots replaced by underscores (unambiguous for diffusers' and transformers'
    Stable Diffusion models). A key with no module, or with a rank-1 factor that does not fit the
    module's weight shape, fails naming both.
    """
    layers = adapter.layers.get(component, {})
    known = {path.replace(".", "_"): path for path in shapes} if adapter.kohya else {p: p for p in shapes}
    sep = "_" if adapter.kohya else "."
    out: dict[str, str] = {}
    for key, layer in layers.items():
        # transformers 5 flattened CLIPTextModel (``encoder.layers...``); files made against 4.x say
        # ``text_model.encoder.layers...``: either spelling finds the module.
        path = known.get(key) or known.get(key.removeprefix(f"text_model{sep}")) or known.get(f"text_model{sep}{key}")
        if path is None:
            near = sorted(shapes)[:3]
            raise InvalidArgumentError("lora", adapter.path or adapter.name,
                                       reason=f"{component} has no adaptable module {key!r} (e.g. {', '.join(near)})")
        shape = tuple(shapes[path])
        want = (layer.up.shape[0], *layer.down.shape[1:])
        if tuple(want) != shape:
            raise InvalidArgumentError("lora", adapter.path or adapter.name,
                                       reason=f"{component} module {path} has weight {shape}, the LoRA makes {want}")
        out[key] = path
    return out


def fused_terms(adapters: Sequence[LoraAdapter], weights: Sequence[float], component: str,
                shapes: Mapping[str, tuple[int, ...]]) -> Terms:
    """The layers of ``adapters`` for ``component`` by target module, each with its adapter's weight
    (adapters at weight 0 contribute nothing)."""
    terms: Terms = {}
    for adapter, weight in zip(adapters, weights, strict=True):
        if weight == 0 or component not in adapter.layers:
            continue
        for key, path in resolve_keys(adapter, component, shapes).items():
            terms.setdefault(path, []).append((adapter.layers[component][key], float(weight)))
    return terms


def fuse(base: torch.Tensor, terms: Sequence[tuple[LoraLayer, float]], *, out: torch.Tensor | None = None,
         transposed: bool = False) -> torch.Tensor:
    """``base + sum scale * (alpha / rank) * up @ down`` in one pass over the weight (``addmm`` with
    ``base`` as its input, then ``addmm_`` per further layer; no dense delta is made), written into
    ``out`` (same shape as ``base``, e.g. the parameter itself: its storage is kept) or a new tensor.
    ``base``: the weight in PyTorch's layout (out, in[, kh, kw]), or with ``transposed`` a 2-D (in, out)
    weight (an ONNX MatMul's)."""
    if not terms:
        return base.clone() if out is None else out.copy_(base)
    rows = base.shape[0]
    result = None
    for layer, scale in terms:
        up = layer.up.flatten(1).to(base.dtype)  # (out, rank)
        down = layer.down.flatten(1).to(base.dtype)  # (rank, in * kh * kw)
        m1, m2 = (down.t(), up.t()) if transposed else (up, down)  # (in, rank) @ (rank, out) for a MatMul's
        alpha = scale * layer.alpha / layer.rank
        if result is None:
            flat = base.view(rows, -1)
            if out is None:
                result = torch.addmm(flat, m1, m2, alpha=alpha)
            else:
                result = torch.addmm(flat, m1, m2, alpha=alpha, out=out.view(rows, -1))
        else:
            result.addmm_(m1, m2, alpha=alpha)
    return result.view(base.shape) if out is None else out


def fused_deltas(adapters: Sequence[LoraAdapter], weights: Sequence[float], component: str,
                 shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """module path -> ``sum_i weights[i] * (alpha_i / rank_i) * up_i @ down_i`` (float32, PyTorch layout),
    what diffusers' ``set_adapters(names, adapter_weights=weights)`` adds layer by layer."""
    return {path: fuse(torch.zeros(shapes[path]), t)
            for path, t in fused_terms(adapters, weights, component, shapes).items()}


__all__ = ["Target", "Terms", "fuse", "fused_deltas", "fused_terms", "resolve_keys"]
