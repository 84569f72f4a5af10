"""Packaging guards: importing fastgen has no global side effects, and a wheel built without the C++
extension still carries every package (pyproject.toml lists them explicitly, and fastgen.kernels
comes from the top-level kernels/ folder)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # tests/ops/test_packaging.py -> repository root

_IMPORT_CHECK = """
import sys
import torch
threads = torch.get_num_threads()
import fastgen
import fastgen.ops
from fastgen.ops import _ext
assert "fastgen._C" not in sys.modules, "the extension was imported eagerly"
assert not torch.cuda.is_initialized(), "importing fastgen initialised CUDA"
assert torch.get_num_threads() == threads, "importing fastgen changed torch's thread count"
out = fastgen.ops.to_uint8_nhwc(torch.zeros(1, 3, 2, 2))  # first use loads the extension if built
assert out.shape == (1, 2, 2, 3)
assert not torch.cuda.is_initialized(), "running an op initialised CUDA"
assert torch.get_num_threads() == threads, "running an op changed torch's thread count"
print("ok", _ext.available())
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTGEN_")}
    env.update(extra)
    return env


def test_import_has_no_side_effects():
    proc = subprocess.run([sys.executable, "-c", _IMPORT_CHECK], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")


def test_import_fastgen_does_not_import_torch():
    code = "import sys, fastgen; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr


def _copy_tree(dst: Path) -> None:
    """The repository as a fresh checkout would have it: no build outputs, caches or built .so files
    (a stale build/lib would otherwise leak an extension into a FASTGEN_BUILD_EXT=0 wheel)."""
    top_skip = {".git", "build", "dist", ".venv", "out", "fastgen-out", ".whl", ".benchmarks"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n in ("__pycache__", ".pytest_cache", ".ruff_cache")
                or n.endswith((".egg-info", ".so", ".pyd", ".pyc"))}
        if Path(folder).resolve() == ROOT:
            skip |= top_skip & set(names)
        return skip

    shutil.copytree(ROOT, dst, ignore=ignore)


def _packages(folder: Path, prefix: str) -> list[str]:
    """Dotted names of every folder under ``folder`` (itself included) that has an __init__.py."""
    found = []
    for init in sorted(folder.rglob("__init__.py")):
        rel = init.parent.relative_to(folder)
        found.append(".".join([prefix, *rel.parts]))
    return found


def _no_isolation_build_problem() -> str | None:
    """Why ``pip wheel --no-build-isolation`` cannot work here (a fresh Python 3.11 venv has
    setuptools 65 and no ``wheel``), else None."""
    try:
        import setuptools
    except ImportError:
        return "setuptools is not installed"
    version = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
    if version < (69, 0):
        return f"setuptools {setuptools.__version__} is older than pyproject.toml's build requirement (>=69)"
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:
        return f"setuptools {setuptools.__version__} needs the 'wheel' package to build wheels"
    return None


@pytest.mark.skipif(_no_isolation_build_problem() is not None,
                    reason=f"--no-build-isolation wheel build: {_no_isolation_build_problem()}")
def test_wheel_without_extension_has_every_package(tmp_path):
    src = tmp_path / "src-tree"
    _copy_tree(src)
    wheels = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
        capture_output=True, text=True, env=_env(FASTGEN_BUILD_EXT="0", PIP_NO_INDEX="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (wheel,) = wheels.glob("fastgen-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    assert "fastgen/kernels/__init__.py" in names
    # pyproject's package-data: the shipped launch-config tables (none committed yet) and their README.
    assert "fastgen/kernels/configs/README.md" in names
    shipped = {f"fastgen/kernels/configs/{p.name}" for p in (ROOT / "kernels" / "configs").glob("*.json")}
    assert shipped <= names, shipped - names
    assert "fastgen/models/spec.py" in names
    assert not any(n.startswith("fastgen/_C") for n in names), "FASTGEN_BUILD_EXT=0 still built the extension"

    expected = _packages(ROOT / "src" / "fastgen", "fastgen") + _packages(ROOT / "kernels", "fastgen.kernels")
    missing = [p for p in expected if f"{p.replace('.', '/')}/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel (add them to pyproject.toml): {missing}"
    # Every module of every package travels too.
    for folder, prefix in ((ROOT / "src" / "fastgen", "fastgen"), (ROOT / "kernels", "fastgen/kernels")):
        for py in folder.rglob("*.py"):
            if (py.parent / "__init__.py").exists() and "__pycache__" not in py.parts:
                assert f"{prefix}/{py.relative_to(folder).as_posix()}" in names, py


def test_verbs_stay_callable_after_their_modules_are_imported():
    """Importing ``fastgen.export`` (a package) or ``fastgen.ops.attention`` (a module) sets the module as
    the package attribute of the same name; the verbs must still be callable."""
    code = """
import torch
import fastgen.export.config, fastgen.ops.attention
import fastgen, fastgen.ops
from fastgen.export.api import export
q = torch.randn(1, 3, 2, 8)
assert torch.equal(fastgen.ops.attention(q, q, q, backend="reference"),
                   fastgen.ops.attention.attention(q, q, q, backend="reference"))
assert callable(fastgen.export) and fastgen.export.__verb__() is export
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
