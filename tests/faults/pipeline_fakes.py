"""Shared by ``test_images.py`` and ``test_numerics.py``: small fake engines with the real specs' shapes
(arithmetic instead of models), the generation settings they run with, and the one-line refusal check.
The generator and scorer fixtures built from them are in ``conftest.py``.
"""

from __future__ import annotations

import pytest
from hangs import within

from fastgen.engines.base import Engine
from fastgen.errors import InvalidArgumentError
from fastgen.models.spec import DimRange, ExportSpec, ShapeProfile, TensorSpec

HANG_S = 10.0  # seconds any one call below may take before it counts as hung


def one_line_error(error, *needles: str) -> str:
    message = str(getattr(error, "value", error))  # a pytest ExceptionInfo or the exception
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def refused(fn, *needles: str, error: type = InvalidArgumentError, unblock=None) -> str:
    """``fn()`` raises ``error`` (without hanging) in one line holding every needle."""
    with pytest.raises(error) as info:
        within(HANG_S, fn, unblock=unblock)
    return one_line_error(info, *needles)


# --- fakes: engines with real specs, arithmetic inside --------------------------------------------

def _spec(component, inputs, outputs, **dims) -> ExportSpec:
    profile = ShapeProfile({k: DimRange(*v) for k, v in dims.items()})
    inputs, outputs = (tuple(TensorSpec(*t) for t in ts) for ts in (inputs, outputs))
    multiples = {"height": 16} if component == "unet" else {}
    return ExportSpec(component, inputs, outputs, profile, multiples=multiples)


LATENT, IDS = ("batch", 4, "height/8", "width/8"), ("input_ids", "int64", ("batch", "seq"), 0, 1000)
SIZES = {"height": (32, 32, 64), "width": (32, 32, 64)}
UNET_SPEC = _spec("unet", [("sample", "float32", LATENT), ("timestep", "float32", ("batch",), 0, 1000),
                           ("encoder_hidden_states", "float32", ("batch", "seq", 8))],
                  [("noise_pred", "float32", LATENT)], batch=(1, 2, 8), seq=(77, 77, 77), **SIZES)
TEXT_SPEC = _spec("text-encoder", [IDS], [("last_hidden_state", "float32", ("batch", "seq", 8))],
                  batch=(1, 2, 8), seq=(1, 77, 77))
VAE_SPEC = _spec("vae-decoder", [("latent", "float32", LATENT)],
                 [("image", "float32", ("batch", 3, "height", "width"))], batch=(1, 1, 8), **SIZES)
CLASSIFIER_SPEC = _spec("classifier", [("pixel_values", "float32", ("batch", 3, 16, 16))],
                        [("logits", "float32", ("batch", 3))], batch=(1, 2, 8))
MASK = ("attention_mask", "int64", ("batch", "seq"), None, None, "mask")
TEXT_CLASSIFIER_SPEC = _spec("text-classifier", [IDS, MASK], [("logits", "float32", ("batch", 2))],
                             batch=(1, 2, 8), seq=(1, 16, 64))
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear"}
POISON = "poison"  # a prompt with this word makes the fake UNet return NaN for its rows


class FakeEngine(Engine):
    backend = "fake"

    def __init__(self, spec: ExportSpec, fn) -> None:
        super().__init__(spec)
        self.fn = fn

    def _run(self, inputs):
        return self.fn(inputs)


GEN = {"steps": 2, "progress": False, "height": 32, "width": 32}  # what the fake generator runs with
