"""``fastgen.Scorer``: image, text and video-frame classification on one classifier engine.

Inputs become engine feeds through the scorer's preprocessor (:mod:`fastgen.pipelines.preprocess`,
shared with ``fastgen.Runtime``): images (see :mod:`fastgen.pipelines.classifier_images` for the
accepted kinds) are converted to RGB, resized to the engine's image size with PIL, stacked into a
uint8 (N, H, W, C) batch and normalised with :func:`fastgen.ops.normalize_nchw` (``(x / 255 - mean)
/ std``; the C++ op when it is built). Texts are tokenized with the engine's tokenizer, sorted by
length so that each batch pads only to its own longest text (the attention mask makes the padding
invisible to the model), and returned in the caller's order. Videos are sampled by
:mod:`fastgen.pipelines.video` and their frames scored as images; the result holds the mean and max
probability of every label over the frames.

Probabilities are the softmax of the logits (``multi_label``: the sigmoid of each logit), computed
in float32 with numpy by :meth:`Scorer.scores`, the one way logits become scores. Logits with a NaN
or an infinity are a :class:`~fastgen.errors.NumericalError` naming the input, never a score
(:meth:`Scorer.score_rows` gives the error per row, for callers that batch requests together).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fastgen.engines.base import Engine
from fastgen.errors import InvalidArgumentError, NumericalError, UnsupportedError, check_choice
from fastgen.models.metadata import ImageClassifierMetadata, TextClassifierMetadata
from fastgen.models.spec import parse_dim
from fastgen.pipelines.config import check_text
from fastgen.pipelines.preprocess import ImagePreprocessor, TextPreprocessor, positive_int
from fastgen.pipelines.scorer_detect import DetectionMethods
from fastgen.pipelines.scorer_embed import EmbeddingMethods
from fastgen.pipelines.scorer_similarity import SimilarityMethods
from fastgen.pipelines.scorer_video import VideoMethods, VideoScore
from fastgen.pipelines.scores import Score, nonfinite_error, padded_output
from fastgen.pipelines.scores import batch_progress as _progress

logger = logging.getLogger(__name__)

Kind = Literal["image", "text"]
KINDS = ("image", "text")
#: What a scorer's engine does: classify (logits), embed (embeddings: :meth:`Scorer.embed`), detect
#: (boxes: :meth:`Scorer.detect`). Inferred from the engine's outputs unless given.
Task = Literal["classify", "embed", "detect", "similarity"]
TASKS = ("classify", "embed", "detect", "similarity")
#: engine component -> default kind
COMPONENT_KINDS = {"classifier": "image", "text-classifier": "text"}
#: task -> (the method that turns one batch of feeds into logits, the one that turns logits into probabilities):
#: the one place a task changes how ``logits`` / ``scores`` work. A detector's "logits" are each label's best
#: confidence after NMS (DetectionMethods), probabilities already; every other task's are the engine's.
TASK_STEPS = {"detect": ("detection_logits", "detection_probabilities")}
ENGINE_STEPS = ("_engine_logits", "_activation")


class Scorer(SimilarityMethods, EmbeddingMethods, DetectionMethods, VideoMethods):
    """Classify images, texts or video frames with one classifier :class:`~fastgen.Engine`; or embed
    them (an encoder engine, :meth:`embed`), or detect objects in images (a detector, :meth:`detect`).

    ``task``: ``classify``, ``embed`` or ``detect`` (default: from the engine's outputs).

    ``kind``: ``image`` or ``text`` (default: from the engine's component, ``classifier`` or
    ``text-classifier``, else from its inputs). ``labels``: names in logit order (default: the
    engine's ``metadata.labels``, else ``label_0``...). ``tokenizer`` (text): default the engine's.
    ``image_size`` (int or (height, width)), ``mean``, ``std``, ``resample`` (PIL code or name) and
    ``center_crop`` (shorter side resize + centre crop instead of a direct resize): default the
    engine's metadata (:class:`~fastgen.models.metadata.ImageClassifierMetadata`), then the
    engine's input shape, ImageNet statistics, bilinear and no crop. ``max_length`` (text): default
    the metadata's ``max_length``, capped by the engine's sequence range. ``batch_size``: default the
    engine profile's opt batch, at most its max. ``multi_label``: sigmoid instead of softmax.
    ``top_k``: how many labels ``Score.top`` lists. ``progress``: a progress bar over batches.
    ``text_engine``: a CLIP / SigLIP text tower (``engine`` is then the image tower) and/or ``aesthetic``: a
    head on image embeddings (a module or a safetensors path): the task is ``similarity``
    (:mod:`fastgen.pipelines.scorer_similarity`).

    The steps are public for callers that batch on their own (``fastgen.Runtime``):
    ``scorer.text_preprocessor`` / ``scorer.image_preprocessor`` turn inputs into engine feeds,
    :meth:`logits` runs one batch of feeds, :meth:`scores` turns logits into :class:`Score` objects.
    """

    _logits_step, _probs_step = ENGINE_STEPS  # the task's steps (TASK_STEPS), set by __init__

    def __init__(self, engine: Engine, *, kind: Kind | None = None, task: Task | None = None,
                 labels: Sequence[str] | None = None,
                 tokenizer: Any = None, image_size: int | Sequence[int] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 resample: int | str | None = None, center_crop: bool | None = None,
                 max_length: int | None = None, batch_size: int | None = None, multi_label: bool = False,
                 top_k: int = 3, progress: bool = False, text_engine: Engine | None = None,
                 aesthetic: Any = None) -> None:
        if not isinstance(engine, Engine):
            raise InvalidArgumentError("engine", type(engine).__name__, "a fastgen Engine (fastgen.build / load_engine)")
        self.engine = engine
        self._init_similarity(text_engine, aesthetic, tokenizer=tokenizer, max_length=max_length)
        metadata = engine.metadata
        spec = engine.spec
        self.kind: Kind = kind or self._infer_kind()
        check_choice("kind", self.kind, KINDS)
        self.multi_label = bool(multi_label)
        self.top_k = positive_int("top_k", top_k)
        self.progress = progress
        self.task: Task = task or self._infer_task()
        check_choice("task", self.task, TASKS)
        self.output_name = "logits" if "logits" in spec.output_names else spec.output_names[0]
        if self.task == "classify":
            out_spec = spec.outputs[spec.output_names.index(self.output_name)]
            if len(out_spec.shape) != 2:
                raise UnsupportedError(f"engine output {self.output_name!r} has shape {out_spec.shape}; "
                                       "a classifier's logits are (batch, num_labels)")
            self._num_labels = out_spec.shape[1] if isinstance(out_spec.shape[1], int) else None
            recorded = (metadata.labels if isinstance(metadata, (ImageClassifierMetadata, TextClassifierMetadata))
                        else None)
            self._labels = self._check_labels(labels if labels is not None else recorded)
        else:  # embeddings have no labels; a detector's come from its metadata (its _setup_detect)
            self._num_labels = None
            self._labels = list(labels) if labels is not None else None
        self._image_options = {"image_size": image_size, "mean": mean, "std": std, "resample": resample}
        self.text_preprocessor: TextPreprocessor | None = None
        """Texts -> engine feeds (a text scorer; None for an image one)."""
        self.image_preprocessor: ImagePreprocessor | None = None
        """Images -> engine feeds (an image scorer; None for a text one)."""
        if self.kind == "image":
            reason = ImagePreprocessor.unsupported(engine)
            if reason is not None:
                raise InvalidArgumentError("kind", "image", KINDS, reason=reason)
            self.image_preprocessor = ImagePreprocessor(engine, image_size=image_size, mean=mean, std=std,
                                                        resample=resample, center_crop=center_crop)
        else:
            reason = TextPreprocessor.unsupported(engine)
            if reason is not None:
                raise InvalidArgumentError("kind", "text", KINDS, reason=reason)
            self.text_preprocessor = TextPreprocessor(engine, tokenizer=tokenizer, max_length=max_length)
        self._setup_batch(batch_size)
        setup = getattr(self, f"_setup_{self.task}", None)  # the task's mixin finishes the set-up
        if setup is not None:
            setup()
        # Method names, not bound methods: a bound method held by its own object is a reference cycle, and
        # a dropped scorer would keep its engine (and its device memory) until the cyclic collector ran.
        self._logits_step, self._probs_step = TASK_STEPS.get(self.task, ENGINE_STEPS)

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: Any, component: str | None = None, *, backend: str = "onnxruntime",
                        device: str = "auto", precision: str = "fp32", cache: Any = None,
                        quantization: Any = "none", execution: Any = None, **options: Any) -> Scorer:
        """A scorer over a built (cached) engine of ``model``.

        ``model``: a preset (``tiny`` has ``classifier`` and ``text-classifier``; the default
        component is ``classifier``), a local transformers folder, anything else
        :func:`fastgen.build` takes, or an engine directory made by ``fastgen build`` (a folder with
        ``manifest.json``) or an ``.onnx`` file, which are loaded as they are (``backend`` and
        ``precision`` do not apply; ``device="auto"`` keeps the engine's own device when usable).
        ``quantization``: a ``fastgen.quant`` preset name or config for the built engine (the
        classifier head stays in float, see ``fastgen.quant.DEFAULT_SKIP``). ``execution``: a
        :class:`~fastgen.ExecutionOptions` for the engine (threads, provider; default: automatic).
        ``options`` go to :class:`Scorer`. A two-tower model (``tiny-clip``, a CLIPModel / SiglipModel folder, a
        folder of ``text-tower/`` and ``image-tower/`` engines) with no ``component`` gives one scorer over both
        towers (with the folder's ``aesthetic.safetensors`` head when there is one).
        """
        from fastgen.engines.build import build
        from fastgen.engines.cache import MANIFEST
        from fastgen.engines.loading import load_engine

        towers = cls._tower_engines(model, component, backend=backend, device=device, precision=precision,
                                    cache=cache, quantization=quantization, execution=execution)
        if towers is not None:  # a two-tower model (CLIP, SigLIP): one scorer over both engines
            options.setdefault("aesthetic", towers[2])
            return cls(towers[0], text_engine=towers[1], **options)
        path = Path(model).expanduser() if isinstance(model, (str, os.PathLike)) else None
        if path is not None and ((path / MANIFEST).is_file() or
                                 (path.is_file() and path.suffix.lower() == ".onnx")):
            if quantization not in (None, "none"):
                raise InvalidArgumentError("quantization", str(quantization), ("none",),
                                           reason=f"{path} is a built engine; quantize when building it")
            engine = load_engine(path, device=None if device == "auto" else device, execution=execution)
            if component is not None and component != engine.spec.component and not (
                    component == "classifier" and engine.spec.component == "text-classifier"):
                raise InvalidArgumentError("component", component, [engine.spec.component],
                                           reason=f"{path} is a {engine.spec.component} engine")
        else:
            engine = build(model, component=component or "classifier", backend=backend, device=device,
                           precision=precision, cache=cache, quantization=quantization,
                           **({} if execution is None else {"execution": execution}))
        return cls(engine, **options)

    def _infer_task(self) -> Task:
        """``detect`` or ``embed`` when the engine's outputs say so (the task mixins decide), else ``classify``."""
        spec = self.engine.spec
        if self._is_similarity(spec):
            return "similarity"
        if self._is_detector(spec):
            return "detect"
        if self._is_embedder(spec):
            return "embed"
        return "classify"

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
        value = positive_int("batch_size", batch_size)
        if value > self._max_batch:
            raise InvalidArgumentError("batch_size", value, f"1 to {self._max_batch} (this engine's batch profile)")
        return value

    # --- properties ----------------------------------------------------------------------------

    def _text(self) -> TextPreprocessor:
        if self.text_preprocessor is None:
            raise AttributeError(f"an {self.kind} scorer has no text settings")
        return self.text_preprocessor

    def _image(self) -> ImagePreprocessor:
        if self.image_preprocessor is None:
            raise AttributeError(f"a {self.kind} scorer has no image settings")
        return self.image_preprocessor

    @property
    def tokenizer(self) -> Any:
        """The text preprocessor's tokenizer (text scorers)."""
        return self._text().tokenizer

    @property
    def max_length(self) -> int:
        """Texts are truncated at this many tokens (text scorers)."""
        return self._text().max_length

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) images are resized to (image scorers)."""
        return self._image().size

    @property
    def channels(self) -> int:
        """Channels of the engine's pixel input, 1 or 3 (image scorers)."""
        return self._image().channels

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the normalisation (image scorers)."""
        return self._image().mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation of the normalisation (image scorers)."""
        return self._image().std

    @property
    def resample(self) -> int:
        """PIL's resampling filter code (image scorers)."""
        return self._image().resample

    @property
    def center_crop(self) -> bool:
        """Whether images are resized on their shorter side and centre-cropped (image scorers)."""
        return self._image().center_crop

    @property
    def labels(self) -> list[str]:
        """Label names in logit order (a detector: in class-score order; an embedder: none)."""
        if self._labels is None and self.task == "embed":
            return []
        if self._labels is None:  # a graph whose label dim is symbolic: ask it once
            logits = self.engine(self.engine.spec.sample_inputs("min"))[self.output_name]
            self._num_labels = int(logits.shape[-1])
            self._labels = [f"label_{i}" for i in range(self._num_labels)]
        return self._labels

    def __repr__(self) -> str:
        return f"<Scorer {self.kind} {len(self.labels)} labels on {self.engine!r}>"

    # --- running -------------------------------------------------------------------------------

    def logits(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """One engine call over ready engine inputs (batch first, from this scorer's preprocessor):
        the (n, num_labels) float32 logits on the CPU. A batch under the engine's minimum is padded up
        to it (its last row repeated) and the extra rows dropped."""
        return getattr(self, self._logits_step)(feeds)

    def _engine_logits(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """A classifier's :meth:`logits`: the engine's own output."""
        logits = padded_output(self.engine, feeds, self._min_batch, self.output_name, dims=2,
                               expected="(batch, num_labels)")
        return logits.float().cpu()

    def _activation(self, logits: np.ndarray) -> np.ndarray:
        """A classifier's probabilities: the sigmoid of each logit (``multi_label``), else the softmax of each row."""
        if self.multi_label:
            return 1.0 / (1.0 + np.exp(-logits))
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def scores(self, logits: torch.Tensor | np.ndarray) -> list[Score]:
        """One :class:`Score` per row of a (n, num_labels) logits batch (:meth:`logits`); a row with a
        NaN or an infinity raises :class:`NumericalError` naming it."""
        return self._scores(logits)[0]

    def score_rows(self, logits: torch.Tensor | np.ndarray) -> list[Score | NumericalError]:
        """:meth:`scores`, but a non-finite row gives its :class:`NumericalError` in its place instead of
        failing the batch: what a caller scoring many requests in one batch fails each request by."""
        logits = self._as_array(logits)
        bad = set(self._nonfinite(logits))
        if not bad:
            return list(self.scores(logits))
        good = [i for i in range(len(logits)) if i not in bad]
        scores = iter(self.scores(logits[good]) if good else [])
        return [self._numerical_error([i], "row") if i in bad else next(scores) for i in range(len(logits))]

    @staticmethod
    def _as_array(logits: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(logits, torch.Tensor):
            logits = logits.detach().float().cpu().numpy()
        return np.asarray(logits, dtype=np.float32)  # (n, num_labels)

    @staticmethod
    def _nonfinite(logits: np.ndarray) -> list[int]:
        return np.flatnonzero(~np.isfinite(logits.reshape(len(logits), -1)).all(axis=1)).tolist()

    def _numerical_error(self, rows: Sequence[int], what: str) -> NumericalError:
        return nonfinite_error(f"the {self.engine.spec.component} engine", "logits", rows, what)

    def _scores(self, logits: torch.Tensor | np.ndarray, offset: int = 0, what: str = "row"
                ) -> tuple[list[Score], np.ndarray]:
        """(one Score per row, the (n, num_labels) float32 probabilities) of a logits batch; a non-finite
        row raises :class:`NumericalError` naming it as ``what[offset + i]``.

        The probabilities are computed with numpy in float32: on a busy CPU, PyTorch's softmax over a
        batch can wait milliseconds for its intra-op threads (5 to 12 ms per call measured on a loaded
        2-core machine), longer than the engine call of a small classifier.
        """
        logits = self._as_array(logits)
        bad = self._nonfinite(logits)
        if bad:  # a softmax of NaN is NaN, and an argsort of it a made-up "top" label
            raise self._numerical_error([offset + i for i in bad], what)
        probs = getattr(self, self._probs_step)(logits).astype(np.float32)
        labels = self.labels
        if logits.shape[0] and logits.shape[1] != len(labels):
            raise InvalidArgumentError("labels", f"{len(labels)} labels", f"{logits.shape[1]} (the engine's logits)")
        out = []
        for row_logits, row_probs, row_top in zip(logits.tolist(), probs.tolist(), self._top(probs)):
            out.append(Score(dict(zip(labels, row_probs)), [(labels[j], row_probs[j]) for j in row_top], row_logits))
        return out, probs

    def _top(self, probs: np.ndarray) -> list[list[int]]:
        """The ``top_k`` label indices of each row of (n, num_labels) probabilities, most probable
        first, ties in label order. One stable argsort per batch, not a sort per row: on a busy device
        thread building scores was a tenth of a small classifier's batch time."""
        k = min(self.top_k, probs.shape[-1])
        return np.argsort(-probs, axis=-1, kind="stable")[:, :k].tolist()  # (n, k)

    def _require(self, kind: Kind, what: str, value: Any) -> None:
        if self.kind != kind:
            raise InvalidArgumentError(what, value if isinstance(value, str) else type(value).__name__,
                                       reason=f"this scorer's model is a{'n' if self.kind == 'image' else ''} "
                                       f"{self.kind} classifier; pass {self.kind}s")

    def preprocess_images(self, images: Any) -> torch.Tensor:
        """Images -> the engine's pixel input: (N, C, H, W) float32 on the CPU, ``(x / 255 - mean) / std``."""
        self._require("image", "images", images)
        return self._image()(images)

    def _image_probs(self, items: list[Any], batch_size: int | None, what: str = "images"
                     ) -> tuple[list[Score], torch.Tensor]:
        bs = self._check_batch(batch_size)
        prep = self._image()
        scores: list[Score] = []
        probs: list[np.ndarray] = []
        with _progress(-(-len(items) // bs), "scoring images", self.progress) as advance:
            for start in range(0, len(items), bs):
                pixels = prep.to_uint8(items[start:start + bs])  # (n, H, W, C) uint8
                batch_scores, batch_probs = self._scores(self.logits(prep.feeds(pixels)), start, what)
                scores += batch_scores
                probs.append(batch_probs)
                advance()
        return scores, (torch.from_numpy(np.concatenate(probs)) if probs else torch.empty(0, len(self.labels)))

    def score_images(self, images: Any, *, texts: Any = None, batch_size: int | None = None) -> list[Score]:
        """One :class:`Score` per image (see :mod:`fastgen.pipelines.classifier_images` for accepted kinds).

        A single image, a 4-D batch array / tensor, or a list of images; always returns a list.
        Unreadable files raise :class:`InvalidArgumentError` naming the file. ``texts``: a two-tower
        scorer's labels (zero-shot; without them, its aesthetic head scores): see ``scorer_similarity``.
        """
        if self.task == "similarity":
            return self._similarity_scores(images, texts, batch_size)
        if texts is not None:
            raise InvalidArgumentError("texts", "texts", reason="only a two-tower (CLIP / SigLIP) scorer scores images "
                                       "against texts")
        self._require("image", "images", images)
        return self._image_probs(self._image().flatten(images), batch_size)[0]

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
            check_text(f"texts[{i}]", t, "str")
        prep = self._text()
        bs = self._check_batch(batch_size)
        if not prep.can_pad:
            bs = 1  # a tokenizer without a pad token cannot batch texts of different lengths
        lengths = prep.lengths(items)
        order = sorted(range(len(items)), key=lengths.__getitem__)  # stable
        results: list[Score | None] = [None] * len(items)
        with _progress(-(-len(items) // bs), "scoring texts", self.progress) as advance:
            for start in range(0, len(items), bs):
                chunk = order[start:start + bs]
                logits = self.logits(prep.feeds([items[i] for i in chunk]))
                bad = self._nonfinite(self._as_array(logits))
                if bad:  # named by the caller's index, not the length-sorted one
                    raise self._numerical_error(sorted(chunk[i] for i in bad), "texts")
                for i, s in zip(chunk, self.scores(logits)):
                    results[i] = s
                advance()
        return results  # type: ignore[return-value]

    def __call__(self, inputs: Any, *, batch_size: int | None = None) -> list[Score]:
        """``score_images`` or ``score_texts``, by this scorer's kind."""
        if self.kind == "text":
            return self.score_texts(inputs, batch_size=batch_size)
        return self.score_images(inputs, batch_size=batch_size)

    def torch_modules(self) -> dict[str, torch.nn.Module]:
        """The PyTorch modules that run this scorer's classifier, by component name, as its engine
        lists them (:meth:`Engine.torch_modules`): ``{"classifier": module}`` on the torch backend,
        empty where the engine runs none (onnxruntime, TensorRT). For tools that work on modules,
        such as ``fastgen.optimize``: changing them in place changes the scores."""
        return dict(self.engine.torch_modules())

    def close(self) -> None:
        self.engine.close()
        if self.text_engine is not None:
            self.text_engine.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Score", "Scorer", "VideoScore"]
