"""fastgen.pipelines.scorer on texts: batched, length-sorted, padded-to-longest scoring equals the
PyTorch model run on each text alone, unpadded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastgen
from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.scorer import Scorer

LABELS = ["compliant", "misleading", "prohibited"]
TEXTS = [
    "buy now",
    "a photo of a red sports car on a mountain road at sunset, studio lighting, product shot",
    "",
    "terrible quality broken on arrival never buying again waste of money refund please",
    "five stars",
    "Limited offer!!! FREE shipping — best price, quality guaranteed ☺",
    "the text is too small",
    "great product fast delivery excellent service would recommend to friends five stars " * 3,
    "spammy clickbait",
    "x",
    "healthy salad bowl with avocado and tomatoes, top view, food delivery promotion",
    "new collection of winter jackets",
    "electric bicycle " * 60,  # longer than the 128-token limit: truncated
]


@pytest.fixture(scope="module")
def component():
    """The tiny text classifier with larger random weights, so that padding mistakes show."""
    comp = fastgen.load_component("tiny", "text-classifier")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in comp.model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return comp


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def scorer(request, component):
    return Scorer(fastgen.build(component, backend=request.param, device="cpu"))


def reference_logits(component, texts: list[str], max_length: int = 128) -> torch.Tensor:
    """Each text alone: no padding, mask of ones, truncated at max_length."""
    rows = []
    for text in texts:
        enc = component.tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            rows.append(component.module(enc["input_ids"], enc["attention_mask"])[0][0].float())
    return torch.stack(rows)  # (n, 3)


def probs(scores) -> torch.Tensor:
    return torch.tensor([[s.probs[k] for k in LABELS] for s in scores], dtype=torch.float64)


def test_text_defaults(scorer):
    assert scorer.kind == "text"
    assert scorer.labels == LABELS
    assert scorer.max_length == 128
    assert scorer.batch_size == 8
    assert scorer.tokenizer is not None


@pytest.mark.parametrize("batch_size", [1, 4, 5, None])
def test_scores_equal_unpadded_single_texts(scorer, component, batch_size, monkeypatch):
    seen = []
    run = scorer.logits

    def spy(feeds):
        seen.append({k: v.clone() for k, v in feeds.items()})
        return run(feeds)

    monkeypatch.setattr(scorer, "logits", spy)
    scores = scorer.score_texts(TEXTS, batch_size=batch_size)
    ref = reference_logits(component, TEXTS)
    torch.testing.assert_close(torch.tensor([s.logits for s in scores]), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs(scores), torch.softmax(ref.double(), -1), atol=1e-5, rtol=0)
    bs = batch_size or scorer.batch_size
    assert [f["input_ids"].shape[0] for f in seen] == [min(bs, len(TEXTS) - i) for i in range(0, len(TEXTS), bs)]
    for f in seen:  # each batch is padded only to its own longest text, with the mask
        mask = f["attention_mask"]
        assert set(f) == {"input_ids", "attention_mask"}
        assert mask.sum(1).max() == mask.shape[1]
        assert mask.shape[1] <= 128
    if bs > 1:  # length sorting: batch widths grow, and some rows really are padded
        widths = [f["input_ids"].shape[1] for f in seen]
        assert widths == sorted(widths)
        assert any((f["attention_mask"] == 0).any() for f in seen)


def test_padding_without_mask_would_differ(component):
    """The check above can fail: the same padded batch without its mask gives other logits."""
    enc = component.tokenizer(TEXTS[:2], padding="longest", return_tensors="pt")
    with torch.inference_mode():
        unmasked = component.module(enc["input_ids"], torch.ones_like(enc["attention_mask"]))[0]
    assert (unmasked[0] - reference_logits(component, TEXTS[:1])[0]).abs().max() > 1e-2


def test_order_and_single_string(scorer, component):
    one = scorer.score_texts(TEXTS[1])
    assert len(one) == 1
    torch.testing.assert_close(torch.tensor(one[0].logits), reference_logits(component, TEXTS[1:2])[0],
                               atol=1e-5, rtol=1e-5)
    reversed_scores = scorer(list(reversed(TEXTS)))  # __call__ dispatches to score_texts
    forward = scorer.score_texts(TEXTS)
    torch.testing.assert_close(probs(reversed_scores), probs(forward).flip(0), atol=1e-6, rtol=0)
    assert scorer.score_texts([]) == []


def test_max_length_option(scorer, component):
    short = Scorer(scorer.engine, max_length=6)
    scores = short.score_texts(TEXTS[:4])
    ref = reference_logits(component, TEXTS[:4], max_length=6)
    torch.testing.assert_close(torch.tensor([s.logits for s in scores]), ref, atol=1e-5, rtol=1e-5)
    assert Scorer(scorer.engine, max_length=4096).max_length == 128  # capped by the engine's seq range


def test_preset_text_classifier_from_pretrained(tmp_path):
    s = Scorer.from_pretrained("tiny", "text-classifier", device="cpu")
    assert s.kind == "text" and s.labels == LABELS
    fastgen.build("tiny", component="text-classifier", device="cpu", out=tmp_path / "t")
    d = Scorer.from_pretrained(tmp_path / "t")  # tokenizer and labels from the engine directory
    assert d.kind == "text" and d.labels == LABELS and d.tokenizer is not None
    np.testing.assert_allclose(probs(d.score_texts(TEXTS)), probs(s.score_texts(TEXTS)), atol=1e-6)


def test_bad_text_inputs(scorer):
    with pytest.raises(InvalidArgumentError, match=r"texts\[1\]"):
        scorer.score_texts(["ok", 3])
    with pytest.raises(InvalidArgumentError, match="text classifier") as exc:
        scorer.score_images(np.zeros((8, 8, 3), np.uint8))
    assert "\n" not in str(exc.value)
    with pytest.raises(InvalidArgumentError, match="text classifier"):
        scorer.score_video(np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(InvalidArgumentError, match="kind"):
        Scorer(scorer.engine, kind="image")
    with pytest.raises(InvalidArgumentError, match="max_length"):
        Scorer(scorer.engine, max_length=0)


def test_text_preprocessor_encodes_and_pads_as_the_tokenizer_does(scorer):
    prep = scorer.text_preprocessor
    assert scorer.image_preprocessor is None and not hasattr(scorer, "image_size")
    assert prep.tokenizer is scorer.tokenizer and prep.max_length == scorer.max_length == 128
    assert prep.input_names == tuple(scorer.engine.spec.input_names) and prep.static_length is None
    # Unpadded ids now, padded later: the same feeds as the tokenizer's own padded call.
    ids = prep.encode_batch(TEXTS)
    assert ids == [prep.encode(t) for t in TEXTS]
    assert [len(e["input_ids"]) for e in ids] == prep.lengths(TEXTS)
    for name, values in prep.pad(ids, 128).items():
        assert torch.equal(values, prep.feeds(TEXTS, pad_to=128)[name]), name
    edges = prep.bucket_edges((8, 16, 512))
    assert edges == (8, 16, 128) and prep.bucket(9, edges) == 16 and prep.bucket(500, edges) == 128


def test_feeds_logits_scores_is_what_score_texts_does(scorer):
    prep = scorer.text_preprocessor
    texts = sorted(TEXTS[:5], key=lambda t: prep.lengths([t])[0])  # score_texts' own (length) order
    batch = scorer.scores(scorer.logits(prep.feeds(texts)))
    alone = scorer.score_texts(texts, batch_size=len(texts))
    assert [s.to_dict() for s in batch] == [s.to_dict() for s in alone]
    logits = scorer.logits(prep.feeds(texts))  # (n, 3)
    assert [s.to_dict() for s in scorer.scores(logits.numpy())] == [s.to_dict() for s in batch]
