"""Export configuration (one frozen dataclass; CLI flags are generated from it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fastgen.core.config import ConfigMixin
from fastgen.errors import InvalidArgumentError

MIN_OPSET = 17
DYNAMO_MIN_OPSET = 18
MAX_OPSET = 23


@dataclass(frozen=True)
class ExportConfig(ConfigMixin):
    """How a PyTorch component becomes an ONNX graph, and how the result is checked."""

    exporter: Literal["torchscript", "dynamo"] = "torchscript"
    """ONNX exporter: the TorchScript tracer (robust on diffusers models) or torch.export + onnxscript."""
    opset: int | None = None
    """ONNX opset version; None picks the exporter's lowest: 17 for torchscript, 18 for dynamo (which needs 18+)."""
    cleanup: Literal["none", "onnxslim"] = "onnxslim"
    """Graph clean-up after export: constant folding, shape inference and dead-node removal via onnxslim."""
    verify: Literal["none", "opt", "profile"] = "profile"
    """Compare ONNX Runtime against PyTorch on fresh random inputs: not at all, at the opt shape, or at min, opt and max."""
    tolerance: float = 1e-3
    """Largest allowed max-abs error relative to the largest reference magnitude, per output."""
    min_cosine: float = 0.9999
    """Smallest allowed cosine similarity between ONNX Runtime and PyTorch outputs."""
    external_data: Literal["auto", "always", "never"] = "auto"
    """Store weights beside the graph (model.onnx.data): when over 2 GB (auto), always, or never."""
    seed: int = 0
    """Seed of the random verification inputs."""

    def __post_init__(self) -> None:
        self.validate_literals()
        low = DYNAMO_MIN_OPSET if self.exporter == "dynamo" else MIN_OPSET
        if self.opset is not None and not low <= self.opset <= MAX_OPSET:
            raise InvalidArgumentError("opset", self.opset, f"{low} to {MAX_OPSET} with the {self.exporter} exporter")
        if not 0 < self.tolerance < 1:
            raise InvalidArgumentError("tolerance", self.tolerance, "0 < tolerance < 1")
        if not 0 < self.min_cosine <= 1:
            raise InvalidArgumentError("min-cosine", self.min_cosine, "0 < min-cosine <= 1")

    @property
    def resolved_opset(self) -> int:
        if self.opset is not None:
            return self.opset
        return DYNAMO_MIN_OPSET if self.exporter == "dynamo" else MIN_OPSET

    def artifact_dict(self) -> dict:
        """The fields that change the exported file (verification settings do not)."""
        return {"exporter": self.exporter, "opset": self.resolved_opset, "cleanup": self.cleanup,
                "external_data": self.external_data}
