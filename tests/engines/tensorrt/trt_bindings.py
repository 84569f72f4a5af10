"""NVIDIA's real TensorRT Python bindings, loaded on a CPU over stub libraries, and their API as data.

The ``tensorrt-cu12-bindings`` / ``tensorrt-cu13-bindings`` wheels hold TensorRT's whole Python API
(a pybind11 module) but need TensorRT's shared libraries to load. Only ten C symbols are resolved at
load time; stub libraries exporting them (factories returning NULL, versions) are compiled here with
the C compiler under TensorRT's sonames and loaded with ``RTLD_GLOBAL`` before the import. Every
class, method, property, enum member and pybind11 signature is then introspectable, while
constructing a ``Builder`` raises ``TypeError`` (its factory returned NULL).

Each version is loaded in its own subprocess (both wheels install the module ``tensorrt_bindings``,
and they link different sonames), which writes the API as JSON (:func:`api`).

``make install`` puts the wheels under ``.venv/tensorrt-bindings/<major>`` (``pip --target``);
``FASTGEN_TRT_BINDINGS`` names another root.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
#: TensorRT major versions checked, and the bindings wheel pinned for each (Makefile installs these).
VERSIONS = {10: "tensorrt-cu12-bindings==10.16.1.11", 11: "tensorrt-cu13-bindings==11.4.0.106"}

SYMBOLS_C = r"""
#include <stddef.h>
void* createInferBuilder_INTERNAL(void* logger, int version) { return NULL; }
void* createInferRefitter_INTERNAL(void* engine, void* logger, int version) { return NULL; }
void* createInferRuntime_INTERNAL(void* logger, int version) { return NULL; }
void* getBuilderPluginRegistry(int capability) { return NULL; }
void* getPluginRegistry(void) { return NULL; }
int initLibNvInferPlugins(void* logger, const char* ns) { return 0; }
void* createNvOnnxParser_INTERNAL(void* network, void* logger, int version) { return NULL; }
void* createNvOnnxParserRefitter_INTERNAL(void* refitter, void* logger, int version) { return NULL; }
int getNvOnnxParserVersion(void) { return TRT_VERSION; }
int getInferLibVersion(void) { return TRT_VERSION; }
"""
LIBRARIES = ("nvinfer", "nvinfer_plugin", "nvonnxparser")


def bindings_root() -> Path:
    return Path(os.environ.get("FASTGEN_TRT_BINDINGS", ROOT / ".venv" / "tensorrt-bindings"))


def bindings_dir(major: int) -> Path | None:
    """Where the bindings of TensorRT ``major`` are installed (``tensorrt_bindings/`` inside), or None."""
    path = bindings_root() / str(major)
    return path if (path / "tensorrt_bindings" / "__init__.py").is_file() else None


def build_stubs(major: int, out: Path) -> list[Path]:
    """Compile the three stub libraries of TensorRT ``major`` into ``out`` (cc, sonames ``lib*.so.<major>``)."""
    out.mkdir(parents=True, exist_ok=True)
    source = out / "trt_stub.c"
    source.write_text(SYMBOLS_C)
    libs = []
    for name in LIBRARIES:
        lib = out / f"lib{name}.so.{major}"
        if not lib.is_file():
            subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", f"-DTRT_VERSION={major * 10000}",
                            f"-Wl,-soname,{lib.name}", "-o", str(lib), str(source)], check=True)
        libs.append(lib)
    return libs


# Runs in the subprocess: load the stubs, import the bindings, write the API as JSON.
_DUMP = r"""
import ctypes, inspect, json, sys
libs, path, out = sys.argv[1].split(":"), sys.argv[2], sys.argv[3]
for lib in libs:
    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
sys.path.insert(0, path)
import tensorrt_bindings as trt

def signatures(func):
    if inspect.isfunction(func) or inspect.ismethod(func):  # Python code: its own signature
        try:
            return [func.__name__ + str(inspect.signature(func))]
        except (TypeError, ValueError):
            return []
    doc = (getattr(func, "__doc__", None) or "")
    name = getattr(func, "__name__", "")
    lines = [l.strip() for l in doc.splitlines()]
    sigs = [l.split(". ", 1)[1] if l[:1].isdigit() and ". " in l else l
            for l in lines if l.split(". ", 1)[-1].startswith(name + "(")]
    return sigs

api = {"version": trt.__version__, "classes": {}, "functions": {}, "values": {}}

def describe(obj, qualname):
    entry = {"bases": [b.__name__ for b in obj.__mro__[1:] if b is not object],
             "methods": {}, "properties": {}, "members": None}
    if hasattr(obj, "__members__"):
        entry["members"] = {k: int(v) for k, v in sorted(obj.__members__.items())}
    api["classes"][qualname] = entry
    for attr in dir(obj):
        if attr.startswith("__") and attr not in ("__init__", "__call__", "__getitem__", "__len__"):
            continue
        value = inspect.getattr_static(obj, attr, None)
        if inspect.isclass(value):  # a nested class: ILogger.Severity
            if value is not obj and f"{qualname}.{attr}" not in api["classes"]:
                describe(value, f"{qualname}.{attr}")
        elif isinstance(value, property):
            entry["properties"][attr] = {"readonly": value.fset is None}
        elif callable(value) or isinstance(value, (staticmethod, classmethod)):
            entry["methods"][attr] = signatures(getattr(obj, attr)) or ["%s(*args, **kwargs)" % attr]
        elif entry["members"] is None or attr not in entry["members"]:
            entry.setdefault("values", {})[attr] = repr(value)

for name, obj in sorted(vars(trt).items()):
    if name.startswith("_"):
        continue
    if inspect.isclass(obj):
        describe(obj, name)
    elif callable(obj):
        api["functions"][name] = signatures(obj) or ["%s(*args, **kwargs)" % name]
    elif isinstance(obj, (int, float, str)):
        api["values"][name] = obj
try:
    trt.Builder(trt.Logger())
    api["builder"] = "constructed"
except TypeError as exc:
    api["builder"] = "TypeError: " + str(exc)
with open(out, "w") as f:
    json.dump(api, f, indent=1, sort_keys=True)
"""


@functools.cache
def api(major: int, cache: Path | None = None) -> dict | None:
    """TensorRT ``major``'s Python API as data, read off the real bindings (None: not installed here).

    ``{"version", "classes": {name: {"bases", "methods": {name: [pybind11 signatures]},
    "properties": {name: {"readonly"}}, "members": {enum member: value} | None}}, "functions", "values"}``.
    """
    path = bindings_dir(major)
    if path is None:
        return None
    dist = sorted(path.glob("tensorrt_cu*_bindings-*.dist-info"))
    # A new wheel or a new dumper makes a new dump.
    tag = hashlib.sha256("|".join([*(d.name for d in dist), _DUMP, SYMBOLS_C]).encode()).hexdigest()[:12]
    work = (cache or path.parent / "_api") / f"{major}-{tag}"
    out = work / "api.json"
    if not out.is_file():
        libs = build_stubs(major, work)
        tmp = out.with_suffix(".tmp")
        subprocess.run([sys.executable, "-c", _DUMP, ":".join(map(str, libs)), str(path), str(tmp)], check=True,
                       env={**os.environ, "PYTHONPATH": ""})
        tmp.replace(out)
    return json.loads(out.read_text())


_PARAM = re.compile(r"(\*{0,2}\w+)(?:\s*:\s*[^=,]+?)?(?:\s*=\s*[^,]+)?(?=,|$)")


def parameters(signature: str) -> list[tuple[str, bool]]:
    """``[(name, has_default)]`` of a pybind11 signature ``name(self: T, a: int, b: int = 0) -> R``."""
    inner = signature[signature.index("(") + 1: signature.rindex(")")]
    depth, parts, cur = 0, [], ""
    for ch in inner:  # split on top-level commas (types like Dict[str, int] hold commas)
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    out = []
    for part in parts:
        part = part.strip()
        name = part.split(":", 1)[0].split("=", 1)[0].strip()
        out.append((name, "=" in part))
    return out


def install(root: Path | None = None) -> None:
    """Install the pinned bindings wheels, one directory per major (``pip --target``, no dependencies)."""
    root = root or bindings_root()
    for major_version, requirement in VERSIONS.items():
        if bindings_dir(major_version) is not None and root == bindings_root():
            installed = sorted((root / str(major_version)).glob("tensorrt_cu*_bindings-*.dist-info"))
            if installed and installed[0].name.removesuffix(".dist-info").split("-")[1] == requirement.split("==")[1]:
                continue
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--upgrade", "--target", str(root / str(major_version)), requirement], check=True)


if __name__ == "__main__":  # make install: python tests/engines/tensorrt/trt_bindings.py
    install()
