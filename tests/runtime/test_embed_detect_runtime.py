"""Embeddings and detections as Runtime request kinds: EmbedRequest / DetectRequest batched like scoring
(text length buckets, one bucket per image input size), interleaved with other scorers' requests, each
result equal to ``Scorer.embed`` / ``Scorer.detect`` of the item alone (per-request options included);
ScoreRequests to a detector share its batches; bad requests fail at submission in one line."""

from __future__ import annotations

import inspect
import threading

import numpy as np
import onnx
import pytest
import torch

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.scorer import Scorer
from fastgen.runtime import DetectRequest, EmbedRequest, Runtime, ScoreRequest

pytestmark = pytest.mark.usefixtures("no_leaked_threads")
TIMEOUT = 120
LABELS = ["person", "car", "dog"]
TEXTS = ["", "a", "buy now", "a photo of a red sports car on a mountain road at sunset " * 2,
         "great product fast delivery " * 12, "électrique ☕ vélo " * 40, "x y z"]


class Spy:
    """A scorer that records each engine call's rows (``method``) and otherwise is the scorer."""

    def __init__(self, scorer, method: str) -> None:
        self._scorer, self._method = scorer, method
        self.calls: list[int] = []
        self._lock = threading.Lock()

    def __getattr__(self, name):
        value = getattr(self._scorer, name)
        if name != self._method:
            return value

        def call(feeds, *args, **kwargs):
            with self._lock:
                self.calls.append(next(iter(feeds.values())).shape[0])
            return value(feeds, *args, **kwargs)

        return call


class TinyYolo(torch.nn.Module):
    """Strided convs to three levels (strides 8, 16, 32) and a 1x1 head each: ultralytics' yolov8
    layout (batch, 4 + classes, anchors), boxes in input pixels, class scores through a sigmoid."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(7)
        conv = lambda i, o: torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, 2, 1), torch.nn.SiLU())  # noqa: E731
        self.p3 = torch.nn.Sequential(conv(3, 8), conv(8, 8), conv(8, 8))
        self.p4, self.p5 = conv(8, 8), conv(8, 8)
        self.heads = torch.nn.ModuleList(torch.nn.Conv2d(8, 4 + classes, 1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 3, H, W) in [0, 1]
        f3 = self.p3(x)
        f4 = self.p4(f3)
        outs = []
        for feat, head, stride in zip((f3, f4, self.p5(f4)), self.heads, (8, 16, 32)):
            y = (head(feat) * 3).flatten(2)  # (batch, 4 + classes, h * w)
            h, w = feat.shape[2:]
            gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                    indexing="ij")
            cx = (gx.flatten() + 0.5 + torch.tanh(y[:, 0])) * stride
            cy = (gy.flatten() + 0.5 + torch.tanh(y[:, 1])) * stride
            wh = torch.exp(y[:, 2:4].clamp(-2, 2)) * stride * 2
            outs.append(torch.cat([cx[:, None], cy[:, None], wh, torch.sigmoid(y[:, 4:])], dim=1))
        return torch.cat(outs, dim=2)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """A tiny yolov8-layout detector exported to ONNX as ultralytics exports (names, imgsz, stride)."""
    path = tmp_path_factory.mktemp("det") / "det.onnx"
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    torch.onnx.export(TinyYolo().eval(), (torch.zeros(1, 3, 64, 96),), str(path), opset_version=17,
                      input_names=["images"], output_names=["output0"],
                      dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}}, **legacy)
    model = onnx.load(str(path))
    for key, value in {"names": str(dict(enumerate(LABELS))), "imgsz": "[64, 96]", "stride": "32",
                       "task": "detect"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return Scorer.from_pretrained(path)


@pytest.fixture(scope="module")
def encoders():
    return {kind: Scorer.from_pretrained("tiny-embed", f"{kind}-encoder", backend="torch", device="cpu")
            for kind in ("text", "image")}


def pictures(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


ODD = [(77, 113), (257, 1), (1, 257), (64, 96), (33, 200), (50, 50), (9, 9)]


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def test_embeddings_are_batched_in_buckets_and_equal_embedding_alone(encoders, tiny_scorer):
    text, image = Spy(encoders["text"], "embeddings"), Spy(encoders["image"], "embeddings")
    moderation = tiny_scorer("text")
    pics = pictures(ODD)
    normalize = [None, True, False]
    plan = [EmbedRequest(t, normalize=normalize[i % 3]) for i, t in enumerate(TEXTS)]
    plan += [EmbedRequest(p, scorer="vision", normalize=normalize[i % 3]) for i, p in enumerate(pics)]
    plan += [ScoreRequest(t) for t in TEXTS[:3]]  # the only text classifier, beside the text encoder
    order = plan[::2] + plan[1::2]
    with Runtime(scorers={"retrieval": text, "vision": image, "moderation": moderation}, text_buckets=(8, 32, 128),
                 max_wait_ms=300, start=False) as rt:
        futures = [rt.submit(r) for r in order]
        rt.start()
        got = {id(r): f.result(TIMEOUT) for r, f in zip(order, futures)}
        stats = rt.stats()["kinds"]
        buckets = {b for e, b in rt.metrics.profile.keys() if e == "retrieval"}
    assert {f.kind for f in futures} == {"retrieval", "vision", "moderation"}
    for r in plan:
        value = got[id(r)]
        if isinstance(r, ScoreRequest):
            np.testing.assert_allclose(value.logits, moderation.score_texts([r.item])[0].logits, atol=1e-5)
            continue
        own = encoders["text"] if isinstance(r.item, str) else encoders["image"]
        ref = own.embed([r.item], normalize=r.normalize)[0]
        assert isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.shape == ref.shape
        assert value.device.type == "cpu" and value.untyped_storage().nbytes() == 4 * value.numel()  # its own copy
        np.testing.assert_allclose(value.numpy(), ref.numpy(), atol=2e-5, rtol=0)
        assert cosine(value, ref) >= 0.99999
        wanted = encoders["text"].embedding.normalize if r.normalize is None and isinstance(r.item, str) else (
            encoders["image"].embedding.normalize if r.normalize is None else r.normalize)
        assert abs(float(value.norm()) - 1.0) < 1e-5 if wanted else True
    # Each text's token count, as its model reads it (an API's usage), without tokenizing it again.
    for r, f in zip(order, futures):
        scorer = moderation if isinstance(r, ScoreRequest) else encoders["text"]
        assert f.tokens == (scorer.text_preprocessor.lengths([r.item])[0] if isinstance(r.item, str) else None)
    # Texts in length buckets (several calls), the images in one bucket of the encoder's size: one call.
    assert buckets <= {"8", "32", "128", "512"} and len(buckets) >= 2 and sum(text.calls) == len(TEXTS)
    assert image.calls == [len(pics)]
    assert stats["retrieval"]["requests"] == {"succeeded": len(TEXTS)}
    assert stats["vision"]["requests"] == {"succeeded": len(pics)} and stats["moderation"]["batch_size"]["count"] >= 1


def test_detections_and_detector_scores_share_batches_and_equal_the_scorers_own(detector):
    spy = Spy(detector, "detector_outputs")
    pics = pictures(ODD, seed=1)
    options = [dict(), dict(conf=0.4, iou=0.3), dict(max_det=2), dict(conf=0.1, iou=0.9, max_det=50)]
    plan = [DetectRequest(p, **options[i % 4]) for i, p in enumerate(pics)] + [ScoreRequest(p) for p in pics[:3]]
    with Runtime(scorers={"nsfw": spy}, max_wait_ms=300, start=False) as rt:
        futures = [rt.submit(r) for r in plan]
        rt.start()
        got = [f.result(TIMEOUT) for f in futures]
        assert asyncio_detect(rt, pics[0]).labels == detector.detect(pics[0], conf=0.2)[0].labels
        # Auto-tuning times the detector's bucket (its input size) like any scorer's.
        assert set(rt.autotune(10_000.0, batch_sizes=(1, 2), iters=1)) == {"nsfw:64x96"}
    assert spy.calls[0] == len(plan)  # one engine call for the DetectRequests and ScoreRequests together
    found = 0
    for r, value in zip(plan, got):
        if isinstance(r, ScoreRequest):
            ref = detector.score_images([r.item])[0]
            assert value.probs == pytest.approx(ref.probs, abs=1e-6) and value.label == ref.label
            continue
        kwargs = {k: getattr(r, k) for k in ("conf", "iou", "max_det") if getattr(r, k) is not None}
        (ref,) = detector.detect([r.item], **kwargs)
        assert value.labels == ref.labels and value.class_ids.tolist() == ref.class_ids.tolist()
        np.testing.assert_allclose(value.scores, ref.scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(value.boxes, ref.boxes, rtol=1e-5, atol=1e-3)
        assert len(value) <= (r.max_det or 300)
        found += len(value)
    assert found > 0  # the random head finds boxes: a real comparison


def asyncio_detect(rt, image):
    import asyncio

    return asyncio.run(rt.detect(image, conf=0.2))


def test_requests_that_do_not_fit_their_scorer_fail_at_submission(encoders, detector, tiny_scorer):
    with Runtime(scorers={"retrieval": encoders["text"], "nsfw": detector, "moderation": tiny_scorer("text")}) as rt:
        for request, argument, needle in [
            (EmbedRequest("x", scorer="moderation"), "scorer", "needs a scorer that embeds"),
            (DetectRequest(np.zeros((8, 8, 3), np.uint8), scorer="retrieval"), "scorer", "detects"),
            (EmbedRequest(np.zeros((8, 8, 3), np.uint8)), "request", "no image scorer that embeds"),
            (EmbedRequest("x", scorer="nope"), "scorer", "moderation, nsfw, retrieval"),
            (EmbedRequest(3, scorer="retrieval"), "item", "text"),
            (ScoreRequest("x", scorer="retrieval"), "scorer", "classifies"),
        ]:
            with pytest.raises(InvalidArgumentError) as err:
                rt.submit(request)
            assert err.value.argument == argument and needle in str(err.value) and "\n" not in str(err.value)
        assert rt.stats()["inflight"] == 0
    with Runtime(scorers={"retrieval": encoders["text"]}) as rt:
        with pytest.raises(InvalidArgumentError, match="no image scorer that detects"):
            rt.submit(DetectRequest(np.zeros((8, 8, 3), np.uint8)))
    for bad, argument in [(dict(conf=1.5), "conf"), (dict(iou=-0.1), "iou"), (dict(max_det=0), "max_det"),
                          (dict(conf=True), "conf")]:
        with pytest.raises(InvalidArgumentError) as err:
            DetectRequest(np.zeros((4, 4, 3), np.uint8), **bad)
        assert err.value.argument == argument
    with pytest.raises(InvalidArgumentError) as err:
        EmbedRequest("x", normalize="yes")
    assert err.value.argument == "normalize"


def test_a_two_tower_scorer_embeds_with_each_tower_and_scores_with_its_head():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 1))  # tiny-clip: 16-d embeddings
    clip = Scorer.from_pretrained("tiny-clip", backend="torch", device="cpu", aesthetic=head)
    assert clip.task == "similarity" and clip.kind == "image" and clip.text_engine is not None
    towers = {"text": Spy(clip, "tower_embeddings")}
    pics = pictures(ODD[:4], seed=2)
    plan = [EmbedRequest(t, scorer="clip", normalize=i % 2 == 0) for i, t in enumerate(TEXTS[:5])]
    plan += [EmbedRequest(p, normalize=i % 2 == 1) for i, p in enumerate(pics)] + [ScoreRequest(p) for p in pics]
    with Runtime(scorers={"clip": towers["text"]}, text_buckets=(8, 32), max_wait_ms=300, start=False) as rt:
        assert set(rt.executors) == {"clip", "clip:text"} and rt.scheduler.nested_kinds == ("clip:text",)
        futures = [rt.submit(r) for r in plan]
        rt.start()
        got = [f.result(TIMEOUT) for f in futures]
        stats = rt.stats()["kinds"]
    assert {f.kind for f in futures} == {"clip", "clip:text"}
    for r, value in zip(plan, got):
        if isinstance(r, ScoreRequest):
            ref_score = clip.score_images([r.item])[0]
            assert list(value.probs) == ["aesthetic"] and value.probs == pytest.approx(ref_score.probs, rel=1e-5)
            continue
        ref = clip.embed([r.item], normalize=r.normalize)[0]
        np.testing.assert_allclose(value.numpy(), ref.numpy(), atol=2e-5, rtol=0)
    # The images' embeddings and aesthetic scores: one image tower call; the texts: one call per length bucket.
    assert len(pics) * 2 in towers["text"].calls and sum(towers["text"].calls) == len(plan)
    assert stats["clip:text"]["requests"] == {"succeeded": 5} and stats["clip"]["requests"] == {"succeeded": 8}


def test_a_non_finite_detector_row_fails_its_own_request_only(detector):
    from fastgen.errors import NumericalError

    class Poisoned(Spy):
        """The detector, with NaN outputs for all-black inputs (a 64x96 black image fills the input: no padding)."""

        def __getattr__(self, name):
            if name != "detector_outputs":
                return getattr(self._scorer, name)

            def call(feeds):
                raw = self._scorer.detector_outputs(feeds).clone()
                black = next(iter(feeds.values())).flatten(1).abs().amax(dim=1) == 0
                raw[black] = float("nan")
                return raw

            return call

    black = np.zeros((64, 96, 3), np.uint8)
    pics = pictures([(40, 60), (64, 96)], seed=3)
    plan = [DetectRequest(pics[0]), DetectRequest(black), ScoreRequest(black), ScoreRequest(pics[1]),
            DetectRequest(pics[1], conf=0.1)]
    with Runtime(scorers={"nsfw": Poisoned(detector, "")}, max_wait_ms=300, start=False) as rt:
        futures = [rt.submit(r) for r in plan]
        rt.start()
        errors = [f.exception(TIMEOUT) for f in futures]
    assert [type(e) for e in errors] == [type(None), NumericalError, NumericalError, type(None), type(None)]
    assert "\n" not in str(errors[1])
    assert futures[3].result().probs == pytest.approx(detector.score_images([pics[1]])[0].probs, abs=1e-6)
    assert futures[4].result().labels == detector.detect([pics[1]], conf=0.1)[0].labels
