"""Without TensorRT (every CPU machine): fastgen never imports it, and asking for it fails in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import fastgen
from fastgen.engines import trt_lib
from fastgen.engines.registry import get_backend
from fastgen.errors import UnsupportedError


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastgen.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=300)


def test_fastgen_never_imports_tensorrt():
    code = ("import sys, fastgen; from fastgen.engines.registry import backends; from fastgen.cli.main import cli; "
            "[b.available() for b in backends()]; fastgen.BuildConfig(backend='tensorrt'); fastgen.TensorRTOptions(); "
            "assert not [m for m in sys.modules if m.startswith(('tensorrt', 'tensorrt_bindings'))], 'imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(trt_lib.installed(), reason="TensorRT is installed here")
def test_backend_is_listed_but_unavailable_with_what_to_install(mlp):
    spec = get_backend("tensorrt")
    assert not spec.available() and "pip install" in spec.unavailable_message()
    with pytest.raises(UnsupportedError, match="needs NVIDIA TensorRT 10 or 11") as info:
        fastgen.build(mlp, backend="tensorrt", cache=False, out="never")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(trt_lib.installed(), reason="TensorRT is installed here")
@pytest.mark.parametrize("args", [["build", "tiny", "--component", "unet", "--backend", "tensorrt"],
                                  ["score", "--model", "tiny", "--component", "text-classifier", "--text", "a cat", "--backend", "tensorrt"]])
def test_cli_fails_in_one_line(args):
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: backend 'tensorrt' needs NVIDIA TensorRT"), proc.stderr
    assert "pip install" in lines[0]
