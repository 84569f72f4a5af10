"""The backend's TensorRT names against NVIDIA's real bindings of TensorRT 10 and 11.

Statically: every ``trt.<Name>[.<Member>]`` the backend's source mentions exists in both versions
(classes, enum members, nested classes). Dynamically, conftest.py checks every call the logic tests
record against both versions' pybind11 signatures.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import MAJORS, require_api

SOURCES = sorted((Path(__file__).resolve().parents[3] / "src" / "fastgen" / "engines").glob("t*.py"))
BACKEND = [p for p in SOURCES if p.name.startswith(("trt_", "tensorrt_"))]


def trt_chains(path: Path) -> set[tuple[str, ...]]:
    """Attribute chains rooted at a name ``trt`` (``trt.BuilderFlag.REFIT`` -> ("BuilderFlag", "REFIT"))."""
    chains = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        parts = []
        cur: ast.AST = node
        while isinstance(cur, ast.Attribute):
            parts.append(cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name) and cur.id == "trt":
            chains.add(tuple(reversed(parts)))
    # keep only maximal chains (trt.A.B implies trt.A)
    return {c for c in chains if not any(len(o) > len(c) and o[:len(c)] == c for o in chains)}


def missing(api: dict, chain: tuple[str, ...]) -> str | None:
    head, rest = chain[0], chain[1:]
    if head == "__version__":
        return None
    if head not in api["classes"]:
        return None if head in api["functions"] or head in api["values"] else f"trt.{head}"
    qualname = head
    for member in rest:
        entry = api["classes"][qualname]
        nested = f"{qualname}.{member}"
        if nested in api["classes"]:
            qualname = nested
            continue
        if member in entry["methods"] or member in entry["properties"] or member in (entry["members"] or {}):
            return None
        return f"trt.{'.'.join(chain)}"
    return None


def test_the_backend_sources_are_found():
    assert {p.name for p in BACKEND} >= {"trt_build.py", "trt_engine.py", "trt_lib.py", "tensorrt_backend.py"}


@pytest.mark.parametrize("major", MAJORS)
def test_every_trt_name_in_the_backend_exists_in_the_real_bindings(major):
    api = require_api(major)
    used = set().union(*(trt_chains(p) for p in BACKEND))
    assert ("BuilderFlag", "REFIT") in used and ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED") in used
    problems = sorted(filter(None, (missing(api, c) for c in used)))
    assert not problems, f"not in TensorRT {api['version']}: {problems}"


@pytest.mark.parametrize("major", MAJORS)
def test_a_misspelled_name_is_caught(major):
    api = require_api(major)
    assert missing(api, ("BuilderFlag", "REFITT")) == "trt.BuilderFlag.REFITT"
    assert missing(api, ("OnnxParserr",)) == "trt.OnnxParserr"


def test_the_flags_tensorrt_11_removed_are_not_used():
    # TensorRT 11 dropped the precision builder flags: precision comes from the strongly typed graph.
    api10, api11 = require_api(10), require_api(11)
    removed = set(api10["classes"]["BuilderFlag"]["members"]) - set(api11["classes"]["BuilderFlag"]["members"])
    assert {"FP16", "INT8", "FP8", "BF16"} <= removed
    used = set().union(*(trt_chains(p) for p in BACKEND))
    assert not {c for c in used if c[0] == "BuilderFlag" and c[-1] in removed}


def test_the_stub_loaded_bindings_refuse_to_build():
    # The real module imports over the stubs; its factories return NULL, so no Builder can be made.
    for major in MAJORS:
        assert require_api(major)["builder"].startswith("TypeError")
