"""HTTP serving: ``fastgen serve`` (FastAPI on uvicorn) over one :class:`fastgen.Runtime`.

``create_app(ServeConfig(model="tiny", scorers=("tiny",)))`` is the app; :class:`Service` holds its
models and runtime; :func:`fastgen.serve.server.run` serves it until SIGTERM, draining what was
accepted. Importing this package imports neither fastapi nor uvicorn (the ``serve`` extra): the
names below load on first use. See docs/serving.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastgen.core.lazy import lazy_getattr

_LAZY = {
    "ServeConfig": "fastgen.serve.config",
    "Service": "fastgen.serve.service",
    "GenerationParams": "fastgen.serve.generation",
    "ImageScorerClient": "fastgen.serve.service",
    "create_app": "fastgen.serve.app",
}

__all__ = list(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from fastgen.serve.app import create_app
    from fastgen.serve.config import ServeConfig
    from fastgen.serve.generation import GenerationParams
    from fastgen.serve.service import ImageScorerClient, Service
