"""``Scorer.embed`` and its pieces: pooling against per-row references (left and right padding, empty
rows), output and pooling resolution, the metadata that carries the settings, the task inference,
a CLIP text encoder's pooled output against transformers, and one-line errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import fastgen
from fastgen.errors import InvalidArgumentError, NumericalError, UnsupportedError
from fastgen.models.metadata import (
    ImageEncoderMetadata,
    TextEncoderMetadata,
    metadata_from_manifest,
)
from fastgen.models.spec import DimRange, ExportSpec, ShapeProfile, TensorSpec
from fastgen.pipelines.embeddings import EmbeddingSettings, l2_normalize, pool, resolve_settings
from fastgen.pipelines.scorer import Scorer


def cosine(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, dim) batches, in float64: (n,)."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a64 * b64).sum(-1) / np.maximum(np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1), 1e-300)


TEXTS = ["buy now", "a photo of a red sports car on a mountain road at sunset, studio lighting, product shot",
         "", "x", "electric bicycle " * 80, "five stars"]


def reference_pool(row: torch.Tensor, mode: str) -> torch.Tensor:
    """One unpadded row (tokens, hidden) pooled the plain way."""
    if mode == "cls":
        return row[0]
    if mode == "lasttoken":
        return row[-1]
    if mode == "max":
        return row.max(dim=0).values
    if mode == "mean":
        return row.mean(dim=0)
    return row.sum(dim=0) / len(row) ** 0.5  # mean_sqrt_len_tokens


@pytest.mark.parametrize("mode", ["mean", "cls", "lasttoken", "max", "mean_sqrt_len_tokens"])
@pytest.mark.parametrize("left", [False, True])
def test_pool_equals_unpadded_rows(mode, left):
    gen = torch.Generator().manual_seed(0)
    lengths = [1, 7, 13, 2, 13]
    seq = max(lengths)
    states = torch.randn(len(lengths), seq, 5, generator=gen) * 3  # (n, seq, hidden)
    mask = torch.zeros(len(lengths), seq, dtype=torch.int64)
    for i, n in enumerate(lengths):
        if left:
            mask[i, seq - n:] = 1
        else:
            mask[i, :n] = 1
    got = pool(states, mask, mode)
    for i, n in enumerate(lengths):
        row = states[i, seq - n:] if left else states[i, :n]
        torch.testing.assert_close(got[i], reference_pool(row, mode), rtol=1e-5, atol=1e-5)
    # No mask: every token counts.
    torch.testing.assert_close(pool(states, None, mode)[1], reference_pool(states[1], mode), rtol=1e-5, atol=1e-5)


def test_pool_edge_cases():
    states = torch.ones(2, 3, 4)
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]])
    assert pool(states, mask, "lasttoken")[0].abs().sum() == 0  # no token at all: zeros, as sentence-transformers
    assert torch.isfinite(pool(states, mask, "mean")).all()  # no division by zero
    assert torch.equal(l2_normalize(torch.zeros(1, 4)), torch.zeros(1, 4))
    with pytest.raises(InvalidArgumentError, match="pooling"):
        pool(states, mask, "pooled")


def spec(outputs, component="text-encoder", image=False):
    inputs = ((TensorSpec("pixel_values", "float32", ("batch", 3, 8, 8)),) if image else
              (TensorSpec("input_ids", "int64", ("batch", "seq"), low=0, high=10),
               TensorSpec("attention_mask", "int64", ("batch", "seq"), kind="mask")))
    dims = {"batch": DimRange(1, 2, 4)} if image else {"batch": DimRange(1, 2, 4), "seq": DimRange(1, 8, 16)}
    return ExportSpec(component=component, inputs=inputs, profile=ShapeProfile(dims),
                      outputs=tuple(TensorSpec(n, "float32", shape) for n, shape in outputs))


HIDDEN = ("last_hidden_state", ("batch", "seq", 6))
POOLED = ("pooler_output", ("batch", 6))


def test_resolve_settings():
    assert resolve_settings(spec([HIDDEN]), None, "text") == EmbeddingSettings("last_hidden_state", "mean", False, 6)
    assert resolve_settings(spec([HIDDEN, POOLED]), None, "text").pooling == "pooled"
    assert resolve_settings(spec([HIDDEN, POOLED], "image-encoder", True), ImageEncoderMetadata(), "image").output \
        == "pooler_output"
    assert resolve_settings(spec([HIDDEN], "image-encoder", True), None, "image").pooling == "cls"
    vit = dataclasses.replace(spec([HIDDEN, POOLED], "image-encoder", True), model_type="ViTModel")
    assert resolve_settings(vit, None, "image").pooling == "cls"  # its pooler is a pre-training head
    assert resolve_settings(vit, ImageEncoderMetadata(pooling="pooled"), "image").output == "pooler_output"
    recorded = TextEncoderMetadata(pooling="lasttoken", normalize=True)
    assert resolve_settings(spec([HIDDEN, POOLED]), recorded, "text") == EmbeddingSettings(
        "last_hidden_state", "lasttoken", True, 6)
    assert resolve_settings(spec([("text_embeds", ("batch", 4)), HIDDEN]), None, "text").output == "text_embeds"
    with pytest.raises(UnsupportedError, match="no pooled"):
        resolve_settings(spec([HIDDEN]), TextEncoderMetadata(pooling="pooled"), "text")
    with pytest.raises(UnsupportedError, match="token states"):
        resolve_settings(spec([POOLED]), TextEncoderMetadata(pooling="mean"), "text")
    with pytest.raises(InvalidArgumentError, match="pooling"):
        EmbeddingSettings("last_hidden_state", "median")


@pytest.mark.parametrize("meta", [TextEncoderMetadata(pooling="cls", normalize=True, max_length=300),
                                  TextEncoderMetadata(),
                                  ImageEncoderMetadata(image_size=32, pooling="mean", normalize=False)])
def test_metadata_round_trip(meta):
    entry = json.loads(json.dumps(meta.to_manifest()))
    assert metadata_from_manifest("image-encoder" if isinstance(meta, ImageEncoderMetadata) else "text-encoder",
                                  entry) == meta


@pytest.mark.parametrize(("kwargs", "argument"), [({"pooling": "median"}, "pooling"), ({"normalize": "yes"}, "normalize"),
                                                  ({"max_length": 0}, "max_length")])
def test_metadata_validation(kwargs, argument):
    with pytest.raises(InvalidArgumentError, match=argument):
        TextEncoderMetadata(**kwargs)


def test_task_inference():
    from fastgen.pipelines.scorer_embed import EmbeddingMethods

    m = EmbeddingMethods()
    assert m._is_embedder(spec([HIDDEN]))
    assert m._is_embedder(spec([POOLED], component="custom"))
    assert m._is_embedder(spec([("image_embeds", ("batch", 4))], component="custom", image=True))
    assert m._is_embedder(spec([("sentence_embedding", ("batch", 4))], component="custom"))
    assert not m._is_embedder(spec([("logits", ("batch", 3)), POOLED], component="custom"))
    assert not m._is_embedder(spec([("boxes", ("batch", 4))], component="custom"))


@pytest.fixture(scope="module")
def embedder():
    return Scorer.from_pretrained("tiny-embed", "text-encoder", backend="torch", device="cpu")


def test_preset_mean_pooling_normalized(embedder):
    comp = fastgen.load_component("tiny-embed", "text-encoder")
    assert (embedder.task, embedder.kind, embedder.pooling, embedder.max_length) == ("embed", "text", "mean", 512)
    got = embedder.embed(TEXTS, batch_size=4)
    rows = []
    for text in TEXTS:
        enc = comp.tokenizer(text, return_tensors="pt", truncation=True, max_length=512)
        with torch.inference_mode():
            rows.append(comp.model(**enc).last_hidden_state[0].mean(dim=0))
    ref = torch.nn.functional.normalize(torch.stack(rows), dim=-1)
    assert cosine(got, ref).min() >= 0.9999
    np.testing.assert_allclose(got.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    raw = embedder.embed(TEXTS, normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), got, atol=1e-5, rtol=1e-5)
    assert embedder.embed("x").shape == (1, 32) and embedder.embed([]).shape == (0, 32)
    assert embedder.labels == [] and embedder.embedding_dim == 32


def test_clip_text_encoder_pooled_output():
    """The tiny preset's CLIP text tower: its pooled output (the end token's state), batched and padded."""
    scorer = Scorer.from_pretrained("tiny", "text-encoder", backend="onnxruntime", device="cpu")
    assert (scorer.task, scorer.pooling, scorer.embedding.output) == ("embed", "pooled", "pooler_output")
    comp = fastgen.load_component("tiny", "text-encoder")
    texts = TEXTS[:4]
    rows = []
    for text in texts:
        ids = comp.tokenizer(text, return_tensors="pt", truncation=True, max_length=77)["input_ids"]
        with torch.inference_mode():
            rows.append(comp.model(input_ids=ids).pooler_output[0])
    assert cosine(scorer.embed(texts, batch_size=4), torch.stack(rows)).min() >= 0.9999


def test_non_finite_rows_are_named(embedder, monkeypatch):
    run = embedder.embeddings

    def nan_for_longest(feeds, **kwargs):
        out = run(feeds, **kwargs)
        lengths = feeds["attention_mask"].sum(dim=1)
        out[lengths == lengths.max()] = float("nan")
        return out

    rows = embedder.embedding_rows(torch.tensor([[1.0, 2.0], [float("inf"), 0.0]]))
    assert isinstance(rows[1], NumericalError) and "row[1]" in str(rows[1]) and torch.equal(rows[0], torch.tensor([1.0, 2.0]))
    monkeypatch.setattr(embedder, "embeddings", nan_for_longest)
    with pytest.raises(NumericalError, match=r"texts\[1\]"):
        embedder.embed(["a", "a much longer text than the others", "b c"], batch_size=3)


def test_errors(embedder):
    with pytest.raises(InvalidArgumentError, match="normalize"):
        embedder.embed("x", normalize="yes")
    with pytest.raises(InvalidArgumentError, match="text encoder"):
        embedder.embed([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        embedder.embed("x", batch_size=0)
    classifier = Scorer.from_pretrained("tiny", "text-classifier", backend="torch", device="cpu")
    assert classifier.task == "classify"
    with pytest.raises(UnsupportedError, match="not an encoder"):
        classifier.embed("x")


@pytest.mark.parametrize(("module", "match"), [("Dense", "module Dense"), ("weightedmean", "pooling 'weightedmean'")])
def test_unsupported_sentence_transformers_layouts(tmp_path, module, match):
    from fastgen.models.assets import embedding_settings

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "1_Pooling").mkdir()
    pooling = "weightedmean" if module == "weightedmean" else "mean"
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": pooling}))
    if module == "Dense":
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedError, match=match) as err:
        embedding_settings(tmp_path)
    assert "\n" not in str(err.value)
