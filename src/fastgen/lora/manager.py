"""Loaded adapters and the active selection over a pipeline's engines: load, select, swap, unload.

A swap computes, per component, ``sum_i scale_i * (alpha_i / rank_i) * up_i @ down_i`` for every adapted
module and hands it to the component's backend target (:mod:`fastgen.lora.torch_apply`,
:mod:`fastgen.lora.ort_apply`, :mod:`fastgen.lora.trt_apply`); nothing is exported or built, and engine
cache keys never see adapters (the engine stays the base model's graph and weights).

Two levels of selection. :attr:`AdapterManager.selection` is the *default* one (what ``set_adapters``,
``load`` and ``unload`` choose; ``Generator.active_adapters``), applied to every component at once.
:meth:`AdapterManager.activate` applies a selection to ONE component, so a server can run requests of
different adapters on one set of engines (``fastgen.Runtime``'s per-request adapters): the text
encoder is swapped on the thread that encodes prompts, right before it encodes them, and the UNet on
the thread that runs the UNet steps. Each component tracks what is fused into it now
(:attr:`AdapterManager.current`), as its *effective* selection (:meth:`AdapterManager.effective`: only
the adapters that change its weights), so a LoRA of the UNet alone never swaps a text encoder and
asking for what is there already costs nothing. Every change of weights happens under
:attr:`AdapterManager.lock`, which callers also hold across the engine calls that must see those
weights (:meth:`AdapterManager.use`): a swap from another thread waits for the call to end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from fastgen.core import cpus
from fastgen.engines.torch_backend import intra_op_threads
from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.lora.config import AdapterSelection
from fastgen.lora.formats import COMPONENTS, LoraAdapter, read_lora
from fastgen.lora.targets import Target, fused_terms, resolve_keys

logger = logging.getLogger(__name__)

def fuse_threads() -> int:
    """Threads for fusing: the usable CPUs no other runnable thread holds right now, at least one.
    Fusing a rank-64 LoRA into sd15's attention weights is compute-bound (its up @ down products), so
    idle CPUs halve it; but torch's OpenMP threads collapse when another process holds a CPU
    (measured on 2 CPUs with a busy neighbour: sd15's weights in 0.15 s on one thread, 2.2 s on two;
    see fastgen.engines.torch_backend), so a busy machine gets one."""
    others = cpus.others_running()
    return max(1, cpus.usable_cpus() - (others if others is not None else cpus.usable_cpus()))


def target_for(engine: Any, base: Any = None) -> Target:
    """The LoRA target of one engine, by backend; ``base`` (TensorRT only): what the engine was built from."""
    backend = getattr(engine, "backend", None)
    if backend == "torch":
        from fastgen.lora.torch_apply import TorchTarget

        modules = engine.torch_modules()
        if len(modules) != 1:
            raise UnsupportedError(f"LoRA on a torch engine running {len(modules)} modules")
        return TorchTarget(next(iter(modules.values())))
    if backend == "onnxruntime":
        from fastgen.lora.ort_apply import OrtTarget

        return OrtTarget(engine)
    if backend == "tensorrt":
        from fastgen.lora.trt_apply import TrtTarget

        if base is None:
            raise InvalidArgumentError("base", None, reason="LoRA on a TensorRT engine needs the model it was built "
                                       "from (a preset, a model folder or a Component), for the base weights")
        return TrtTarget(engine, base)
    raise UnsupportedError(f"LoRA on {backend or type(engine).__name__} engines is not supported "
                           "(torch, onnxruntime, tensorrt)")


class AdapterManager:
    """Adapters over ``engines`` (component name, as in :data:`~fastgen.lora.formats.COMPONENTS` -> engine).

    ``base``: component name -> what a TensorRT engine was built from (see :func:`target_for`).
    """

    def __init__(self, engines: Mapping[str, Any], *, base: Mapping[str, Any] | None = None) -> None:
        unknown = [c for c in engines if c not in COMPONENTS]
        if unknown:
            raise InvalidArgumentError("component", unknown[0], COMPONENTS)
        self.engines = {c: e for c, e in engines.items() if e is not None}
        self.base = dict(base or {})
        self.adapters: dict[str, LoraAdapter] = {}
        self.selection = AdapterSelection()
        self._targets: dict[str, Target] = {}
        self._adapted: dict[str, set[str]] = {}  # component -> modules some loaded adapter adapts
        self._shape_cache: dict[str, dict[str, tuple[int, ...]]] = {}
        self.last_swap_seconds = 0.0
        self.current: dict[str, AdapterSelection] = {}
        """component -> its effective selection fused into its engine now (absent: none, the base weights)."""
        self._stale: set[str] = set()  # components whose weights must be applied again (a new session)
        self.lock = threading.RLock()
        """Held while weights change, and by callers across the engine calls that must see them (:meth:`use`)."""

    def _shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        if component not in self._shape_cache:
            self._shape_cache[component] = dict(self.target(component).weight_shapes())
        return self._shape_cache[component]

    def target(self, component: str) -> Target:
        if component not in self._targets:
            self._targets[component] = target_for(self.engines[component], self.base.get(component))
        return self._targets[component]

    def load(self, lora: str | os.PathLike | LoraAdapter, name: str | None = None, weight: float = 1.0) -> LoraAdapter:
        """Load a LoRA file (or an in-memory :class:`LoraAdapter`) under ``name`` and apply it at ``weight``
        alongside the adapters active now. Its keys are checked against every engine it targets first."""
        adapter = lora if isinstance(lora, LoraAdapter) else read_lora(lora, name=name)
        if name is not None and adapter.name != name:
            adapter = LoraAdapter(name=name, layers=adapter.layers, kohya=adapter.kohya, path=adapter.path)
        if adapter.name in self.adapters:
            raise InvalidArgumentError("name", adapter.name, reason="an adapter of that name is loaded; unload it first")
        missing = [c for c in adapter.layers if c not in self.engines]
        if missing:
            raise InvalidArgumentError("lora", adapter.path or adapter.name, sorted(self.engines),
                                       reason=f"adapts {missing[0]}, which this pipeline has no engine of")
        with self.lock:  # prepare may replace an onnxruntime session: never under a running call
            touched = {c: set(resolve_keys(adapter, c, self._shapes(c)).values()) for c in adapter.layers}
            for component, modules in touched.items():
                new = self._adapted.get(component, set()) | modules
                self.target(component).prepare(new)
                self._adapted[component] = new
                self._stale.add(component)  # an onnxruntime session made anew feeds nothing yet
            self.adapters[adapter.name] = adapter
            self.set_adapters([*self.selection.names, adapter.name], [*self.selection.weights, weight])
        return adapter

    def check(self, selection: AdapterSelection, argument: str = "adapter") -> None:
        """Raise a one-line InvalidArgumentError naming ``argument`` if ``selection`` names an adapter
        that is not loaded (the loaded names are listed)."""
        unknown = [n for n in selection.names if n not in self.adapters]
        if unknown:
            raise InvalidArgumentError(argument, unknown[0], sorted(self.adapters) or "none loaded (load_lora first)")

    def effective(self, component: str, selection: AdapterSelection) -> AdapterSelection:
        """The part of ``selection`` that changes ``component``'s weights: its adapters that have layers
        for it, at a nonzero scale, in order (what fusing ``selection`` into it depends on)."""
        keep = [(n, w) for n, w in zip(selection.names, selection.weights, strict=True)
                if w != 0 and n in self.adapters and component in self.adapters[n].layers]
        if len(keep) == len(selection.names):
            return selection
        return AdapterSelection(tuple(n for n, _ in keep), tuple(w for _, w in keep))

    def activate(self, component: str, selection: AdapterSelection) -> float | None:
        """Fuse ``selection`` into ``component``'s engine alone (the other components keep theirs).
        Returns the seconds the swap took, or None when its effective selection is there already (or
        no loaded adapter adapts it). Unknown names raise, naming ``adapters``."""
        self.check(selection, "adapters")
        with self.lock:
            want = self.effective(component, selection)
            if component not in self._adapted or self._holds(component, want):
                return None
            start = time.perf_counter()
            self._apply(component, want)
            seconds = time.perf_counter() - start
        logger.debug("LoRA: %s of %s fused (%.1f ms)", _describe(want), component, seconds * 1e3)
        return seconds

    @contextlib.contextmanager
    def use(self, components: Sequence[str], selection: AdapterSelection) -> Iterator[dict[str, float]]:
        """Activate ``selection`` on ``components`` and hold :attr:`lock` until the block ends (wrap the
        engine calls that must run with those weights). Yields component -> seconds of each swap made."""
        with self.lock:
            swaps = {}
            for component in components:
                seconds = self.activate(component, selection)
                if seconds is not None:
                    swaps[component] = seconds
            yield swaps

    def restore(self) -> dict[str, float]:
        """Every component back to the default :attr:`selection` (after per-component activations);
        component -> seconds of each swap made."""
        with self.use(tuple(self.engines), self.selection) as swaps:
            return swaps

    def _holds(self, component: str, want: AdapterSelection) -> bool:
        return component not in self._stale and self.current.get(component, AdapterSelection()) == want

    def _apply(self, component: str, want: AdapterSelection) -> None:
        """Fuse ``want`` (an effective selection of ``component``) into its engine (lock held)."""
        adapters = [self.adapters[n] for n in want.names]
        with intra_op_threads(fuse_threads()):
            self.target(component).apply(fused_terms(adapters, want.weights, component, self._shapes(component)))
        self.current[component] = want
        self._stale.discard(component)

    def set_adapters(self, names: str | Sequence[str] | None, weights: float | Sequence[float] | None = None) -> float:
        """Apply exactly these loaded adapters at these scales (an empty list: the base weights). Returns the
        seconds the swap took."""
        selection = AdapterSelection.of(names, weights)
        self.check(selection)
        with self.lock:
            start = time.perf_counter()
            for component in self._adapted:
                want = self.effective(component, selection)
                # A component that has this already (its effective selection) keeps it: same weights.
                if not self._holds(component, want):
                    self._apply(component, want)
            self.selection = selection
            self.last_swap_seconds = time.perf_counter() - start
        logger.info("LoRA: %s active (%.1f ms)", _describe(selection), self.last_swap_seconds * 1e3)
        return self.last_swap_seconds

    def unload(self, name: str | None = None) -> None:
        """Remove one adapter (None: all); the others stay applied at their scales."""
        if name is not None and name not in self.adapters:
            raise InvalidArgumentError("adapter", name, sorted(self.adapters) or "none loaded")
        with self.lock:
            keep = [n for n in self.selection.names if name is not None and n != name]
            # Every component, per-request activations included, goes back to the default without it.
            self.set_adapters(keep, [self.selection.scale_of(n) for n in keep])
            for n in ([name] if name is not None else list(self.adapters)):
                del self.adapters[n]
            if not self.adapters:
                for target in self._targets.values():
                    if hasattr(target, "release"):
                        target.release()

    def close(self) -> None:
        for target in self._targets.values():
            if hasattr(target, "close"):
                target.close()


def _describe(selection: AdapterSelection) -> str:
    return ", ".join(f"{n}={w:g}" for n, w in zip(selection.names, selection.weights, strict=True)) or "none"


__all__ = ["AdapterManager", "target_for"]
