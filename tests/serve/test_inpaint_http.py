"""Inpainting through ``POST /v1/images/edits`` with a ``mask`` upload, over real HTTP: the images are
the library's for the same request, an alpha mask is read as OpenAI's API reads it (transparent:
edit) and a mask without alpha as diffusers does (white: regenerate); bad masks are one-line 400s."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from fastgen.serve import ServeConfig, Service, create_app

SIZE = 64


@pytest.fixture(scope="module")
def setup(live_server, tiny_models):
    config = ServeConfig(model="tiny", max_image_pixels=128 * 128, max_images=4)
    service = Service(config, generator=tiny_models["generator"])
    server = live_server(create_app(config, service=service)).wait_ready()
    with server.client() as client:
        yield client, tiny_models["generator"]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def _inputs() -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    white = np.zeros((SIZE, SIZE), dtype=np.uint8)
    white[16:48, 8:40] = 255  # regenerate this box, keep the rest
    return image, Image.fromarray(white, mode="L")


FORM = {"prompt": "a red car", "steps": "4", "seed": "11", "strength": "0.9", "mask_blur": "2"}


def test_edits_with_a_mask_give_the_librarys_images(setup):
    client, generator = setup
    image, mask = _inputs()
    alpha = image.convert("RGBA")
    alpha.putalpha(Image.fromarray(255 - np.asarray(mask)))  # OpenAI: transparent where to edit
    files = {"image": ("in.png", _png(image), "image/png"), "mask": ("m.png", _png(alpha), "image/png")}
    r = client.post("/v1/images/edits", data=FORM, files=files)
    assert r.status_code == 200, r.text
    got = _pixels(r.json()["data"][0]["b64_json"])
    want = generator.generate("a red car", image=image, mask_image=mask, seed=11, steps=4, strength=0.9,
                              mask_blur=2, output_type="uint8", progress=False).images[0]
    assert np.abs(got - want).max() <= 1
    # The same mask without alpha (white: regenerate) is the same request.
    files["mask"] = ("m.png", _png(mask), "image/png")
    plain = client.post("/v1/images/edits", data=FORM, files=files)
    assert plain.status_code == 200, plain.text
    assert np.array_equal(_pixels(plain.json()["data"][0]["b64_json"]), got)
    # Pixels far outside the mask stay close to the input image (latent blending keeps them).
    keep = np.asarray(image, dtype=np.int16)[:, 56:]
    assert np.abs(got[:, 56:] - keep).mean() < np.abs(got[16:48, 8:40] - np.asarray(image, np.int16)[16:48, 8:40]).mean()


@pytest.mark.parametrize("mask,needle", [
    (Image.new("L", (SIZE, SIZE // 2)), "the mask must have the image's size"),
    (b"not an image", None),
])
def test_bad_masks_are_one_line_400s(setup, mask, needle):
    client, _ = setup
    image, _ = _inputs()
    data = mask if isinstance(mask, bytes) else _png(mask)
    files = {"image": ("in.png", _png(image), "image/png"), "mask": ("m.png", data, "image/png")}
    r = client.post("/v1/images/edits", data=FORM, files=files)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "mask" and "\n" not in error["message"]
    if needle:
        assert needle in error["message"]


def test_a_mask_given_as_text_is_refused(setup):
    client, _ = setup
    image, _ = _inputs()
    r = client.post("/v1/images/edits", data={**FORM, "mask": "everything"},
                    files={"image": ("in.png", _png(image), "image/png")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask"
