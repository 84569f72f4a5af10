"""What ``fastgen serve`` serves and how (a frozen dataclass; the CLI's flags come from it).

Nothing here imports fastapi, uvicorn or torch: a config can be made, checked and passed around
(to a Ray deployment, say) on a machine that has only fastgen's core.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastgen.core.config import ConfigMixin, literal_choices
from fastgen.engines.config import BuildConfig, Device, Precision
from fastgen.engines.registry import backend_names, check_backend
from fastgen.errors import InvalidArgumentError
from fastgen.lora.config import parse_lora_arg
from fastgen.runtime.config import RuntimeConfig
from fastgen.runtime.requests import SCORER_NAME, check_scorer_name

#: The environment variable read when ``api_key`` is not set.
API_KEY_ENV = "FASTGEN_API_KEY"
#: Scorer components a ``scorers`` entry may name (``MODEL:COMPONENT``): classifiers, and encoders
#: (embeddings: ``/v1/embeddings``).
SCORER_COMPONENTS = ("classifier", "text-classifier", "text-encoder", "image-encoder")


def _quantizations() -> tuple[Any, ...]:
    return literal_choices(BuildConfig, "quantization") or ("none",)


def _int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
            high is not None and value > high):
        allowed = f"integers >= {low}" if high is None else f"integers from {low} to {high}"
        raise InvalidArgumentError(name.replace("_", "-"), value, allowed)


def lora_name(path: str) -> str:
    """An adapter's name from its path: the file's stem, or the folder's name."""
    name = Path(path.rstrip("/\\")).name
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else name


def parse_scorer(spec: str) -> tuple[str | None, str, str | None]:
    """``[NAME=]MODEL[:COMPONENT]`` -> (name or None, model, component or None). Only a valid name
    before the first ``=`` names (a path such as ``./a=b`` stays a path), and only a known component
    after the last colon splits, so a path with a colon in it stays a path."""
    name, sep, rest = spec.partition("=")
    if not (sep and rest and SCORER_NAME.fullmatch(name)):
        name, rest = None, spec  # type: ignore[assignment]
    model, sep, component = rest.rpartition(":")
    if sep and model and component in SCORER_COMPONENTS:
        return name, model, component
    return name, rest, None


def split_scorer(spec: str) -> tuple[str, str | None]:
    """``[NAME=]MODEL[:COMPONENT]`` -> (model, component or None): :func:`parse_scorer` without the name."""
    return parse_scorer(spec)[1:]  # type: ignore[return-value]


def model_label(model: str) -> str:
    """The name a model is served under by default: a preset as is, a folder or file by its name."""
    path = Path(os.path.expanduser(model))
    if os.sep in model or (os.altsep and os.altsep in model) or path.exists():
        return path.resolve().name or model
    return model


@dataclass(frozen=True)
class ServeConfig(ConfigMixin):
    """One HTTP server over one :class:`fastgen.Runtime`: its models, its address, its limits."""

    OPTION_NAME = "serve option"

    model: str | None = None
    """The generator: a preset (tiny, tiny-sdxl, sd15, sdxl), a local diffusers pipeline folder, or a
    folder of engine directories made by `fastgen build --component all --out DIR`; none: no generator
    (a scoring-only server; a server needs a model, a scorer or both)."""
    scorers: tuple[str, ...] = ()
    """Scorers to serve, each [NAME=]MODEL[:COMPONENT] (component classifier, text-classifier, text-encoder
    or image-encoder; default classifier; a detector's .onnx file needs none). NAME is what requests pass as `model` (/v1/score) or `scorer` (best-of-N) to pick
    it and its label in the metrics; without one a scorer is named by its kind (text, image), so
    there is at most one unnamed text and one unnamed image scorer. The only image classifier (or
    the one a request names) ranks best-of-N candidates."""
    loras: tuple[str, ...] = ()
    """LoRA adapters loaded into the generator at start, each PATH or PATH:SCALE (a .safetensors file in
    diffusers/PEFT or kohya format, or a diffusers LoRA folder; scale 1 by default), named after the
    file's stem and applied to every generation (fastgen.lora: no engine is rebuilt)."""
    model_name: str | None = None
    """The name clients pass as `model` and /v1/models lists; none: the preset's name, or the folder's."""
    backend: str = field(default="onnxruntime", metadata={"choices": backend_names})
    """Engine backend of the models that are built (not of engine directories)."""
    device: Device = "auto"
    """Where the engines run: cuda when a GPU is present (auto), or forced."""
    precision: Precision = "fp32"
    """Engine precision (not of engine directories)."""
    quantization: str = field(default="none", metadata={"choices": _quantizations})
    """Quantize the UNet (a fastgen.quant preset; text encoders, the VAE and the classifiers stay in float)."""
    profile: str | None = None
    """Shape ranges for the generator's engines, e.g. batch=1:8:16,height=256:512:768 (none: the model's)."""
    cache_dir: str | None = None
    """Engine cache root; none: $FASTGEN_CACHE_DIR, else ~/.cache/fastgen/engines."""
    host: str = "127.0.0.1"
    """Address to listen on: the loopback interface by default; 0.0.0.0 listens on every interface
    (set an api_key then)."""
    port: int = 8000
    """TCP port to listen on (0: any free port, printed at start)."""
    api_key: str | None = field(default=None, repr=False)
    """Clients must send `Authorization: Bearer KEY` (every route but /, /static, /healthz and /readyz);
    none: $FASTGEN_API_KEY, and without it no key is asked for."""
    max_body_bytes: int = 32 << 20
    """Largest request body, in bytes (uploads and base64 images included); larger: 413."""
    max_image_pixels: int = 4096 * 4096
    """Largest input image (width x height) accepted for editing or scoring, and largest generated size; a
    larger upload: 413."""
    max_images: int = 16
    """Images per generation request, at most: n, and best-of-N candidates."""
    max_items: int = 64
    """Texts and images per scoring request (/v1/score, /v1/embeddings, /v1/detect), at most."""
    access_log: bool = False
    """Log one line per request (uvicorn's access log). Off by default: /metrics counts every request
    by route and status with its latency, and the line costs the event loop about 0.2 ms per request
    (an eighth of a scoring request's server time, measured on the tiny preset); errors are logged
    either way."""
    warmup: bool = True
    """Run one small generation and one scoring call per engine before /readyz says ready."""
    keep_alive_s: float = 75.0
    """Seconds an idle keep-alive connection stays open. Longer than a load balancer's idle timeout
    (AWS ALB and nginx: 60 s) so that the balancer, not the server, closes idle connections: a
    request sent on a connection as the server closes it gets no answer (a 502 at the balancer).
    uvicorn's own default is 5 s."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: seconds that accepted requests get to finish before they are cancelled and the
    server exits."""
    intra_op_threads: int = 0
    """Threads inside one operator of every engine, 1 to 1024 (0: automatic, as
    fastgen.ExecutionOptions.intra_op_threads). Give each server its share of the cores where
    several share a machine (replicas, other services)."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Queueing and batching of the runtime (fastgen.RuntimeConfig)."""

    def __post_init__(self) -> None:
        self.validate_literals()
        check_backend(self.backend)
        if self.quantization not in _quantizations():
            raise InvalidArgumentError("quantization", self.quantization, _quantizations())
        for name in ("model", "model_name", "profile", "cache_dir", "api_key"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                shown = "an empty string" if isinstance(value, str) else type(value).__name__
                raise InvalidArgumentError(name.replace("_", "-"), "<hidden>" if name == "api_key" else shown,
                                           "a non-empty string, or none")
        scorers = (self.scorers,) if isinstance(self.scorers, str) else tuple(self.scorers)
        names: list[str] = []
        for spec in scorers:
            if not isinstance(spec, str) or not spec.strip() or spec.startswith("="):
                raise InvalidArgumentError("scorer", spec, "[NAME=]MODEL[:COMPONENT] (classifier, text-classifier)")
            name = parse_scorer(spec)[0]
            if name is not None:
                check_scorer_name(name, "scorer")
                if name in names:
                    raise InvalidArgumentError("scorer", spec, reason=f"two scorers named {name!r}")
                if self.model is not None and name == (self.model_name or model_label(self.model)):
                    raise InvalidArgumentError("scorer", spec, reason=f"{name!r} is the generator's name")
                names.append(name)
        object.__setattr__(self, "scorers", scorers)
        loras = (self.loras,) if isinstance(self.loras, str) else tuple(self.loras)
        names = [lora_name(parse_lora_arg(text)[0]) for text in loras]
        if loras and self.model is None:
            raise InvalidArgumentError("lora", loras[0], reason="LoRA adapters need a generator model")
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise InvalidArgumentError("lora", duplicate, reason="two adapters of that name: rename a file")
        object.__setattr__(self, "loras", loras)
        if not isinstance(self.host, str) or not self.host.strip():
            raise InvalidArgumentError("host", self.host, "an address or host name, e.g. 127.0.0.1 or 0.0.0.0")
        _int("port", self.port, 0, 65535)
        for name in ("max_body_bytes", "max_image_pixels", "max_images", "max_items"):
            _int(name, getattr(self, name), 1)
        _int("intra_op_threads", self.intra_op_threads, 0, 1024)
        for name in ("warmup", "access_log"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(name.replace("_", "-"), getattr(self, name), (True, False))
        for name, zero in (("drain_timeout_s", True), ("keep_alive_s", False)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < float("inf")
                    or (value == 0 and not zero)):
                raise InvalidArgumentError(name.replace("_", "-"), value,
                                           f"finite numbers {'>=' if zero else '>'} 0 (seconds)")
        if isinstance(self.runtime, dict):
            object.__setattr__(self, "runtime", RuntimeConfig.from_dict(self.runtime))
        if not isinstance(self.runtime, RuntimeConfig):
            raise InvalidArgumentError("runtime", type(self.runtime).__name__, "a fastgen.RuntimeConfig")

    # --- derived -----------------------------------------------------------------------------------

    def check_items(self, count: int, argument: str) -> None:
        """Refuse a scoring request of more than ``max_items`` texts and images (before any is decoded)."""
        if count > self.max_items:
            raise InvalidArgumentError(argument, f"{count} items",
                                       f"at most {self.max_items} texts and images per request (max_items)")

    def resolved_api_key(self) -> str | None:
        """``api_key``, else $FASTGEN_API_KEY, else None (no key needed)."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None

    @property
    def served_name(self) -> str | None:
        """The generator's name for clients (``model_name``, else from ``model``); None without one."""
        if self.model is None:
            return None
        return self.model_name or model_label(self.model)

    def scorer_specs(self) -> list[tuple[str, str | None]]:
        """Each ``scorers`` entry as (model, component or None)."""
        return [split_scorer(s) for s in self.scorers]

    def named_scorer_specs(self) -> list[tuple[str | None, str, str | None]]:
        """Each ``scorers`` entry as (name or None, model, component or None)."""
        return [parse_scorer(s) for s in self.scorers]



__all__ = ["API_KEY_ENV", "SCORER_COMPONENTS", "ServeConfig", "model_label", "parse_scorer", "split_scorer"]
