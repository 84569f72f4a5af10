"""A loaded model component: the module to export or run, with its export spec and provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fastgen.models.metadata import ComponentMetadata, metadata_class
from fastgen.models.spec import ExportSpec


@dataclass
class Component:
    """One exportable piece of a model (a UNet, a VAE decoder, a text encoder, a classifier...).

    ``module`` is a wrapper whose ``forward`` takes the spec's inputs positionally, in order, and
    returns a tuple of the spec's outputs, in order: exactly what the ONNX exporter traces and what
    the torch engine runs.
    """

    name: str
    """Component kind (``unet``, ``vae-decoder``, ``vae-encoder``, ``text-encoder``, ``text-encoder-2``,
    ``classifier``, ``text-classifier``)."""
    module: torch.nn.Module
    """Wrapper with positional tensor inputs and a tuple of tensor outputs, in eval mode."""
    spec: ExportSpec
    """Inputs, outputs and shape profile."""
    model: torch.nn.Module
    """The underlying library model (diffusers / transformers / user module) the wrapper calls."""
    source: dict[str, Any] = field(default_factory=dict)
    """JSON recipe to rebuild ``model`` without pickle: ``{"library": "diffusers"|"transformers",
    "class": ..., "config": {...}, "adapter": {...}}``; empty when the model cannot be rebuilt
    (a custom ``nn.Module``)."""
    origin: str = ""
    """Human-readable origin: preset name, local path, or ``<module ClassName>``."""
    tokenizer: Any = None
    """The text component's tokenizer (a transformers tokenizer), when the model has one."""
    metadata: ComponentMetadata | None = None
    """Typed metadata pipelines need (scheduler config, VAE scaling, labels...): see ``models.metadata``;
    filled by ``models.assets`` on loading. None (the default) becomes the empty metadata of ``name``'s kind."""

    def __post_init__(self) -> None:
        if self.metadata is None:
            self.metadata = metadata_class(self.name)()

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the PyTorch module on named inputs and return named outputs (the export oracle)."""
        with torch.inference_mode():
            outs = self.module(*(inputs[n] for n in self.spec.input_names))
        return dict(zip(self.spec.output_names, outs))
