"""fastgen.pipelines.detection without a model: NMS against a plain greedy reference, decoding of both
layouts, letterbox geometry, layout recognition and the ONNX metadata parser.

The reference is plain Python over float64 lists: boxes by descending score (ties in index order),
each kept unless its IoU with a kept box of its class is above the threshold (IoU 0 when the union
is empty), at most ``max_det``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastgen.models.metadata import DetectorMetadata, metadata_from_manifest
from fastgen.models.onnx_metadata import detector_metadata_from_onnx
from fastgen.pipelines import detection
from fastgen.pipelines.detection import Letterbox, anchor_counts, decode, nms, output_layout, postprocess


def ref_iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_nms(boxes, scores, classes, iou: float, max_det: int | None = None) -> list[int]:
    boxes = [[float(v) for v in b] for b in np.asarray(boxes, dtype=np.float64)]
    scores = [float(s) for s in scores]
    classes = [int(c) for c in classes]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties in index order
    kept: list[int] = []
    for i in order:
        if all(classes[k] != classes[i] or ref_iou(boxes[k], boxes[i]) <= iou for k in kept):
            kept.append(i)
        if max_det is not None and len(kept) == max_det:
            break
    return kept


def random_boxes(n: int, seed: int, classes: int = 3, ties: bool = False, span: float = 100.0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, span, (n, 2))
    wh = rng.uniform(0, span / 4, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    if ties:
        scores = np.round(scores * 4) / 4  # many equal scores
    return boxes, scores, rng.integers(0, classes, n)


def run_nms(boxes, scores, classes, iou, max_det=None):
    return nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes), iou=iou,
               max_det=max_det).tolist()


@pytest.mark.parametrize("n,iou,ties,classes", [(1, 0.5, False, 1), (7, 0.3, True, 2), (200, 0.45, False, 3),
                                                (300, 0.45, True, 1), (500, 0.7, False, 5), (2500, 0.45, False, 4)])
def test_nms_equals_greedy_reference(n, iou, ties, classes):
    boxes, scores, cls = random_boxes(n, seed=n, classes=classes, ties=ties)
    assert run_nms(boxes, scores, cls, iou) == ref_nms(boxes, scores, cls, iou)


def test_nms_crowded_boxes():
    """Many boxes around a few objects (what a detector's raw output is): long suppression chains."""
    rng = np.random.default_rng(7)
    centers, sizes = rng.uniform(0, 200, (12, 2)), rng.uniform(10, 60, (12, 2))
    obj = rng.integers(0, 12, 800)
    c = centers[obj] + rng.normal(0, 3, (800, 2))
    wh = sizes[obj] * rng.uniform(0.7, 1.3, (800, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, 800).astype(np.float32)
    for iou in (0.3, 0.6):
        for classes in (obj % 3, np.zeros(800, np.int64)):
            assert run_nms(boxes, scores, classes, iou) == ref_nms(boxes, scores, classes, iou)


def test_nms_blocks_and_max_det(monkeypatch):
    boxes, scores, cls = random_boxes(900, seed=3, classes=2, span=60.0)  # dense: suppression across blocks
    expected = ref_nms(boxes, scores, cls, 0.4)
    monkeypatch.setattr(detection, "NMS_BLOCK", 64)
    assert run_nms(boxes, scores, cls, 0.4) == expected
    assert run_nms(boxes, scores, cls, 0.4, max_det=70) == expected[:70]
    assert run_nms(boxes, scores, cls, 0.4, max_det=1) == expected[:1]


def test_nms_edge_cases():
    empty = np.zeros((0, 4), np.float32)
    assert run_nms(empty, np.zeros(0, np.float32), np.zeros(0, np.int64), 0.5) == []
    # identical boxes and scores: the first one stays; another class is not suppressed
    same = np.array([[0, 0, 10, 10]] * 3 + [[0, 0, 10, 10]], np.float32)
    assert run_nms(same, np.full(4, 0.5, np.float32), np.array([0, 0, 0, 1]), 0.5) == [0, 3]
    # zero-area and inverted boxes: IoU 0, never suppressed, never NaN
    flat = np.array([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 0, 9], [9, 9, 1, 1]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    assert run_nms(flat, scores, np.zeros(4, np.int64), 0.1) == [0, 1, 2, 3]
    # an IoU of exactly the threshold keeps both (suppression is "above")
    half = np.array([[0, 0, 2, 1], [0, 0, 1, 1]], np.float32)
    assert run_nms(half, np.array([0.9, 0.8], np.float32), np.zeros(2, np.int64), 0.5) == [0, 1]
    assert run_nms(half, np.array([0.9, 0.8], np.float32), np.zeros(2, np.int64), 0.49) == [0]
    # a chain: A suppresses B, so C (overlapping B only) stays
    chain = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [10, 0, 20, 10]], np.float32)
    assert run_nms(chain, np.array([0.9, 0.8, 0.7], np.float32), np.zeros(3, np.int64), 0.3) == [0, 2]
    # classes None: class-agnostic
    assert nms(torch.from_numpy(same), torch.ones(4)).tolist() == [0]


def yolo_raw(rows: list[list[list[float]]], layout: str) -> torch.Tensor:
    """(batch, anchors, 4 + classes [+1]) rows -> the layout's tensor."""
    t = torch.tensor(rows, dtype=torch.float32)
    return t.transpose(1, 2).contiguous() if layout == "yolov8" else t


def ref_postprocess(rows, layout, conf, iou, max_det):
    """Decoding by hand per anchor, then the greedy reference."""
    boxes, scores, classes = [], [], []
    for cx, cy, w, h, *rest in rows:
        if layout == "yolov5":
            obj, probs = rest[0], [obj_p * rest[0] for obj_p in rest[1:]]
            if obj <= conf:
                continue
        else:
            probs = rest
        best = max(range(len(probs)), key=lambda j: (probs[j], -j))
        if probs[best] > conf:
            boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
            scores.append(probs[best])
            classes.append(best)
    keep = ref_nms(np.array(boxes, np.float32).reshape(-1, 4), scores, classes, iou, max_det)
    return [boxes[i] for i in keep], [scores[i] for i in keep], [classes[i] for i in keep]


@pytest.mark.parametrize("layout", ["yolov8", "yolov5"])
def test_decode_and_postprocess_match_reference(layout):
    rng = np.random.default_rng(1)
    nc = 3
    batch = []
    for _ in range(3):
        xy = rng.uniform(0, 64, (150, 2))
        wh = rng.uniform(1, 30, (150, 2))
        extra = rng.uniform(0, 1, (150, nc + (layout == "yolov5")))
        batch.append(np.concatenate([xy, wh, extra], axis=1).astype(np.float32).tolist())
    batch[2] = [[*r[:4]] + [0.0] * (len(r) - 4) for r in batch[2]]  # an image with nothing found
    raw = yolo_raw(batch, layout)
    found = postprocess(raw, layout, ["a", "b", "c"], conf=0.3, iou=0.45, max_det=40)
    assert len(found) == 3 and len(found[2]) == 0 and found[2].boxes.shape == (0, 4)
    for rows, got in zip(batch, found):
        boxes, scores, classes = ref_postprocess(np.asarray(rows, np.float32).tolist(), layout, 0.3, 0.45, 40)
        np.testing.assert_allclose(got.boxes, np.array(boxes, np.float32).reshape(-1, 4), atol=1e-4)
        np.testing.assert_allclose(got.scores, scores, rtol=1e-6)
        assert got.class_ids.tolist() == classes
        assert got.labels == ["abc"[c] for c in classes]
        assert got.boxes.dtype == np.float32 and got.scores.dtype == np.float32


def test_decode_yolov5_filters_on_objectness():
    # class prob 1 but objectness 0.2 <= conf: dropped even though 0.2 * 1 is not compared
    raw = torch.tensor([[[10, 10, 4, 4, 0.2, 1.0], [10, 10, 4, 4, 0.9, 0.5]]])
    image, xyxy, score, cls = decode(raw, "yolov5", 0.2)
    assert image.tolist() == [0] and score.tolist() == pytest.approx([0.45])
    assert xyxy.tolist() == [[8, 8, 12, 12]]


@pytest.mark.parametrize("size,image", [((320, 320), (77, 113)), ((320, 320), (257, 1)), ((320, 320), (1, 257)),
                                        ((64, 96), (113, 77)), ((64, 64), (64, 64)), ((32, 48), (5, 3000))])
def test_letterbox_geometry_round_trips(size, image):
    h, w = image
    box = Letterbox.fit(h, w, size)
    r = min(size[0] / h, size[1] / w)  # ultralytics: one ratio, rounded sides, pad split -0.1 / +0.1
    assert (box.new_height, box.new_width) == (max(1, round(h * r)), max(1, round(w * r)))
    assert box.top == round((size[0] - box.new_height) / 2 - 0.1)
    assert box.left == round((size[1] - box.new_width) / 2 - 0.1)
    assert 0 <= box.top and box.top + box.new_height <= size[0] and box.left + box.new_width <= size[1]
    # the image's own corners in the input map back exactly to (0, 0, w, h)
    inner = np.array([[box.left, box.top, box.left + box.new_width, box.top + box.new_height]])
    assert box.to_original(inner).tolist() == [[0, 0, w, h]]
    # any box inside the image: forward then back is the identity (to float32 precision); outside is clipped
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1, (50, 4)) * [w, h, w, h]
    orig = np.sort(xy.reshape(50, 2, 2), axis=1).reshape(50, 4)
    fwd = orig * ([box.new_width / w, box.new_height / h] * 2) + [box.left, box.top] * 2
    np.testing.assert_allclose(box.to_original(fwd), orig, rtol=1e-6, atol=1e-4 * max(h, w))
    assert box.to_original(np.array([[-50, -50, 1e6, 1e6]])).tolist() == [[0, 0, w, h]]


def test_letterbox_image_pixels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 100, (77, 113, 3), dtype=np.uint8)
    out, box = detection.letterbox_image(image, (64, 96), resample=0)
    assert out.shape == (64, 96, 3) and out.dtype == np.uint8
    content = np.argwhere((out != detection.PAD_VALUE).any(axis=2))
    assert content.min(0).tolist() == [box.top, box.left]
    assert (content.max(0) + 1).tolist() == [box.top + box.new_height, box.left + box.new_width]
    with pytest.raises(Exception, match="images"):
        detection.letterbox_image(np.zeros((4, 4), np.float64), (8, 8), argument="images")


def test_output_layouts():
    assert anchor_counts(640, 640) == {8400, 25200} and anchor_counts(320, 320) == {2100, 6300}
    assert output_layout((1, 22, 2100), (320, 320)) == "yolov8"  # NudeNet v3
    assert output_layout(("batch", 84, 8400), (640, 640)) == "yolov8"
    assert output_layout(("batch", 25200, 85), (640, 640)) == "yolov5"
    assert output_layout((1, 197, 768), (224, 224)) is None  # a ViT's hidden states
    assert output_layout((1, 22, 2000), (320, 320)) is None
    assert output_layout(("batch", 84, "anchors"), None) is None  # nothing says it is a detector
    assert output_layout(("batch", 84, "anchors"), None, trusted=True) == "yolov8"
    assert output_layout(("batch", "anchors", 85), None, trusted=True) == "yolov5"
    assert output_layout((1, 84), (640, 640), trusted=True) is None


def test_onnx_metadata_parser():
    props = {"names": "{0: 'person', 1: 'bicycle', 2: \"car\"}", "imgsz": "[640, 480]", "stride": "32",
             "task": "detect", "description": "Ultralytics YOLOv8n model"}
    m = detector_metadata_from_onnx(props)
    assert m == DetectorMetadata(labels=("person", "bicycle", "car"), image_size=(640, 480), stride=32)
    assert metadata_from_manifest("anything", m.to_manifest()) == m
    assert m.with_defaults().mean == (0.0, 0.0, 0.0) and m.with_defaults().std == (1.0, 1.0, 1.0)
    assert detector_metadata_from_onnx({"names": '["a", "b"]', "imgsz": "320"}).labels == ("a", "b")
    assert detector_metadata_from_onnx({"names": "{0: 'a'}", "task": "segment"}) is None
    assert detector_metadata_from_onnx({"imgsz": "[640, 640]"}) is None
    # anything but a literal table is never evaluated: labels fall back, the rest still parses
    for hostile in ("__import__('os').system('true')", "{0: open('x').read()}", "{0: 'a', **x}",
                    "[" * 100000, "{0: 'a', 2: 'c'}", "x" * (2 << 20)):
        m = detector_metadata_from_onnx({"names": hostile, "imgsz": "[64, 64]", "stride": "nope"})
        assert m is not None and m.labels is None and m.image_size == (64, 64) and m.stride is None
