"""fastgen.pipelines.scorer on images: preprocessing, probabilities, batching, labels, bad inputs.

References are independent of the scorer: PIL resize + ``(x / 255 - mean) / std`` in PyTorch for
the preprocessing, and the tiny classifier's PyTorch module (softmax of its logits) for the scores.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image

import fastgen
from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.scorer import Score, Scorer

LABELS = ["clean", "text-heavy", "low-quality", "unsafe"]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def component():
    return fastgen.load_component("tiny", "classifier")


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def scorer(request):
    engine = fastgen.build("tiny", component="classifier", backend=request.param, device="cpu")
    return Scorer(engine)


@pytest.fixture(scope="module")
def ort_scorer():
    return Scorer(fastgen.build("tiny", component="classifier", backend="onnxruntime", device="cpu"))


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (50, 70), (97, 33), (1, 5), (128, 96), (65, 63)]
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return out


def reference_pixels(images: list[Image.Image], size: int = 64, crop: bool = False) -> torch.Tensor:
    """Plain PIL + PyTorch: resize (bilinear) then (x / 255 - mean) / std, (N, 3, size, size) fp32."""
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if crop:
            # torchvision's Resize(size) / transformers' shortest_edge: the long side is int(size * long / short).
            short, long = min(im.size), max(im.size)
            rw, rh = (size, int(size * long / short)) if im.width <= im.height else (int(size * long / short), size)
            im = im.resize((rw, rh), Image.BILINEAR)
            left, top = round((rw - size) / 2), round((rh - size) / 2)
            im = im.crop((left, top, left + size, top + size))
        elif im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        arrays.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float())
    x = torch.stack(arrays)
    return (x / 255 - MEAN) / STD


def reference_logits(component, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return component.module(pixels)[0].float()


def probs_matrix(scores: list[Score]) -> torch.Tensor:
    return torch.tensor([[s.probs[k] for k in LABELS] for s in scores], dtype=torch.float64)


# --- preprocessing --------------------------------------------------------------------------------

def test_defaults_come_from_metadata(ort_scorer):
    assert ort_scorer.kind == "image"
    assert ort_scorer.labels == LABELS
    assert ort_scorer.image_size == (64, 64)
    assert ort_scorer.mean == (0.485, 0.456, 0.406) and ort_scorer.std == (0.229, 0.224, 0.225)
    assert ort_scorer.resample == Image.BILINEAR and ort_scorer.center_crop is False
    assert ort_scorer.batch_size == 8  # the profile's opt batch (1:8:32)


def test_preprocess_matches_pil_torch_reference(ort_scorer, tmp_path):
    images = random_images(6)
    ref = reference_pixels(images)
    assert torch.equal(ort_scorer.preprocess_images(images), ref)  # PIL images
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"im{i}.png")
        im.save(paths[-1])
    assert torch.equal(ort_scorer.preprocess_images(paths), ref)  # files (lossless png)
    assert torch.equal(ort_scorer.preprocess_images([str(p) for p in paths]), ref)
    arrays = [np.array(im) for im in images]
    assert torch.equal(ort_scorer.preprocess_images(arrays), ref)  # uint8 HWC arrays
    # non-contiguous views: every other column of a wider array
    wide = [np.repeat(a, 2, axis=1)[:, ::2] for a in arrays]
    assert not wide[0].flags.c_contiguous
    assert torch.equal(ort_scorer.preprocess_images(wide), ref)
    assert torch.equal(ort_scorer.preprocess_images([torch.from_numpy(a) for a in arrays]), ref)  # uint8 HWC tensors
    floats = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]  # CHW in [0, 1]
    assert torch.equal(ort_scorer.preprocess_images(floats), ref)


def test_preprocess_batches_modes_and_crop(ort_scorer):
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)  # (N, H, W, C)
    ref = reference_pixels([Image.fromarray(a) for a in batch])
    assert torch.equal(ort_scorer.preprocess_images(batch), ref)
    assert torch.equal(ort_scorer.preprocess_images(torch.from_numpy(batch)), ref)
    rgba = np.concatenate([batch[0], np.full((64, 64, 1), 7, np.uint8)], axis=2)
    assert torch.equal(ort_scorer.preprocess_images(rgba), ref[:1])  # alpha dropped
    gray = Image.fromarray(batch[0, :, :, 0], mode="L")
    assert torch.equal(ort_scorer.preprocess_images(gray), reference_pixels([gray]))
    assert torch.equal(ort_scorer.preprocess_images(np.asarray(gray)), reference_pixels([gray]))
    crop = Scorer(ort_scorer.engine, center_crop=True)
    odd = random_images(6, seed=3)
    assert torch.equal(crop.preprocess_images(odd), reference_pixels(odd, crop=True))
    assert ort_scorer.preprocess_images([]).shape == (0, 3, 64, 64)


def test_image_preprocessor_is_the_scorers(ort_scorer):
    prep = ort_scorer.image_preprocessor
    assert ort_scorer.text_preprocessor is None and not hasattr(ort_scorer, "tokenizer")
    assert (prep.size, prep.channels, prep.mean, prep.std) == ((64, 64), 3, ort_scorer.mean, ort_scorer.std)
    images = random_images(4)
    ref = reference_pixels(images)
    assert torch.equal(prep(images), ref)
    pixels = prep.to_uint8(prep.flatten(images))  # (4, 64, 64, 3) uint8
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 64, 64, 3)
    feeds = prep.feeds(pixels)
    assert list(feeds) == [prep.input_name] and torch.equal(feeds[prep.input_name], ref)
    # The public steps give exactly what score_images gives for one batch.
    scores = ort_scorer.scores(ort_scorer.logits(feeds))
    assert [s.to_dict() for s in scores] == [s.to_dict() for s in ort_scorer.score_images(images, batch_size=4)]


def test_torch_modules_come_from_the_engine(scorer):
    modules = scorer.torch_modules()
    if scorer.engine.backend == "torch":
        assert list(modules) == ["classifier"] and isinstance(modules["classifier"], torch.nn.Module)
        assert modules == scorer.engine.torch_modules()
    else:
        assert modules == {}  # onnxruntime runs no PyTorch module


# --- probabilities ----------------------------------------------------------------------------------

def test_probs_are_softmax_of_the_pytorch_module(scorer, component):
    images = random_images(6, seed=2)
    logits = reference_logits(component, reference_pixels(images))  # (6, 4)
    scores = scorer.score_images(images)
    assert len(scores) == 6
    got_logits = torch.tensor([s.logits for s in scores])
    torch.testing.assert_close(got_logits, logits, atol=1e-4, rtol=1e-4)
    probs = probs_matrix(scores)
    torch.testing.assert_close(probs, torch.softmax(logits.double(), -1), atol=1e-5, rtol=0)
    cos = torch.nn.functional.cosine_similarity(got_logits.flatten(), logits.flatten(), dim=0)
    assert cos > 0.99999
    assert torch.allclose(probs.sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-6)
    for s in scores:  # top-3, sorted, consistent with probs
        assert len(s.top) == 3
        assert [p for _, p in s.top] == sorted((p for _, p in s.top), reverse=True)
        assert s.top[0] == max(s.probs.items(), key=lambda kv: kv[1])
        assert s.label == s.top[0][0]


def test_multi_label_is_sigmoid(ort_scorer, component):
    images = random_images(3, seed=4)
    logits = reference_logits(component, reference_pixels(images))
    scores = Scorer(ort_scorer.engine, multi_label=True, top_k=10).score_images(images)
    torch.testing.assert_close(probs_matrix(scores), torch.sigmoid(logits.double()), atol=1e-5, rtol=0)
    assert all(len(s.top) == 4 for s in scores)  # top_k capped at the label count


@pytest.mark.parametrize("n", [1, 5, 13])
@pytest.mark.parametrize("batch_size", [1, 4, None])
def test_batching_keeps_order_and_values(scorer, component, n, batch_size, monkeypatch):
    images = random_images(n, seed=n)
    expected = torch.softmax(reference_logits(component, reference_pixels(images)).double(), -1)
    sizes = []
    run = scorer.logits

    def spy(feeds):
        sizes.append(next(iter(feeds.values())).shape[0])
        return run(feeds)

    monkeypatch.setattr(scorer, "logits", spy)
    scores = scorer.score_images(images, batch_size=batch_size)
    bs = batch_size or scorer.batch_size
    assert sizes == [min(bs, n - i) for i in range(0, n, bs)]
    torch.testing.assert_close(probs_matrix(scores), expected, atol=1e-5, rtol=0)


def test_batch_size_limits(ort_scorer):
    assert Scorer(ort_scorer.engine, batch_size=32).batch_size == 32
    for bad in (0, 33, -1, 2.5, True):
        with pytest.raises(InvalidArgumentError, match="batch_size"):
            Scorer(ort_scorer.engine, batch_size=bad)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        ort_scorer.score_images(random_images(1), batch_size=64)


def test_labels_and_top_k(ort_scorer):
    custom = ["a", "b", "c", "d"]
    s = Scorer(ort_scorer.engine, labels=custom, top_k=2)
    (score,) = s.score_images(random_images(1))
    assert list(score.probs) == custom and len(score.top) == 2
    base = ort_scorer.score_images(random_images(1))[0]
    assert list(score.probs.values()) == list(base.probs.values())
    with pytest.raises(InvalidArgumentError, match="labels"):
        Scorer(ort_scorer.engine, labels=["a", "b"])
    with pytest.raises(InvalidArgumentError, match="labels"):
        Scorer(ort_scorer.engine, labels=["a", "a", "b", "c"])
    with pytest.raises(InvalidArgumentError, match="top_k"):
        Scorer(ort_scorer.engine, top_k=0)
    ort_scorer.engine.metadata  # noqa: B018 - loaded once
    bare = Scorer(ort_scorer.engine, labels=None)
    assert bare.labels == LABELS


def test_labels_default_without_metadata(component, tmp_path):
    engine = fastgen.build("tiny", component="classifier", backend="onnxruntime", device="cpu", out=tmp_path / "c")
    onnx_only = fastgen.load_engine(engine.path / "model.onnx")  # a bare graph: no metadata, no labels
    s = Scorer(onnx_only, image_size=64)
    assert s.kind == "image" and s.labels == [f"label_{i}" for i in range(4)]
    images = random_images(2)
    expected = torch.softmax(reference_logits(component, reference_pixels(images)), -1)
    got = torch.tensor([[sc.probs[f"label_{i}"] for i in range(4)] for sc in s.score_images(images)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_from_engine_directory(tmp_path, ort_scorer):
    fastgen.build("tiny", component="classifier", out=tmp_path / "c", device="cpu")
    s = Scorer.from_pretrained(tmp_path / "c")
    assert s.kind == "image" and s.labels == LABELS and s.engine.path == (tmp_path / "c").absolute()
    images = random_images(5, seed=9)
    torch.testing.assert_close(probs_matrix(s.score_images(images)), probs_matrix(ort_scorer.score_images(images)),
                               atol=1e-6, rtol=0)
    with pytest.raises(InvalidArgumentError, match="component"):
        Scorer.from_pretrained(tmp_path / "c", component="text-classifier")


def test_from_pretrained_preset_and_torch_backend(component):
    s = Scorer.from_pretrained("tiny", backend="torch", device="cpu", top_k=1)
    assert s.engine.backend == "torch" and s.labels == LABELS
    images = random_images(2, seed=5)
    expected = torch.softmax(reference_logits(component, reference_pixels(images)).double(), -1)
    scores = s(images)  # __call__ dispatches on kind
    torch.testing.assert_close(probs_matrix(scores), expected, atol=1e-6, rtol=0)
    assert len(scores[0].top) == 1


def test_score_to_dict_is_json(ort_scorer):
    (s,) = ort_scorer.score_images(random_images(1))
    d = json.loads(json.dumps(s.to_dict()))
    assert set(d) == {"probs", "top", "logits"}
    assert d["top"][0] == {"label": s.top[0][0], "prob": s.top[0][1]}
    assert d["probs"] == s.probs


# --- bad inputs -------------------------------------------------------------------------------------

def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_unreadable_files_name_the_file(ort_scorer, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(InvalidArgumentError) as exc:
        ort_scorer.score_images([random_images(1)[0], bad])
    assert str(bad) in one_line(exc)
    truncated = tmp_path / "truncated.png"
    random_images(1)[0].save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(InvalidArgumentError) as exc:
        ort_scorer.score_images(truncated)
    assert str(truncated) in one_line(exc)
    with pytest.raises(InvalidArgumentError) as exc:
        ort_scorer.score_images(tmp_path / "missing.jpg")
    assert "missing.jpg" in one_line(exc) and "no such file" in str(exc.value)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 2), np.uint8), "shape"),
    (np.zeros((3, 8, 8, 8, 3), np.uint8), "shape"),
    (torch.zeros(2, 8, 8), "float tensor"),
    (torch.zeros(3, 8, 8, dtype=torch.int32), "dtype"),
    (12, "int"),
    ({"a": 1}, "dict"),
])
def test_bad_image_values(ort_scorer, bad, match):
    with pytest.raises(InvalidArgumentError, match=match) as exc:
        ort_scorer.score_images(bad)
    one_line(exc)


def test_text_to_image_scorer(ort_scorer):
    with pytest.raises(InvalidArgumentError, match="image classifier") as exc:
        ort_scorer.score_texts(["hello"])
    one_line(exc)


def test_bad_scorer_options(ort_scorer):
    with pytest.raises(InvalidArgumentError, match="kind"):
        Scorer(ort_scorer.engine, kind="audio")
    with pytest.raises(InvalidArgumentError, match="kind"):
        Scorer(ort_scorer.engine, kind="text")
    with pytest.raises(InvalidArgumentError, match="resample"):
        Scorer(ort_scorer.engine, resample="sharpest")
    with pytest.raises(InvalidArgumentError, match="std"):
        Scorer(ort_scorer.engine, std=[0.2, 0.0, 0.2])
    with pytest.raises(InvalidArgumentError, match="mean"):
        Scorer(ort_scorer.engine, mean=[0.5])
    with pytest.raises(InvalidArgumentError, match="image_size"):
        Scorer(ort_scorer.engine, image_size=(64, 0))
    with pytest.raises(InvalidArgumentError, match="engine"):
        Scorer("tiny")
    assert Scorer(ort_scorer.engine, resample="bicubic").resample == Image.BICUBIC


# --- other engines ----------------------------------------------------------------------------------

class SmallNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):  # (batch, 3, 32, 32) -> (batch, 3)
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_static_batch_onnx_graph_pads_short_batches(tmp_path):
    """A third-party graph with a fixed batch of 2 and no metadata: kind, size and labels from the graph."""
    torch.manual_seed(0)
    net = SmallNet().eval()
    path = tmp_path / "static.onnx"
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    torch.onnx.export(net, (torch.zeros(2, 3, 32, 32),), str(path), input_names=["pixel_values"],
                      output_names=["logits"], **legacy)
    s = Scorer(fastgen.load_engine(path))
    assert s.kind == "image" and s.image_size == (32, 32) and s.batch_size == 2
    assert s.labels == ["label_0", "label_1", "label_2"]
    images = random_images(5, seed=11)
    with torch.inference_mode():
        expected = torch.softmax(net(reference_pixels(images, size=32)).double(), -1)
    got = torch.tensor([[sc.probs[k] for k in s.labels] for sc in s.score_images(images)], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        Scorer(fastgen.load_engine(path), batch_size=3)


def test_bf16_torch_engine_close_to_fp32(ort_scorer):
    s = Scorer.from_pretrained("tiny", backend="torch", precision="bf16", device="cpu")
    images = random_images(4, seed=12)
    torch.testing.assert_close(probs_matrix(s.score_images(images)), probs_matrix(ort_scorer.score_images(images)),
                               atol=1e-2, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_torch_engine_on_cuda(ort_scorer):
    """uint8 pixels go to the GPU and are normalised there; results match the CPU engine."""
    s = Scorer.from_pretrained("tiny", backend="torch", device="cuda")
    assert s.engine.device.type == "cuda"
    images = random_images(5, seed=13)
    torch.testing.assert_close(probs_matrix(s.score_images(images)), probs_matrix(ort_scorer.score_images(images)),
                               atol=1e-4, rtol=0)
