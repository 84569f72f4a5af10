"""Fixtures of the fault suite, and its helper modules made importable.

The suite runs with ``--import-mode=importlib`` (pyproject), which puts no test folder on ``sys.path``:
this folder is added here, so the tests import their helpers as top-level modules (``from hangs import
within``, ``pipeline_fakes``, ``runtime_fakes``), whether the whole suite or a single file runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# The fixtures import the helper modules (and fastgen) when they run, not here: a module of fastgen
# that fails to import then fails the tests that use it, not the collection of the whole suite.

# --- images and numerics: a generator and scorers on fake engines ----------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from fastgen.models.tokenizers import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture(scope="module")
def make_generator(tokenizer):
    """``make_generator(vae_nan_rows=())``: a Generator on fake engines; a prompt holding ``POISON``
    makes its UNet rows NaN, and the VAE returns NaN for the images of ``vae_nan_rows``."""
    from pipeline_fakes import POISON, SCHEDULER, TEXT_SPEC, UNET_SPEC, VAE_SPEC, FakeEngine

    from fastgen.pipelines.generator import Generator

    poison_id = tokenizer(POISON).input_ids[1]

    def text(inputs):
        ids = inputs["input_ids"]
        hidden = torch.zeros(*ids.shape, 8)
        hidden[..., 0] = (ids == poison_id).any(dim=1, keepdim=True).float()  # the poisoned rows' marker
        return {"last_hidden_state": hidden}

    def unet(inputs):
        out = 0.1 * inputs["sample"]
        out[inputs["encoder_hidden_states"][:, :, 0].amax(dim=1) > 0.5] = float("nan")
        return {"noise_pred": out}

    def make(vae_nan_rows=()):
        def vae(inputs):
            image = torch.tanh(torch.nn.functional.interpolate(inputs["latent"][:, :3], scale_factor=8))
            image[[r for r in vae_nan_rows if r < image.shape[0]]] = float("nan")
            return {"image": image}

        return Generator(unet=FakeEngine(UNET_SPEC, unet), vae_decoder=FakeEngine(VAE_SPEC, vae),
                         text_encoder=FakeEngine(TEXT_SPEC, text), tokenizer=tokenizer,
                         scheduler_config=SCHEDULER, scaling_factor=0.18215)

    return make


@pytest.fixture(scope="module")
def gen(make_generator):
    return make_generator()


@pytest.fixture(scope="module")
def image_scorer():
    from pipeline_fakes import CLASSIFIER_SPEC, FakeEngine

    from fastgen.pipelines.scorer import Scorer

    def run(inputs):
        logits = inputs["pixel_values"].mean(dim=(2, 3))  # (n, 3) of the normalised pixels
        logits[logits.mean(dim=1) < -1.0] = float("nan")  # a model that overflows on dark images
        return {"logits": logits}

    return Scorer(FakeEngine(CLASSIFIER_SPEC, run))


@pytest.fixture(scope="module")
def text_scorer(tokenizer):
    from pipeline_fakes import TEXT_CLASSIFIER_SPEC, FakeEngine

    from fastgen.pipelines.scorer import Scorer

    def run(inputs):
        length = inputs["attention_mask"].sum(1).float()
        return {"logits": torch.stack([length, torch.zeros_like(length)], 1)}

    return Scorer(FakeEngine(TEXT_CLASSIFIER_SPEC, run), tokenizer=tokenizer)


# --- the runtime: no thread may outlive a test -----------------------------------------------------


@pytest.fixture
def no_leaked_threads():
    """Threads counted before and after: none may outlive the test (shutdown joins them; a thread a
    test hung on purpose is released at its end and given a moment to return). The runtime test files
    use it for every test (``pytestmark``)."""
    from runtime_fakes import eventually, ours

    before = ours()
    yield
    eventually(lambda: not ours() - before)
