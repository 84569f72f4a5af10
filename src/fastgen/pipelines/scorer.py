"""``fastgen.Scorer``: image, text and video-frame classification on one classifier engine.

Images (see :mod:`fastgen.pipelines.imageio` for the accepted kinds) are converted to RGB, resized
to the engine's image size with PIL, stacked into a uint8 (N, H, W, C) batch and normalised with
:func:`fastgen.ops.normalize_nchw` (``(x / 255 - mean) / std``; the C++ op when it is built).
Texts are tokenized with the engine's tokenizer, sorted by length so that each batch pads only to
its own longest text (the attention mask makes the padding invisible to the model), and returned
in the caller's order. Videos are sampled by :mod:`fastgen.pipelines.video` and their frames
scored as images; the result holds the mean and max probability of every label over the frames.

Probabilities are the softmax of the logits (``multi_label``: the sigmoid of each logit).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fastgen.engines.base import Engine
from fastgen.errors import InvalidArgumentError, UnsupportedError, check_choice
from fastgen.models.spec import parse_dim
from fastgen.pipelines import imageio
from fastgen.pipelines.video import sample_video

logger = logging.getLogger(__name__)

Kind = Literal["image", "text"]
KINDS = ("image", "text")
#: engine component -> default kind
COMPONENT_KINDS = {"classifier": "image", "text-classifier": "text"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Score:
    """Classification of one input."""

    probs: dict[str, float]
    """Label to probability, in the model's label order."""
    top: list[tuple[str, float]]
    """The ``top_k`` most probable labels, most probable first."""
    logits: list[float]
    """Raw logits, in label order."""

    @property
    def label(self) -> str:
        """The most probable label."""
        return self.top[0][0]

    def to_dict(self) -> dict[str, Any]:
        return {"probs": dict(self.probs), "top": [{"label": k, "prob": p} for k, p in self.top],
                "logits": list(self.logits)}


@dataclass
class VideoScore:
    """Classification of a video: per-frame scores and their mean and max per label."""

    mean: dict[str, float]
    """Label to its probability averaged over the sampled frames."""
    max: dict[str, float]
    """Label to its largest probability over the sampled frames."""
    top: list[tuple[str, float]]
    """The ``top_k`` labels by mean probability, most probable first."""
    frames: list[Score] = field(default_factory=list)
    """Score of each sampled frame, in video order."""
    indices: list[int] = field(default_factory=list)
    """Frame index (0-based) of each sampled frame."""
    timestamps: list[float | None] = field(default_factory=list)
    """Presentation time in seconds of each sampled frame (None for arrays)."""
    total_frames: int | None = None
    """Frame count of the video, when known."""

    def to_dict(self) -> dict[str, Any]:
        return {"mean": dict(self.mean), "max": dict(self.max),
                "top": [{"label": k, "prob": p} for k, p in self.top],
                "frames": [{"index": i, "timestamp": t, **s.to_dict()}
                           for i, t, s in zip(self.indices, self.timestamps, self.frames)],
                "total_frames": self.total_frames}


def _positive_int(argument: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgumentError(argument, value, "integers >= 1")
    return int(value)


def _dim_size(engine: Engine, entry: Any, which: str = "opt") -> int | None:
    """A spec shape entry's size: the int, or the profile's value for a symbol (None if unknown)."""
    parsed = parse_dim(entry)
    if parsed is None:
        return int(entry)
    rng = engine.spec.profile.dims.get(parsed[0])
    return None if rng is None else rng.at(which) // parsed[1]  # type: ignore[arg-type]


@contextlib.contextmanager
def _progress(total: int, description: str, enabled: bool) -> Iterator[Callable[[], None]]:
    """A transient rich bar on stderr over ``total`` batches (nothing when disabled or one batch)."""
    if not enabled or total <= 1:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


class Scorer:
    """Classify images, texts or video frames with one classifier :class:`~fastgen.Engine`.

    ``kind``: ``image`` or ``text`` (default: from the engine's component, ``classifier`` or
    ``text-classifier``, else from its inputs). ``labels``: names in logit order (default: the
    engine's ``labels`` extra, else ``label_0``...). ``tokenizer`` (text): default the engine's.
    ``image_size`` (int or (height, width)), ``mean``, ``std``, ``resample`` (PIL code or name) and
    ``center_crop`` (shorter side resize + centre crop instead of a direct resize): default the
    engine's extras (``image_size``, ``mean``, ``std``, ``resample``, ``center_crop``), then the
    engine's input shape, ImageNet statistics, bilinear and no crop. ``max_length`` (text): default
    the ``max_length`` extra, capped by the engine's sequence range. ``batch_size``: default the
    engine profile's opt batch, at most its max. ``multi_label``: sigmoid instead of softmax.
    ``top_k``: how many labels ``Score.top`` lists. ``progress``: a progress bar over batches.
    """

    def __init__(self, engine: Engine, *, kind: Kind | None = None, labels: Sequence[str] | None = None,
                 tokenizer: Any = None, image_size: int | Sequence[int] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 resample: int | str | None = None, center_crop: bool | None = None,
                 max_length: int | None = None, batch_size: int | None = None, multi_label: bool = False,
                 top_k: int = 3, progress: bool = False) -> None:
        if not isinstance(engine, Engine):
            raise InvalidArgumentError("engine", type(engine).__name__, "a fastgen Engine (fastgen.build / load_engine)")
        self.engine = engine
        self.extras = dict(engine.extras)
        spec = engine.spec
        self.kind: Kind = kind or self._infer_kind()
        check_choice("kind", self.kind, KINDS)
        self.multi_label = bool(multi_label)
        self.top_k = _positive_int("top_k", top_k)
        self.progress = progress
        self.output_name = "logits" if "logits" in spec.output_names else spec.output_names[0]
        out_spec = spec.outputs[spec.output_names.index(self.output_name)]
        if len(out_spec.shape) != 2:
            raise UnsupportedError(f"engine output {self.output_name!r} has shape {out_spec.shape}; "
                                   "a classifier's logits are (batch, num_labels)")
        self._num_labels = out_spec.shape[1] if isinstance(out_spec.shape[1], int) else None
        self._labels = self._check_labels(labels if labels is not None else self.extras.get("labels"))
        if self.kind == "image":
            self._setup_image(image_size, mean, std, resample, center_crop)
        else:
            self._setup_text(tokenizer, max_length)
        self._setup_batch(batch_size)

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: Any, component: str | None = None, *, backend: str = "onnxruntime",
                        device: str = "auto", precision: str = "fp32", cache: Any = None,
                        quantization: Any = "none", **options: Any) -> Scorer:
        """A scorer over a built (cached) engine of ``model``.

        ``model``: a preset (``tiny`` has ``classifier`` and ``text-classifier``; the default
        component is ``classifier``), a local transformers folder, anything else
        :func:`fastgen.build` takes, or an engine directory made by ``fastgen build`` (a folder with
        ``manifest.json``) or an ``.onnx`` file, which are loaded as they are (``backend`` and
        ``precision`` do not apply; ``device="auto"`` keeps the engine's own device when usable).
        ``quantization``: a ``fastgen.quant`` preset name or config for the built engine (the
        classifier head stays in float, see ``fastgen.quant.DEFAULT_SKIP``). ``options`` go to
        :class:`Scorer`.
        """
        from fastgen.engines.build import build
        from fastgen.engines.cache import MANIFEST
        from fastgen.engines.loading import load_engine

        path = Path(model).expanduser() if isinstance(model, (str, os.PathLike)) else None
        if path is not None and ((path / MANIFEST).is_file() or
                                 (path.is_file() and path.suffix.lower() == ".onnx")):
            if quantization not in (None, "none"):
                raise InvalidArgumentError("quantization", str(quantization), ("none",),
                                           reason=f"{path} is a built engine; quantize when building it")
            engine = load_engine(path, device=None if device == "auto" else device)
            if component is not None and component != engine.spec.component and not (
                    component == "classifier" and engine.spec.component == "text-classifier"):
                raise InvalidArgumentError("component", component, [engine.spec.component],
                                           reason=f"{path} is a {engine.spec.component} engine")
        else:
            engine = build(model, component=component or "classifier", backend=backend, device=device,
                           precision=precision, cache=cache, quantization=quantization)
        return cls(engine, **options)

    def _infer_kind(self) -> Kind:
        spec = self.engine.spec
        if spec.component in COMPONENT_KINDS:
            return COMPONENT_KINDS[spec.component]  # type: ignore[return-value]
        if "input_ids" in spec.input_names:
            return "text"
        if len(spec.inputs) == 1 and len(spec.inputs[0].shape) == 4:
            return "image"
        raise InvalidArgumentError("kind", None, KINDS, reason=f"cannot tell from a {spec.component!r} engine "
                                   f"with inputs {spec.input_names}")

    def _check_labels(self, labels: Sequence[str] | None) -> list[str] | None:
        if labels is None:
            return [f"label_{i}" for i in range(self._num_labels)] if self._num_labels else None
        if isinstance(labels, str) or not all(isinstance(x, str) for x in labels):
            raise InvalidArgumentError("labels", labels, "a list of label names (strings)")
        labels = list(labels)
        if self._num_labels is not None and len(labels) != self._num_labels:
            raise InvalidArgumentError("labels", f"{len(labels)} labels", f"{self._num_labels} (the engine's logits)")
        if len(set(labels)) != len(labels):
            raise InvalidArgumentError("labels", labels, reason="names must be unique")
        return labels

    def _setup_image(self, image_size: Any, mean: Any, std: Any, resample: Any, center_crop: Any) -> None:
        spec = self.engine.spec
        if len(spec.inputs) != 1 or len(spec.inputs[0].shape) != 4 or not spec.inputs[0].dtype.startswith(("float", "bfloat")):
            raise InvalidArgumentError("kind", "image", KINDS, reason=f"engine inputs {spec.input_names} are not "
                                       "one (batch, channels, height, width) float tensor")
        self.input_name = spec.inputs[0].name
        _, c, h, w = spec.inputs[0].shape
        self.channels = _dim_size(self.engine, c) or 3
        if self.channels not in (1, 3):
            raise UnsupportedError(f"image classifiers with {self.channels} input channels (supported: 1, 3)")
        size = image_size if image_size is not None else self.extras.get("image_size")
        if size is None:
            size = (_dim_size(self.engine, h), _dim_size(self.engine, w))
            if None in size:
                raise InvalidArgumentError("image_size", None, reason="the engine states no image size: pass one")
        if isinstance(size, (int, np.integer)):
            size = (size, size)
        if (isinstance(size, str) or not isinstance(size, Sequence) or len(size) != 2
                or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in size)):
            raise InvalidArgumentError("image_size", image_size, "an int >= 1 or (height, width)")
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if self.channels == 3 else ((0.5,), (0.5,))
        self.mean = tuple(float(v) for v in (mean if mean is not None else self.extras.get("mean", default_mean)))
        self.std = tuple(float(v) for v in (std if std is not None else self.extras.get("std", default_std)))
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels or (name == "std" and 0.0 in values):
                raise InvalidArgumentError(name, list(values), f"{self.channels} floats, one per channel"
                                           + (", non-zero" if name == "std" else ""))
        self.resample = imageio.resample_code(resample if resample is not None else self.extras.get("resample", 2))
        self.center_crop = bool(center_crop if center_crop is not None else self.extras.get("center_crop", False))

    def _setup_text(self, tokenizer: Any, max_length: int | None) -> None:
        spec = self.engine.spec
        names = spec.input_names
        unknown = [n for n in names if n not in _TOKEN_INPUTS]
        if "input_ids" not in names or unknown:
            raise InvalidArgumentError("kind", "text", KINDS, reason=f"engine inputs {names} are not token inputs "
                                       f"({', '.join(_TOKEN_INPUTS)})")
        self.tokenizer = tokenizer if tokenizer is not None else self.engine.tokenizer
        if self.tokenizer is None:
            raise InvalidArgumentError("tokenizer", None, reason="this text engine has no saved tokenizer: pass one")
        seq_entry = spec.inputs[names.index("input_ids")].shape[1]
        self._static_seq = seq_entry if isinstance(seq_entry, int) else None
        seq_max = _dim_size(self.engine, seq_entry, "max")
        self._seq_min = _dim_size(self.engine, seq_entry, "min") or 1
        limit = max_length if max_length is not None else self.extras.get("max_length")
        if limit is None:
            model_max = getattr(self.tokenizer, "model_max_length", None)
            limit = model_max if isinstance(model_max, int) and model_max < 1_000_000 else None
        if limit is None:
            limit = seq_max or 512
        limit = _positive_int("max_length", limit)
        self.max_length = min(limit, seq_max) if seq_max else limit

    def _setup_batch(self, batch_size: int | None) -> None:
        first = self.engine.spec.inputs[0].shape[0]
        if isinstance(first, int):  # a graph with a fixed batch: short batches are padded up to it
            self._min_batch = self._max_batch = default = first
        else:
            rng = self.engine.spec.profile.dims.get(parse_dim(first)[0])  # type: ignore[index]
            self._max_batch = rng.max if rng is not None else 1 << 30
            default = min(rng.opt, self._max_batch) if rng is not None else 1
            # TensorRT refuses batches under the profile's min: those are padded up to it
            self._min_batch = rng.min if rng is not None and self.engine.strict_profile else 1
        self.batch_size = self._check_batch(batch_size, default)

    def _check_batch(self, batch_size: int | None, default: int | None = None) -> int:
        if batch_size is None:
            return default if default is not None else self.batch_size
        value = _positive_int("batch_size", batch_size)
        if value > self._max_batch:
            raise InvalidArgumentError("batch_size", value, f"1 to {self._max_batch} (this engine's batch profile)")
        return value

    # --- properties ----------------------------------------------------------------------------

    @property
    def labels(self) -> list[str]:
        """Label names in logit order."""
        if self._labels is None:  # a graph whose label dim is symbolic: ask it once
            logits = self.engine(self.engine.spec.sample_inputs("min"))[self.output_name]
            self._num_labels = int(logits.shape[-1])
            self._labels = [f"label_{i}" for i in range(self._num_labels)]
        return self._labels

    def __repr__(self) -> str:
        return f"<Scorer {self.kind} {len(self.labels)} labels on {self.engine!r}>"

    # --- running -------------------------------------------------------------------------------

    def _run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (n, num_labels) float32 on the CPU for one batch, padded up to the engine's minimum."""
        n = next(iter(feeds.values())).shape[0]
        if n < self._min_batch:  # repeat the last row; its results are dropped below
            feeds = {k: torch.cat([v, v[-1:].expand(self._min_batch - n, *v.shape[1:])]) for k, v in feeds.items()}
        logits = self.engine(feeds)[self.output_name]
        if logits.dim() != 2 or logits.shape[0] != max(n, self._min_batch):
            raise UnsupportedError(f"engine output {self.output_name!r} has shape {tuple(logits.shape)} for a "
                                   f"batch of {max(n, self._min_batch)}; expected (batch, num_labels)")
        return logits[:n].float().cpu()

    def scores_from_logits(self, logits: torch.Tensor) -> tuple[list[Score], torch.Tensor]:
        """(one :class:`Score` per row, the (n, num_labels) float32 probabilities) of a logits batch."""
        logits = logits.float().cpu()  # (n, num_labels)
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        return self._make_scores(logits.detach().numpy(), probs.detach().numpy()), probs

    def _make_scores(self, logits: np.ndarray, probs: np.ndarray) -> list[Score]:
        """One Score per row of (n, num_labels) float32 logits and probabilities. The top-k is one
        stable argsort per batch (ties keep label order), not a sort per row: on a busy device thread
        building scores was a tenth of a small classifier's batch time."""
        labels = self.labels
        if logits.shape[0] and logits.shape[1] != len(labels):
            raise InvalidArgumentError("labels", f"{len(labels)} labels", f"{logits.shape[1]} (the engine's logits)")
        k = min(self.top_k, len(labels))
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :k].tolist()  # (n, k)
        out = []
        for row_logits, row_probs, row_top in zip(logits.tolist(), probs.tolist(), order):
            out.append(Score(dict(zip(labels, row_probs)), [(labels[j], row_probs[j]) for j in row_top], row_logits))
        return out

    def _require(self, kind: Kind, what: str, value: Any) -> None:
        if self.kind != kind:
            raise InvalidArgumentError(what, value if isinstance(value, str) else type(value).__name__,
                                       reason=f"this scorer's model is a{'n' if self.kind == 'image' else ''} "
                                       f"{self.kind} classifier; pass {self.kind}s")

    def preprocess_images(self, images: Any) -> torch.Tensor:
        """Images -> the engine's pixel input: (N, C, H, W) float32, ``(x / 255 - mean) / std``."""
        from fastgen.ops import normalize_nchw

        self._require("image", "images", images)
        items = imageio.flatten_images(images)
        pixels = imageio.images_to_uint8(items, self.image_size, channels=self.channels, resample=self.resample,
                                         center_crop=self.center_crop)  # (N, H, W, C) uint8
        return normalize_nchw(pixels, self.mean, self.std)

    def _image_probs(self, items: list[Any], batch_size: int | None) -> tuple[list[Score], torch.Tensor]:
        bs = self._check_batch(batch_size)
        scores: list[Score] = []
        probs: list[torch.Tensor] = []
        with _progress(-(-len(items) // bs), "scoring images", self.progress) as advance:
            for start in range(0, len(items), bs):
                batch_scores, batch_probs = self._image_batch(items[start:start + bs])
                scores += batch_scores
                probs.append(batch_probs)
                advance()
        return scores, (torch.cat(probs) if probs else torch.empty(0, len(self.labels)))

    def _image_batch(self, items: list[Any]) -> tuple[list[Score], torch.Tensor]:
        """One engine call over ``items`` (images): scores and (n, num_labels) probabilities."""
        from fastgen.ops import normalize_nchw

        pixels = imageio.images_to_uint8(items, self.image_size, channels=self.channels,
                                         resample=self.resample, center_crop=self.center_crop)
        # uint8 travels to the device (4x fewer bytes than floats); normalising there is one pass
        pixels = pixels.to(self.engine.device)  # (n, H, W, C) uint8
        x = normalize_nchw(pixels, self.mean, self.std, out_dtype=self.engine.float_dtype)  # (n, C, H, W)
        return self.scores_from_logits(self._run({self.input_name: x}))

    def score_images(self, images: Any, *, batch_size: int | None = None) -> list[Score]:
        """One :class:`Score` per image (see :mod:`fastgen.pipelines.imageio` for accepted kinds).

        A single image, a 4-D batch array / tensor, or a list of images; always returns a list.
        Unreadable files raise :class:`InvalidArgumentError` naming the file.
        """
        self._require("image", "images", images)
        return self._image_probs(imageio.flatten_images(images), batch_size)[0]

    def _text_feeds(self, texts: list[str], pad_to: int | None = None) -> dict[str, torch.Tensor]:
        if self._static_seq is not None:  # a fixed-length graph: pad every text to it
            padding: Any = "max_length"
            length = self._static_seq
        elif pad_to is not None:  # a length bucket's edge (fastgen.Runtime): one shape per bucket
            padding, length = "max_length", min(int(pad_to), self.max_length)
        else:
            padding, length = "longest", self.max_length
        if getattr(self.tokenizer, "pad_token", None) is None:
            padding = False  # batches of one (see score_texts): nothing to pad
        enc = self.tokenizer(texts, padding=padding, truncation=True, max_length=length, return_tensors="np",
                             return_attention_mask=True,
                             return_token_type_ids="token_type_ids" in self.engine.spec.input_names)
        if enc["input_ids"].shape[1] < self._seq_min:  # a strict engine's shortest sequence
            enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self._seq_min,
                                 return_tensors="np", return_attention_mask=True,
                                 return_token_type_ids="token_type_ids" in self.engine.spec.input_names)
        return {n: torch.from_numpy(np.asarray(enc[n], dtype=np.int64)) for n in self.engine.spec.input_names}

    def score_texts(self, texts: str | Sequence[str], *, batch_size: int | None = None) -> list[Score]:
        """One :class:`Score` per text, in order; a single string gives a list of one.

        Texts are truncated at ``max_length`` tokens and batched by length (each batch padded to its
        longest, with the attention mask), so results equal scoring each text alone.
        """
        self._require("text", "texts", texts)
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items:
            return []
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise InvalidArgumentError(f"texts[{i}]", type(t).__name__, "str")
        bs = self._check_batch(batch_size)
        if getattr(self.tokenizer, "pad_token", None) is None:
            bs = 1  # a tokenizer without a pad token cannot batch texts of different lengths
        lengths = [len(ids) for ids in self.tokenizer(items, truncation=True, max_length=self.max_length)["input_ids"]]
        order = sorted(range(len(items)), key=lengths.__getitem__)  # stable
        results: list[Score | None] = [None] * len(items)
        with _progress(-(-len(items) // bs), "scoring texts", self.progress) as advance:
            for start in range(0, len(items), bs):
                chunk = order[start:start + bs]
                scores, _ = self.scores_from_logits(self._run(self._text_feeds([items[i] for i in chunk])))
                for i, s in zip(chunk, scores):
                    results[i] = s
                advance()
        return results  # type: ignore[return-value]

    def score_batch(self, items: Sequence[Any], *, pad_to: int | None = None) -> list[Score]:
        """One engine call over ``items`` (texts or images, by this scorer's kind), for callers that batch.

        No splitting into ``batch_size`` batches and no reordering: ``len(items)`` must fit the
        engine's batch profile. Texts are padded to ``pad_to`` tokens (at most ``max_length``; it
        must hold the longest of them) or, by default, to the longest; images as :meth:`score_images`.
        """
        items = list(items)
        if not items:
            return []
        if self.kind == "text":
            for i, t in enumerate(items):
                if not isinstance(t, str):
                    raise InvalidArgumentError(f"texts[{i}]", type(t).__name__, "str")
            return self.scores_from_logits(self._run(self._text_feeds(items, pad_to)))[0]
        self._require("image", "images", items)
        return self._image_batch(imageio.flatten_images(items))[0]

    def score_feeds(self, feeds: dict[str, torch.Tensor]) -> list[Score]:
        """One engine call over ready engine inputs (batch first), for callers that prepare their own
        (``fastgen.Runtime`` pads texts it tokenized at submission): padded up to the engine's
        minimum batch, logits checked, one :class:`Score` per row.

        The probabilities are computed with numpy (float32; equal to :meth:`scores_from_logits` to
        about 1e-7): on a busy CPU, PyTorch's softmax over a batch can wait milliseconds for its
        intra-op threads (5 to 12 ms per call measured on a loaded 2-core machine), longer than the
        engine call of a small classifier.
        """
        logits = self._run(dict(feeds)).numpy()  # (n, num_labels) float32
        if self.multi_label:
            probs = 1.0 / (1.0 + np.exp(-logits))
        else:
            e = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probs = e / e.sum(axis=-1, keepdims=True)
        return self._make_scores(logits, probs.astype(np.float32))

    def score_video(self, video: Any, *, frames: int = 8, batch_size: int | None = None) -> VideoScore:
        """Score ``frames`` frames sampled uniformly over ``video`` and aggregate them per label.

        ``video``: a file path (decoded with PyAV) or a uint8 (T, H, W, C) array / tensor. See
        :mod:`fastgen.pipelines.video` for the sampling rule. Unreadable videos raise
        :class:`InvalidArgumentError`.
        """
        self._require("image", "video", os.fspath(video) if isinstance(video, os.PathLike) else video)
        sampled = sample_video(video, frames)
        scores, probs = self._image_probs(sampled.frames, batch_size)  # probs: (K, num_labels) float32
        labels = self.labels
        mean = probs.double().mean(dim=0).tolist()
        peak = probs.max(dim=0).values.tolist()
        top = sorted(zip(labels, mean), key=lambda lp: -lp[1])[:min(self.top_k, len(labels))]
        return VideoScore(dict(zip(labels, mean)), dict(zip(labels, peak)), top, scores, sampled.indices,
                          sampled.timestamps, sampled.total)

    def __call__(self, inputs: Any, *, batch_size: int | None = None) -> list[Score]:
        """``score_images`` or ``score_texts``, by this scorer's kind."""
        if self.kind == "text":
            return self.score_texts(inputs, batch_size=batch_size)
        return self.score_images(inputs, batch_size=batch_size)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Score", "Scorer", "VideoScore"]
