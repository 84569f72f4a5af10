"""The engine interface: named tensors in, named tensors out, whatever the backend."""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastgen.errors import CacheCorruptionError, InvalidArgumentError
from fastgen.models.metadata import (
    ComponentMetadata,
    metadata_class,
    metadata_from_dict,
    metadata_from_manifest,
)
from fastgen.models.spec import ExportSpec, parse_dim

logger = logging.getLogger(__name__)

PRECISION_FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Engine(abc.ABC):
    """A runnable component.

    ``run`` takes a mapping of input name to tensor (torch or numpy) and returns a dict of output
    name to ``torch.Tensor`` on the engine's device. Float inputs are cast to the engine's float
    dtype; everything else must match the spec.
    """

    #: Backend name: ``torch``, ``onnxruntime`` or ``tensorrt``.
    backend: str = ""
    #: Whether inputs outside the profile's min/max must be refused (TensorRT) or merely run.
    strict_profile: bool = False

    def __init__(self, spec: ExportSpec, *, device: torch.device | str = "cpu", precision: str = "fp32",
                 manifest: Mapping[str, Any] | None = None, path: Path | None = None) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.precision = precision
        self.manifest = dict(manifest or {})
        self.path = path
        self._tokenizer: Any = None
        self._metadata = self._manifest_metadata()  # parsed now: a bad manifest fails at loading

    def _manifest_metadata(self) -> ComponentMetadata:
        try:
            if "metadata" in self.manifest:
                return metadata_from_manifest(self.spec.component, self.manifest["metadata"])
            # a format-1 manifest handed over without read_manifest's conversion, or none (a bare graph)
            return metadata_from_dict(self.spec.component, self.manifest.get("extras"))
        except InvalidArgumentError as exc:
            where = self.path if self.path is not None else "engine manifest"
            raise CacheCorruptionError(f"{where}: bad component metadata ({exc}); rebuild the engine "
                                       "(fastgen build ... --out DIR)") from exc

    @property
    def metadata(self) -> ComponentMetadata:
        """Typed pipeline metadata of the component (scheduler config, VAE scaling, labels...) from the
        manifest or :meth:`attach`; the empty metadata of the component's kind when there is none."""
        return self._metadata

    @property
    def tokenizer(self) -> Any:
        """The tokenizer saved with a text engine (``tokenizer/`` in its directory), or None."""
        if self._tokenizer is None and self.path is not None and (Path(self.path) / "tokenizer").is_dir():
            from fastgen.models.tokenizers import load_tokenizer

            self._tokenizer = load_tokenizer(Path(self.path) / "tokenizer")
        return self._tokenizer

    def attach(self, *, tokenizer: Any = None, metadata: ComponentMetadata | None = None) -> Engine:
        """Give an in-memory engine its component's tokenizer and metadata (None: the empty metadata
        of the engine's component kind)."""
        self._tokenizer = tokenizer
        self._metadata = metadata if metadata is not None else metadata_class(self.spec.component)()
        return self

    @abc.abstractmethod
    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Backend-specific execution on validated, device-placed, dtype-cast inputs."""

    def run(self, inputs: Mapping[str, Any] | None = None, /, **kwargs: Any) -> dict[str, torch.Tensor]:
        feeds = self.prepare_inputs({**(inputs or {}), **kwargs})
        return self._run(feeds)

    __call__ = run

    @property
    def float_dtype(self) -> torch.dtype:
        return PRECISION_FLOAT[self.precision]

    def prepare_inputs(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Check names, ranks, static dims and symbol consistency; cast floats; move to device."""
        expected = self.spec.input_names
        missing = [n for n in expected if n not in inputs]
        extra = [n for n in inputs if n not in expected]
        if missing or extra:
            bad = (missing or extra)[0]
            raise InvalidArgumentError("input name", bad, expected,
                                       reason="missing" if missing else "not an input of this engine")
        sizes: dict[str, int] = {}
        out: dict[str, torch.Tensor] = {}
        for t in self.spec.inputs:
            value = inputs[t.name]
            tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
            if not isinstance(tensor, torch.Tensor):
                raise InvalidArgumentError(t.name, type(value).__name__, "torch.Tensor or numpy.ndarray")
            if tensor.dim() != len(t.shape):
                raise InvalidArgumentError(f"{t.name} shape", tuple(tensor.shape), f"rank {len(t.shape)}: {t.shape}")
            for axis, (entry, size) in enumerate(zip(t.shape, tensor.shape)):
                parsed = parse_dim(entry)
                if parsed is None:
                    if size != entry:
                        raise InvalidArgumentError(f"{t.name} shape", tuple(tensor.shape),
                                                   f"{t.shape} (axis {axis} is fixed at {entry})")
                    continue
                symbol, div = parsed
                root = size * div
                if sizes.setdefault(symbol, root) != root:
                    raise InvalidArgumentError(f"{t.name} shape", tuple(tensor.shape),
                                               reason=f"dim {symbol!r} is {sizes[symbol]} in another input")
            want = torch.bool if t.dtype == "bool" else getattr(torch, t.dtype)
            if want.is_floating_point:
                if not tensor.dtype.is_floating_point:
                    raise InvalidArgumentError(f"{t.name} dtype", str(tensor.dtype), "floating point")
                want = self.float_dtype
            elif tensor.dtype != want:
                if tensor.dtype.is_floating_point:
                    raise InvalidArgumentError(f"{t.name} dtype", str(tensor.dtype), t.dtype)
            out[t.name] = tensor.to(device=self.device, dtype=want)
        self.spec.check_dims(sizes)
        if self.strict_profile:
            for symbol, size in sizes.items():
                rng = self.spec.profile.dims.get(symbol)
                if rng is not None and not rng.min <= size <= rng.max:
                    raise InvalidArgumentError(symbol, size, f"{rng.min} to {rng.max} (this engine's profile)")
        return out

    def describe(self) -> dict[str, Any]:
        """What ``fastgen inspect`` shows."""
        return {
            "backend": self.backend,
            "device": str(self.device),
            "precision": self.precision,
            "component": self.spec.component,
            "model_type": self.spec.model_type,
            "inputs": [t.to_dict() for t in self.spec.inputs],
            "outputs": [t.to_dict() for t in self.spec.outputs],
            "profile": self.spec.profile.to_dict(),
            "cache_key": self.manifest.get("cache_key"),
            "built_at": self.manifest.get("built_at"),
            "build_seconds": self.manifest.get("build_seconds"),
            "path": str(self.path) if self.path else None,
            "quantization": quantization_summary(self.manifest),
        }

    def torch_modules(self) -> dict[str, torch.nn.Module]:
        """The PyTorch modules this engine runs, by component name: ``{}`` for engines that run no
        PyTorch module (onnxruntime, tensorrt); the torch engine returns ``{component: its module}``.

        What :func:`fastgen.optimize` patches in place: a change to these modules changes the engine.
        """
        return {}

    def close(self) -> None:
        """Release backend resources (sessions, graphs)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec.component} {self.backend}/{self.precision} on {self.device}>"


def root_sizes(spec: ExportSpec, inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Root symbol sizes (``height`` in pixels, not ``height/8``) read off validated inputs."""
    sizes: dict[str, int] = {}
    for t in spec.inputs:
        for entry, size in zip(t.shape, inputs[t.name].shape, strict=True):
            parsed = parse_dim(entry)
            if parsed is not None:
                sizes[parsed[0]] = size * parsed[1]
    return sizes


def quantization_summary(manifest: Mapping[str, Any]) -> str | None:
    """``"w8a8-dynamic: 48 layers"`` for an engine built from a quantized component, else None."""
    recipe = manifest.get("quantization") or {}
    if not recipe:
        return None
    named = (manifest.get("build_config") or {}).get("quantization")
    if isinstance(named, dict) or named in (None, "none"):  # a config object, or quantized beforehand
        kinds = sorted({entry["config"]["type"] for entry in recipe.values()})
        named = "+".join(kinds)
    return f"{named}: {len(recipe)} layers"
