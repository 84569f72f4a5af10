"""``fastgen.optimize``: route the attention of diffusers and transformers models through :func:`fastgen.ops.attention`.

``optimize(model, attention="triton")`` finds every attention layer it knows how to serve and swaps it in
place, reversibly:

- diffusers ``Attention`` modules (UNet self/cross attention, the VAE mid-block, DiT / PixArt transformer
  blocks) whose processor is the standard ``AttnProcessor2_0`` or ``AttnProcessor`` get a
  :class:`~fastgen.ops.attention_diffusers.FastgenAttnProcessor` (which keeps the original processor);
- diffusion transformers: SD3 / SD3.5's ``JointAttnProcessor2_0`` (joint and dual attention) and FLUX's
  ``FluxAttnProcessor`` (``FluxAttention``, double- and single-stream blocks) get the processors of
  :mod:`fastgen.ops.attention_dit`, kept and restored the same way;
- transformers attention modules that dispatch through ``AttentionInterface`` (CLIP, BERT, ViT... on
  ``sdpa`` or ``eager``) have their config switched to the ``"fastgen"`` implementation, and each layer
  carries its own backend in a ``_fastgen_attention`` attribute (see :mod:`fastgen.ops.attention_transformers`).

All state lives on the modules: no global switch, nothing shared between models. Optimizing again switches
the backend without stacking wrappers; ``attention=None`` (or ``report.restore()``) puts the original
processors / attention implementations back exactly.

Per call, a layer whose inputs the backend cannot serve (CPU tensors without ``TRITON_INTERPRET=1``, head
dim outside 16..256 for Triton, a mask that is not a key-padding pattern...) runs the SDPA path and logs it
once per layer and reason; ``strict=True`` raises :class:`UnsupportedError` instead. While tracing for
export (ONNX, ``torch.jit.trace``, ``torch.export``) every layer runs its original code, so an optimized
model exports to the same graph as the original.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.ops.attention import BACKENDS, attention

__all__ = ["ATTENTION_CHOICES", "AttentionPolicy", "OptimizeReport", "attention_revision", "is_exporting",
           "key_padding_from_mask", "optimize"]

logger = logging.getLogger(__name__)

#: Values of ``optimize(..., attention=...)`` besides None (which restores the originals).
ATTENTION_CHOICES = ("triton", "triton-int8", "sdpa", "reference")

#: Additive mask entries at or below this are "masked": exp(-1e4 + spread) underflows to exactly 0 in
#: every float format (fp16/bf16/fp32 and fp64) for any score spread below ~9000. diffusers uses -10000,
#: transformers finfo(dtype).min, others -inf.
MASKED_BIAS = -1e4


# --- call-time policy, shared by the diffusers processor and the transformers attention function ------------

def is_exporting() -> bool:
    """Whether the current call is being traced for export: ONNX (TorchScript or dynamo), jit.trace, torch.export.

    Under plain ``torch.compile`` this is False, so compiled models keep the fused kernel (a custom op with a
    fake implementation). ``torch.compiler.is_exporting`` appeared in torch 2.6; the ONNX flag covers the
    dynamo ONNX exporter on 2.13 as well.
    """
    compiler = getattr(torch, "compiler", None)
    exporting = getattr(compiler, "is_exporting", None)
    if exporting is not None and exporting():
        return True
    compiling = getattr(compiler, "is_compiling", None)
    if compiling is not None and compiling():
        return False  # torch.compile: keep the custom op (and keep dynamo away from the checks below)
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


_TRITON_INSTALLED: list[bool] = []  # filled on first use (a plain list: dynamo traces it, unlike functools.cache)


def _triton_installed() -> bool:
    if not _TRITON_INSTALLED:
        _TRITON_INSTALLED.append(importlib.util.find_spec("triton") is not None)
    return _TRITON_INSTALLED[0]


def _capturing(t: torch.Tensor) -> bool:
    """A CUDA graph capture is under way on ``t``'s device (host syncs are illegal then)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class AttentionPolicy:
    """One layer's attention settings: backend (None: run the original code), strict, and what was logged."""

    __slots__ = ("backend", "name", "strict", "_logged")

    def __init__(self, name: str, backend: str | None, strict: bool = False) -> None:
        self.name = name
        self.backend = backend
        self.strict = strict
        self._logged: set[str] = set()

    def __repr__(self) -> str:
        return f"AttentionPolicy({self.name!r}, backend={self.backend!r}, strict={self.strict})"

    def violation(self, q: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> str | None:
        """Why the backend cannot serve this call, or None."""
        if self.backend in (None, "auto"):
            return None
        reason = BACKENDS[self.backend].violation(q, mask, causal)
        if reason is not None:
            return reason
        if self.backend.startswith("triton") and not _triton_installed():
            return "anything without the triton package installed"
        return None

    def fallback(self, reason: str) -> None:
        """Record that this call runs the SDPA path: raise when strict, else log once per layer and reason."""
        if self.strict:
            raise UnsupportedError(f"attention backend {self.backend!r} cannot serve layer {self.name!r}: "
                                   f"{reason} (strict=True; without it the layer runs the sdpa path)")
        if reason not in self._logged:
            self._logged.add(reason)
            logger.warning("attention layer %s: backend %r does not support %s; running the sdpa path",
                           self.name, self.backend, reason)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None,
               causal: bool, scale: float | None) -> torch.Tensor:
        """:func:`fastgen.ops.attention` on (batch, seq, heads, head_dim) views with this layer's backend."""
        reason = self.violation(q, mask, causal)
        if reason is None:
            backend = None if self.backend == "auto" else self.backend
        else:
            self.fallback(reason)
            backend = "sdpa"
        return attention(q, k, v, mask=mask, causal=causal, scale=scale, backend=backend)


def key_padding_from_mask(mask: torch.Tensor, batch: int, seq_q: int, seq_k: int, *, allow_causal: bool
                          ) -> tuple[torch.Tensor | None, bool] | str:
    """Rewrite an SDPA-style mask as ``(key_padding or None, causal)``, or say why it can't be, exactly.

    ``mask`` broadcasts to (batch, heads, seq_q, seq_k): boolean (True = attend) or additive float (0 =
    attend, <= :data:`MASKED_BIAS` = masked). It is a key-padding mask when every query row of every head
    sees the same keys, and (``allow_causal``) a causal one when row ``i`` sees those keys ``j`` with
    ``j <= i + seq_k - seq_q``. Each query row must keep one visible key (a fully masked row is NaN or
    uniform in the original, zeros in fastgen). The check costs one host sync.
    """
    if (not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-1] != seq_k
            or mask.shape[-2] not in (1, seq_q) or mask.shape[0] not in (1, batch)):
        return f"mask of shape {tuple(getattr(mask, 'shape', ()))} (not broadcastable to a key-padding mask)"
    if _capturing(mask):
        return "mask checks during CUDA graph capture"
    if mask.dtype == torch.bool:
        allowed, valid = mask, torch.ones((), dtype=torch.bool, device=mask.device)
    elif mask.is_floating_point():
        allowed = mask == 0
        valid = (allowed | (mask <= MASKED_BIAS)).all()
    else:
        return f"mask dtype {mask.dtype}"
    kp = allowed[:, :1, -1:, :]  # (b, 1, 1, seq_k): the last query row sees every unpadded key either way
    plain = (allowed == kp).all() & kp.any(dim=-1).all()
    flags = [valid, plain, kp.all()]
    if allow_causal and seq_q > 1:
        i = torch.arange(seq_q, device=mask.device)[:, None]
        j = torch.arange(seq_k, device=mask.device)[None, :]
        pattern = kp & (j <= i + (seq_k - seq_q))  # (b, 1, seq_q, seq_k)
        flags.append((allowed.expand(-1, -1, seq_q, -1) == pattern).all() & pattern.any(dim=-1).all())
    valid_, plain_, full, *causal_ = torch.stack(flags).tolist()  # the one sync
    if not valid_:
        return f"additive mask values other than 0 and <= {MASKED_BIAS:g}"
    if plain_:
        causal = False
    elif causal_ and causal_[0]:
        causal = True
    else:
        return "a mask that is not key-padding" + (" + causal" if allow_causal else "") + \
            " (or that leaves a query row without keys)"
    if full:
        return None, causal
    return kp.reshape(kp.shape[0], seq_k).expand(batch, seq_k).contiguous(), causal


# --- the report / handle -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OptimizeReport:
    """What :func:`optimize` did; ``restore()`` undoes it."""

    attention: str | None
    """The backend asked for (None: this call restored the originals)."""
    layers: Mapping[str, str] = field(default_factory=dict)
    """Qualified name -> backend of every attention layer now routed through ``fastgen.ops.attention``."""
    skipped: Mapping[str, str] = field(default_factory=dict)
    """Qualified name -> why the layer keeps its original attention (excluded, unsupported processor...)."""
    restored: tuple[str, ...] = ()
    """Layers this call put back to their original attention (``attention=None``, or newly excluded)."""
    strict: bool = False
    """Whether a call the backend cannot serve raises instead of running the sdpa path."""
    targets: tuple[tuple[str, nn.Module], ...] = field(default=(), repr=False, compare=False)
    """(name prefix, module) of every model walked: what ``restore()`` walks again."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        object.__setattr__(self, "skipped", MappingProxyType(dict(self.skipped)))

    def restore(self) -> OptimizeReport:
        """Put back the original attention of every layer of the optimized models (idempotent)."""
        return _apply(self.targets, None, (), None, False)

    def __str__(self) -> str:
        lines = [f"optimize(attention={self.attention!r}): {len(self.layers)} layers, {len(self.skipped)} skipped"
                 + (f", {len(self.restored)} restored" if self.restored else "")]
        lines += [f"  {name}: {backend}" for name, backend in self.layers.items()]
        lines += [f"  {name}: skipped ({why})" for name, why in self.skipped.items()]
        return "\n".join(lines)


# --- finding the models --------------------------------------------------------------------------------------

_ACCEPTED = ("an nn.Module, a diffusers pipeline, a fastgen Component, an object with torch_modules() (Engine, "
             "Generator, Scorer), or a list of them")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _no_torch_modules(obj: Any, prefix: str) -> UnsupportedError:
    """The error for a holder of models that runs no PyTorch module (an engine of another backend...)."""
    component = getattr(getattr(obj, "spec", None), "component", None)
    what = f"the {component} engine" if component else type(obj).__name__
    where = f" (at {prefix!r})" if prefix else ""
    backend = getattr(obj, "backend", None)
    runs = f"runs on {backend}" if backend else "runs no PyTorch module"
    return UnsupportedError(f"optimize applies to the torch backend (or to the model before export): "
                            f"{what}{where} {runs}")


def _targets(obj: Any, prefix: str, out: list[tuple[str, nn.Module]], notes: dict[str, str]) -> None:
    """Append (prefix, module) for every model ``obj`` holds; raise before anything is changed.

    Holders of models (engines, Generator, Scorer, anything else) are asked through their public
    ``torch_modules() -> {name: nn.Module | None}``; each module is named by its key under ``prefix``,
    and a None value (held but not loaded yet) is noted in the report's ``skipped``.
    """
    from fastgen.models.component import Component

    if isinstance(obj, nn.Module):
        out.append((prefix, obj))
    elif isinstance(obj, Component):
        out.append((prefix, obj.model))
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _targets(item, _join(prefix, str(i)), out, notes)
    elif callable(getattr(obj, "torch_modules", None)):
        modules = obj.torch_modules()
        if not modules:
            raise _no_torch_modules(obj, prefix)
        for key, module in modules.items():
            if module is None:
                notes[_join(prefix, key)] = "not loaded yet (built on first use): optimize it once loaded"
                continue
            if not isinstance(module, nn.Module):
                raise InvalidArgumentError(f"{type(obj).__name__}.torch_modules()[{key!r}]", type(module).__name__,
                                           "an nn.Module")
            out.append((_join(prefix, key), module))
    elif isinstance(getattr(obj, "components", None), dict):  # a diffusers pipeline
        for key, value in obj.components.items():
            if isinstance(value, nn.Module):
                out.append((_join(prefix, key), value))
    else:
        raise InvalidArgumentError("model", type(obj).__name__, _ACCEPTED)


# --- applying ------------------------------------------------------------------------------------------------

def _check_args(attention: Any, exclude: Any, filter_fn: Any, strict: Any) -> tuple[str, ...]:
    if attention is not None and attention not in ATTENTION_CHOICES:
        raise InvalidArgumentError("attention", attention, (*ATTENTION_CHOICES, None))
    if isinstance(exclude, str):
        exclude = (exclude,)
    try:
        patterns = tuple(exclude or ())
    except TypeError:
        raise InvalidArgumentError("exclude", exclude, "glob patterns over qualified module names") from None
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise InvalidArgumentError("exclude", pattern, "non-empty glob patterns (strings) over qualified "
                                       "module names")
    if filter_fn is not None and not callable(filter_fn):
        raise InvalidArgumentError("filter_fn", filter_fn, "a callable (name, module) -> bool, or None")
    if not isinstance(strict, bool):
        raise InvalidArgumentError("strict", strict, (True, False))
    return patterns


def _excluded(name: str, module: nn.Module, patterns: tuple[str, ...],
              filter_fn: Callable[[str, nn.Module], bool] | None) -> str | None:
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return f"excluded by pattern {pattern!r}"
    if filter_fn is not None and not filter_fn(name, module):
        return "excluded by filter_fn"
    return None


def _adapters(modules: Iterable[nn.Module]) -> list[Any]:
    """The library adapters for the libraries ``modules`` come from (their classes' packages).

    A module whose class (or a base class) is defined in diffusers / transformers implies that library is
    imported already: asking costs no import. Base classes count, so subclasses in user or remote code
    are covered too.
    """
    libraries: set[str] = set()
    seen: set[type] = set()
    for module in modules:
        cls = type(module)
        if cls not in seen:
            seen.add(cls)
            libraries.update(c.__module__.partition(".")[0] for c in cls.__mro__)
    found = []
    if "diffusers" in libraries:
        from fastgen.ops import attention_diffusers

        found.append(attention_diffusers)
    if "transformers" in libraries:
        from fastgen.ops import attention_transformers

        found.append(attention_transformers)
    return found


def _walk(targets: Iterable[tuple[str, nn.Module]]) -> Iterator[tuple[str, nn.Module]]:
    seen: set[int] = set()
    for prefix, root in targets:
        for name, module in root.named_modules():
            if id(module) not in seen:
                seen.add(id(module))
                # A bare attention module passed as the model is named by its class.
                yield _join(prefix, name) or type(module).__name__, module


def _apply(targets: tuple[tuple[str, nn.Module], ...], backend: str | None, patterns: tuple[str, ...],
           filter_fn: Callable[[str, nn.Module], bool] | None, strict: bool,
           notes: Mapping[str, str] | None = None) -> OptimizeReport:
    layers: dict[str, str] = {}
    skipped: dict[str, str] = dict(notes or {})
    restored: list[str] = []
    walked = list(_walk(targets))
    adapters = _adapters(module for _, module in walked)
    # Plan first (classification raises nothing), then change modules.
    plan: list[tuple[Any, str, nn.Module, str | None]] = []  # (adapter, name, module, reason to keep original)
    for name, module in walked:
        for adapter in adapters:
            verdict = adapter.classify(module)
            if verdict is None:
                continue
            if backend is not None and verdict == "ok":
                verdict = _excluded(name, module, patterns, filter_fn) or "ok"
            plan.append((adapter, name, module, None if verdict == "ok" else verdict))
            break
    for adapter in adapters:
        mine = [(name, module, reason) for a, name, module, reason in plan if a is adapter]
        if backend is not None:
            for note_name, why in adapter.notes(targets):
                skipped.setdefault(note_name, why)
        if not mine:
            continue
        result = adapter.apply(mine, backend, strict)
        layers.update(result.get("layers", {}))
        skipped.update(result.get("skipped", {}))
        restored += result.get("restored", [])
    if layers or restored:
        _bump_revisions(targets)
    if backend is not None:
        logger.info("optimize: %d attention layers -> %s, %d skipped", len(layers), backend, len(skipped))
    elif restored:
        logger.info("optimize: restored the original attention of %d layers", len(restored))
    return OptimizeReport(backend, layers, skipped, tuple(restored), strict, targets)


def optimize(model: Any, attention: str | None = "triton", *, exclude: str | Iterable[str] = (),
             filter_fn: Callable[[str, nn.Module], bool] | None = None, strict: bool = False) -> OptimizeReport:
    """Route the attention layers of ``model`` through :func:`fastgen.ops.attention` with backend ``attention``.

    ``model``: an ``nn.Module`` (diffusers UNet / VAE / DiT / PixArt / SD3 / FLUX, transformers CLIP / BERT /
    ViT...), a diffusers pipeline (its ``components``), a fastgen ``Component``, any object with a public
    ``torch_modules() -> dict[str, nn.Module]`` (a torch-backend ``Engine``, a ``Generator``, a ``Scorer``:
    each module is named by its key), or a list of those. ``attention``: ``"triton"``, ``"triton-int8"``,
    ``"sdpa"``, ``"reference"``, or None to restore the original attention of every layer. ``exclude``:
    glob patterns over qualified module names (``"*mid_block*"``) whose layers keep their original
    attention; ``filter_fn(name, module)``: False keeps that layer's original attention. ``strict``: a call
    the backend cannot serve raises :class:`UnsupportedError` instead of running the sdpa path.

    Returns an :class:`OptimizeReport` (``layers``, ``skipped``, ``restore()``). An object whose
    ``torch_modules()`` is empty (an engine of another backend...) raises :class:`UnsupportedError`
    (optimize applies to the torch backend, or to the model before export). Every model it changes gets a
    new :func:`attention_revision`, so a torch engine replaying CUDA graphs of it captures them anew.
    """
    patterns = _check_args(attention, exclude, filter_fn, strict)
    found: list[tuple[str, nn.Module]] = []
    notes: dict[str, str] = {}
    _targets(model, "", found, notes)
    return _apply(tuple(found), attention, patterns, filter_fn, strict, notes)


#: Attribute (in the module's __dict__, not a parameter or buffer) counting optimize's changes to a model.
REVISION_ATTR = "fastgen_attention_revision"


def attention_revision(module: nn.Module) -> int:
    """How many times :func:`optimize` (or ``restore()``) changed ``module``'s attention: 0 if never.

    What holders of captured work (a torch engine's CUDA graphs replay the kernels they recorded)
    compare to know that the model changed under them. One dict lookup: cheap enough per call.
    """
    return module.__dict__.get(REVISION_ATTR, 0)


def _bump_revisions(targets: Iterable[tuple[str, nn.Module]]) -> None:
    for _, module in targets:
        module.__dict__[REVISION_ATTR] = attention_revision(module) + 1

