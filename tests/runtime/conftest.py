"""Fixtures for the runtime tests: tiny-preset engines built once per session, a thread-leak check."""

from __future__ import annotations

import threading

import pytest

from fastgen.engines.config import BuildConfig
from fastgen.export.config import ExportConfig

FAST_BUILD = BuildConfig(export=ExportConfig(verify="opt"))
_CACHE: dict = {}


def _once(key, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


@pytest.fixture(scope="session")
def tiny_generator():
    """``tiny_generator(backend="torch")``: a tiny-preset Generator (engines cached for the session)."""
    from fastgen.pipelines.generator import Generator

    def get(backend: str = "torch"):
        return _once(("gen", backend), lambda: Generator.from_pretrained(
            "tiny", backend=backend, device="cpu", build_config=FAST_BUILD))

    return get


@pytest.fixture(scope="session")
def tiny_scorer():
    """``tiny_scorer(kind, backend="torch")``: the tiny text or image classifier as a Scorer."""
    from fastgen.pipelines.scorer import Scorer

    def get(kind: str, backend: str = "torch"):
        component = "text-classifier" if kind == "text" else "classifier"
        return _once(("scorer", kind, backend), lambda: Scorer.from_pretrained(
            "tiny", component, backend=backend, device="cpu"))

    return get


@pytest.fixture
def no_leaked_threads():
    """Fails the test if it leaves a thread behind (the runtime must join its device thread)."""
    before = set(threading.enumerate())
    yield
    # No grace period: shutdown() itself must have joined the device thread.
    extra = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not extra, f"threads left running: {extra}"
