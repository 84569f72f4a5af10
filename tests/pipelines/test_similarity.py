"""Image-text similarity on two towers (CLIP, SigLIP): parity with transformers' CLIPModel / SiglipModel on the
same weights, on the torch and onnxruntime backends; zero-shot scores, embeddings, engine folders, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastgen.engines.build import build
from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.models import load_component
from fastgen.pipelines.scorer import Scorer

PRESETS = ("tiny-clip", "tiny-siglip")
# Very different lengths: one word, a sentence, one past CLIP's 77 tokens and SigLIP's 24 (truncated).
TEXTS = ["x", "a red car", "a photo of a golden retriever wearing sunglasses on a beach, funny social media ad",
         " ".join(["luxury watch on black marble"] * 30), "buy now"]
_SCORERS: dict = {}


def scorer_for(preset: str, backend: str) -> Scorer:
    if (preset, backend) not in _SCORERS:
        _SCORERS[(preset, backend)] = Scorer.from_pretrained(preset, backend=backend, device="cpu")
    return _SCORERS[(preset, backend)]


@pytest.fixture(scope="module")
def reference():
    """preset -> the transformers model (CLIPModel / SiglipModel) with the preset's weights."""
    return {p: load_component(p, "text-tower").model for p in PRESETS}


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(32, 32), (90, 40), (64, 64), (41, 41)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)]


def transformers_outputs(scorer: Scorer, model, imgs, texts):
    """CLIPModel / SiglipModel on the scorer's pixels and on the texts tokenized as its processor does (CLIP:
    padded to the longest, with the mask; SigLIP: padded to the fixed length, no mask)."""
    prep = scorer.text_preprocessor
    siglip = scorer.family == "siglip"
    enc = prep.tokenizer(texts, padding="max_length" if siglip else True, truncation=True,
                         max_length=prep.max_length, return_tensors="pt")
    feeds = {"input_ids": enc["input_ids"]} if siglip else {"input_ids": enc["input_ids"],
                                                            "attention_mask": enc["attention_mask"]}
    pixels = scorer.preprocess_images(imgs)
    with torch.no_grad():
        out = model(**feeds, pixel_values=pixels)
        text = model.get_text_features(**feeds).pooler_output
        image = model.get_image_features(pixel_values=pixels).pooler_output
    return out, text, image


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min())


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("n_images", [1, 3])
def test_similarity_and_embeddings_match_transformers(reference, preset, backend, n_images):
    scorer = scorer_for(preset, backend)
    imgs = images(n_images)
    out, text_ref, image_ref = transformers_outputs(scorer, reference[preset], imgs, TEXTS)
    logits = scorer.similarity(imgs, TEXTS, logits=True)
    assert logits.shape == (n_images, len(TEXTS)) and logits.dtype == torch.float32
    assert rel_err(logits, out.logits_per_image) <= 1e-4
    assert min_cosine(logits.reshape(1, -1), out.logits_per_image.reshape(1, -1)) >= 0.9999
    probs = scorer.similarity(imgs, TEXTS)
    expected = torch.sigmoid(out.logits_per_image) if preset == "tiny-siglip" else out.logits_per_image
    assert rel_err(probs, expected) <= 1e-4
    # tower embeddings: projected and unnormalised (get_*_features), normalised = the model's *_embeds
    text = scorer.embed(TEXTS)
    image = scorer.embed(imgs)
    assert text.shape == text_ref.shape and image.shape == image_ref.shape
    assert min_cosine(text, text_ref) >= 0.9999 and rel_err(text, text_ref) <= 1e-4
    assert min_cosine(image, image_ref) >= 0.9999 and rel_err(image, image_ref) <= 1e-4
    assert min_cosine(scorer.embed(TEXTS, normalize=True), out.text_embeds) >= 0.9999
    assert rel_err(scorer.embed(imgs, normalize=True), out.image_embeds) <= 1e-4


@pytest.mark.parametrize("preset", PRESETS)
def test_texts_embed_as_alone_whatever_the_batch(preset):
    scorer = scorer_for(preset, "onnxruntime")
    together = scorer.embed_texts(TEXTS, batch_size=2)
    alone = torch.cat([scorer.embed_texts(t) for t in TEXTS])
    assert rel_err(together, alone) <= 1e-5
    assert scorer.embed_texts([]).shape == (0, together.shape[1])


@pytest.mark.parametrize("preset", PRESETS)
def test_zero_shot_scores_over_texts(reference, preset):
    scorer = scorer_for(preset, "torch")
    imgs = images(3, seed=2)
    out, _, _ = transformers_outputs(scorer, reference[preset], imgs, TEXTS)
    scores = scorer.score_images(imgs, texts=TEXTS)
    probs = torch.tensor([[s.probs[t] for t in TEXTS] for s in scores])
    expected = (torch.sigmoid(out.logits_per_image) if preset == "tiny-siglip"
                else out.logits_per_image.softmax(dim=1))  # CLIP's zero-shot probabilities
    assert rel_err(probs, expected) <= 1e-4
    assert rel_err(torch.tensor([s.logits for s in scores]), out.logits_per_image) <= 1e-4
    assert all(s.top[0][1] == max(s.probs.values()) for s in scores)


@pytest.mark.parametrize("preset", PRESETS)
def test_score_pairs_is_each_image_against_its_own_text(preset):
    scorer = scorer_for(preset, "torch")
    imgs = images(4, seed=3)
    texts = [TEXTS[1], TEXTS[2], TEXTS[1], TEXTS[0]]
    matrix = scorer.similarity(imgs, texts)
    pairs = scorer.score_pairs(imgs, texts)
    # the matrix's diagonal (up to float rounding: the unique texts are embedded in a smaller batch)
    assert [s.probs["similarity"] for s in pairs] == pytest.approx([float(matrix[i, i]) for i in range(4)], rel=1e-6)
    assert scorer.needs_texts and scorer.pair_labels == ["similarity"]


def test_engine_folder_of_both_towers(tmp_path):
    for tower in ("text-tower", "image-tower"):
        build("tiny-siglip", component=tower, backend="onnxruntime", device="cpu", out=tmp_path / tower)
    loaded = Scorer.from_pretrained(tmp_path)
    built = scorer_for("tiny-siglip", "onnxruntime")
    assert loaded.task == "similarity" and loaded.family == "siglip" and loaded.logit_bias == built.logit_bias
    imgs = images(3)
    assert rel_err(loaded.similarity(imgs, TEXTS, logits=True), built.similarity(imgs, TEXTS, logits=True)) <= 1e-6
    loaded.close()


def test_preprocessing_matches_the_image_processors():
    import transformers

    # Sizes whose resize both round alike (a landscape 37x53 differs by one column: see the report).
    imgs = [images(1)[0], Image.fromarray(np.asarray(images(2)[1]))]
    clip = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    siglip = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    for preset, processor in (("tiny-clip", clip), ("tiny-siglip", siglip)):
        ours = scorer_for(preset, "torch").preprocess_images(imgs)
        ref = processor(images=imgs, return_tensors="pt")["pixel_values"]
        assert rel_err(ours, ref) <= 1e-5, preset


def test_errors_are_one_line():
    scorer = scorer_for("tiny-clip", "torch")
    cases = [(lambda: scorer.score_pairs(images(2), ["a"]), "one per image"),
             (lambda: scorer.score_images(images(1), texts=["a", "a"]), "distinct"),
             (lambda: scorer.similarity(images(1), [3]), "texts"),
             (lambda: scorer.tower_embeddings({}, "audio"), "image, text")]
    for call, needle in cases:
        with pytest.raises(InvalidArgumentError) as err:
            call()
        assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UnsupportedError, match="no aesthetic head"):
        scorer.score_images(images(1))
    with pytest.raises(InvalidArgumentError, match="only a two-tower"):
        Scorer.from_pretrained("tiny", backend="torch").score_images(images(1), texts=["a"])
    lone = Scorer(scorer.engine)  # the image tower alone embeds (no text tower, no head)
    assert lone.task != "similarity"
    with pytest.raises(InvalidArgumentError, match="text tower"):
        Scorer(scorer.engine, text_engine="not an engine")


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_local_folder_scorer_matches_transformers(tmp_path, family):
    """A save_pretrained folder (model, tokenizer, image processor) with its own scale and bias."""
    import transformers

    from fastgen.models.adapters_clip import preset_tokenizer
    from fastgen.models.presets import preset_config

    _, cls_name, config = preset_config(f"tiny-{family}", "text-tower")
    cls = getattr(transformers, cls_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = cls(cls.config_class.from_dict(config)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.0)
        if family == "siglip":
            model.logit_bias.fill_(-6.0)
    model.save_pretrained(tmp_path)
    preset_tokenizer(family, config["text_config"]).save_pretrained(tmp_path)
    processor = (transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
                 if family == "clip" else transformers.SiglipImageProcessor(size={"height": 32, "width": 32}))
    processor.save_pretrained(tmp_path)
    scorer = Scorer.from_pretrained(tmp_path, backend="torch", device="cpu")
    assert scorer.family == family and scorer.logit_scale == float(torch.tensor(4.0).exp())
    imgs = images(3, seed=5)
    out, _, _ = transformers_outputs(scorer, model, imgs, TEXTS)
    assert rel_err(scorer.similarity(imgs, TEXTS, logits=True), out.logits_per_image) <= 1e-4


@pytest.mark.parametrize("preset", PRESETS)
def test_a_lone_tower_embeds_as_the_two_tower_scorer(preset):
    """Each tower alone is an encoder (task embed, EmbeddingMethods), with the same embeddings."""
    both = scorer_for(preset, "onnxruntime")
    text_only, image_only = Scorer(both.text_engine), Scorer(both.engine)
    assert text_only.task == image_only.task == "embed"
    imgs = images(3)
    assert rel_err(text_only.embed(TEXTS), both.embed(TEXTS)) <= 1e-6
    assert rel_err(image_only.embed(imgs), both.embed(imgs)) <= 1e-6


def test_text_batch_size_is_checked_against_the_text_towers_profile(tmp_path):
    import fastgen
    from fastgen.errors import InvalidArgumentError

    scorer = fastgen.Scorer.from_pretrained("tiny-clip", backend="torch", device="cpu",
                                            cache=fastgen.EngineCache(tmp_path / "cache"))
    top = scorer._text_max_batch
    assert len(scorer.embed_texts(["a cat", "a dog"], batch_size=1)) == 2
    with pytest.raises(InvalidArgumentError, match="text tower's batch profile"):
        scorer.embed_texts(["a cat"], batch_size=top + 1)


def test_a_zero_embedding_normalises_to_zeros_not_nan():
    from fastgen.pipelines import embeddings, similarity

    assert similarity.l2_normalize is embeddings.l2_normalize  # one normaliser for embeddings and towers
    out = similarity.l2_normalize(torch.zeros(2, 4))
    assert torch.equal(out, torch.zeros(2, 4)) and not out.isnan().any()
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.equal(similarity.l2_normalize(x)[0], x[0] / x[0].norm())  # transformers' x / ||x|| otherwise
    logits = similarity.similarity_logits(torch.zeros(1, 4), torch.ones(2, 4), 10.0, -1.0)
    assert torch.equal(logits, torch.full((1, 2), -1.0))  # a zero image is at cosine 0 from every text, not NaN
