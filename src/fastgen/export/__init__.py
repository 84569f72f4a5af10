"""torch -> ONNX export with built-in verification against PyTorch."""

from fastgen.core.lazy import callable_module, lazy_getattr
from fastgen.export.config import ExportConfig

# export / export_into / ExportResult need torch and onnx: imported on first use.
_LAZY = {"ExportResult": "fastgen.export.api", "export": "fastgen.export.api", "export_into": "fastgen.export.api"}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = ["ExportConfig", "ExportResult", "export", "export_into"]


def _verb():
    from fastgen.export.api import export

    return export


callable_module(__name__, _verb)  # `fastgen.export(...)` works even once this package is imported
