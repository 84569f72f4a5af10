"""LoRA on torch engines: fused into the module's weights in place (same storage).

``param.copy_(base + delta)`` keeps every tensor where it was, so a ``torch.compile``d module (its
graph reads the parameters) and captured CUDA graphs (their kernels read those addresses) stay valid:
a swap never recompiles or recaptures. The base weight of each adapted module is kept (a copy of the
adapted modules only) and restored exactly on unfuse, rather than subtracting the delta back, so
swapping many times leaves no drift, at fp16 too.
"""

from __future__ import annotations

import logging

import torch

from fastgen.errors import UnsupportedError
from fastgen.lora.targets import Terms, fuse

logger = logging.getLogger(__name__)

#: Module types whose ``weight`` a LoRA updates (Linear, and Conv2d for kohya's conv/LoCon layers).
ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)


class TorchTarget:
    """The adaptable Linear/Conv2d weights of a PyTorch model (``engine.torch_modules()``'s model)."""

    backend = "torch"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._layers = {name: m for name, m in model.named_modules() if isinstance(m, ADAPTABLE)}
        self._base: dict[str, torch.Tensor] = {}  # module path -> a copy of its weight before any LoRA
        self._applied: set[str] = set()

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(m.weight.shape) for name, m in self._layers.items()}

    def prepare(self, modules: set[str]) -> None:
        for name in modules:
            weight = self._layers[name].weight
            if not isinstance(weight, torch.nn.Parameter) or not weight.is_floating_point():
                raise UnsupportedError(f"LoRA on {name}: its weight is not a float parameter (a quantized layer?); "
                                       "apply LoRA before quantizing")

    @torch.no_grad()
    def apply(self, terms: Terms) -> None:
        for name in sorted(self._applied | set(terms)):
            weight = self._layers[name].weight
            base = self._base.get(name)
            if base is None:
                base = self._base[name] = weight.detach().clone()
            if name not in terms:
                weight.copy_(base)
            elif weight.dtype == torch.float32:
                fuse(base, terms[name], out=weight)  # one pass, into the parameter's own storage
            else:
                # Summed in float32, rounded once to the weight's dtype: what fusing at fp16 can give.
                weight.copy_(fuse(base.float(), terms[name]))
        self._applied = set(terms)
        # The base copies stay while adapters are loaded (also when none is applied): a swap back from
        # the base weights would otherwise copy every adapted weight again first.
        logger.debug("torch LoRA: %d weights fused", len(terms))

    def release(self) -> None:
        """Drop the base copies once nothing is applied (the manager: no adapter loaded any more)."""
        if not self._applied:
            self._base.clear()


__all__ = ["ADAPTABLE", "TorchTarget"]
