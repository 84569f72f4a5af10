"""Best-of-N ranked by prompt adherence (a CLIP / SigLIP scorer), and the aesthetic head as a scorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from fastgen.engines.build import build
from fastgen.errors import InvalidArgumentError
from fastgen.models import load_component
from fastgen.pipelines.scorer import Scorer
from fastgen.pipelines.similarity import AestheticHead

A, B = "a cozy coffee shop interior", "luxury watch on black marble, macro photography, dramatic shadows"
FAST = {"steps": 3, "progress": False, "seed": 20}
N = 4


@pytest.fixture(scope="module")
def gen(generator_for):
    return generator_for("tiny", "torch")


@pytest.fixture(scope="module")
def candidates(gen):
    """Every candidate of prompts A and B (prompt-major, seeds 20..23), as uint8 images."""
    return gen.generate([A, B], num_images_per_prompt=N, output_type="uint8", **FAST).images  # (2N, 64, 64, 3)


def laion_head(dim: int) -> nn.Sequential:
    """LAION's improved aesthetic predictor's layout (linear layers, dropouts between, no activations), tiny."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(dim, 24), nn.Dropout(0.2), nn.Linear(24, 8), nn.Dropout(0.1),
                             nn.Linear(8, 1)).eval()


def reference_logits(preset: str, scorer: Scorer, pil: list, texts: list[str]) -> torch.Tensor:
    """transformers' model on the same weights, its own image processor, the texts as its processor pads them."""
    model = load_component(preset, "text-tower").model
    if preset == "tiny-clip":
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        enc = scorer.text_preprocessor.tokenizer(texts, padding=True, return_tensors="pt")
        feeds = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    else:
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
        enc = scorer.text_preprocessor.tokenizer(texts, padding="max_length", max_length=24, return_tensors="pt")
        feeds = {"input_ids": enc["input_ids"]}
    with torch.no_grad():
        return model(**feeds, pixel_values=processor(images=pil, return_tensors="pt")["pixel_values"]).logits_per_image


@pytest.mark.parametrize("preset", ["tiny-clip", "tiny-siglip"])
def test_best_of_n_keeps_the_candidate_closest_to_its_prompt(gen, candidates, preset):
    scorer = Scorer.from_pretrained(preset, backend="torch", device="cpu")
    pil = [Image.fromarray(x) for x in candidates]
    logits = reference_logits(preset, scorer, pil, [A, B])  # (2N, 2)
    values = torch.sigmoid(logits) if preset == "tiny-siglip" else logits
    best = gen.generate([A, B], candidates=N, scorer=scorer, keep=2, output_type="uint8", **FAST)
    for p in range(2):
        own = values[p * N:(p + 1) * N, p]  # each candidate against its own prompt
        order = torch.argsort(-own, stable=True)[:2].tolist()
        assert best.seeds[2 * p:2 * p + 2] == [20 + j for j in order]
        np.testing.assert_array_equal(best.images[2 * p], candidates[p * N + order[0]])
        assert best.rank_values[2 * p:2 * p + 2] == pytest.approx(own[order].tolist(), rel=1e-4, abs=1e-6)
    assert all(list(s.probs) == ["similarity"] for s in best.scores)
    with pytest.raises(InvalidArgumentError, match="similarity"):
        gen.generate(A, candidates=2, scorer=scorer, rank_by="pretty", **FAST)


def test_aesthetic_head_beside_the_towers(tmp_path):
    """An engine folder of both towers with aesthetic.safetensors: the head is loaded, and scores what the
    LAION MLP gives on transformers' normalised image embedding."""
    for tower in ("text-tower", "image-tower"):
        build("tiny-clip", component=tower, backend="onnxruntime", device="cpu", out=tmp_path / tower)
    head = laion_head(16)
    save_file({f"layers.{k}": v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "aesthetic.safetensors"))
    scorer = Scorer.from_pretrained(tmp_path)
    assert scorer.labels == ["aesthetic"] and scorer.pair_labels == ["similarity", "aesthetic"]
    pil = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8)) for i in range(3)]
    model = load_component("tiny-clip", "image-tower").model
    with torch.no_grad():
        embeds = model.get_image_features(pixel_values=scorer.preprocess_images(pil)).pooler_output
        expected = head(embeds / embeds.norm(dim=-1, keepdim=True))[:, 0]
    scores = scorer.score_images(pil)
    got = torch.tensor([s.probs["aesthetic"] for s in scores])
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    pairs = scorer.score_pairs(pil, ["a", "b", "a"])
    assert [s.probs["aesthetic"] for s in pairs] == pytest.approx(got.tolist(), rel=1e-6)
    scorer.close()


def test_aesthetic_scorer_in_best_of_n(gen, candidates):
    """The image tower alone with a head (a module here) ranks best-of-N by the head's score."""
    head = nn.Linear(16, 1)
    with torch.no_grad():
        head.weight.copy_(torch.linspace(-1, 1, 16)[None])
        head.bias.fill_(5.0)
    image_tower = build("tiny-clip", component="image-tower", backend="torch", device="cpu")
    scorer = Scorer(image_tower, aesthetic=head)
    assert scorer.task == "similarity" and not scorer.needs_texts and scorer.labels == ["aesthetic"]
    values = np.array([s.probs["aesthetic"] for s in scorer.score_images([Image.fromarray(x) for x in candidates])])
    best = gen.generate([A, B], candidates=N, scorer=scorer, keep=1, output_type="uint8", **FAST)
    assert best.seeds == [20 + int(np.argmax(values[p * N:(p + 1) * N])) for p in range(2)]
    # the same head from a one-layer safetensors file (LAION's first predictor) scores the same
    file_head = AestheticHead.from_state_dict({"weight": head.weight.detach(), "bias": head.bias.detach()})
    assert Scorer(image_tower, aesthetic=file_head).score_images(Image.fromarray(candidates[0]))[0].probs[
        "aesthetic"] == pytest.approx(values[0], rel=1e-6)


def test_bad_aesthetic_heads_are_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    two = tmp_path / "two.safetensors"
    save_file({"weight": torch.zeros(2, 16)}, str(two))
    for value, needle in ((bad, "safetensors"), (two, "one output"), (3, "nn.Module")):
        with pytest.raises(InvalidArgumentError) as err:
            AestheticHead.from_file(value) if not isinstance(value, int) else Scorer.from_pretrained(
                "tiny-clip", backend="torch", aesthetic=value)
        assert needle in str(err.value) and "\n" not in str(err.value)
