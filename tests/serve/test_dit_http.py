"""A diffusion transformer served over real HTTP: ``fastgen serve tiny-flux`` answers generations with the
library's images, takes FLUX's ``true_cfg_scale`` and the T5 ``max_sequence_length`` as JSON fields, and
reports the family's default guidance; a bad value is a one-line 400 naming the field."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from fastgen.serve import ServeConfig, Service, create_app

_GENERATORS: dict = {}


@pytest.fixture(scope="module")
def setup(live_server):
    from fastgen.engines.config import BuildConfig
    from fastgen.export.config import ExportConfig
    from fastgen.pipelines.generator import Generator

    if "flux" not in _GENERATORS:
        _GENERATORS["flux"] = Generator.from_pretrained("tiny-flux", backend="torch", device="cpu",
                                                        build_config=BuildConfig(export=ExportConfig(verify="opt")))
    config = ServeConfig(model="tiny-flux", max_image_pixels=128 * 128, max_images=4)
    service = Service(config, generator=_GENERATORS["flux"])
    server = live_server(create_app(config, service=service)).wait_ready()
    with server.client() as client:
        yield client, _GENERATORS["flux"]


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("fields", [{}, {"true_cfg_scale": 2.5, "negative_prompt": "blurry", "max_sequence_length": 32}])
def test_flux_generation_over_http_is_the_librarys(setup, fields):
    client, generator = setup
    body = {"prompt": "a running shoe on a beach", "steps": 3, "seed": 5, "size": "64x48", **fields}
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["seed"] for d in data] == [5]
    ours = _pixels(data[0]["b64_json"])
    expected = generator.generate(body["prompt"], steps=3, seed=5, height=48, width=64, progress=False,
                                  **{k: v for k, v in fields.items()}).images[0]
    ref = np.asarray(expected.convert("RGB"), dtype=np.int16)
    assert ours.shape == ref.shape == (48, 64, 3)
    assert np.abs(ours - ref).max() <= 1  # PNG round trip of the same pixels; one level for torch's thread timing


def test_flux_fields_are_checked(setup):
    client, _ = setup
    response = client.post("/v1/images/generations", json={"prompt": "x", "steps": 2, "max_sequence_length": 513})
    assert response.status_code == 400
    assert "max-sequence-length 513" in response.json()["error"]["message"]
