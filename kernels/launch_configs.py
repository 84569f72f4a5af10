"""Launch configs per kernel, per GPU architecture: shipped tables, a persistent autotune cache, defaults.

A kernel's launch config (block sizes, warps, stages) depends on the GPU architecture and the problem
shape. :class:`ConfigTable` answers ``config(key, arch)`` from, in order:

1. the user's autotune cache, ``<kernel>.json`` in :func:`autotune_dir` (``$FASTGEN_AUTOTUNE_DIR``, else
   ``$XDG_CACHE_HOME/fastgen/autotune``, else ``~/.cache/fastgen/autotune``), filled by :meth:`tune`;
2. the table shipped with fastgen, ``kernels/configs/<kernel>.json`` (tuned on our GPUs and committed;
   see ``kernels/configs/README.md``);
3. the per-architecture default table, ``kernels/configs/<table>.json`` (:func:`arch_default`): one
   entry per kernel and shape class, each chosen with its static figures (registers, spills, shared
   memory, MMA kind) by ``benchmarks/static_gpu_report.py`` so that it compiles without spills and
   within the target's shared memory; the compile gate (``tests/kernels/test_compile_gate.py``) holds
   every entry to that. An entry may be ``null``: no config fits that class on that architecture, and
   the launcher refuses it (:class:`NoFittingConfig`) so that dispatch routes around it.

Both files are JSON, ``{"format": 1, "kernel": ..., "archs": {"sm90": {"<key>": {config}}}}``, keyed by
the compute capability and by a shape key the kernel builds (bucketed, so the table stays small). Entries
tuned under another Triton major.minor are ignored, as a config that was fastest there may not even
compile here. A corrupt or unreadable file is logged and ignored, never fatal; writes go to a temp name
then ``os.replace``. Tuning happens only when a caller asks for it on CUDA; tests and the interpreter
never tune (the timer is injectable so the cache logic is tested without a GPU).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from fastgen.core.paths import cache_dir
from fastgen.errors import UnsupportedError

logger = logging.getLogger(__name__)

_FORMAT = 1
#: The tables shipped with fastgen (see ``configs/README.md``).
SHIPPED_DIR = Path(__file__).parent / "configs"

Config = dict[str, int]


def autotune_dir() -> Path:
    """Where tuned configs persist: ``$FASTGEN_AUTOTUNE_DIR``, else the XDG cache, else ``~/.cache``
    (:func:`fastgen.core.paths.cache_dir`, the resolver of every fastgen cache)."""
    return cache_dir("autotune")


def device_arch(device: Any) -> str:
    """``"sm90"`` for a CUDA device of compute capability 9.0; ``"cpu"`` (interpreter) otherwise."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return dev.type
    return _cuda_arch(dev.index if dev.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_arch(index: int) -> str:  # cached: this sits on every kernel launch
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


#: The default table serving each architecture. Tables follow the resources that bound a config (shared
#: memory per block, registers, MMA kind), so GPUs that share them share a table.
TABLE_FOR_ARCH = {"sm80": "sm80", "sm87": "sm80", "sm86": "sm89", "sm89": "sm89", "sm120": "sm89",
                  "sm121": "sm89", "sm90": "sm90", "sm100": "sm100", "sm103": "sm100"}
#: Targets the compile gate and the static report cover, with the GPUs they stand for.
GATE_ARCHS = {"sm80": "A100", "sm89": "L4 / RTX 4090", "sm90": "H100 / H200", "sm100": "B200"}
#: cudaDevAttrMaxSharedMemoryPerBlockOptin: the most shared memory one block may use (what Triton's
#: launcher compares a compiled kernel's ``metadata.shared`` with).
SMEM_LIMIT = {"sm80": 166912, "sm86": 101376, "sm87": 166912, "sm89": 101376, "sm90": 232448,
              "sm100": 232448, "sm103": 232448, "sm120": 101376, "sm121": 101376}


class NoFittingConfig(UnsupportedError):
    """No launch config of this kernel fits this shape class on this architecture (the table says null)."""


def table_for(arch: str) -> str:
    """The default table serving ``arch``: exact, else the smallest-shared-memory table (sm89's) for an
    unknown sm80+ target; older GPUs are refused."""
    if arch in TABLE_FOR_ARCH:
        return TABLE_FOR_ARCH[arch]
    digits = arch[2:] if arch.startswith("sm") else ""
    if not digits.isdigit() or int(digits) < 80:
        raise UnsupportedError(f"fastgen's Triton kernels need an NVIDIA GPU of compute capability >= 8.0 "
                               f"(sm80, sm86, sm89, sm90, sm100, sm120); got {arch!r}")
    return "sm89"


@functools.cache
def _arch_table(table: str) -> dict[str, Any]:
    path = SHIPPED_DIR / f"{table}.json"
    data = json.loads(path.read_text())  # shipped with the package: a broken one is a packaging bug
    if data.get("format") != _FORMAT or data.get("arch") != table:
        raise ValueError(f"{path}: not a format-{_FORMAT} default table for {table}")
    return data["kernels"]


def arch_default(kernel: str, arch: str, shape_class: str, fallback: Config) -> Config:
    """The default config of ``kernel`` for ``shape_class`` on ``arch`` from its default table.

    ``fallback`` (the kernel's own heuristic) serves a class the table does not list, and every class
    under the interpreter (``arch == "cpu"``). Raises :class:`NoFittingConfig` for a ``null`` entry.
    """
    if not arch.startswith("sm"):
        return dict(fallback)
    table = table_for(arch)
    entries = _arch_table(table).get(kernel, {})
    if shape_class not in entries:
        return dict(fallback)
    entry = entries[shape_class]
    if entry is None:
        raise NoFittingConfig(f"kernel {kernel!r} has no launch config that fits {shape_class} on {arch} "
                              f"(kernels/configs/{table}.json: it would spill or exceed shared memory)")
    return dict(entry["config"])


def has_fitting_config(kernel: str, arch: str, shape_class: str) -> bool:
    """Whether :func:`arch_default` has a config for this class (what dispatch asks before choosing)."""
    try:
        return not arch.startswith("sm") or _arch_table(table_for(arch)).get(kernel, {}).get(shape_class, 0) is not None
    except UnsupportedError:
        return False


def triton_version() -> str:
    """Triton's ``major.minor`` (entries tuned under another one are ignored)."""
    import triton

    return ".".join(triton.__version__.split(".")[:2])


def pow2_bucket(n: int) -> int:
    """The power of two >= n (shape keys bucket sequence lengths so the table stays small)."""
    return 1 << max(0, int(n) - 1).bit_length()


def _read(path: Path) -> dict[str, Any]:
    """``archs`` of a config file, or {} if it is missing, unreadable or not ours (logged)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable kernel config file %s: %s", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("archs"), dict):
        logger.warning("ignoring kernel config file %s: not format %d", path, _FORMAT)
        return {}
    return data["archs"]


def _valid(cfg: Any, allowed: set[str]) -> bool:
    return (isinstance(cfg, dict) and set(cfg) - {"triton"} <= allowed
            and all(isinstance(v, int) and v > 0 for k, v in cfg.items() if k != "triton"))


class ConfigTable:
    """Launch configs of one kernel: see the module docstring for the lookup order.

    ``candidates``: the configs :meth:`tune` times; their keys are the config fields accepted from files.
    """

    def __init__(self, kernel: str, candidates: Sequence[Config], *, shipped_dir: Path | None = None) -> None:
        self.kernel = kernel
        self.candidates = [dict(c) for c in candidates]
        self._fields = {f for c in self.candidates for f in c}
        self._shipped_dir = shipped_dir or SHIPPED_DIR
        self._lock = threading.Lock()
        self._memo: dict[tuple[str, str], Config] = {}  # (arch, key) -> config, this process

    @property
    def path(self) -> Path:
        """The user's cache file for this kernel."""
        return autotune_dir() / f"{self.kernel}.json"

    def _lookup_file(self, path: Path, arch: str, key: str, version: str | None) -> Config | None:
        cfg = _read(path).get(arch, {}).get(key)
        if cfg is None or not _valid(cfg, self._fields):
            return None
        if version is not None and cfg.get("triton") not in (None, version):
            return None  # tuned under another Triton
        return {k: v for k, v in cfg.items() if k != "triton"}

    def config(self, key: str, arch: str, default: Config) -> Config:
        """The config for ``key`` on ``arch`` (``"sm90"``): autotune cache, then shipped table, then
        ``default`` (the per-architecture default table's entry, :func:`arch_default`)."""
        memo = self._memo.get((arch, key))
        if memo is not None:
            return dict(memo)
        version = triton_version() if arch.startswith("sm") else None
        cfg = (self._lookup_file(self.path, arch, key, version)
               or self._lookup_file(self._shipped_dir / f"{self.kernel}.json", arch, key, version)
               or dict(default))
        self._memo[(arch, key)] = cfg
        return dict(cfg)

    def tune(self, key: str, arch: str, launch: Callable[[Config], None], default: Config, *,
             timer: Callable[[Callable[[], None]], float] | None = None, force: bool = False,
             fits: Callable[[Config], str | None] | None = None) -> Config:
        """Time every candidate with ``launch(cfg)``, keep the fastest, persist it; returns it.

        A cached entry is reused unless ``force``. Before anything is timed, ``fits(cfg)`` (the
        launcher's check of the *compiled* kernel: register spills, shared memory over the device's
        limit; see :func:`fastgen.kernels.launch.compiled_misfit`) drops candidates that would spill
        or fail to launch on this GPU; a candidate that still fails to compile or launch is skipped.
        ``timer(fn) -> ms`` defaults to Triton's ``do_bench``.
        """
        version = triton_version() if arch.startswith("sm") else None
        if not force:
            hit = self._lookup_file(self.path, arch, key, version)
            if hit is not None:
                self._memo[(arch, key)] = hit
                return dict(hit)
        if timer is None:
            from triton.testing import do_bench as timer
        best, best_ms = None, float("inf")
        for cfg in self.candidates:
            misfit = fits(dict(cfg)) if fits is not None else None
            if misfit is not None:
                logger.debug("%s: candidate %s skipped on %s for %s: %s", self.kernel, cfg, arch, key, misfit)
                continue
            try:
                ms = timer(lambda cfg=cfg: launch(dict(cfg)))
            except Exception as exc:  # noqa: BLE001 - a config this GPU cannot run is just disqualified
                logger.debug("%s: config %s failed for %s: %s", self.kernel, cfg, key, exc)
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        if best is None:
            logger.warning("%s: no candidate config ran for %s; using the default", self.kernel, key)
            return self.config(key, arch, default)
        logger.info("%s: tuned %s on %s: %s (%.3f ms)", self.kernel, key, arch, best, best_ms)
        self._memo[(arch, key)] = dict(best)
        self._persist(arch, {key: {**best, **({"triton": version} if version else {})}})
        return dict(best)

    def _persist(self, arch: str, entries: dict[str, dict[str, Any]]) -> None:
        """Merge entries into the user's cache file atomically (a failure to write is only logged)."""
        path = self.path
        with self._lock:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                archs = _read(path)
                archs.setdefault(arch, {}).update(entries)
                data = {"format": _FORMAT, "kernel": self.kernel, "archs": archs}
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except OSError as exc:
                logger.warning("could not save tuned configs to %s: %s", path, exc)

    def choose(self, key: str, arch: str, launch: Callable[[Config], None], default: Config,
               autotune: bool, fits: Callable[[Config], str | None] | None = None) -> Config:
        """What a launcher uses: ``default`` under the interpreter (``arch == "cpu"``), else :meth:`tune`
        when ``autotune``, else :meth:`config`."""
        if not arch.startswith("sm"):
            return dict(default)
        if autotune:
            return self.tune(key, arch, launch, default, fits=fits)
        return self.config(key, arch, default)

    def export(self, archs: Iterable[str] | None = None) -> dict[str, Any]:
        """The user's cache as a shippable table (to commit as ``kernels/configs/<kernel>.json``)."""
        cached = _read(self.path)
        keep = cached if archs is None else {a: cached[a] for a in archs if a in cached}
        return {"format": _FORMAT, "kernel": self.kernel, "archs": keep}
