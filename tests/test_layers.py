"""The package layering of ``src/fastgen`` and ``kernels/``, derived from the source (no imports run).

Each package sits on one layer and may import only its own layer and the ones below it; the root
package (``fastgen/__init__.py``, the lazy public API) is the composition root above them all. A
package missing from ``LAYERS`` fails the test: place it explicitly. No module may use another
package's underscore names (private modules, functions, methods or attributes).
"""

from __future__ import annotations

import ast
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Bottom to top. "core" is fastgen.core plus the root's plain modules (errors, version).
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("models",),
    ("kernels",),
    ("ops",),
    ("quant",),
    ("export",),
    ("engines",),
    ("lora",),
    ("pipelines",),
    ("runtime",),
    ("serve",),
    ("cli",),
]
ROOT = "fastgen"  # the composition root: fastgen/__init__.py
#: Underscore names that belong to third-party libraries (set or read on their objects), not to us.
EXTERNAL_PRIVATE = {"_attn_implementation"}


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. fastgen.engines.build
    path: Path
    is_package: bool


def package_of(module: str) -> str | None:
    """The layer unit of a dotted fastgen module name (None: not fastgen)."""
    parts = module.split(".")
    if parts[0] != "fastgen":
        return None
    if len(parts) == 1:
        return ROOT
    if parts[1] in ("errors", "version"):
        return "core"
    return parts[1]


def discover(src: Path, kernels: Path | None) -> list[Module]:
    mods = []
    trees = [(src, "fastgen")] + ([(kernels, "fastgen.kernels")] if kernels is not None else [])
    for base, prefix in trees:
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            mods.append(Module(".".join((prefix, *parts)), path, is_package))
    return mods


def _imported(mod: Module, node: ast.AST) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) for one import statement."""
    if isinstance(node, ast.Import):
        return [(a.name, []) for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = mod.name.split(".")
            if not mod.is_package:
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        return [(target, [a.name for a in node.names])]
    return []


def _private_defs(mods: list[Module]) -> dict[str, set[str]]:
    """Underscore names (functions, classes, attributes set on self) defined per package."""
    defs: dict[str, set[str]] = defaultdict(set)
    for mod in mods:
        pkg = package_of(mod.name)
        for node in ast.walk(ast.parse(mod.path.read_text())):
            names = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.append(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.append(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.append(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.append(node.target.id)
            defs[pkg].update(n for n in names if n.startswith("_") and not n.startswith("__")
                             and n not in EXTERNAL_PRIVATE)
    return defs


def check(mods: list[Module]) -> list[str]:
    """Every layering and privacy violation, one line each."""
    rank = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
    rank[ROOT] = len(LAYERS)
    problems: list[str] = []
    edges: dict[str, set[str]] = defaultdict(set)
    private = _private_defs(mods)
    for mod in mods:
        src_pkg = package_of(mod.name)
        if src_pkg not in rank:
            problems.append(f"{mod.name}: package {src_pkg!r} has no layer in tests/test_layers.py LAYERS")
            continue
        tree = ast.parse(mod.path.read_text())
        where = f"{mod.path.relative_to(REPO) if mod.path.is_relative_to(REPO) else mod.path}"
        for node in ast.walk(tree):
            for target, names in _imported(mod, node):
                dst_pkg = package_of(target)
                if dst_pkg is None or dst_pkg == src_pkg:
                    continue
                edges[src_pkg].add(dst_pkg)
                line = f"{where}:{node.lineno}"
                if dst_pkg not in rank:
                    problems.append(f"{line}: imports {target} of unplaced package {dst_pkg!r}")
                elif rank[dst_pkg] > rank[src_pkg]:
                    problems.append(f"{line}: {src_pkg} (layer {rank[src_pkg]}) imports {target} "
                                    f"of higher layer {dst_pkg} ({rank[dst_pkg]})")
                hidden = [p for p in target.split(".")[1:] if p.startswith("_") and not p.startswith("__")]
                hidden += [n for n in names if n.startswith("_") and not n.startswith("__")]
                if hidden:
                    problems.append(f"{line}: {src_pkg} imports private {hidden[0]!r} of {dst_pkg} ({target})")
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                    continue
                owners = {p for p, names in private.items() if node.attr in names}
                if owners and src_pkg not in owners:
                    problems.append(f"{where}:{node.lineno}: {src_pkg} reads {node.attr!r}, private to "
                                    f"{', '.join(sorted(owners))}")
            reflected = _reflected_private(node)
            if reflected is not None:
                owners = {p for p, names in private.items() if reflected in names} - {src_pkg}
                if owners:
                    problems.append(f"{where}:{node.lineno}: {src_pkg} reads {reflected!r} by name, private to "
                                    f"{', '.join(sorted(owners))}")
    problems += [f"import cycle among packages: {', '.join(c)}" for c in _cycles(edges)]
    return problems


def _reflected_private(node: ast.AST) -> str | None:
    """``_name`` of ``getattr(obj, "_name")`` / ``setattr`` / ``hasattr`` / ``delattr`` on another object."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2):
        return None
    obj, name = node.args[0], node.args[1]
    if isinstance(obj, ast.Name) and obj.id in ("self", "cls"):
        return None
    if isinstance(name, ast.Constant) and isinstance(name.value, str) and name.value.startswith("_") \
            and not name.value.startswith("__"):
        return name.value
    return None


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each group of packages that import one another in a cycle (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def test_layers_and_privacy():
    problems = check(discover(REPO / "src" / "fastgen", REPO / "kernels"))
    assert not problems, "\n".join(problems)


def _tree(tmp_path: Path, files: dict[str, str]) -> list[Module]:
    for name, text in files.items():
        path = tmp_path / "fastgen" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return discover(tmp_path / "fastgen", None)


def test_checker_catches_a_cycle_an_upward_import_and_private_reads(tmp_path):
    mods = _tree(tmp_path, {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/spec.py": "def load():\n    from fastgen.engines.base import Engine\n",  # upward
        "engines/__init__.py": "",
        "engines/base.py": ("from fastgen.models.spec import load\n"
                            "from fastgen.models.spec import _hidden\n"
                            "def f(gen):\n    return gen._size\n"),
        "engines/cache.py": "def g(s):\n    return getattr(s, '_seq', 1)\n",
        "pipelines/__init__.py": "",
        "pipelines/gen.py": "class G:\n    def _size(self):\n        self._seq = 1\n",
        "widgets/__init__.py": "",
    })
    problems = check(mods)
    text = "\n".join(problems)
    assert "models (layer 1) imports fastgen.engines.base of higher layer engines" in text
    assert "import cycle among packages: engines, models" in text
    assert "imports private '_hidden' of models" in text
    assert "engines reads '_size', private to pipelines" in text
    assert "engines reads '_seq' by name, private to pipelines" in text
    assert "package 'widgets' has no layer" in text
