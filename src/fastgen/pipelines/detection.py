"""YOLO-style object detection: output layouts, letterboxing, box decoding and non-maximum suppression.

Two output layouts are read (:data:`~fastgen.models.metadata.DETECTOR_LAYOUTS`):

- ``yolov8`` (ultralytics YOLOv8 / 11, NudeNet v3): one (batch, 4 + classes, anchors) output: box
  centre x, y, width, height in input pixels, then one confidence per class (no objectness);
- ``yolov5`` (YOLOv5, YOLOX-style exports): one (batch, anchors, 5 + classes) output: cx, cy, w, h,
  an objectness, then class probabilities; a box's confidence is objectness x class probability.

Each anchor keeps its most confident class (ultralytics' ``multi_label=False``); anchors whose
confidence is not above ``conf`` are dropped, the ``MAX_NMS`` most confident of the rest go through
class-aware non-maximum suppression (:func:`nms`), and at most ``max_det`` boxes are kept, most
confident first. Boxes go back to the original image through the letterbox (:class:`Letterbox`).

Images are letterboxed as ultralytics' ``LetterBox`` does (``auto=False``, scale up allowed,
centred): resized keeping their aspect ratio to ``round(side * r)`` with ``r = min(H / h, W / w)``,
then padded with grey 114 to the input size, ``round(pad / 2 -+ 0.1)`` on the top / left. Resizing
is PIL's (bilinear by default, where ultralytics uses OpenCV's), so pixels may differ from an
ultralytics pipeline by a level or two; the geometry is the same.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines import classifier_images
from fastgen.pipelines.preprocess import ImagePreprocessor

Layout = Literal["yolov8", "yolov5"]
#: Grey level of the letterbox padding (ultralytics').
PAD_VALUE = 114
#: Largest head stride when the model records none (YOLOv5 / v8 / 11: P3-P5, strides 8, 16, 32).
DEFAULT_STRIDE = 32
#: Candidates kept for NMS, the most confident first (ultralytics' ``max_nms``).
MAX_NMS = 30000
# Boxes suppressed together: an NMS_BLOCK^2 IoU matrix at a time, whatever the count. Small blocks
# pay: most boxes of a crowded image are suppressed by earlier blocks' kept boxes before their own
# block's matrix is built (20,000 boxes around 50 objects, one CPU thread: 70 ms at 256, 0.9 s at 1024).
NMS_BLOCK = 256


# --- layouts ------------------------------------------------------------------------------------------

def anchor_counts(height: int, width: int, stride: int = DEFAULT_STRIDE) -> set[int]:
    """How many boxes a YOLO head over a ``height`` x ``width`` input predicts: one per grid cell of
    each stride from 8 to ``stride`` (anchor-free, YOLOv8), or three per cell (YOLOv5's anchors)."""
    cells, s = 0, 8
    while s <= max(stride, 8):
        cells += math.ceil(height / s) * math.ceil(width / s)  # a stride-2 conv chain rounds up
        s *= 2
    return {cells, 3 * cells}


def output_layout(shape: Sequence[Any], image_size: tuple[int, int] | None, stride: int | None = None, *,
                  trusted: bool = False) -> Layout | None:
    """The layout of a detector output of ``shape`` (ints, or symbols for dynamic dims), or None.

    Known dims must fit the input: (batch, 4 + classes, anchors) with an anchor count of the
    ``image_size`` grid (:func:`anchor_counts`) is ``yolov8``, (batch, anchors, 5 + classes) is
    ``yolov5``. ``trusted`` (the model's metadata says it is a detector): a symbolic anchor dim, or
    an unknown input size, is accepted, the class dim being the one that is an int."""
    if len(shape) != 3:
        return None
    a, b = shape[1], shape[2]
    known = image_size is not None and all(isinstance(v, int) for v in image_size)
    counts = anchor_counts(*image_size, stride or DEFAULT_STRIDE) if known else set()  # type: ignore[misc]
    if isinstance(a, int) and isinstance(b, int):
        v8, v5 = a >= 5 and b in counts, b >= 6 and a in counts
        if v8 != v5:
            return "yolov8" if v8 else "yolov5"
        if v8 or trusted:  # both fit, or a detector whose grid is unknown: the smaller dim holds the classes
            return "yolov8" if 5 <= a < b else "yolov5" if 6 <= b < a else None
        return None
    if not trusted:
        return None
    if isinstance(a, int) and a >= 5:
        return "yolov8"
    if isinstance(b, int) and b >= 6:
        return "yolov5"
    return None


def num_classes(shape: Sequence[Any], layout: Layout) -> int | None:
    """Classes of a detector output of ``shape`` in ``layout`` (None when that dim is symbolic)."""
    dim = shape[1] if layout == "yolov8" else shape[2]
    return (dim - (4 if layout == "yolov8" else 5)) if isinstance(dim, int) else None


# --- letterbox ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Letterbox:
    """Where one image went in the detector's input: resized to ``new_height`` x ``new_width``, its top
    left corner at (``left``, ``top``); the rest is padding."""

    height: int
    """Original image height, pixels."""
    width: int
    """Original image width, pixels."""
    new_height: int
    """Height of the resized image inside the input."""
    new_width: int
    """Width of the resized image inside the input."""
    top: int
    """Padding rows above the image."""
    left: int
    """Padding columns left of the image."""

    @classmethod
    def fit(cls, height: int, width: int, size: tuple[int, int]) -> Letterbox:
        """ultralytics' geometry for an ``height`` x ``width`` image in an input of ``size`` (height, width)."""
        r = min(size[0] / height, size[1] / width)
        new_h = min(size[0], max(1, round(height * r)))
        new_w = min(size[1], max(1, round(width * r)))
        top = round((size[0] - new_h) / 2 - 0.1)
        left = round((size[1] - new_w) / 2 - 0.1)
        return cls(height, width, new_h, new_w, top, left)

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """(k, 4) x1 y1 x2 y2 in input pixels -> (k, 4) float32 in original pixels, clipped to the image.

        Each axis is scaled by its own resize ratio (``width / new_width``), which is what the resize did:
        ultralytics' one ``gain`` is off by the rounding of the resized side (a 257 x 1 strip in 320 x
        320 is resized to 320 x 1, a gain of 1.245 in x but exactly 1 in y)."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        x = (b[:, [0, 2]] - self.left) * self.width / self.new_width  # float64: integer edges map exactly
        y = (b[:, [1, 3]] - self.top) * self.height / self.new_height
        out = np.empty_like(b)
        out[:, [0, 2]] = np.clip(x, 0, self.width)
        out[:, [1, 3]] = np.clip(y, 0, self.height)
        return out.astype(np.float32)


def _source_size(image: Any) -> tuple[Any, tuple[int, int] | None]:
    """(the image, opened if it was a file; its (height, width) when its kind tells it)."""
    if isinstance(image, (str, os.PathLike)):
        image = classifier_images.open_image(image)
    if hasattr(image, "size") and hasattr(image, "mode"):  # a PIL image
        return image, (image.height, image.width)
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        return image, (image.shape[0], image.shape[1])
    if isinstance(image, torch.Tensor) and image.dim() in (2, 3):
        if image.dtype == torch.uint8 or image.dim() == 2:
            return image, (image.shape[0], image.shape[1])  # (H, W, C) uint8, (H, W)
        return image, (image.shape[1], image.shape[2])  # float (C, H, W)
    return image, None


def letterbox_image(image: Any, size: tuple[int, int], *, channels: int = 3, resample: int = 2,
                    argument: str = "image") -> tuple[np.ndarray, Letterbox]:
    """One image (any kind :mod:`fastgen.pipelines.classifier_images` accepts) -> ((height, width,
    channels) uint8 letterboxed to ``size``, its :class:`Letterbox`)."""
    try:
        image, source = _source_size(image)
    except InvalidArgumentError as exc:  # an unreadable file: named by the caller's argument
        raise InvalidArgumentError(argument, str(image), reason=str(exc)) from None
    if source is None or min(source) < 1:  # not an image: the loader's own one-line error
        classifier_images.image_to_uint8(image, size, channels=channels, argument=argument)
        raise InvalidArgumentError(argument, type(image).__name__, "an image")
    box = Letterbox.fit(source[0], source[1], size)
    inner = classifier_images.image_to_uint8(image, (box.new_height, box.new_width), channels=channels,
                                             resample=resample, argument=argument)  # (h', w', C)
    out = np.full((size[0], size[1], channels), PAD_VALUE, dtype=np.uint8)  # (H, W, C)
    out[box.top:box.top + box.new_height, box.left:box.left + box.new_width] = inner
    return out, box


class LetterboxPreprocessor(ImagePreprocessor):
    """A detector's :class:`~fastgen.pipelines.preprocess.ImagePreprocessor`: images are letterboxed
    (:func:`letterbox_image`) instead of stretched; normalisation is the same ``(x / 255 - mean) / std``
    (a detector's defaults: mean 0, std 1)."""

    @classmethod
    def from_image_preprocessor(cls, prep: ImagePreprocessor) -> LetterboxPreprocessor:
        """The same settings (input, size, channels, mean, std, filter, device) with letterboxing."""
        out = cls.__new__(cls)
        out.__dict__.update(prep.__dict__)
        out.center_crop = False
        return out

    def letterbox(self, images: Sequence[Any], argument: str = "images") -> tuple[torch.Tensor, list[Letterbox]]:
        """A list of single images -> ((N, height, width, channels) uint8 letterboxed to the input size,
        one :class:`Letterbox` per image to map boxes back)."""
        pixels = np.empty((len(images), self.size[0], self.size[1], self.channels), dtype=np.uint8)  # (N, H, W, C)
        boxes = []
        for i, image in enumerate(images):
            name = argument if isinstance(image, (str, os.PathLike)) else f"{argument}[{i}]"
            pixels[i], box = letterbox_image(image, self.size, channels=self.channels, resample=self.resample,
                                             argument=name)
            boxes.append(box)
        return torch.from_numpy(pixels), boxes

    def to_uint8(self, images: Sequence[Any], argument: str = "images") -> torch.Tensor:
        """:meth:`letterbox` without the geometry (what batching callers that only score need)."""
        return self.letterbox(images, argument)[0]


# --- decoding and NMS ---------------------------------------------------------------------------------

@dataclass
class Detections:
    """The objects found in one image, most confident first."""

    boxes: np.ndarray
    """(k, 4) float32 x1, y1, x2, y2 in original image pixels."""
    scores: np.ndarray
    """(k,) float32 confidences."""
    class_ids: np.ndarray
    """(k,) int64 class indices."""
    labels: list[str] = field(default_factory=list)
    """Class names of the k boxes."""

    def __len__(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        return {"detections": [{"label": label, "confidence": float(s), "class_id": int(c),
                                "box": [float(v) for v in b]}
                               for label, s, c, b in zip(self.labels, self.scores, self.class_ids, self.boxes)]}


def decode(raw: torch.Tensor, layout: Layout, conf: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """A (batch, ...) detector output -> candidates over the whole batch: (image index (m,), x1 y1 x2
    y2 (m, 4) in input pixels, confidence (m,), class (m,)), those with a confidence above ``conf``."""
    x = raw.float()
    if layout == "yolov8":
        x = x.transpose(1, 2)  # (batch, anchors, 4 + classes)
        score, cls = x[..., 4:].max(dim=-1)  # (batch, anchors); ties: the lowest class
    else:
        obj = x[..., 4:5]  # (batch, anchors, 1)
        score, cls = (x[..., 5:] * obj).max(dim=-1)
        score = torch.where(obj[..., 0] > conf, score, torch.zeros_like(score))  # YOLOv5 filters on objectness first
    image, anchor = torch.nonzero(score > conf, as_tuple=True)
    cxcywh = x[image, anchor, :4]  # (m, 4)
    half = cxcywh[:, 2:] / 2
    xyxy = torch.cat([cxcywh[:, :2] - half, cxcywh[:, :2] + half], dim=1)
    return image, xyxy, score[image, anchor], cls[image, anchor]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) IoU of x1 y1 x2 y2 boxes (n, 4) and (m, 4); 0 where the union is empty (zero-area boxes)."""
    # In place after the first op of each line: the (n, m) temporaries are what this costs.
    iw = torch.minimum(a[:, None, 2], b[None, :, 2]).sub_(torch.maximum(a[:, None, 0], b[None, :, 0])).clamp_(min=0)
    ih = torch.minimum(a[:, None, 3], b[None, :, 3]).sub_(torch.maximum(a[:, None, 1], b[None, :, 1])).clamp_(min=0)
    inter = iw.mul_(ih)  # (n, m)
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    union = (area_a[:, None] + area_b[None, :]).sub_(inter)
    return inter.div_(union).nan_to_num_(nan=0.0)  # 0 / 0: both boxes empty


def _greedy(boxes: torch.Tensor, iou: float, limit: int) -> torch.Tensor:
    """Indices (ascending) that greedy NMS keeps of (m, 4) float64 boxes sorted by descending score, one
    class; stops once ``limit`` are kept."""
    kept: list[torch.Tensor] = []
    kept_boxes = boxes[:0]
    for start in range(0, len(boxes), NMS_BLOCK):
        block = boxes[start:start + NMS_BLOCK]  # (k, 4)
        live = torch.arange(start, start + len(block), device=boxes.device)
        if len(kept_boxes):  # suppressed by a box an earlier block kept; only the rest go on
            alive = ~(box_iou(kept_boxes, block) > iou).any(dim=0)
            block, live = block[alive], live[alive]
        m = torch.triu(box_iou(block, block) > iou, diagonal=1)  # (k', k'): earlier boxes over later ones
        keep = torch.zeros(len(block), dtype=torch.bool, device=boxes.device)
        open_ = torch.ones(len(block), dtype=torch.bool, device=boxes.device)  # not decided yet
        while bool(open_.any()):
            # A box overlapped by a kept one is suppressed; one overlapped by no kept or open box is kept.
            # The first open box is always decided, so this ends; in practice in a few rounds.
            open_ &= ~(m & keep[:, None]).any(dim=0)
            decided = open_ & ~(m & open_[:, None]).any(dim=0)
            keep |= decided
            open_ &= ~decided
        idx = torch.nonzero(keep, as_tuple=True)[0]
        kept.append(live[idx])
        kept_boxes = torch.cat([kept_boxes, block[idx]])
        if len(kept_boxes) >= limit:
            break
    return torch.cat(kept)[:limit]


def nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor | None = None, *, iou: float = 0.45,
        max_det: int | None = None) -> torch.Tensor:
    """Greedy non-maximum suppression, vectorised: indices of the kept boxes, most confident first.

    Exactly greedy NMS (boxes by descending score, ties in index order; a box is dropped when its IoU
    with a kept box of its class is above ``iou``; at most ``max_det`` kept), computed per class (a
    class never suppresses another, so each is its own problem, a few times fewer IoUs) on blocks of
    ``NMS_BLOCK`` sorted boxes, as Cluster-NMS does (Zheng et al. 2020), without a per-box loop: a
    block is first suppressed by every box kept before it (one (kept, block) IoU matrix); its
    survivors then settle on their upper-triangular "IoU > iou" matrix M in rounds, each a pair of
    matrix-vector ORs: a box overlapped by a kept box is suppressed, a box overlapped by no kept and
    no undecided box is kept. The first undecided box is always decided, so it ends, exactly on the
    greedy answer (Cluster-NMS's own iteration, ``keep = ~any(M & keep[:, None])``, reaches it too but
    can oscillate for more rounds on crowded boxes). IoUs are float64: boxes that touch the threshold
    are decided as a float64 greedy reference decides them. ``classes`` None: class-agnostic.
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices  # rank -> box
    ranked = boxes[order].double()  # (n, 4)
    limit = n if max_det is None else max_det
    if classes is None:
        groups: Sequence[torch.Tensor] = [torch.arange(n, device=boxes.device)]
    else:  # the ranks of each class, ascending
        by_class = classes[order]
        ranks = torch.sort(by_class, stable=True).indices
        counts = torch.unique_consecutive(by_class[ranks], return_counts=True)[1]
        groups = torch.split(ranks, counts.tolist())
    kept = torch.cat([group[_greedy(ranked[group], iou, limit)] for group in groups])
    return order[torch.sort(kept).values[:limit]]  # the kept ranks in score order, then the first max_det


def postprocess(raw: torch.Tensor, layout: Layout, labels: Sequence[str], *, conf: float = 0.25,
                iou: float = 0.45, max_det: int = 300, letterboxes: Sequence[Letterbox | None] | None = None
                ) -> list[Detections]:
    """A (batch, ...) detector output -> one :class:`Detections` per row: decoded (:func:`decode`),
    the ``MAX_NMS`` most confident candidates suppressed (:func:`nms`, per class), at most ``max_det``
    kept, boxes mapped to the original image through its :class:`Letterbox` (None: input pixels)."""
    image, xyxy, score, cls = decode(raw, layout, conf)
    out = []
    for row in range(raw.shape[0]):
        sel = torch.nonzero(image == row, as_tuple=True)[0]
        if len(sel) > MAX_NMS:
            sel = sel[torch.sort(score[sel], descending=True, stable=True).indices[:MAX_NMS]]
        keep = sel[nms(xyxy[sel], score[sel], cls[sel], iou=iou, max_det=max_det)]
        boxes = xyxy[keep].cpu().numpy()
        box = letterboxes[row] if letterboxes is not None else None
        boxes = box.to_original(boxes) if box is not None else boxes.astype(np.float32)
        ids = cls[keep].cpu().numpy().astype(np.int64)
        out.append(Detections(boxes.reshape(-1, 4), score[keep].cpu().numpy().astype(np.float32), ids,
                              [labels[i] if i < len(labels) else f"label_{i}" for i in ids.tolist()]))
    return out


def label_confidences(detections: Sequence[Detections], num_labels: int) -> np.ndarray:
    """(n, num_labels) float32: each label's largest confidence among each image's detections, 0 where
    it has none."""
    out = np.zeros((len(detections), num_labels), dtype=np.float32)
    for row, d in enumerate(detections):
        if len(d):
            np.maximum.at(out[row], d.class_ids, d.scores)
    return out


__all__ = ["DEFAULT_STRIDE", "MAX_NMS", "PAD_VALUE", "Detections", "Layout", "Letterbox", "LetterboxPreprocessor",
           "anchor_counts", "box_iou", "decode", "label_confidences", "letterbox_image", "nms", "num_classes",
           "output_layout", "postprocess"]
