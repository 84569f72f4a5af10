"""torch -> ONNX export with built-in verification against PyTorch."""

from fastgen.export.api import ExportResult, export, export_into
from fastgen.export.config import ExportConfig

__all__ = ["ExportConfig", "ExportResult", "export", "export_into"]
