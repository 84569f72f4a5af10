"""``Scorer.detect`` on tiny YOLO-style detectors built here in PyTorch and exported to ONNX as
ultralytics exports (``names``, ``imgsz``, ``stride`` in the graph's metadata_props).

The reference is independent of fastgen: the letterbox by hand with PIL, the raw output from a plain
onnxruntime session, decoding per anchor in Python and the greedy NMS of ``test_detect_nms``.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

if str(Path(__file__).parent) not in sys.path:  # --import-mode=importlib: the reference helpers' folder
    sys.path.insert(0, str(Path(__file__).parent))

from test_detect_nms import ref_postprocess  # noqa: E402

from fastgen.cli.score import score as score_cli  # noqa: E402
from fastgen.engines.torch_backend import TorchEngine  # noqa: E402
from fastgen.errors import InvalidArgumentError, UnsupportedError  # noqa: E402
from fastgen.models.component import Component  # noqa: E402
from fastgen.models.metadata import DetectorMetadata  # noqa: E402
from fastgen.models.spec import DimRange, ExportSpec, ShapeProfile, TensorSpec  # noqa: E402
from fastgen.pipelines.detection import Detections  # noqa: E402
from fastgen.pipelines.scorer import Score, Scorer  # noqa: E402

LABELS = ["person", "car", "dog"]
NUDENET = ["FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
           "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
           "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
           "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED"]


class TinyYolo(torch.nn.Module):
    """Three strided convs to P3 (stride 8), two more to P4 / P5, a 1x1 head per level; boxes decoded
    on each level's grid in input pixels, class scores through a sigmoid. ``yolov8``: (batch, 4 +
    classes, cells); ``yolov5``: (batch, 3 x cells, 5 + classes) with an objectness."""

    def __init__(self, classes: int, layout: str = "yolov8", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        c = 8
        conv = lambda i, o: torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, 2, 1), torch.nn.SiLU())  # noqa: E731
        self.p3 = torch.nn.Sequential(conv(3, c), conv(c, c), conv(c, c))
        self.p4, self.p5 = conv(c, c), conv(c, c)
        self.layout, self.classes = layout, classes
        per = 4 + classes if layout == "yolov8" else 3 * (5 + classes)
        self.heads = torch.nn.ModuleList(torch.nn.Conv2d(c, per, 1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 3, H, W) in [0, 1]
        f3 = self.p3(x)
        levels = (f3, self.p4(f3), self.p5(self.p4(f3)))
        outs = []
        for feat, head, stride in zip(levels, self.heads, (8, 16, 32)):
            y = head(feat) * 3  # (batch, per, h, w); spread so that some classes are confident
            b, _, h, w = y.shape
            gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                    indexing="ij")
            if self.layout == "yolov8":
                y = y.flatten(2)  # (batch, 4 + classes, h * w)
                grid = (gx.flatten(), gy.flatten())
            else:
                y = y.view(b, 3, 5 + self.classes, h * w).permute(0, 2, 1, 3).reshape(b, 5 + self.classes, 3 * h * w)
                grid = (gx.flatten().repeat(3), gy.flatten().repeat(3))
            cx = (grid[0] + 0.5 + torch.tanh(y[:, 0])) * stride
            cy = (grid[1] + 0.5 + torch.tanh(y[:, 1])) * stride
            wh = torch.exp(y[:, 2:4].clamp(-2, 2)) * stride * 2
            outs.append(torch.cat([cx[:, None], cy[:, None], wh, torch.sigmoid(y[:, 4:])], dim=1))
        out = torch.cat(outs, dim=2)  # (batch, 4 + classes [+1], anchors)
        return out if self.layout == "yolov8" else out.transpose(1, 2)


def export(module: torch.nn.Module, path: Path, size: tuple[int, int], props: dict[str, str] | None = None, *,
           batch: int | str = "batch") -> Path:
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    dynamic = {"images": {0: "batch"}, "output0": {0: "batch"}} if isinstance(batch, str) else None
    torch.onnx.export(module.eval(), (torch.zeros(1 if dynamic else batch, 3, *size),), str(path), opset_version=17,
                      input_names=["images"], output_names=["output0"], dynamic_axes=dynamic, **legacy)
    if props:
        model = onnx.load(str(path))
        for key, value in props.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, str(path))
    return path


def ultralytics_props(labels: list[str], size: tuple[int, int]) -> dict[str, str]:
    """What ultralytics writes (its exporter: ``str(dict)`` of names, ``str(list)`` of imgsz)."""
    return {"description": "Ultralytics YOLOv8n model", "author": "Ultralytics", "stride": "32", "task": "detect",
            "batch": "1", "imgsz": str(list(size)), "names": str(dict(enumerate(labels)))}


def ref_letterbox(image: Image.Image, size: tuple[int, int]) -> tuple[np.ndarray, tuple[float, ...]]:
    """By hand: (1, 3, H, W) float32 x / 255, and (r_x, r_y, left, top) to map boxes back."""
    w, h = image.size
    r = min(size[0] / h, size[1] / w)
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    left, top = round((size[1] - nw) / 2 - 0.1), round((size[0] - nh) / 2 - 0.1)
    canvas = Image.new("RGB", (size[1], size[0]), (114, 114, 114))
    canvas.paste(image.convert("RGB") if (nw, nh) == (w, h) else image.convert("RGB").resize((nw, nh), Image.BILINEAR),
                 (left, top))
    pixels = np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1)[None] / 255
    return pixels, (w / nw, h / nh, left, top, w, h)


def reference_detect(path: Path, images: list[Image.Image], size, layout, conf=0.25, iou=0.45, max_det=300):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = []
    for im in images:
        pixels, (rx, ry, left, top, w, h) = ref_letterbox(im, size)
        raw = session.run(None, {"images": pixels})[0][0]
        rows = (raw.T if layout == "yolov8" else raw).tolist()  # (anchors, 4 + classes [+1])
        boxes, scores, classes = ref_postprocess(rows, layout, conf, iou, max_det)
        mapped = [[min(max((b[0] - left) * rx, 0), w), min(max((b[1] - top) * ry, 0), h),
                   min(max((b[2] - left) * rx, 0), w), min(max((b[3] - top) * ry, 0), h)] for b in boxes]
        out.append((np.array(mapped, np.float64).reshape(-1, 4), scores, classes))
    return out


def images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


ODD = [(77, 113), (257, 1), (1, 257), (64, 96), (33, 200), (50, 50)]


@pytest.fixture(scope="module")
def detectors(tmp_path_factory):
    root = tmp_path_factory.mktemp("detectors")
    v8 = TinyYolo(3, "yolov8", seed=1)
    v5 = TinyYolo(3, "yolov5", seed=2)
    return {
        "yolov8": (export(v8, root / "v8.onnx", (64, 96), ultralytics_props(LABELS, (64, 96))), v8, (64, 96)),
        "yolov5": (export(v5, root / "v5.onnx", (64, 64), ultralytics_props(LABELS, (64, 64))), v5, (64, 64)),
    }


@pytest.mark.parametrize("layout", ["yolov8", "yolov5"])
def test_detect_matches_reference(detectors, layout):
    path, _, size = detectors[layout]
    scorer = Scorer.from_pretrained(path)
    assert (scorer.task, scorer.detector_layout, scorer.labels, scorer.image_size) == ("detect", layout, LABELS, size)
    assert scorer.mean == (0.0, 0.0, 0.0) and scorer.std == (1.0, 1.0, 1.0)
    ims = images(ODD)
    for conf, iou, max_det in ((0.25, 0.45, 300), (0.4, 0.3, 5)):
        got = scorer.detect(ims, conf=conf, iou=iou, max_det=max_det, batch_size=4)
        want = reference_detect(path, ims, size, layout, conf, iou, max_det)
        assert len(got) == len(ims)
        if conf == 0.25:  # the random head finds things: a real comparison
            assert sum(len(d) for d in got) > len(ims)
        for d, (boxes, scores, classes), im in zip(got, want, ims):
            assert isinstance(d, Detections) and d.class_ids.tolist() == classes
            assert d.labels == [LABELS[c] for c in classes]
            np.testing.assert_allclose(d.scores, scores, rtol=1e-5)
            np.testing.assert_allclose(d.boxes, boxes, rtol=1e-5, atol=1e-3)
            assert (d.boxes[:, [0, 2]] <= im.width).all() and (d.boxes[:, [1, 3]] <= im.height).all()


def test_boxes_map_back_exactly_through_the_letterbox(tmp_path):
    """A "detector" that boxes the non-padding pixels of its input: mapped back, the box is the whole
    original image, exactly, whatever its shape."""

    class Content(torch.nn.Module):
        def forward(self, x):  # (batch, 3, H, W) -> (batch, 4 + 1, 21 cells of a 32x32 input)
            mask = ((x - 114 / 255).abs() > 1e-3).any(dim=1).float()  # (batch, H, W)
            ys = torch.arange(x.shape[2], dtype=torch.float32)
            xs = torch.arange(x.shape[3], dtype=torch.float32)
            rows, cols = mask.amax(dim=2), mask.amax(dim=1)  # (batch, H), (batch, W)
            y1 = (ys + 1e4 * (1 - rows)).amin(dim=1)
            y2 = (ys * rows).amax(dim=1) + 1
            x1 = (xs + 1e4 * (1 - cols)).amin(dim=1)
            x2 = (xs * cols).amax(dim=1) + 1
            box = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, torch.ones_like(x1)], dim=1)
            return box[:, :, None].expand(-1, -1, 21)  # the same box at every anchor: NMS keeps one

    path = export(Content(), tmp_path / "content.onnx", (32, 32), {"names": "{0: 'image'}", "imgsz": "[32, 32]"})
    scorer = Scorer.from_pretrained(path)
    rng = np.random.default_rng(0)
    for h, w in [(77, 113), (257, 1), (1, 257), (31, 33), (3, 2), (32, 32), (1, 1)]:
        image = rng.integers(0, 100, (h, w, 3), dtype=np.uint8)  # never 114: padding is told apart
        (found,) = scorer.detect(image)
        assert found.boxes.tolist() == [[0, 0, w, h]] and found.labels == ["image"]


def test_torch_engine_agrees_with_onnxruntime(detectors):
    path, module, size = detectors["yolov8"]
    spec = ExportSpec("detector", (TensorSpec("images", "float32", ("batch", 3, *size)),),
                      (TensorSpec("output0", "float32", ("batch", 7, 126)),), ShapeProfile({"batch": DimRange(1, 2, 8)}))
    engine = TorchEngine(Component("detector", module, spec, module, origin="<test>"))
    engine.attach(metadata=DetectorMetadata(labels=tuple(LABELS), image_size=size))
    torch_scorer, ort_scorer = Scorer(engine), Scorer.from_pretrained(path)
    assert torch_scorer.task == "detect"
    ims = images(ODD, seed=5)
    prep = ort_scorer.image_preprocessor
    pixels, _ = prep.letterbox(ims)
    np.testing.assert_allclose(torch_scorer.detector_outputs(prep.feeds(pixels)).numpy(),
                               ort_scorer.detector_outputs(prep.feeds(pixels)).numpy(), rtol=1e-4, atol=1e-4)
    for a, b in zip(torch_scorer.detect(ims, conf=0.5), ort_scorer.detect(ims, conf=0.5)):
        assert a.labels == b.labels
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_nudenet_like_detector_now_scores(tmp_path):
    """The issue's refusal: a NudeNet-v3-shaped graph (batch 1, 320 x 320, (1, 22, 2100)) loaded and
    benched, but score refused its output. It is a detector now, with or without metadata."""
    module = TinyYolo(len(NUDENET), "yolov8", seed=3)
    bare = export(module, tmp_path / "320n.onnx", (320, 320), batch=1)
    named = export(module, tmp_path / "320n-named.onnx", (320, 320), ultralytics_props(NUDENET, (320, 320)), batch=1)
    ims = images([(120, 90), (40, 300)], seed=7)
    bare_scorer, named_scorer = Scorer.from_pretrained(bare), Scorer.from_pretrained(named)
    assert bare_scorer.task == named_scorer.task == "detect"
    assert bare_scorer.labels == [f"label_{i}" for i in range(18)] and named_scorer.labels == NUDENET
    scores = named_scorer.score_images(ims)  # batch 1: two engine calls
    found = named_scorer.detect(ims)
    assert len(scores) == 2 and all(isinstance(s, Score) for s in scores)
    for s, d in zip(scores, found):
        assert list(s.probs) == NUDENET
        best = {label: max([float(c) for c, lab in zip(d.scores, d.labels) if lab == label], default=0.0)
                for label in NUDENET}
        assert s.probs == pytest.approx(best, abs=0) and s.logits == pytest.approx(list(best.values()), abs=0)
        assert 0.0 in s.probs.values() and max(s.probs.values()) > 0.25
        assert s.top[0] == max(best.items(), key=lambda kv: kv[1])
    assert [s.probs for s in bare_scorer.score_images(ims)] == [
        dict(zip(bare_scorer.labels, s.probs.values())) for s in scores]


def test_moderation_paths(detectors):
    """score_images equals per-label maxima of detect; score_video and best-of-N take a detector."""
    path, _, _ = detectors["yolov8"]
    scorer = Scorer.from_pretrained(path)
    ims = images(ODD, seed=2)
    got = scorer.score_images(ims)
    for s, d in zip(got, scorer.detect(ims)):
        for label in LABELS:
            assert s.probs[label] == max([float(c) for c, lab in zip(d.scores, d.labels) if lab == label], default=0.0)
    frames = np.stack([np.asarray(im.resize((40, 30))) for im in ims[:3]])  # (T, H, W, C) uint8
    video = scorer.score_video(frames, frames=3)
    assert set(video.max) == set(LABELS) and all(0 <= v <= 1 for v in video.max.values())
    from fastgen.pipelines.best_of import best_of

    decoded = torch.rand(4, 3, 32, 32) * 2 - 1
    chosen, chosen_scores, values = best_of(decoded, [0, 0, 1, 1], 2, scorer, 1, "car")
    assert len(chosen) == 2 and values == [s.probs["car"] for s in chosen_scores]


def test_detect_bad_arguments(detectors, tmp_path):
    path, _, _ = detectors["yolov5"]
    scorer = Scorer.from_pretrained(path)
    image = np.zeros((10, 10, 3), np.uint8)
    for kwargs, name in (({"conf": 1.5}, "conf"), ({"iou": -0.1}, "iou"), ({"conf": float("nan")}, "conf"),
                         ({"max_det": 0}, "max_det"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(InvalidArgumentError, match=name):
            scorer.detect(image, **kwargs)
    with pytest.raises(InvalidArgumentError, match="images"):
        scorer.detect(str(tmp_path / "missing.png"))
    assert scorer.detect([]) == [] and len(scorer.detect(image, conf=1.0)[0]) == 0
    with pytest.raises(InvalidArgumentError, match="labels"):
        Scorer.from_pretrained(path, labels=["a", "b"])
    assert Scorer.from_pretrained(path, labels=["x", "y", "z"]).labels == ["x", "y", "z"]
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    classifier = Scorer.from_pretrained(export(net, tmp_path / "classifier.onnx", (32, 32)))  # (batch, 4) logits
    assert classifier.task == "classify"
    with pytest.raises(InvalidArgumentError, match="task"):
        classifier.detect(image)
    with pytest.raises(UnsupportedError, match="detector"):
        Scorer(classifier.engine, task="detect")


def test_score_cli_prints_boxes(detectors, tmp_path):
    path, _, _ = detectors["yolov8"]
    files = []
    for i, im in enumerate(images([(77, 113), (257, 1)], seed=4)):
        files.append(str(tmp_path / f"im{i}.png"))
        im.save(files[-1])
    runner = CliRunner()
    result = runner.invoke(score_cli, ["-m", str(path), *files, "--json", "--conf", "0.5", "--iou", "0.3"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    want = Scorer.from_pretrained(path).detect(files, conf=0.5, iou=0.3)
    assert data["task"] == "detect" and data["labels"] == LABELS
    for row, d in zip(data["results"], want):
        assert [x["label"] for x in row["detections"]] == d.labels
        np.testing.assert_allclose([x["box"] for x in row["detections"]], d.boxes.reshape(-1, 4), atol=1e-4)
        assert set(row["probs"]) == set(LABELS)
    table = runner.invoke(score_cli, ["-m", str(path), files[0], "--conf", "0.5"])
    assert table.exit_code == 0, table.output
    first = want[0]
    assert first.labels[0] in table.output and f"{first.scores[0]:.3f}" in table.output
    positional = runner.invoke(score_cli, [str(path), files[0], "--json", "--conf", "0.5", "--iou", "0.3"])
    assert positional.exit_code == 0, positional.output  # `fastgen score det.onnx img.png`
    assert json.loads(positional.output)["results"][0]["detections"] == data["results"][0]["detections"]
    bad = runner.invoke(score_cli, ["-m", str(path), files[0], "--conf", "2"])
    assert bad.exit_code == 2 and "--conf" in bad.output and "Traceback" not in bad.output


def test_non_finite_outputs_are_errors_not_empty(detectors, monkeypatch):
    """A NaN output is never "nothing found" (a moderation scorer's most dangerous answer)."""
    from fastgen.errors import NumericalError

    path, _, _ = detectors["yolov8"]
    scorer = Scorer.from_pretrained(path)
    ims = images([(20, 30), (30, 20), (16, 16)], seed=9)
    clean = scorer.score_images(ims)
    real = scorer.engine._run  # the backend's call, after the engine's checks

    def poisoned(feeds):
        raw = real(feeds)["output0"].clone()
        raw[1, 5, 3] = float("nan")  # the second image of each batch
        return {"output0": raw}

    monkeypatch.setattr(scorer.engine, "_run", poisoned)
    with pytest.raises(NumericalError, match=r"images\[1\]"):
        scorer.detect(ims, batch_size=3)
    with pytest.raises(NumericalError, match=r"images\[1\]"):
        scorer.score_images(ims, batch_size=3)
    prep = scorer.image_preprocessor
    pixels, boxes = prep.letterbox(ims)
    raw = scorer.detector_outputs(prep.feeds(pixels))
    rows = scorer.detection_rows(raw, boxes)
    assert isinstance(rows[1], NumericalError) and [len(r) for r in (rows[0], rows[2])] == [
        len(d) for d in (scorer.detections(raw[:1], boxes[:1])[0], scorer.detections(raw[2:], boxes[2:])[0])]
    results = scorer.score_rows(scorer.logits(prep.feeds(pixels)))
    assert isinstance(results[1], NumericalError)
    assert results[0].probs == clean[0].probs and results[2].probs == clean[2].probs
