"""Object detection (YOLO-style outputs, non-maximum suppression): ``Scorer.detect``.

A mixin of :class:`fastgen.pipelines.scorer.Scorer`: methods over the scorer's engine(s) and preprocessors.

An engine is a detector (its task, when none is given, is ``detect``) when it takes one image and
returns one (batch, a, b) output whose dims fit a YOLO head over its input
(:func:`fastgen.pipelines.detection.output_layout`), or when its metadata is a
:class:`~fastgen.models.metadata.DetectorMetadata` (an ultralytics ONNX export: ``names``, ``imgsz``,
``stride`` in the graph's metadata, read by ``load_engine``). Labels come from the metadata, else
``label_<i>``; the input size from the metadata, else the engine's input shape; images are
letterboxed (:class:`~fastgen.pipelines.detection.LetterboxPreprocessor`) to ``x / 255`` pixels
unless a mean / std is recorded or given.

The steps are public for callers that batch on their own (``fastgen.Runtime``):
``scorer.image_preprocessor.letterbox(images)`` -> (uint8 pixels, letterboxes),
``scorer.image_preprocessor.feeds(pixels)`` -> engine feeds, :meth:`DetectionMethods.detector_outputs`
(one engine call), :meth:`DetectionMethods.detections` (decode + NMS + mapping, per row; or
:meth:`DetectionMethods.detection_rows`, a non-finite row's error in its place). As a
moderation scorer, ``Scorer.logits`` of a detector is :meth:`DetectionMethods.detection_logits`
(each label's best confidence after NMS, 0 where none is found) and its ``Score`` probabilities are
those confidences, so ``score_images``, ``score_video``, best-of-N and the Runtime's image scoring
work on a detector unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fastgen.errors import InvalidArgumentError, NumericalError, UnsupportedError
from fastgen.models.metadata import DetectorMetadata
from fastgen.pipelines.detection import (
    Detections,
    Layout,
    Letterbox,
    LetterboxPreprocessor,
    label_confidences,
    num_classes,
    output_layout,
    postprocess,
)
from fastgen.pipelines.preprocess import ImagePreprocessor, dim_size, positive_int
from fastgen.pipelines.scores import nonfinite_rows, padded_output

#: ``detect``'s defaults (ultralytics' predict defaults, but ``iou`` 0.45 as YOLOv5's and NudeNet's).
DEFAULT_CONF = 0.25
DEFAULT_IOU = 0.45
DEFAULT_MAX_DET = 300


def _fraction(argument: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise InvalidArgumentError(argument, value, "numbers from 0 to 1")
    return float(value)


class DetectionMethods:
    """Mixed into :class:`~fastgen.pipelines.scorer.Scorer`."""

    engine: Any
    kind: str
    task: str
    batch_size: int
    image_preprocessor: Any
    _labels: list[str] | None
    _num_labels: int | None
    _min_batch: int

    def _is_detector(self, spec: Any) -> bool:
        """Whether an engine with this spec is a detector (its task, when none is given, is ``detect``)."""
        return self._detector_layout(spec) is not None

    def _detector_layout(self, spec: Any, *, trusted: bool = False) -> Layout | None:
        """The layout of the engine's one output when it is a YOLO-style detector's (``trusted``: the
        caller said so, as the metadata would), else None."""
        if len(spec.inputs) != 1 or len(spec.inputs[0].shape) != 4 or len(spec.outputs) != 1:
            return None
        metadata = getattr(self.engine, "metadata", None)
        recorded = isinstance(metadata, DetectorMetadata)
        if recorded and metadata.layout is not None and len(spec.outputs[0].shape) == 3:
            return metadata.layout  # type: ignore[return-value]
        size = metadata.image_size if recorded else None
        if size is None:
            size = tuple(spec.inputs[0].shape[2:])
        elif isinstance(size, int):
            size = (size, size)
        stride = metadata.stride if recorded else None
        shape = spec.outputs[0].shape
        layout = output_layout(shape, size, stride, trusted=trusted or recorded)  # type: ignore[arg-type]
        if layout is None and (trusted or recorded) and len(shape) == 3 and not all(isinstance(d, int) for d in shape):
            # The exporter left the output's dims symbolic (torch's tracer does behind a dynamic batch):
            # the graph's own answer on one blank image decides.
            shape = getattr(self, "_probed_shape", None) or self._probe_output_shape(size)  # type: ignore[arg-type]
            layout = output_layout(shape, size, stride, trusted=True)  # type: ignore[arg-type]
        return layout

    def _probe_output_shape(self, size: tuple[Any, Any]) -> tuple[int, ...]:
        """The output's shape on one zero image of ``size`` (or the profile's opt size)."""
        shape = self.engine.spec.inputs[0].shape
        dims = [dim_size(self.engine, shape[0], "min") or 1, dim_size(self.engine, shape[1]) or 3]
        dims += [v if isinstance(v, int) else dim_size(self.engine, s) or 1 for v, s in zip(size, shape[2:])]
        name = self.engine.spec.inputs[0].name
        out = self.engine({name: torch.zeros(dims, dtype=self.engine.float_dtype)})[self.engine.spec.output_names[0]]
        self._probed_shape = tuple(out.shape)
        return self._probed_shape

    def _setup_detect(self) -> None:
        """Layout, labels and the letterbox preprocessor of a detector (after Scorer's common set-up)."""
        spec = self.engine.spec
        if self.kind != "image":
            raise InvalidArgumentError("kind", self.kind, ("image",), reason="a detector takes images")
        layout = self._detector_layout(spec, trusted=True)
        shape = spec.outputs[0].shape
        if layout is None:
            raise UnsupportedError(f"engine output {spec.output_names[0]!r} has shape {shape}; a detector's is "
                                   "(batch, 4 + classes, anchors) (yolov8) or (batch, anchors, 5 + classes) (yolov5)")
        self.detector_layout: Layout = layout
        """``yolov8`` or ``yolov5``: how the engine's output is read (:mod:`fastgen.pipelines.detection`)."""
        count = num_classes(shape, layout)
        if count is None:  # a symbolic class dim: ask the graph once
            count = num_classes(getattr(self, "_probed_shape", None) or self._probe_output_shape(self._input_size()
                                                                                                or (1, 1)), layout)
        metadata = self.engine.metadata
        labels = self._labels
        if labels is None and isinstance(metadata, DetectorMetadata) and metadata.labels is not None:
            labels = list(metadata.labels)
        if labels is None:
            labels = [f"label_{i}" for i in range(count)]  # type: ignore[arg-type]
        if isinstance(labels, str) or not all(isinstance(x, str) for x in labels) or len(set(labels)) != len(labels):
            raise InvalidArgumentError("labels", labels, "a list of unique label names (strings)")
        if len(labels) != count:
            raise InvalidArgumentError("labels", f"{len(labels)} labels", f"{count} (the detector's classes)")
        self._labels, self._num_labels = list(labels), count
        self.image_preprocessor = self._letterbox_preprocessor()
        self.conf = DEFAULT_CONF
        """Confidence threshold of :meth:`detection_logits` (``score_images``, the Runtime)."""
        self.iou = DEFAULT_IOU
        """IoU threshold of :meth:`detection_logits`."""
        self.max_det = DEFAULT_MAX_DET
        """Most boxes per image of :meth:`detection_logits`."""

    def _letterbox_preprocessor(self) -> LetterboxPreprocessor:
        prep: ImagePreprocessor = self.image_preprocessor
        options = getattr(self, "_image_options", {})
        if not isinstance(self.engine.metadata, DetectorMetadata):
            # No recorded statistics: a detector's pixels are x / 255 (ultralytics), not ImageNet-normalised.
            c = prep.channels
            prep = ImagePreprocessor(self.engine, image_size=options.get("image_size") or self._input_size(),
                                     mean=options.get("mean") or (0.0,) * c, std=options.get("std") or (1.0,) * c,
                                     resample=options.get("resample"), center_crop=False)
        return LetterboxPreprocessor.from_image_preprocessor(prep)

    def _input_size(self) -> tuple[int, int] | None:
        shape = self.engine.spec.inputs[0].shape
        size = (dim_size(self.engine, shape[2]), dim_size(self.engine, shape[3]))
        return None if None in size else size  # type: ignore[return-value]

    def _require_detector(self) -> LetterboxPreprocessor:
        if self.task != "detect":
            raise InvalidArgumentError("task", self.task, ("detect",), reason="this scorer's engine is not a detector "
                                       "(pass task='detect' for a YOLO-style output it did not recognise)")
        return self.image_preprocessor

    # --- the steps --------------------------------------------------------------------------------

    def detector_outputs(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """One engine call over ready inputs (from ``image_preprocessor.feeds``): the raw (n, ...)
        output, float32 on the engine's device. A batch under the engine's minimum is padded (its last
        row repeated) and the extra rows dropped."""
        self._require_detector()
        return padded_output(self.engine, feeds, self._min_batch, self.engine.spec.output_names[0], dims=3,
                             expected="(batch, a, b)").float()

    def detections(self, raw: torch.Tensor, letterboxes: Sequence[Letterbox | None] | None = None, *,
                   conf: float = DEFAULT_CONF, iou: float = DEFAULT_IOU, max_det: int = DEFAULT_MAX_DET,
                   what: str = "row", offset: int = 0) -> list[Detections]:
        """Raw outputs (:meth:`detector_outputs`) -> one :class:`Detections` per row, boxes in original
        pixels through each row's :class:`Letterbox` (None: input pixels). A row with a NaN or an
        infinity is a :class:`~fastgen.errors.NumericalError` naming it (``what[offset + i]``): "nothing
        found" would be a made-up answer, and a moderation scorer's most dangerous one."""
        self._require_detector()
        conf, iou = _fraction("conf", conf), _fraction("iou", iou)
        max_det = positive_int("max_det", max_det)
        if letterboxes is not None and len(letterboxes) != raw.shape[0]:
            raise InvalidArgumentError("letterboxes", f"{len(letterboxes)} letterboxes", f"{raw.shape[0]} (the rows)")
        bad = nonfinite_rows(raw)
        if bad:
            raise self._numerical_error([offset + i for i in bad], what)  # type: ignore[attr-defined]
        return postprocess(raw, self.detector_layout, self.labels, conf=conf, iou=iou, max_det=max_det,  # type: ignore[attr-defined]
                           letterboxes=letterboxes)

    def detection_rows(self, raw: torch.Tensor, letterboxes: Sequence[Letterbox | None] | None = None, *,
                       conf: float = DEFAULT_CONF, iou: float = DEFAULT_IOU, max_det: int = DEFAULT_MAX_DET
                       ) -> list[Detections | NumericalError]:
        """:meth:`detections`, but a non-finite row gives its :class:`NumericalError` in its place instead
        of failing the batch (what a caller batching many requests fails each request by)."""
        bad = set(nonfinite_rows(raw))
        good = [i for i in range(raw.shape[0]) if i not in bad]
        found = iter(self.detections(raw[good], None if letterboxes is None else [letterboxes[i] for i in good],
                                     conf=conf, iou=iou, max_det=max_det) if good else [])
        return [self._numerical_error([i], "row") if i in bad else next(found)  # type: ignore[attr-defined]
                for i in range(raw.shape[0])]

    def detection_logits(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """A detector's ``Scorer.logits``: (n, num_labels) float32 on the CPU, each label's largest
        confidence among the image's detections (``conf``, ``iou``, ``max_det`` attributes), 0 where
        it has none; a row whose output has a NaN or an infinity is all NaN. ``Scorer`` uses them as
        the probabilities of its Scores, as they are (and a NaN row as the NumericalError it is)."""
        raw = self.detector_outputs(feeds)
        bad = nonfinite_rows(raw)
        good = [i for i in range(raw.shape[0]) if i not in bad]
        out = torch.full((raw.shape[0], len(self.labels)), float("nan"))  # type: ignore[attr-defined]
        if good:  # a non-finite row stays NaN: Scorer's scores name it (score_rows fails it alone)
            found = self.detections(raw[good], conf=self.conf, iou=self.iou, max_det=self.max_det)
            out[good] = torch.from_numpy(label_confidences(found, len(self.labels)))  # type: ignore[attr-defined]
        return out

    @staticmethod
    def detection_probabilities(confidences: Any) -> Any:
        """A detector's probabilities from its :meth:`detection_logits`: the confidences as they are
        (``Scorer``'s step for task ``detect``, where a classifier's is a softmax or a sigmoid)."""
        return confidences

    def detection_scores(self, found: Sequence[Detections]) -> list[Any]:
        """One multi-label ``Score`` per image's :class:`Detections`: each label's best confidence, 0
        where it has no box (what ``score_images`` gives, without a second engine call)."""
        return self.scores(torch.from_numpy(label_confidences(found, len(self.labels))))  # type: ignore[attr-defined]

    # --- the API ----------------------------------------------------------------------------------

    def detect(self, images: Any, *, conf: float = DEFAULT_CONF, iou: float = DEFAULT_IOU,
               max_det: int = DEFAULT_MAX_DET, batch_size: int | None = None) -> list[Detections]:
        """The objects in each image (one, a 4-D batch, or a list; see
        :mod:`fastgen.pipelines.classifier_images`): one :class:`Detections` per image, boxes x1 y1 x2
        y2 in the image's own pixels, most confident first.

        ``conf``: boxes above this confidence are kept; ``iou``: a box whose IoU with a more confident
        box of its class is above this is suppressed; ``max_det``: most boxes per image."""
        prep = self._require_detector()
        conf, iou = _fraction("conf", conf), _fraction("iou", iou)
        max_det = positive_int("max_det", max_det)
        items = prep.flatten(images)
        bs = self._check_batch(batch_size)  # type: ignore[attr-defined]
        out: list[Detections] = []
        for start in range(0, len(items), bs):
            pixels, boxes = prep.letterbox(items[start:start + bs])  # (n, H, W, C) uint8
            out += self.detections(self.detector_outputs(prep.feeds(pixels)), boxes, conf=conf, iou=iou,
                                   max_det=max_det, what="images", offset=start)
        return out


__all__ = ["DEFAULT_CONF", "DEFAULT_IOU", "DEFAULT_MAX_DET", "DetectionMethods", "Detections"]
