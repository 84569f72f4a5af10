"""Builds the optional C++ extension ``fastgen._C`` (pybind11 only, no torch C++ API).

Everything else about the package (name, version, packages, package-dir) lives in pyproject.toml;
this file only adds the extension. ``FASTGEN_BUILD_EXT=0`` skips it; otherwise a compiler error
fails the install (no silent fallback: a wheel either has the extension or was asked not to).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup


def _extensions() -> tuple[list, dict]:
    if os.environ.get("FASTGEN_BUILD_EXT", "1").strip().lower() in ("0", "false", "no", "off"):
        return [], {}
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    here = os.path.dirname(os.path.abspath(__file__))
    # setuptools wants source paths relative to the project root.
    sources = sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "*.cpp")))
    headers = sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "*.h")))
    if sys.platform == "win32":
        compile_args, link_args = ["/O2", "/fp:precise"], []
    else:
        # -ffp-contract=off: no fused multiply-add, so x*127.5+127.5 rounds twice, like PyTorch.
        # -fno-trapping-math (clang's default) changes no value, only lets GCC if-convert and so
        # vectorise the clamp loops. No -ffast-math (it would break NaN handling and the rounding
        # trick), no -march=native (wheels must run on any x86-64 / aarch64 CPU; the F16C code is
        # chosen at run time).
        compile_args = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-pthread"]
        link_args = ["-pthread"]
    ext = Pybind11Extension(
        "fastgen._C",
        sources,
        depends=headers,
        cxx_std=17,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
