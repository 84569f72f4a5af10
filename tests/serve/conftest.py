"""Fixtures for the HTTP tests: tiny-preset models built once per session, and live uvicorn servers on
loopback (a free port each), started in a thread and stopped by the fixtures. Tests talk to them
over real HTTP with httpx. Helpers (``LiveServer``, ``wait_for``, ``sse_events``...) are in
``serve_helpers.py``, importable as a top-level module (this folder is put on ``sys.path`` here, as
the suite runs with ``--import-mode=importlib``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from fastgen.engines.config import BuildConfig  # noqa: E402
from fastgen.export.config import ExportConfig  # noqa: E402

FAST_BUILD = BuildConfig(export=ExportConfig(verify="opt"))
_MODELS: dict = {}


@pytest.fixture(scope="session")
def tiny_models():
    """The tiny preset's generator, image and text classifiers (torch engines, CPU), built once."""
    if not _MODELS:
        from fastgen.pipelines.generator import Generator
        from fastgen.pipelines.scorer import Scorer

        _MODELS["generator"] = Generator.from_pretrained("tiny", backend="torch", device="cpu",
                                                         build_config=FAST_BUILD)
        _MODELS["image"] = Scorer.from_pretrained("tiny", "classifier", backend="torch", device="cpu")
        _MODELS["text"] = Scorer.from_pretrained("tiny", "text-classifier", backend="torch", device="cpu")
    return dict(_MODELS)


@pytest.fixture(scope="module")
def live_server():
    """``live_server(app)``: start ``app`` on a free loopback port; every server stops at module end."""
    from serve_helpers import LiveServer

    servers: list[LiveServer] = []

    def start(app) -> LiveServer:
        server = LiveServer(app).start()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        server.stop()


