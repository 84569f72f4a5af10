"""``Scorer.embed`` against sentence-transformers and transformers on the same weights.

Sentence-transformers models are built in-process (a random BERT saved with a generated WordPiece
tokenizer, then Transformer + Pooling (+ Normalize) saved as a sentence-transformers folder, in its
current layout and in the legacy ``0_Transformer/`` one), and the same folder is loaded by fastgen
(torch and onnxruntime engines). Texts of very different token counts (2 to 257, one truncated) are
embedded in one call, batched by length and padded; every row must have a cosine >= 0.9999 with
sentence-transformers' own embedding of it. Image encoders are compared with transformers' ViTModel
(CLS token and pooled output) on the same pixels.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import fastgen
from fastgen.models import tokenizers
from fastgen.pipelines.embeddings import EmbeddingSettings
from fastgen.pipelines.scorer import Scorer

pytest.importorskip("sentence_transformers")

COSINE = 0.9999
HIDDEN = 32
MAX_SEQ = 300
WORDS = [w for w in tokenizers.bert_vocab(1000)[5:] if w.isalpha() and len(w) > 2][:40]


def cosine(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, dim) batches, in float64: (n,)."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a64 * b64).sum(-1) / np.maximum(np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1), 1e-300)


def words(n: int, offset: int = 0) -> str:
    """A text of exactly ``n`` WordPiece tokens (each word is one token of the generated vocabulary)."""
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


# Token counts with [CLS] and [SEP]: 2, 3, 77, 113, 257, 13, 5, and one truncated at MAX_SEQ.
TEXTS = [words(0), words(1), words(75, 3), words(111, 7), words(255, 1), words(11, 2), words(3, 9),
         words(400, 5)]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A random BertModel (weights widened so pooling mistakes show) with a generated tokenizer."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert")
    config = BertConfig(vocab_size=1000, hidden_size=HIDDEN, intermediate_size=37, num_attention_heads=2,
                        num_hidden_layers=2, max_position_embeddings=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config).eval()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(folder)
    tokenizers.bert_tokenizer(1000, 512).save_pretrained(folder)
    return folder


def st_folder(bert_folder, root, pooling: str, normalize: bool, legacy: bool):
    """Save a sentence-transformers model over the BERT; ``legacy``: rewrite it in the pre-v5 layout
    (``0_Transformer/``, boolean ``pooling_mode_*`` keys, ``sentence_bert_config.json``'s max_seq_length)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    folder = root / f"st-{pooling}-{int(normalize)}-{int(legacy)}"
    modules = [Transformer(str(bert_folder), max_seq_length=MAX_SEQ), Pooling(HIDDEN, pooling)]
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    if legacy:
        inner = folder / "0_Transformer"
        inner.mkdir()
        for f in list(folder.iterdir()):
            if f.is_file() and f.name not in ("modules.json", "README.md", "config_sentence_transformers.json"):
                shutil.move(str(f), inner / f.name)
        (inner / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_SEQ,
                                                                     "do_lower_case": False}))
        mods = json.loads((folder / "modules.json").read_text())
        mods[0].update(path="0_Transformer", type="sentence_transformers.models.Transformer")
        for m in mods[1:]:
            m["type"] = "sentence_transformers.models." + m["type"].rsplit(".", 1)[-1]
        (folder / "modules.json").write_text(json.dumps(mods))
        legacy_pool = {"word_embedding_dimension": HIDDEN, **{f"pooling_mode_{k}": k2 == pooling for k, k2 in (
            ("cls_token", "cls"), ("mean_tokens", "mean"), ("max_tokens", "max"), ("mean_sqrt_len_tokens",
                                                                                     "mean_sqrt_len_tokens"),
            ("lasttoken", "lasttoken"))}}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(legacy_pool))
    return folder


def reference(folder, texts) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    return model.encode(texts, convert_to_numpy=True, batch_size=4)


@pytest.mark.parametrize(("pooling", "normalize", "legacy", "backend"), [
    ("mean", True, False, "onnxruntime"),
    ("mean", True, True, "torch"),
    ("cls", False, False, "torch"),
    ("cls", False, True, "onnxruntime"),
    ("lasttoken", False, False, "onnxruntime"),
    ("max", True, False, "torch"),
    ("mean_sqrt_len_tokens", False, True, "torch"),
])
def test_text_embeddings_match_sentence_transformers(bert_folder, tmp_path, pooling, normalize, legacy,
                                                     backend):
    folder = st_folder(bert_folder, tmp_path, pooling, normalize, legacy)
    ref = reference(folder, TEXTS)
    scorer = Scorer.from_pretrained(folder, "text-encoder", backend=backend, device="cpu", batch_size=3)
    assert scorer.task == "embed" and scorer.pooling == pooling and scorer.max_length == MAX_SEQ
    assert scorer.embedding.normalize is normalize
    lengths = scorer.text_preprocessor.lengths(TEXTS)
    assert lengths == [2, 3, 77, 113, 257, 13, 5, MAX_SEQ]
    got = scorer.embed(TEXTS)
    assert got.shape == (len(TEXTS), HIDDEN) and got.dtype == torch.float32
    cos = cosine(got, ref)
    assert cos.min() >= COSINE, cos
    if normalize:
        np.testing.assert_allclose(got.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    # Batched by length equals each text alone, and forcing normalisation equals normalising.
    alone = torch.cat([scorer.embed(t) for t in TEXTS])
    assert cosine(got, alone).min() >= 1 - 1e-6
    forced = scorer.embed(TEXTS[:3], normalize=True)
    torch.testing.assert_close(forced, torch.nn.functional.normalize(got[:3], dim=-1), atol=1e-5, rtol=1e-5)


def test_engine_directory_keeps_the_pooling(bert_folder, tmp_path):
    """`fastgen build <st-folder> --component text-encoder --out DIR`, then the engine alone embeds."""
    from click.testing import CliRunner

    from fastgen.cli.main import cli

    folder = st_folder(bert_folder, tmp_path, "cls", True, True)
    out = tmp_path / "engine"
    result = CliRunner().invoke(cli, ["build", str(folder), "--component", "text-encoder", "--backend", "onnxruntime",
                                      "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    shutil.rmtree(folder)  # nothing but the engine directory from here on
    scorer = Scorer.from_pretrained(out)
    assert (scorer.task, scorer.pooling, scorer.embedding.normalize, scorer.max_length) == ("embed", "cls", True, MAX_SEQ)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metadata"]["fields"] == {"pooling": "cls", "normalize": True, "max_length": MAX_SEQ}
    got = scorer.embed(TEXTS[:4])
    np.testing.assert_allclose(got.norm(dim=-1).numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_image_embeddings_match_transformers(backend, tmp_path):
    """A ViT saved with save_pretrained: CLS pooling by default (its pooler is a classification head), and
    the pooled output, CLS and mean pooling of the same engine against transformers."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, image_size=40, patch_size=8, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=37)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = ViTModel(config).eval()
    model.save_pretrained(tmp_path / "vit")
    scorer = Scorer.from_pretrained(tmp_path / "vit", "image-encoder", backend=backend, device="cpu")
    assert (scorer.task, scorer.kind, scorer.pooling, scorer.image_size) == ("embed", "image", "cls", (40, 40))
    assert scorer.engine.spec.output_names == ["last_hidden_state", "pooler_output"]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 40), (77, 113), (257, 1), (40, 40),
                                                                         (5, 9))]
    pixels = scorer.image_preprocessor(images)  # (5, 3, 40, 40), what the engine is fed
    with torch.inference_mode():
        out = model(pixel_values=pixels)
    assert cosine(scorer.embed(images, batch_size=2), out.last_hidden_state[:, 0]).min() >= COSINE
    # The same engine with the other poolings an image encoder's metadata may name.
    for pooling, ref in (("pooled", out.pooler_output), ("mean", out.last_hidden_state.mean(dim=1))):
        output = "pooler_output" if pooling == "pooled" else "last_hidden_state"
        scorer.embedding = EmbeddingSettings(output=output, pooling=pooling, dim=32)
        got = scorer.embed(images, normalize=True)
        assert cosine(got, ref).min() >= COSINE
        np.testing.assert_allclose(got.norm(dim=-1).numpy(), 1.0, atol=1e-5)


def test_preset_image_encoder_cls():
    scorer = Scorer.from_pretrained("tiny-embed", "image-encoder", backend="torch", device="cpu")
    model = fastgen.load_component("tiny-embed", "image-encoder").model
    images = [np.full((32, 32, 3), v, dtype=np.uint8) for v in (0, 90, 255)]
    with torch.inference_mode():
        ref = model(pixel_values=scorer.image_preprocessor(images)).last_hidden_state[:, 0]
    assert scorer.pooling == "cls" and cosine(scorer.embed(images), ref).min() >= COSINE
